"""The core client: the per-process runtime of every owner (a driver, or a worker running nested tasks).

Owns the table of objects this process created (and copies of borrowed ones),
the submitter with its worker leases, and the connections to the head, node
agents and leased workers.  All sockets live on one daemon I/O thread; user
threads hand work over with ``EventLoop.call_soon`` and wait on events::

    user threads: remote() --pickle args--> call_soon(_submit) --+
                  get()/wait() <--Event-- entry completed <--+    |
                                                              |    v
    I/O thread:  deps ready -> queue per resource shape -> lease -> ExecuteTask -> worker
                 TaskFinished / WorkerExited / lease replies <-- sockets (agents, workers, head)

Results stay pickled until the thread that calls ``get`` unpickles them.  User
callbacks (``ObjectRef.future()`` completions) run on one callback thread,
never on the I/O thread.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import logging
import os
import pickle
import queue
import sys
import threading
import time
import warnings
from collections import deque

from farpool import exceptions as exc_mod
from farpool._private import context as context_mod
from farpool._private import log_repeats, protocol, scheduling, segments, session, transport, versions
from farpool._private.actor_calls import ActorCalls, ActorQueue
from farpool._private.object_ref import ObjectRef, _nested_refs, arriving, collecting
from farpool._private.refs import FAILED, PENDING, READY, Entry, Location, RefTable
from farpool._private.task_queues import (KeyQueue, LeaseState, RemoteFunctionInfo, TaskQueues, TaskRecord,
                                          TaskState)
from farpool._private.protocol import encode

log = logging.getLogger("farpool.client")

# An idle lease is kept this long before it is returned to the agent: a
# sequential submit/get loop reuses its worker without a lease round trip,
# while another owner waits at most this long for the worker.
LEASE_LINGER_S = 0.05
# How long shutdown waits for the callback thread to finish what arrived before it (worker
# output, future callbacks): longer delivers more of a flood of output, shorter bounds
# shutdown when a user callback blocks.
CALLBACKS_AT_SHUTDOWN_S = 5.0
# Finished tasks remembered for farpool.timeline(); more costs memory, fewer
# shows less history.
TIMELINE_EVENTS = 100_000

# The answer of a request that nobody will answer: the client broke while it waited (_break).
_BROKEN = object()


class AgentConn:
    """A connection to a node agent (ipc on this machine, CURVE TCP elsewhere)."""

    def __init__(self, client: "CoreClient", node_id: str, socket, local: bool, address: str = ""):
        self.client = client
        self.node_id = node_id
        self.socket = socket
        self.local = local
        self.address = address
        self.hello_timer = None  # opened without waiting: gives up unless the agent answers in time


class DirectChannel:
    """A Unix stream straight to a leased worker on this machine (see transport.StreamChannel)."""

    def __init__(self, stream: transport.StreamChannel, doorbell: str | None = None):
        self.stream = stream
        self.doorbell = doorbell  # the worker's datagram socket for TakeBack (answered mid-task)

    def send(self, frames) -> bool:
        return self.stream.send(frames)


class RelayChannel:
    """Tasks for a worker on another machine, relayed by its node agent."""

    def __init__(self, agent: AgentConn, worker_id: str):
        self.agent = agent
        self.prefix = [b"Relay", worker_id.encode()]

    def send(self, frames) -> bool:
        return transport.send(self.agent.socket, self.prefix + frames)


class CoreClient:
    """See the module docstring.  Created by ``api.init``; one per process."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.client_id = os.urandom(8)
        self.identity = b"c:" + self.client_id.hex().encode()
        self.job_id = cfg.get("job_id")
        self.token = cfg.get("token")
        self.session_dir = cfg.get("session_dir")
        self.in_worker = cfg.get("in_worker", False)
        self.worker_id = cfg.get("worker_id")
        self.embedded = cfg.get("embedded", False)
        self.refs = RefTable(self.identity, self.in_worker)
        self.add_local_ref = self.refs.add_ref  # what ObjectRef calls as it is made (on the task path)
        # The table's lock and objects, under the names the rest of the client uses.
        self.lock = self.refs.lock
        self.objects: dict[bytes, Entry] = self.refs.objects
        self._release_scheduled = False
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.loop = transport.EventLoop()
        self.queues = TaskQueues(self.lock)
        self.tasks: dict[bytes, TaskRecord] = self.queues.tasks  # submitted and not done
        self.actor_calls = ActorCalls()
        self.agents: dict[str, AgentConn] = {}
        self.unreachable: dict[str, str] = {}  # node id -> why its agent could not be reached
        self.nodes: list[dict] = []
        self.pending_requests: dict[int, object] = {}
        self._waiting_requests: dict[int, list] = {}  # slots of _request callers waiting (any thread)
        self.borrow_requests: dict[bytes, list] = {}
        self.owner_conns: dict[str, object] = {}    # ipc endpoint -> DEALER, to owners on our node
        self.remote_fetches: dict[bytes, tuple] = {}  # object id -> owner, asked through its agent
        self.local_fetches: dict[bytes, tuple] = {}   # object id -> owner on this node, asked by ipc
        self.owner_pidfds: dict[bytes, int] = {}      # owner identity -> pidfd (owners on this node)
        self.worker_channels: dict[str, DirectChannel] = {}  # worker ipc address -> channel
        self.timeline_events: deque = deque(maxlen=TIMELINE_EVENTS)
        self.children: dict[str, list] = {}  # in a worker: task id (hex) -> tasks it submitted
        self.pools: dict[str, dict] = {}     # pool_key -> {"initializer", "initargs", "max_tasks"}
        self.actor_method_infos: dict = {}
        self.actor_arg_pins: dict[str, list] = {}  # actor id -> ids in its constructor's arguments
        self.borrower_fds: dict[bytes, int] = {}  # owner: pidfds of borrowers on our node (refs.watches)
        self._free_scheduled = False
        self.callback_queue: queue.Queue | None = None
        self.callback_thread: threading.Thread | None = None
        self.broken: BaseException | None = None
        self.owner_address = None
        self.peer_address = None
        self.home: AgentConn | None = None
        self.head = None
        self._thread: threading.Thread | None = None
        self._dispatch_scheduled = False
        self._dirty_keys: set = set()
        self._dirty_actors: set = set()
        self._doorbell_sock = None  # datagrams to workers' doorbells (TakeBack), made on first use
        self.job_setup = cfg.get("job_setup") or {}
        self.blocked_depth = 0
        self._peer_tables()

    # ------------------------------------------------------------------ start/stop
    def connect(self) -> dict:
        """Connect to the head and the home node agent (on the calling thread), then start I/O."""
        cfg = self.cfg
        self.head = transport.dealer(self.identity)
        hello = encode("Hello", ("driver" if not self.in_worker else "worker",
                                 {"pid": os.getpid(), "client": self.identity, "versions": versions.ours()}))
        if cfg["head_address"].startswith("ipc://"):
            self.head.connect(cfg["head_address"])
            transport.send(self.head, hello)
            reply = self._wait_reply(self.head, "the head", cfg.get("start_deadline_s", 30))
        else:
            reply = transport.connect_tcp(self.head, cfg["head_address"], self.token, hello)
        tag, fields, _ = protocol.decode(reply)
        if tag == "Error" and fields[0] == "version-mismatch":
            raise ConnectionError(f"the head refused this program: {fields[1]}")
        if tag != "Welcome":
            raise ConnectionError(f"unexpected answer from the head: {tag}")
        welcome = fields[0]
        why = versions.mismatch(welcome.get("versions"), f"the head at {cfg['head_address']}", "this program")
        if why is not None:
            raise ConnectionError(why)
        if self.job_id is None:
            self.job_id = welcome["job_id"]
        self.nodes = welcome["nodes"]
        self.cluster_embedded = welcome["embedded"]
        self.head_address = welcome.get("address")
        # The home agent: ours on this machine, else the head node's over TCP.
        home_info = cfg.get("agent_address")
        node_id = cfg.get("node_id")
        node = self._wait_for_node(welcome)  # the cluster is usable once a node has registered
        if home_info is None:
            node_id = node["node_id"]
            if cfg.get("local") and node.get("ipc"):
                home_info = node["ipc"]
            else:
                home_info = node["tcp"]
        self.home = self._open_agent(node_id, home_info)
        home_node = next((n for n in self.nodes if n["node_id"] == node_id), {})
        if home_node.get("store_in_shm") is False and not self.in_worker and self.home.local:
            warnings.warn(
                f"the object store of this node ({node_id[:8]}) lives on disk in {home_node.get('store_dir')}, "
                "not in shared memory: /dev/shm has less free space than object_store_memory. Large "
                "objects are slower to write and read. Give the container a larger /dev/shm "
                "(docker run --shm-size=...), or lower object_store_memory.", RuntimeWarning, stacklevel=3)
        # (identity, node, ipc endpoint, pid): how refs name their owner and borrowers name themselves
        self.owner_address = (self.identity, node_id, self._owner_endpoint(), os.getpid())
        self.peer_address = self.refs.peer_address = self.owner_address
        self.head_socket_handler = self._on_head
        self.loop.add_reader(self.head, self._on_head)
        for pid, what in cfg.get("watch_pids", ()):
            # The embedded head and node agent: if one dies, fail everything at once, no hang.
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            self.loop.add_reader(fd, lambda fd=fd, pid=pid, what=what: self._runtime_died(fd, pid, what))
        self._thread = threading.Thread(target=self._run, name="farpool-io", daemon=True)
        self._thread.start()
        return welcome

    def _wait_for_node(self, welcome) -> dict:
        nodes = [n for n in welcome["nodes"] if n.get("alive")]
        if nodes:
            return next((n for n in nodes if n.get("is_head_node")), nodes[0])
        # The embedded head is up before its node agent registers: wait for the table.
        deadline = time.monotonic() + self.cfg.get("start_deadline_s", 30)
        while time.monotonic() < deadline:
            if not self.head.poll(max(1, (deadline - time.monotonic()) * 1000)):
                break
            tag, fields, _ = protocol.decode(self.head.recv_multipart())
            if tag == "NodeTable":
                nodes = [n for n in fields[0] if n.get("alive")]
                self.nodes = fields[0]
                if nodes:
                    return next((n for n in nodes if n.get("is_head_node")), nodes[0])
        raise ConnectionError("the cluster has no live node agent (none registered with the head in time); "
                              f"see the logs in {self.session_dir}")

    def _wait_reply(self, sock, what: str, deadline_s: float) -> list:
        if not sock.poll(deadline_s * 1000):
            raise ConnectionError(f"{what} did not answer within {deadline_s:.0f} s; "
                                  f"see the logs in {self.session_dir}")
        return sock.recv_multipart()

    def _agent_hello(self) -> list:
        # The pid lets an agent on our machine (same pid_space) treat our death as our Goodbye.
        return encode("Hello", ("client", {"job_id": self.job_id, "worker_id": self.worker_id,
                                           "node_id": self.cfg.get("node_id"),
                                           "log_to_driver": self.cfg.get("log_to_driver", False),
                                           "pid": os.getpid(), "pid_space": session.pid_space(),
                                           "driver": not self.in_worker}))

    def _open_agent(self, node_id: str, address: str) -> AgentConn:
        sock = transport.dealer(self.identity)
        hello = self._agent_hello()
        if address.startswith("ipc://"):
            sock.connect(address)
            transport.send(sock, hello)
            local = True
        else:
            transport.connect_tcp(sock, address, self.token, hello)  # its Welcome carries nothing we need
            local = False
        conn = AgentConn(self, node_id, sock, local)
        self.agents[node_id] = conn
        self.loop.add_reader(sock, lambda: self._on_agent(conn))
        return conn

    def _owner_endpoint(self):
        """An ipc ROUTER where borrowers on our node ask us for values (None: none; they ask
        through our home agent)."""
        if not self.session_dir or not os.path.isdir(self.session_dir):
            return None
        if not self.home.local:
            # Our home agent is reached over TCP: we may run on another machine than its
            # node, where no process could open an ipc path of ours.
            return None
        self.owner_socket = transport.router()
        path = session.ipc(self.session_dir, f"o-{self.client_id.hex()}")
        self.owner_socket.bind(path)
        self.loop.add_reader(self.owner_socket, self._on_owner_socket)
        return path

    def _runtime_died(self, fd: int, pid: int, what: str) -> None:
        self.loop.remove_reader(fd)
        os.close(fd)
        # The session directory goes at shutdown: the logs go where they outlive it.
        kept = session.keep_logs(self.session_dir) if self.session_dir else ""
        log_file = os.path.join(kept, "head.log" if what == "head" else "node.log")
        tail = ""
        try:
            with open(log_file) as f:
                tail = "".join(f.readlines()[-8:])
        except OSError:
            pass
        self._break(exc_mod.FarpoolError(
            f"the embedded cluster's {what} (pid {pid}) exited unexpectedly; everything pending fails. "
            f"Call farpool.shutdown() and init() again. Its logs are kept in {kept}; the last lines of "
            f"{log_file}:\n{tail}"))

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: BLE001 - a dead I/O thread must fail every waiter
            log.exception("the farpool I/O thread failed")
            self._break(exc_mod.FarpoolError(f"the farpool client's I/O thread failed: {exc!r}"))
        finally:
            self._close_sockets()

    def _close_sockets(self) -> None:
        for conn in self.agents.values():
            conn.socket.close(0)
        for channel in self.worker_channels.values():
            channel.stream.close()
        for sock in self.owner_conns.values():
            sock.close(0)
        if getattr(self, "owner_socket", None) is not None:
            self.owner_socket.close(0)
            try:
                os.unlink(self.owner_address[2][len("ipc://"):])
            except (OSError, TypeError):
                pass
        if self.head is not None:
            self.head.close(0)
        for fd in self.borrower_fds.values():
            os.close(fd)
        for fd in self.owner_pidfds.values():
            os.close(fd)
        if self._doorbell_sock is not None:
            self._doorbell_sock.close()
        segments.clear_written()  # the session's segments go away: do not keep their memory mapped
        self.loop.close()

    def close_unstarted(self) -> None:
        """Release the sockets of a client whose connect() failed."""
        if self._thread is None:
            self._close_sockets()

    def shutdown(self) -> None:
        """Say goodbye, stop the I/O thread and fail whatever still waits."""
        if self._thread is None:
            return
        if not self._thread.is_alive():  # the I/O thread died: nothing to say goodbye with
            self._thread = None
            self._break(exc_mod.FarpoolError("farpool was shut down while this was pending"))
            return

        def bye():
            for conn in self.agents.values():
                transport.send(conn.socket, encode("Goodbye", ("driver" if not self.in_worker else "worker",
                                                              self.job_id if not self.in_worker else None)))
            transport.send(self.head, encode("Goodbye", ("driver", self.identity.decode())))
            self.loop.stop()
        try:
            self.loop.call_soon(bye)
        except OSError:  # the I/O thread ended (and closed its loop) since we looked
            pass
        self._thread.join(timeout=10)
        self._thread = None
        self._break(exc_mod.FarpoolError("farpool was shut down while this was pending"))
        if self.callback_queue is not None:
            self.callback_queue.put(None)
            # Worker output and callbacks that arrived before shutdown run before it returns
            # (bounded: a callback that blocks does not hold shutdown up for long).
            if self.callback_thread is not None and self.callback_thread is not threading.current_thread():
                self.callback_thread.join(timeout=CALLBACKS_AT_SHUTDOWN_S)

    def _break(self, error: BaseException) -> None:
        """Fail every pending object and request with ``error`` (the cluster is gone)."""
        self.broken = error
        for slot in list(self._waiting_requests.values()):
            if len(slot) == 1:  # not answered yet
                slot.append(_BROKEN)
            slot[0].set()
        with self.lock:
            pending = [(oid, e) for oid, e in self.objects.items() if e.state == PENDING]
            for _, entry in pending:
                entry.state = FAILED
                entry.error = error
        for _, entry in pending:
            self._fire(entry)

    # ------------------------------------------------------------------ refs
    def new_object_id(self) -> bytes:
        return self.client_id + next(self._ids).to_bytes(8, "little")

    def release_ref(self, object_id: bytes) -> None:
        """May run in __del__ on any thread, at any point: see RefTable.release.  Whatever the
        deletion must tell others (frees, borrow releases) leaves from the I/O thread."""
        if self.refs.release(object_id):
            if not self._release_scheduled:
                self._release_scheduled = True
                self.loop.call_soon(self._drain_released)
        elif self.refs.has_output():
            self._schedule_frees()

    def pin_quietly(self, refs: list) -> None:
        """Refs handed on where no borrower protocol reaches (results, actor arguments): keep them."""
        self.refs.pin_quietly([ref._id for ref in refs])

    def mark_registered(self, refs: list, caller: tuple | None = None) -> None:
        """Borrowed refs this process now reports holding (see RefTable.mark_registered)."""
        self.refs.mark_registered([ref._id for ref in refs], caller)
        self._schedule_frees()

    def pin_forever(self, ref: ObjectRef) -> None:
        if self.refs.pin_forever(ref._id):
            warnings.warn(f"ObjectRef {ref.hex()} was pickled outside farpool (not as a task argument, "
                          "result or put value); it stays pinned until this session ends. Pass refs to "
                          "tasks, actors or put() so farpool can track who holds them.", RuntimeWarning,
                          stacklevel=3)

    def _drain_released(self) -> None:
        self._release_scheduled = False
        self.refs.drain_released()
        self._flush_frees()

    # ------------------------------------------------------------------ put/get/wait (user threads)
    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself where it is needed")
        with collecting([]) as collector:
            payload, bufs = protocol.dumps(value, what="the value given to put()")
        oid = self.new_object_id()
        # put copies the user's buffers now (into the node store when large):
        # later mutation changes nothing put.
        location = self.store_value(oid, payload, bufs, "put")
        if location is not None:
            entry = Entry(state=READY, location=location, size=location.size)
        else:
            bufs = [bytes(b.raw()) if isinstance(b, protocol.pickle.PickleBuffer) else b for b in bufs]
            entry = Entry(state=READY, payload=payload, buffers=bufs,
                          size=len(payload) + sum(len(b) for b in bufs))
        with self.lock:
            self.objects[oid] = entry
            for inner in collector:  # refs inside the value live as long as it does
                e = self.objects.get(inner._id)
                if e is not None:
                    e.task_pins += 1
                    entry.contains.append(inner._id)
        return ObjectRef(oid, self.owner_address)

    def _entry_for(self, ref: ObjectRef) -> Entry:
        entry = self.objects.get(ref._id)
        if entry is not None and entry.fetched:
            return entry
        # A borrowed ref: ask its owner for the value (once) and keep a local copy.
        with self.lock:
            entry = self.objects.get(ref._id)
            if entry is None:  # a ref made before this client existed: not counted, kept
                entry = self.objects[ref._id] = Entry(owned=False, fetched=False, owner=ref._owner)
            fetch = not entry.fetched
            entry.fetched = True
        if fetch:
            self.loop.call_soon(self._fetch_borrowed, ref._id, ref._owner)
        return entry

    def wait_entries(self, refs: list, num_returns: int, timeout: float | None) -> list[bool]:
        """Block until ``num_returns`` of ``refs`` are done (or timeout); readiness flags."""
        entries = [self._entry_for(r) for r in refs]
        done = threading.Lock()  # held until enough are done (a bare lock: cheaper than an Event)
        done.acquire()
        remaining = [num_returns]
        registered = []

        def on_done(_entry):  # on the I/O thread
            remaining[0] -= 1
            if remaining[0] == 0:
                done.release()

        with self.lock:
            for e in entries:
                if e.state != PENDING:
                    remaining[0] -= 1
            if remaining[0] > 0:
                for e in entries:
                    if e.state == PENDING:
                        e.waiters.append(on_done)
                        registered.append(e)
        if remaining[0] > 0:
            self._set_blocked(True)
            try:
                done.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
            finally:
                self._set_blocked(False)
                if registered:
                    with self.lock:
                        for e in registered:
                            try:
                                e.waiters.remove(on_done)
                            except ValueError:
                                pass
        return [e.state != PENDING for e in entries]

    def fetch_here(self, refs: list, flags: list, num_returns: int, timeout: float | None) -> list[bool]:
        """wait(fetch_local=True): of the first ``num_returns`` ready ``refs`` (``flags``), those
        whose value lives in another node's store are copied into our node's store (pull.py)
        before they count as ready; True for each ready here now (a failed copy counts: get
        raises its error).  Nothing to do without a store of our own, or for values here."""
        home = self.home
        if home is None or not home.local:
            return flags
        deadline = None if timeout is None else time.monotonic() + timeout
        out = list(flags)
        counted = 0
        for i, (ref, ready) in enumerate(zip(refs, flags)):
            if not ready or counted >= num_returns:
                continue
            counted += 1
            entry = self.objects.get(ref._id)
            if entry is None or entry.state != READY or entry.location is None or entry.location.node_id == home.node_id:
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                out[i] = False
                continue
            spec = self._stored_for(home.node_id, ref._id, entry, f"object {ref.hex()[:16]}")
            try:
                self.agent_request(home, "PullObject", spec[1:], timeout=3600 if left is None else left)
            except exc_mod.FarpoolError:  # no answer in time: not here yet
                out[i] = False
        return out

    def _set_blocked(self, blocked: bool) -> None:
        """Inside a worker's task: tell the agent we wait, so it lends our CPU (no deadlock)."""
        if not self.in_worker or self.worker_id is None:
            return
        if blocked:
            self.blocked_depth += 1
            if self.blocked_depth == 1:
                self.loop.call_soon(self._send_home, "WorkerBlocked", (self.worker_id,))
        else:
            self.blocked_depth -= 1
            if self.blocked_depth == 0:
                self.loop.call_soon(self._send_home, "WorkerUnblocked", (self.worker_id,))

    def _send_home(self, tag, fields) -> None:
        transport.send(self.home.socket, encode(tag, fields))

    def get(self, refs: list, timeout: float | None) -> list:
        ready = self.wait_entries(refs, len(refs), timeout)
        if not all(ready):
            n = ready.count(False)
            raise exc_mod.GetTimeoutError(
                f"get() timed out after {timeout} s with {n} of {len(refs)} object(s) not ready "
                f"(first: {refs[ready.index(False)].hex()}); raise the timeout, or use wait() to "
                "take results as they come")
        return [self.value_of(r) for r in refs]

    def value_of(self, ref: ObjectRef, writable: bool = False):
        """The value (unpickled here). ``writable``: store-backed arrays come as
        copy-on-write views instead of read-only ones (the facades' stdlib semantics)."""
        entry = self.objects.get(ref._id)
        if entry is None:
            raise exc_mod.ObjectLostError(f"object {ref.hex()} is no longer known to this process")
        if entry.state == FAILED:
            raise self._error_of(entry)
        if entry.location is not None:
            payload, buffers = self.map_location(entry.location, private=writable, oid=ref._id, entry=entry)
        else:
            payload, buffers = entry.payload, entry.buffers
        try:
            if entry.owned:  # refs inside our own values are pinned by them (put, RefTable.hold_nested)
                return protocol.loads(payload, buffers)
            with arriving([]) as arrivals:
                value = protocol.loads(payload, buffers)
        except Exception as exc:  # the value's own unpickling code raised: keep its type, say where
            task = getattr(entry.task, "name", None)
            exc.add_note(f"(farpool: while unpickling {f'the result of task {task}' if task else 'the value'} "
                         f"of object {ref.hex()} in get(); the error comes from that value's unpickling code)")
            raise
        if arrivals:
            self._register_arrivals([r for r in (w() for w in arrivals) if r is not None])
        return value

    # ------------------------------------------------------------------ node store
    def store_value(self, store_id: bytes, payload: bytes, buffers: list, what: str) -> tuple | None:
        """Write a large pickled value into this node's store; None when it stays inline."""
        if self.home is None or not self.home.local:
            return None
        size = segments.value_size(payload, buffers)
        if size < segments.INLINE_MAX:
            return None
        path, error = self.agent_request(self.home, "AllocateObject",
                                         (store_id, size, self.identity.decode(), what))
        if path is None:
            raise exc_mod.ObjectStoreFullError(error)
        segments.write_segment(path, payload, buffers, store_id)
        return Location("seg", self.home.node_id, store_id, path, size)

    def map_location(self, location: tuple, private: bool = False, oid: bytes | None = None, entry=None):
        """Zero-copy (payload, buffers) of a stored value (restored if spilled).  A value in
        another node's store (the result of a task that ran there) is copied into ours
        first, by our agent (pull.py), once: the copy is freed with the original."""
        _, node_id, store_id, path, size = location
        if entry is not None and self.home is not None and self.home.local and node_id != self.home.node_id:
            spec = self._stored_for(self.home.node_id, oid, entry, f"object {oid.hex()[:16]}")
            for attempt in (1, 2):  # again if the copy was spilled between the answer and the mapping
                path, error, full = self.agent_request(self.home, "PullObject", spec[1:], timeout=3600)
                if path is None:
                    raise self._copy_failed(oid, error, full)
                try:
                    return segments.read_segment(path, size, private, store_id)
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        try:
            return segments.read_segment(path, size, private, store_id)
        except FileNotFoundError:
            agent = self.agents.get(node_id)
            if agent is None:
                raise exc_mod.ObjectLostError(f"object {store_id.hex()} lives on node {node_id[:8]}, "
                                              "which this process cannot reach") from None
            for attempt in range(segments.READ_ATTEMPTS):  # again if it spilled between answer and mapping
                new_path, error, full = self.agent_request(agent, "RestoreObject", (store_id,))
                if new_path is None and full:  # it is safe on disk: free some memory and ask again
                    raise exc_mod.ObjectStoreFullError(
                        f"cannot bring object {store_id.hex()} back from disk on node {node_id[:8]}: {error}") from None
                if new_path is None:
                    raise exc_mod.ObjectLostError(f"object {store_id.hex()} is gone from node {node_id[:8]}: "
                                                  f"{error}") from None
                try:
                    return segments.read_segment(new_path, size, private, store_id)
                except FileNotFoundError:
                    if attempt == segments.READ_ATTEMPTS - 1:
                        raise

    def agent_of(self, node_id: str, timeout: float = 30.0) -> AgentConn:
        """Our connection to the agent of ``node_id`` (opened if needed). Any thread but the I/O one."""
        done = threading.Event()
        answer: list = []

        def find():
            answer.extend(self._agent_conn(node_id))
            done.set()
        self.loop.call_soon(find)
        if not done.wait(timeout):
            raise exc_mod.FarpoolError(f"no answer looking for the agent of node {node_id[:8]}")
        conn, why = answer
        if conn is None:
            raise exc_mod.FarpoolError(f"cannot reach the agent of node {node_id[:8]}: {why}")
        return conn

    def agent_request(self, agent: AgentConn, tag: str, fields: tuple, timeout: float = 60.0):
        """``tag(request_id, *fields)`` to an agent, wait for its answer. Any thread but the I/O one."""
        return self._request(agent.socket, "the node agent", tag, fields, timeout)

    def head_request(self, tag: str, fields: tuple, timeout: float = 30.0):
        """Send ``tag(request_id, *fields)`` to the head and wait for its answer. Any thread."""
        return self._request(self.head, "the head", tag, fields, timeout)

    def _request(self, sock, who: str, tag: str, fields: tuple, timeout: float):
        """One request/answer exchange through the I/O thread (answers are matched by request id).

        A client that breaks (the embedded head or node agent died, the I/O thread failed)
        fails the requests still waiting at once (``_break``): nobody is left to answer them.
        """
        event = threading.Event()
        slot = [event]
        request_id = next(self._request_ids)
        self._waiting_requests[id(slot)] = slot
        try:
            if self.broken is not None:
                raise self.broken

            def send():
                self.pending_requests[request_id] = slot
                transport.send(sock, encode(tag, (request_id, *fields)))
            self.loop.call_soon(send)
            if not event.wait(timeout):
                if self.broken is not None:
                    raise self.broken
                raise exc_mod.FarpoolError(f"{who} did not answer {tag} within {timeout} s")
        finally:
            self._waiting_requests.pop(id(slot), None)
        if slot[1] is _BROKEN:
            raise self.broken
        return slot[1]

    def _on_ObjectAllocated(self, conn, request_id, path, error) -> None:
        self._answer(request_id, (path, error))

    def _on_StoreStats(self, conn, request_id, stats, listing) -> None:
        self._answer(request_id, (stats, listing))

    def _error_of(self, entry: Entry) -> BaseException:
        error = entry.error
        if isinstance(error, BaseException):
            return error
        kind = error[0]
        if kind == "task":
            _, payload, type_name, tb_text, fn_name, where = error
            cause = None
            if payload is not None:
                try:
                    cause = protocol.loads(payload)
                except Exception:
                    cause = None
            return exc_mod.TaskError.wrap(fn_name, tb_text, cause, type_name, where)
        raise AssertionError(kind)

    def future_for(self, ref: ObjectRef) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        entry = self._entry_for(ref)

        def complete(_entry, ref=ref):
            self.run_callback(self._complete_future, fut, ref)

        with self.lock:
            pending = entry.state == PENDING
            if pending:
                entry.waiters.append(complete)
        if not pending:
            self.run_callback(self._complete_future, fut, ref)
        return fut

    def _complete_future(self, fut, ref) -> None:
        if fut.done():
            return
        try:
            fut.set_result(self.value_of(ref))
        except BaseException as error:  # noqa: BLE001
            fut.set_exception(error)

    def run_callback(self, fn, *args) -> None:
        """Run fn on the one callback thread (never on the I/O thread)."""
        if self.callback_queue is None:
            with self.lock:
                if self.callback_queue is None:
                    self.callback_queue = queue.Queue()
                    self.callback_thread = threading.Thread(
                        target=self._callback_loop, args=(self.callback_queue,), name="farpool-callbacks",
                        daemon=True)
                    self.callback_thread.start()
        self.callback_queue.put((fn, args))

    @staticmethod
    def _callback_loop(q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("a farpool completion callback raised")
            del item, fn, args  # do not keep the last callback (and what it holds) alive

    # ------------------------------------------------------------------ submit (user threads)
    def submit(self, fn: RemoteFunctionInfo, args: tuple, kwargs: dict, num_returns: int, shape: dict,
               max_retries: int, retry_exceptions, name: str, strategy="DEFAULT", pool_key=None,
               actor_id: str | None = None, token=None) -> list:
        if self.broken is not None:
            raise self.broken
        ref_slots = []
        if any(isinstance(a, ObjectRef) for a in args):
            args = list(args)
            for i, a in enumerate(args):
                if isinstance(a, ObjectRef):
                    ref_slots.append((i, a))
                    args[i] = None
            args = tuple(args)
        if kwargs and any(isinstance(v, ObjectRef) for v in kwargs.values()):
            kwargs = dict(kwargs)
            for k, v in list(kwargs.items()):
                if isinstance(v, ObjectRef):
                    ref_slots.append((k, v))
                    kwargs[k] = None
        collector: list = []
        nested = _nested_refs  # (on the task path: save and restore by hand, cheaper than a with block)
        outer, nested.collector = nested.collector, collector
        try:
            payload, bufs = protocol.dumps_call(args, kwargs, name)
        finally:
            nested.collector = outer
        task_id = self.new_object_id()
        # Copy out-of-band buffers now: the caller may mutate its arrays after remote() returns.
        # Large arguments go into the node store once per call; workers map them.
        args_location = self.store_value(task_id + b"args", payload, bufs, f"arguments of {name}") \
            if bufs else None
        if args_location is not None:
            payload, bufs = b"", []
        else:
            bufs = [bytes(b.raw()) for b in bufs]
        return_ids = [task_id] + [self.new_object_id() for _ in range(num_returns - 1)]
        pinned = [r._id for _, r in ref_slots] + [r._id for r in collector]
        if token is not None:  # an actor call keeps its actor alive (the handles' token) until it ends
            pinned.append(token._id)
        if not isinstance(strategy, str):  # NodeAffinity(node_id, soft)
            strategy = ("affinity", strategy.node_id, bool(strategy.soft))
        key = ("actor", actor_id) if actor_id is not None else (tuple(sorted(shape.items())), pool_key, strategy)
        task = TaskRecord(task_id, fn, payload, bufs, ref_slots, return_ids, shape, key, max_retries,
                          retry_exceptions, pinned, name, strategy, pool_key, actor_id=actor_id)
        task.args_location = args_location
        with self.lock:
            for oid in return_ids:
                self.objects[oid] = Entry(task=task)
            for oid in pinned:
                e = self.objects.get(oid)
                if e is not None:
                    e.task_pins += 1
        refs = [ObjectRef(oid, self.owner_address) for oid in return_ids]
        # Borrowed top-level refs need the owner's value: ask for it unless asked already
        # (a ref that arrived inside a value has an entry, not yet fetched).
        for _, ref in ref_slots:
            self._entry_for(ref)
        if self.in_worker and context_mod.context.task_id is not None:
            # remember children, for cancel(recursive=True)
            self.children.setdefault(context_mod.context.task_id, []).append(task_id)
        if not (ref_slots or actor_id) and key in self.queues.parked and self._submit_direct(task):
            return refs
        self.loop.call_soon(self._on_submit, task)
        return refs

    def _submit_direct(self, task: TaskRecord) -> bool:
        """The fast path of a sequential submit-then-get: send the task from this thread
        straight to an idle leased worker on this node, sparing the I/O thread's wake-up.

        Whoever takes a parked lease (TaskQueues.take_parked, under the lock) owns it: a
        caller here, or the I/O thread to dispatch queued tasks or to return it.  The task
        is recorded in flight here, before it leaves: its reply can reach the I/O thread
        before ``_on_sent_direct`` does (the loop may be reading that worker's stream for
        an earlier reply when this one arrives), and a reply for a task not yet recorded
        was taken for one already ended, leaving the task in flight for ever.
        """
        lease = self.queues.take_parked(task.key, task)  # (recorded in flight there already)
        if lease is None:
            return False
        frames = self._task_frames(lease, [task])
        self.loop.call_soon_lazy(self._on_sent_direct, task, lease)
        lease.channel.stream.send_from_thread(frames)
        return True

    def _on_sent_direct(self, task: TaskRecord, lease: LeaseState) -> None:
        if lease.linger is not None:
            self.loop.cancel_timer(lease.linger)
            lease.linger = None
        if not self.queues.sent_direct(task, lease):  # its worker exited before the task reached it
            self._mark_dirty(task.key)

    # ------------------------------------------------------------------ I/O thread: tasks
    def _on_submit(self, task: TaskRecord) -> None:
        self.tasks[task.task_id] = task
        waiting = 0
        with self.lock:
            for _, ref in task.ref_slots:
                entry = self.objects.get(ref._id)
                if entry is None:
                    continue
                if entry.state == PENDING:
                    waiting += 1
                    entry.waiters.append(lambda _e, t=task: self._dep_ready(t))
        task.deps_left = waiting
        if task.actor_id is not None:
            # Actor calls keep submission order: queued now, sent when first in line and ready.
            self.actor_calls.add(task)
            self._mark_actor_dirty(task.actor_id)
        elif waiting == 0:
            self._enqueue(task)

    def _dep_ready(self, task: TaskRecord) -> None:
        task.deps_left -= 1
        if task.actor_id is not None:
            self._mark_actor_dirty(task.actor_id)
        elif task.deps_left == 0:
            self._enqueue(task)

    def _failed_argument(self, task: TaskRecord) -> Entry | None:
        """The entry of a top-level argument that failed: the task fails without running."""
        for _, ref in task.ref_slots:
            entry = self.objects.get(ref._id)
            if entry is not None and entry.state == FAILED:
                return entry
        return None

    def _enqueue(self, task: TaskRecord, front: bool = False) -> None:
        if task.cancelled:
            return
        failed = self._failed_argument(task)
        if failed is not None:
            self._finish_failed(task, self._error_of(failed))
            return
        self.queues.enqueue(task, front)
        self._mark_dirty(task.key)

    def _mark_dirty(self, key) -> None:
        self._dirty_keys.add(key)
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch_dirty)

    def _mark_actor_dirty(self, actor_id: str) -> None:
        self._dirty_actors.add(actor_id)
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch_dirty)

    def _dispatch_dirty(self) -> None:
        self._dispatch_scheduled = False
        keys, self._dirty_keys = self._dirty_keys, set()
        for key in keys:
            if key in self.queues.keys:
                self._dispatch(key)
        actors, self._dirty_actors = self._dirty_actors, set()
        for actor_id in actors:
            self._dispatch_actor(self.actor_calls.actor(actor_id))

    def _dispatch(self, key) -> None:
        plan = self.queues.dispatch(key, self._cluster_cpus())
        for lease, batch in plan.sends:
            self._send_tasks(lease, batch)
        if plan.requests:
            kq = self.queues.keys[key]
            agent, spillback_ok = self._agent_for(kq, key)
            if agent is None:
                return
            for _ in range(plan.requests):
                self._request_lease(kq, key, agent, spillback_ok)
        if plan.take_back is not None:
            self._send_take_back(*plan.take_back)
        for lease in plan.linger:
            lease.linger = self.loop.call_later(LEASE_LINGER_S, self._return_idle, lease)

    def _send_take_back(self, busy: LeaseState, ids: list) -> None:
        token = (busy.node_id, busy.lease_id)
        if isinstance(busy.channel, DirectChannel):
            # Its worker may be deep in a long task: the doorbell is answered even then.
            try:
                self._doorbell().sendto(pickle.dumps((ids, token, self.identity), protocol=5),
                                        busy.channel.doorbell)
            except OSError:  # gone, or its queue is full: try again at the next chance
                busy.taking_back = False
        else:  # on another machine: its agent relays it, answered between tasks
            busy.channel.send(encode("TakeBack", (ids, token)))

    def _doorbell(self):
        sock = self._doorbell_sock
        if sock is None:
            import socket as _socket
            sock = self._doorbell_sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            sock.setblocking(False)
        return sock

    def _on_TakenBack(self, conn, task_ids, lease_key) -> None:
        """Tasks a worker handed back unstarted: first in line again (not an attempt)."""
        lease = self.queues.taken_back(tuple(lease_key), task_ids)
        if lease is not None:
            self._mark_dirty(lease.key)

    def _cluster_cpus(self) -> int:
        return sum(n["total"].get("CPU", 0) for n in self.nodes if n.get("alive"))

    def _agent_for(self, kq: KeyQueue, key) -> tuple:
        """Where to ask for leases: the home agent, or the node a NodeAffinity names."""
        if not isinstance(kq.strategy, tuple):
            return self.home, True
        _, node_id, soft = kq.strategy
        node = next((n for n in self.nodes if n["node_id"] == node_id), None)
        if node is not None and node["alive"]:
            agent, why = self._agent_conn(node_id)
            if agent is None:
                if not soft:
                    self._fail_key(key, exc_mod.NodeDiedError(
                        f"NodeAffinity: cannot reach node {node_id} ({why}); use soft=True to "
                        "let the task run elsewhere"))
                    return None, False
                return self.home, True
            return agent, False
        if soft:
            return self.home, True
        state = "is dead" if node is not None else "is not part of this cluster"
        self._fail_key(key, exc_mod.InfeasibleError(
            f"NodeAffinity: node {node_id} {state} (live nodes: "
            f"{', '.join(n['node_id'] for n in self.nodes if n['alive'])}); pick a live node from "
            "farpool.nodes(), or use NodeAffinity(node_id, soft=True) to allow any node"))
        return None, False

    def _request_lease(self, kq: KeyQueue, key, agent: AgentConn, spillback_ok: bool = True) -> None:
        request_id = next(self._request_ids)
        self.queues.request_sent(key, request_id, agent)
        strategy = kq.strategy if isinstance(kq.strategy, str) else "DEFAULT"
        transport.send(agent.socket, encode("RequestLease", (request_id, kq.shape, self.job_id, kq.pool_key,
                                                             strategy, spillback_ok)))

    def _send_tasks(self, lease: LeaseState, batch: list) -> None:
        """Send a batch the queues already marked RUNNING on ``lease``."""
        if lease.linger is not None:
            self.loop.cancel_timer(lease.linger)
            lease.linger = None
        lease.channel.send(self._task_frames(lease, batch))

    def _task_frames(self, lease: LeaseState, batch: list) -> list:
        """The ExecuteTask message for a batch of tasks sent on this lease."""
        wire = []
        buffers: list = []
        now = time.perf_counter()
        for task in batch:
            fn = task.fn
            fn_bytes = None
            if fn.fn_hash not in lease.shipped:
                fn_bytes = fn.fn_bytes
                lease.shipped.add(fn.fn_hash)
            ref_values = []
            ref_bufs = []
            for slot, ref in task.ref_slots:
                entry = self.objects[ref._id]
                if entry.location is not None:
                    ref_values.append((slot, self._stored_for(lease.node_id, ref._id, entry,
                                                              f"an argument of {task.name}"), 0))
                else:
                    ref_values.append((slot, entry.payload, len(entry.buffers)))
                    ref_bufs.extend(entry.buffers)
            args_payload, arg_bufs = task.args_payload, task.arg_bufs
            if task.args_location is not None:
                args_payload = self._read_on(lease.node_id, task.args_location, f"the arguments of {task.name}")
                if args_payload[0] == "pull":
                    task.args_copies = (task.args_copies or set()) | {lease.node_id}
            job_setup = None
            if not lease.job_sent:
                job_setup = dict(self.job_setup, pool_key=task.pool_key, pool=self.pools.get(task.pool_key))
                lease.job_sent = True
            wire.append((task.task_id, fn.fn_hash, fn_bytes, task.name, args_payload, len(arg_bufs),  # a TaskSpec
                         ref_values, len(task.return_ids), job_setup,
                         (lease.gpu_ids, task.shape.get("CPU", 0) / scheduling.UNIT, task.shape)))
            buffers.extend(arg_bufs)
            buffers.extend(ref_bufs)
            task.submitted_at = now
        # Large results into the worker's node store when we can read them from there (a
        # store of our own to copy them into, or the worker on our node); else inline.
        return encode("ExecuteTask", (wire, self.peer_address, self.home is not None and self.home.local), buffers)

    def _read_on(self, node_id: str, location: tuple, what: str, more_sources=(), owner=None) -> tuple:
        """How a process on node ``node_id`` reads a stored value: ("loc", path, size, store_id) when it
        is in that node's store, else ("pull", store_id, size, sources, owner, what): that
        node's agent copies it from the nodes that hold it (pull.py), and frees the copy
        when ``owner`` ((identity, node id); default: us) is gone."""
        _, where, store_id, path, size = location
        if where == node_id:
            return ("loc", path, size, store_id)
        sources = [where, *(n for n in more_sources if n not in (where, node_id))]
        owner = owner or (self.identity.decode(), self.home.node_id)
        return ("pull", store_id, size, sources, owner, what)

    def _stored_for(self, node_id: str, oid: bytes, entry: Entry, what: str) -> tuple:
        """``_read_on`` for an object of our table, recording the copy it makes: we free the
        copies of what we own; the owner of what we borrow is told (AddCopy) before our
        borrow can end, so it frees that copy too."""
        with self.lock:
            copies = list(entry.copies or ())
        owner = None if entry.owned or entry.owner is None else (entry.owner[0].decode(), entry.owner[1])
        spec = self._read_on(node_id, entry.location, what, copies, owner)
        if spec[0] != "pull":
            return spec
        if entry.owned:
            with self.lock:
                entry.copies = (entry.copies or set()) | {node_id}
        elif entry.owner is not None:
            self.refs.report_copy(entry.owner, oid, entry.location.store_id, node_id)
            self._schedule_frees()
        return spec

    def _return_idle(self, lease: LeaseState) -> None:
        """Its linger timer fired (see TaskQueues.idle)."""
        what = self.queues.idle(lease)
        if what == "dispatch":
            self._dispatch(lease.key)
        elif what == "return":
            agent = self.agents.get(lease.node_id)
            if agent is not None:
                transport.send(agent.socket, encode("ReturnLease", (lease.lease_id, False)))

    def _close_worker_channel(self, node_id: str, worker_id: str) -> None:
        """The worker is gone: close our DEALER to it."""
        if self.session_dir is None:
            return
        for address, channel in list(self.worker_channels.items()):
            if address.endswith(f"/w-{worker_id}") and self.agents.get(node_id) is not None \
                    and self.agents[node_id].local:
                channel.stream.close()
                del self.worker_channels[address]

    # ------------------------------------------------------------------ I/O thread: messages
    # What each kind of peer may send us: (peer, fields, buffers) -> None.  Anything else
    # is dropped and logged (_receive).
    def _peer_tables(self) -> None:
        def star(handler):
            return lambda peer, fields, _buffers: handler(peer, *fields)

        def answer(peer, fields, _buffers):
            self._answer(fields[0], fields[1])

        self._from_head = {
            "NodeTable": lambda _peer, fields, _buffers: self._on_NodeTable(fields[0]),
            "ActorInfo": lambda _peer, fields, _buffers: self._on_ActorInfo(*fields),
            "ActorRegistered": lambda _peer, fields, _buffers: self._answer(fields[0], fields[1:]),
            "Nodes": answer, "KVValue": answer}
        self._from_worker = {
            "TaskFinished": lambda _peer, fields, buffers: self._on_TaskFinished(fields, buffers),
            "TakenBack": star(self._on_TakenBack)}
        self._from_agent = {  # and what its remote workers send us through it
            **self._from_worker, "Reply": answer,
            **{tag: star(getattr(self, "_on_" + tag)) for tag in (
                "Welcome", "Probe", "SegmentsDropped", "WorkerLog", "Nodes", "LeaseGranted", "LeaseSpillback",
                "LeaseInfeasible", "WorkerExited", "ObjectAllocated", "StoreStats", "ObjectCopied", "PeerGone")}}

    @staticmethod
    def _decoded(frames, source: str):
        """(tag, fields, buffers), or None for garbage (dropped and logged)."""
        return protocol.decode_or_log(frames, source, log)

    def _receive(self, frames, peer, table: dict, source: str) -> None:
        message = self._decoded(frames, source)
        if message is None:
            return
        tag, fields, buffers = message
        handler = table.get(tag)
        if handler is None:
            log.warning("dropped %s from %s: not a message it may send us", tag, source)
            return
        handler(peer, fields, buffers)

    def _on_head(self) -> None:
        for frames in transport.recv_all(self.head):
            self._receive(frames, None, self._from_head, "the head")

    def _on_NodeTable(self, nodes: list) -> None:
        self.nodes = nodes
        self._forget_dead_nodes()

    def _forget_dead_nodes(self) -> None:
        """Leases and lease requests on nodes the head declared dead are lost: retry elsewhere."""
        dead = {n["node_id"]: n.get("death_reason", "") for n in self.nodes if not n["alive"]}
        for node_id, reason in dead.items():
            self._owner_lost(lambda owner, n=node_id: owner[1] == n,
                             f"node {node_id[:8]} died ({reason or 'no reason given'})")
        for identity in self.refs.borrowers_on(dead):  # a borrower on a dead node holds nothing any more
            self._borrower_died(identity)
        for (node_id, lease_id), lease in list(self.queues.leases.items()):
            if node_id in dead:
                self._on_WorkerExited(None, lease_id, {
                    "node_id": node_id, "worker_id": lease.worker_id, "pid": "?", "exitcode": None,
                    "signal": None, "node_died": dead[node_id]})
        for node_id in dead:
            conn = self.agents.pop(node_id, None)
            if conn is None or conn is self.home:
                if conn is self.home:
                    self.agents[node_id] = conn
                continue
            self._close_agent(conn)

    def _close_agent(self, conn: AgentConn) -> None:
        """Close a connection to an agent that is gone; lease requests made on it are asked again."""
        self.loop.cancel_timer(conn.hello_timer)
        self.loop.remove_reader(conn.socket)
        conn.socket.close(0)
        for key in self.queues.forget_requests_to(conn):
            self._mark_dirty(key)

    def _answer(self, request_id, value) -> None:
        slot = self.pending_requests.pop(request_id, None)
        if isinstance(slot, list):
            slot.append(value)
            slot[0].set()
        elif callable(slot):  # a continuation on the I/O thread (see _serve_stored)
            slot(value)

    def _on_agent(self, conn: AgentConn) -> None:
        for frames in transport.recv_all(conn.socket):
            if frames[0] == b"FromPeer":  # an owner message routed by an agent (see _send_owner)
                self._on_peer_message(frames)
            else:
                self._receive(frames, conn, self._from_agent, f"the agent of node {conn.node_id[:8]}")
        self._drain_released()

    def _on_worker(self, stream: transport.StreamChannel) -> None:
        for frames in stream.read():
            self._receive(frames, None, self._from_worker, "a worker")
        if stream.eof:  # the worker exited; the agent's WorkerExited drives the retries
            stream.close()
            for address, channel in list(self.worker_channels.items()):
                if channel.stream is stream:
                    del self.worker_channels[address]
        self._drain_released()

    def _on_Welcome(self, conn, info) -> None:
        if conn is not None and conn.hello_timer is not None:  # opened by _open_agent_nowait: it is up
            self.loop.cancel_timer(conn.hello_timer)
            conn.hello_timer = None

    def _on_Probe(self, conn) -> None:
        """An agent we reach over TCP checked that our connection is up (node.py): nothing to do."""

    def _on_SegmentsDropped(self, conn, paths) -> None:
        segments.forget_written(paths)

    def _on_WorkerLog(self, conn, stream: str, data: bytes) -> None:
        """Worker output for this driver: written on the callback thread, never here."""
        self.run_callback(_write_output, stream, data)

    def _on_Nodes(self, conn, request_id, nodes) -> None:
        self._answer(request_id, nodes)

    def _on_LeaseGranted(self, conn: AgentConn, request_id, lease_id, worker_id, address, node_id, gpu_ids):
        kq = self.queues.answered(request_id)
        if kq is None or not kq.queue:
            # Nothing left to run: give the worker straight back.
            transport.send(conn.socket, encode("ReturnLease", (lease_id, False)))
            return
        key = kq.key
        if address is not None:
            channel = self.worker_channels.get(address)
            if channel is None:  # one stream per worker, kept across leases
                try:
                    stream = transport.StreamChannel.connect(address, self.loop)
                except OSError as error:
                    log.warning("cannot connect to worker %s at %s: %s", worker_id, address, error)
                    transport.send(conn.socket, encode("ReturnLease", (lease_id, True)))
                    self._mark_dirty(key)
                    return
                self.loop.add_reader(stream.fd, lambda s=stream: self._on_worker(s))
                channel = self.worker_channels[address] = DirectChannel(stream, address + ".tb")
        else:
            channel = RelayChannel(conn, worker_id)
        lease = LeaseState(lease_id, worker_id, node_id, channel, gpu_ids, key,
                           direct=isinstance(channel, DirectChannel))
        self.queues.add_lease(lease)
        self._dispatch(key)

    def _on_LeaseSpillback(self, conn, request_id, node_id, tcp_address, ipc_address):
        kq = self.queues.answered(request_id)
        if kq is None:
            return
        agent, why = self._agent_conn(node_id, tcp_address, ipc_address)
        if agent is None:
            self._fail_key(kq.key, exc_mod.NodeDiedError(
                f"cannot reach node {node_id[:8]} at {tcp_address or ipc_address} that could run these "
                f"tasks: {why}"))
            return
        if kq.queue:
            self._request_lease(kq, kq.key, agent, spillback_ok=False)

    def _on_LeaseInfeasible(self, conn, request_id, message, fatal):
        kq = self.queues.answered(request_id, final=fatal)
        if kq is None:
            return
        if fatal:
            self._fail_key(kq.key, exc_mod.InfeasibleError(message))
        elif not kq.warned_infeasible:
            kq.warned_infeasible = True
            log.warning("%s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=1)

    def _fail_key(self, key, error: BaseException) -> None:
        for task in self.queues.drain(key):
            self._finish_failed(task, error)

    def _on_WorkerExited(self, conn, lease_id, info) -> None:
        lease, lost = self.queues.worker_exited((info["node_id"], lease_id))
        if lease is None:
            return
        self._close_worker_channel(info["node_id"], info["worker_id"])
        if info.get("node_died") is not None:
            how = f"was lost with its node ({info['node_died']})"
        elif info.get("signal"):
            import signal as _signal
            try:
                how = f"killed by {_signal.Signals(info['signal']).name}"
            except ValueError:
                how = f"killed by signal {info['signal']}"
            if info["signal"] == 9:
                how += " (if nobody killed it, this is usually the out-of-memory killer)"
        else:
            how = f"exited with code {info.get('exitcode')}"
        for task in lost:
            what = (f"worker {info['worker_id']} on node {info['node_id'][:8]} (pid {info['pid']}) "
                    f"{how} while running {task.name}")
            if task.cancelled:
                self._finish_failed(task, exc_mod.TaskCancelledError(f"task {task.name} was cancelled"))
            elif task.spend_attempt():
                log.warning("%s; retrying (%s)", what, task.attempt_text())
                self._enqueue(task, front=True)
            else:
                retries = f" after {task.attempts} attempts" if task.attempts > 1 else ""
                error_cls = exc_mod.NodeDiedError if info.get("node_died") is not None else exc_mod.WorkerCrashedError
                self._finish_failed(task, error_cls(
                    f"{what}{retries}; no retries left (max_retries={task.max_retries}). "
                    "Raise max_retries if the crash is transient, or find why the process died "
                    f"(its log: worker-{info['worker_id']}.log in the session directory)."))
        self._mark_dirty(lease.key)

    def _on_TaskFinished(self, fields, buffers) -> None:
        results, retiring, sender, borrowed, pairs = fields
        if borrowed or pairs:
            self._on_borrowers(sender, borrowed, pairs)
        pos = 0
        lease = None
        completed = []
        for task_id, ok, body, started, ended in results:  # TaskResults
            task = self.queues.finished(task_id, ended - started)
            if task is None:  # ended already (its worker's exit was reported first, or cancelled)
                if ok is True:
                    pos = self._discard_result(body, buffers, pos, sender)
                elif ok is False:
                    self._discard_error(protocol.TaskFailure._make(body).inner, sender)
                continue
            lease = task.lease
            if lease is not None:
                self.timeline_events.append((task.name, started, ended, lease.node_id, lease.worker_id, ok))
            if ok == "retired":  # the worker retired before running it: not an attempt
                self._requeue(task)
                continue
            if ok:
                values = []
                nested = []
                for payload, nbuf, inner in body:
                    if isinstance(payload, tuple):  # in the worker's node store
                        at = protocol.StoredAt._make(payload)
                        values.append(Location("seg", lease.node_id if lease else "", at.store_id, at.path, at.size))
                    else:
                        values.append((payload, buffers[pos:pos + nbuf]))
                    nested.append(inner)
                    pos += nbuf
                completed.append((task, values, nested))
            else:
                failure = protocol.TaskFailure._make(body)
                inner = failure.inner  # refs inside the exception (lent to us)
                if task.cancelled:
                    self._discard_error(inner, sender)
                    self._finish_failed(task, exc_mod.TaskCancelledError(f"task {task.name} was cancelled"))
                    continue
                retry = task.retry_exceptions
                if retry and self._retryable(retry, failure.payload) and task.spend_attempt():
                    self._discard_error(inner, sender)
                    self._requeue(task)
                    continue
                self._finish_failed(task, ("task", *failure[:5]), inner, sender)
        if lease is not None and not retiring:
            self.queues.park_if_idle(lease)
        if completed:
            self._finish_ok(completed, sender)
        if lease is not None:
            if retiring:  # it exits now (max_tasks_per_child): lease no more tasks to it
                self.queues.retire(lease)
            if lease.actor_id is None:
                self._mark_dirty(lease.key)
            else:
                self._mark_actor_dirty(lease.actor_id)

    def _requeue(self, task: TaskRecord) -> None:
        """Run ``task`` again, first in line: on its actor, or on any worker of its shape."""
        if task.actor_id is not None:
            self.actor_calls.requeue(task)
            self._mark_actor_dirty(task.actor_id)
        else:
            self._enqueue(task, front=True)

    def _discard_error(self, inner: list, sender) -> None:
        """Refs inside an exception nobody will see: our borrow of them ends."""
        if inner:
            with self.lock:
                self.refs.discard_value((), inner, sender)
            self._schedule_frees()

    def _discard_result(self, body, buffers, pos: int, sender) -> int:
        """The values of a finished task we no longer know, freed; returns the next buffer position."""
        with self.lock:
            for payload, nbuf, inner in body:
                if isinstance(payload, tuple):
                    # (in the worker's node store: ours, or for a remote worker with a client of its
                    # own, its node; else the copy stays until we leave: its agent frees it then)
                    node_id = sender[1] if sender else self.home.node_id
                    at = protocol.StoredAt._make(payload)
                    self.refs.discard_value(Location("seg", node_id, at.store_id, at.path, at.size), inner, sender)
                else:
                    self.refs.discard_value((payload, None), inner, sender)
                pos += nbuf
        self._schedule_frees()
        return pos

    @staticmethod
    def _retryable(retry, payload) -> bool:
        if retry is True:
            return True
        try:
            error = protocol.loads(payload) if payload is not None else None
        except Exception:
            return False
        return error is not None and isinstance(error, tuple(retry))

    def _finish_ok(self, completed, sender: tuple | None = None) -> None:
        """Results of tasks that ran on ``sender`` (the worker's client address)."""
        fire = []
        with self.lock:
            for task, values, nested in completed:
                self.queues.done(task)
                for oid, value, inner in zip(task.return_ids, values, nested):
                    entry = self.objects.get(oid)
                    if entry is None:
                        self.refs.discard_value(value, inner, sender)
                        continue
                    if inner:
                        self.refs.hold_nested(entry, inner, sender)
                    if isinstance(value, Location):
                        entry.location = value
                        entry.size = value.size
                    else:
                        entry.payload, entry.buffers = value
                        entry.size = len(value[0]) + sum(len(b) for b in value[1])
                    entry.state = READY
                    entry.task = None
                    if entry.waiters:
                        fire.append(entry)
                    else:
                        self.refs.delete_if_unreferenced(oid, entry)
                self._unpin(task)
        self._schedule_frees()
        for entry in fire:
            self._fire(entry)

    def _finish_failed(self, task: TaskRecord, error, inner=(), sender=None) -> None:
        """``inner``: refs inside the exception (lent to us by the worker, ``sender``): they
        live as long as the failed objects, as refs inside a result do."""
        fire = []
        with self.lock:
            self.queues.done(task)
            held = False
            for oid in task.return_ids:
                entry = self.objects.get(oid)
                if entry is None:
                    continue
                if inner:
                    self.refs.hold_nested(entry, inner, sender)
                    held = True
                entry.state = FAILED
                entry.error = error
                entry.task = None
                if entry.waiters:
                    fire.append(entry)
            if inner and not held:  # nobody wants the error
                self.refs.discard_value((), inner, sender)
            self._unpin(task)
        self._schedule_frees()
        for entry in fire:
            self._fire(entry)

    def _unpin(self, task: TaskRecord) -> None:
        """(lock held) The task ended: its arguments are no longer pinned by it."""
        if task.pinned:
            self.refs.unpin(task.pinned)
            task.pinned = []
        if task.args_location is not None:
            self.refs.free_location(task.args_location, task.args_copies)
            task.args_location = None

    def _schedule_frees(self) -> None:
        if not self._free_scheduled:
            self._free_scheduled = True
            self.loop.call_soon(self._flush_frees)

    # Borrowers: the counting is the reference table's (refs.py); the client watches the
    # borrowers it asks for (a pidfd on our node, else WatchPeer to the borrower's agent,
    # whose PeerGone, like its node's death, ends its borrows) and sends what it says.
    def _on_borrowers(self, sender: tuple | None, object_ids: list, pairs: list = ()) -> None:
        self.refs.on_borrowers(sender, object_ids, pairs)
        self._schedule_frees()

    def _register_arrivals(self, refs: list) -> None:
        in_task = self.in_worker and context_mod.context.task_id is not None
        self.refs.register_arrivals(refs, in_task)
        self._schedule_frees()

    def take_sub_borrowed(self) -> list:
        return self.refs.take_sub_borrowed()

    def lend_returned(self, refs: list, caller: tuple | None) -> None:
        """Refs nested in a value this worker returns to ``caller``: the caller borrows them."""
        if caller is None:
            self.pin_quietly(refs)
            return
        self.refs.lend_returned(refs, caller)
        self._schedule_frees()

    def _borrow_released(self, borrower: bytes, oid: bytes) -> None:
        self.refs.borrow_released(borrower, oid)
        self._flush_frees()

    def _borrower_died(self, identity: bytes) -> None:
        """A borrower's process ended (or its node died): it holds nothing any more."""
        self.refs.borrower_died(identity)
        self._flush_frees()

    def _watch_borrower(self, address: tuple) -> None:
        """(I/O thread) Watch a new borrower: a pidfd when it runs on our node (both of us
        attached to our node over ipc: a pid means something only there), else the agent of
        its node tells us when it goes (WatchPeer -> PeerGone)."""
        identity = address[0]
        if self.home is not None and self.home.local and address[1] == self.home.node_id \
                and len(address) > 3 and address[2] is not None:
            try:
                fd = os.pidfd_open(address[3])
            except OSError:  # already gone: all its borrows end now
                self.loop.call_soon(self._borrower_died, identity)
                return
            self.borrower_fds[identity] = fd
            self.loop.add_reader(fd, lambda: self._borrower_died(identity))
            return
        node_id = address[1]
        node = next((n for n in self.nodes if n["node_id"] == node_id), None)
        if node is not None and not node["alive"]:  # _forget_dead_nodes ran before we counted it
            self.loop.call_soon(self._borrower_died, identity)
            return
        conn = self.agents.get(node_id)
        if conn is None and node is not None and node.get("tcp"):
            conn, _ = self._agent_conn(node_id)
        if conn is None:
            # A node our table does not show yet (or one without TCP): not watched; its death
            # still releases the borrows (_forget_dead_nodes), its Goodbye-less exit does not.
            log.info("cannot watch borrower %r: no connection to the agent of node %s",
                     identity[:24], str(node_id)[:8])
            return
        transport.send(conn.socket, encode("WatchPeer", (identity,)))

    def _unwatch_borrower(self, identity: bytes) -> None:
        fd = self.borrower_fds.pop(identity, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def _flush_frees(self) -> None:
        """(I/O thread) Carry out the reference table's outbox, in order."""
        self._free_scheduled = False
        refs = self.refs
        while refs.watches:
            what, arg = refs.watches.popleft()
            if what == "watch":
                self._watch_borrower(arg)
            else:
                self._unwatch_borrower(arg)
        while refs.owner_messages:
            owner, frames = refs.owner_messages.popleft()
            self._send_owner(owner, frames)
        while refs.ended_actors:
            transport.send(self.head, encode("KillActor", (refs.ended_actors.popleft(), True, "released")))
        with self.lock:  # other threads add frees under the lock (release_ref)
            frees, refs.frees = refs.frees, {}
        for node_id, ids in frees.items():
            agent = self.agents.get(node_id)
            if agent is None:  # a node that only holds copies: we never leased there
                agent, _ = self._agent_conn(node_id)
            if agent is not None:  # (a dead node took its copies with it)
                transport.send(agent.socket, encode("FreeObjects", (ids,)))

    def _fire(self, entry: Entry) -> None:
        """Run the entry's waiters (they wake user threads): on the I/O thread, last thing
        before it sleeps (EventLoop.call_last)."""
        if self.loop.in_loop_thread():
            self.loop.call_last(self._fire_now, entry)
        else:
            self._fire_now(entry)

    def _fire_now(self, entry: Entry) -> None:
        with self.lock:
            waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            try:
                waiter(entry)
            except Exception:
                log.exception("an internal completion waiter failed")

    # ------------------------------------------------------------------ borrowers and owners
    # An owner on our node (both of us attached to its agent over ipc) is reached on its
    # own ipc ROUTER: the fast path.  Any other owner is reached through the agent of its
    # node, which is the agent it is attached to (its home):
    #   borrower --ToPeer(owner, msg)--> that agent --FromPeer(borrower, msg)--> owner
    #   owner --ToPeer(borrower, reply)--> its agent --FromPeer(owner, reply)--> borrower
    # and such a borrower gets the value's bytes, never a store location it cannot map.
    # No ipc path crosses nodes, even on one machine, so a loopback cluster takes the
    # path a real one does.  An agent that cannot deliver answers PeerGone; a node that
    # dies or never answers fails what waits on it (_owner_lost): a get never hangs.
    def _owner_is_local(self, owner: tuple) -> bool:
        return (owner[2] is not None and self.home is not None and self.home.local
                and owner[1] == self.home.node_id)

    def _fetch_borrowed(self, object_id: bytes, owner: tuple) -> None:
        if owner[0] == self.identity:
            return
        if not self._owner_is_local(owner):
            self.remote_fetches[object_id] = owner
        else:
            self.local_fetches[object_id] = owner
            if len(owner) > 3:  # watch the owner: if it dies before it answers, say so (no hang)
                self._watch_owner(owner)
        node = self.home.node_id if self.home is not None and self.home.local else None
        self._send_owner(owner, encode("GetObject", (object_id, node)))

    def _watch_owner(self, owner: tuple) -> None:
        identity, pid = owner[0], owner[3]
        if identity in self.owner_pidfds:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone
            self._local_owner_died(identity, None)
            return
        self.owner_pidfds[identity] = fd
        self.loop.add_reader(fd, lambda: self._local_owner_died(identity, fd))

    def _local_owner_died(self, identity: bytes, fd: int | None) -> None:
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)
            self.owner_pidfds.pop(identity, None)
        lost = [oid for oid, owner in self.local_fetches.items() if owner[0] == identity]
        for oid in lost:
            self.remote_fetches[oid] = self.local_fetches.pop(oid)
        self._owner_lost(lambda owner: owner[0] == identity, "its process has exited")

    def _send_owner(self, owner: tuple, frames: list) -> None:
        """To an object's owner (I/O thread); messages to one owner leave in order."""
        identity, node_id, endpoint = owner[:3]
        if identity == self.identity:
            return
        if not self._owner_is_local(owner):
            conn, why = self._agent_conn(node_id)
            if conn is None:  # the owner is gone with its node: nobody is left to answer or count
                self._owner_lost(lambda o: o[1] == node_id, why)
                return
            transport.send(conn.socket, [b"ToPeer", identity, *frames])
            return
        sock = self.owner_conns.get(endpoint)
        if sock is None:
            sock = transport.dealer(self.identity)
            sock.connect(endpoint)
            self.owner_conns[endpoint] = sock
            self.loop.add_reader(sock, lambda s=sock: self._on_owner_reply(s))
        transport.send(sock, frames)

    def _agent_conn(self, node_id: str, tcp: str | None = None, ipc: str | None = None) -> tuple:
        """(our connection to the agent of ``node_id``, None), or (None, why there is none): the
        one way to reach an agent from the I/O thread, opened if needed without waiting for
        its answer.  Its address: ``tcp``/``ipc`` when given (a spillback names a node our
        table may not show yet), else the node table's; TCP when the node has it (the path a
        real cluster takes), else its ipc socket when that is on this machine."""
        conn = self.agents.get(node_id)
        if conn is not None:
            return conn, None
        if node_id in self.unreachable:
            return None, self.unreachable[node_id]
        if tcp is None and ipc is None:
            tcp, why = scheduling.agent_address(self.nodes, node_id)
            if tcp is None:
                node = next((n for n in self.nodes if n["node_id"] == node_id), None)
                ipc = node.get("ipc") if node is not None and node["alive"] else None
                if not self._ipc_reachable(ipc):
                    return None, why
        if tcp:
            return self._open_agent_nowait(node_id, tcp), None
        if self._ipc_reachable(ipc):
            return self._open_agent(node_id, ipc), None  # (an ipc connect never waits)
        return None, f"node {node_id[:8]} has no address reachable from here"

    def _ipc_reachable(self, address: str | None) -> bool:
        return bool(address) and self.home is not None and self.home.local \
            and os.path.exists(address[len("ipc://"):])

    def _open_agent_nowait(self, node_id: str, address: str) -> AgentConn:
        """Like _open_agent over TCP, without blocking the I/O thread on the agent's answer:
        messages queue behind the hello, and an agent silent for HELLO_DEADLINE_S is given up."""
        sock = transport.dealer(self.identity)
        transport.start_tcp(sock, address, self.token, self._agent_hello())
        conn = self.agents[node_id] = AgentConn(self, node_id, sock, False, address)
        conn.hello_timer = self.loop.call_later(transport.HELLO_DEADLINE_S, self._agent_silent, conn)
        self.loop.add_reader(sock, lambda: self._on_agent(conn))
        return conn

    def _agent_silent(self, conn: AgentConn) -> None:
        conn.hello_timer = None
        if self.agents.get(conn.node_id) is not conn:
            return  # closed already (its node died)
        del self.agents[conn.node_id]
        why = (f"the agent of node {conn.node_id[:8]} at {conn.address} did not answer within "
               f"{transport.HELLO_DEADLINE_S:.0f} s (the node may be down, or its port unreachable from here)")
        # Not tried again: leases asked of it go elsewhere or fail (_agent_conn says why).
        self.unreachable[conn.node_id] = why
        self._close_agent(conn)
        self._owner_lost(lambda owner: owner[1] == conn.node_id, why)

    def _owner_lost(self, match, why: str) -> None:
        """Fail the values we asked owners that ``match`` for: they cannot answer, ``why``."""
        lost = [(oid, owner) for oid, owner in self.remote_fetches.items() if match(owner)]
        for oid, owner in lost:
            del self.remote_fetches[oid]
            self._set_borrowed(oid, FAILED, exc_mod.OwnerDiedError(
                f"cannot get object {oid.hex()}: its owner, a process on node {owner[1][:8]}, cannot "
                f"answer: {why}. The value was lost with its owner; create it again (re-run the task "
                "that made it, or put() it), from a process that lives as long as its readers "
                "(the driver, or an actor) if it must outlive the process that made it."))

    def _on_PeerGone(self, conn, identity: bytes) -> None:
        """An agent could not deliver to ``identity``, or saw it leave: it answers nothing and holds nothing."""
        self._owner_lost(lambda owner: owner[0] == identity, "its process has exited")
        if self.refs.is_watched(identity):
            self._borrower_died(identity)

    def _on_peer_message(self, frames) -> None:
        """FromPeer(sender, *message): an owner message from a process on another node."""
        if len(frames) < 4:
            log.warning("dropped a bad message routed by an agent: FromPeer has %d frame(s), expected at "
                        "least 3", len(frames) - 1)
            return
        sender = bytes(frames[1])
        message = self._decoded(frames[2:], "a process on another node")
        if message is None:
            return
        tag, fields, buffers = message
        if tag != "ObjectValue":
            self._on_owner_request(sender, tag, fields, remote=True)
            return
        try:
            self._take_object_value(fields, buffers, remote=True)
        except (TypeError, ValueError) as exc:
            log.warning("dropped a bad ObjectValue from %r: %s", sender[:24], exc)

    def _on_owner_reply(self, sock) -> None:
        for frames in transport.recv_all(sock):
            message = self._decoded(frames, "an owner")
            if message is None:
                continue
            tag, fields, buffers = message
            if tag == "ObjectValue":
                self._take_object_value(fields, buffers, remote=False)
            else:
                log.warning("dropped %s from an owner: not a message it may send us", tag)

    def _take_object_value(self, fields, buffers, remote: bool) -> None:
        object_id, state, payload, error = fields
        if remote and self.remote_fetches.pop(object_id, None) is None:
            return  # not asked for, or given up on already
        if not remote and self.local_fetches.pop(object_id, None) is None:
            return
        if state == READY and isinstance(payload, tuple) and payload[0] == "pull":
            self._pull_borrowed(object_id, payload)
        elif state == READY and isinstance(payload, tuple):  # a Location, as a tuple on the wire
            self._set_borrowed(object_id, READY, None, location=Location._make(payload))
        elif state == READY:
            self._set_borrowed(object_id, READY, None, payload, list(buffers))
        else:
            self._set_borrowed(object_id, FAILED, error)

    def _copy_here(self, object_id: bytes, spec: tuple, copied, failed) -> None:
        """(I/O thread) Our agent copies a value stored on other nodes into our node's store
        (``spec``: a "pull" of _read_on): then ``copied(location)``, or ``failed(error)``."""
        _, store_id, size = spec[:3]
        request_id = next(self._request_ids)

        def answer(reply):
            path, error, full = reply
            if path is None:
                failed(self._copy_failed(object_id, error, full))
            else:
                copied(Location("seg", self.home.node_id, store_id, path, size))
        self.pending_requests[request_id] = answer
        transport.send(self.home.socket, encode("PullObject", (request_id, *spec[1:])))

    def _copy_failed(self, object_id: bytes, error: str, full: bool) -> BaseException:
        kind = exc_mod.ObjectStoreFullError if full else exc_mod.ObjectLostError
        return kind(f"cannot get object {object_id.hex()}: copying it to node {self.home.node_id[:8]} "
                    f"failed: {error}")

    def _pull_borrowed(self, object_id: bytes, spec: tuple) -> None:
        """A borrowed value stored on other nodes: our agent copies it into our node's store."""
        self._copy_here(object_id, spec, lambda location: self._set_borrowed(object_id, READY, None, location=location),
                        lambda error: self._set_borrowed(object_id, FAILED, error))

    def _on_ObjectCopied(self, conn, request_id, path, error, full) -> None:
        self._answer(request_id, (path, error, full))

    def _set_borrowed(self, object_id, state, error, payload=None, buffers=(), location=None) -> None:
        with self.lock:
            entry = self.objects.get(object_id)
            if entry is None:
                return
            entry.state = state
            entry.error = error
            entry.payload = payload
            entry.buffers = list(buffers)
            entry.location = location
        self._fire(entry)

    def _on_owner_socket(self) -> None:
        for frames in transport.recv_all(self.owner_socket):
            identity = frames[0]
            message = self._decoded(frames[1:], "a borrower")
            if message is not None:
                self._on_owner_request(identity, message[0], message[1], remote=False)

    def _on_owner_request(self, identity: bytes, tag: str, fields: tuple, remote: bool) -> None:
        """A borrower on our node (``remote`` False: our ipc ROUTER) or elsewhere (through our agent)."""
        try:
            if tag == "GetObject":
                self._serve_object(identity, fields[0], remote, fields[1] if len(fields) > 1 else None)
            elif tag == "AddCopy":
                self._add_copy(*fields)
            elif tag == "BorrowReleased":
                self._borrow_released(identity, fields[0])
            elif tag == "AddBorrower":
                oid, borrower, *kept = fields  # kept: a ref kept from a task's arguments (add_borrower)
                report = None
                if kept and kept[0]:
                    report = "direct" if borrower[0] == identity else "chain"
                self.refs.borrower_reported(oid, borrower, report)
                self._schedule_frees()
            else:
                log.warning("an owner does not handle %s (from %r)", tag, identity[:24])
        except (TypeError, ValueError, IndexError) as exc:
            log.warning("dropped a bad %s from %r: %s", tag, identity[:24], exc)

    def _serve_object(self, identity, object_id, remote: bool = False, node: str | None = None) -> None:
        """Answer GetObject from a borrower on ``node`` (None: it has no node store to read from)."""
        entry = self.objects.get(object_id)
        if entry is None:
            error = exc_mod.ObjectLostError(f"object {object_id.hex()} was freed by its owner")
            self._reply_object(identity, object_id, FAILED, None, [], error, remote)
        elif entry.state == PENDING:
            with self.lock:
                entry.waiters.append(lambda e, i=identity, o=object_id: self._serve_object(i, o, remote, node))
        elif entry.state == READY and entry.location is not None and node is not None \
                and node != entry.location.node_id:  # its agent copies it (pull.py)
            spec = self._stored_for(node, object_id, entry, f"object {object_id.hex()[:16]}")
            self._reply_object(identity, object_id, READY, spec, [], None, remote)
        elif entry.state == READY and entry.location is not None and remote and node is None:
            if self.home.local and entry.location.node_id != self.home.node_id:
                self._serve_copied(identity, object_id, entry)
            else:
                self._serve_stored(identity, object_id, entry.location)
        elif entry.state == READY and entry.location is not None:  # in its node's store: it maps it
            self._reply_object(identity, object_id, READY, tuple(entry.location), [], None, remote)
        elif entry.state == READY:
            self._reply_object(identity, object_id, READY, entry.payload, entry.buffers, None, remote)
        else:
            self._reply_object(identity, object_id, FAILED, None, [], self._error_of(entry), remote)

    def _add_copy(self, object_id: bytes, store_id: bytes, node_id: str) -> None:
        """A borrower had our object copied to ``node_id``: free that copy with the rest,
        or now if the object is gone already."""
        with self.lock:
            entry = self.objects.get(object_id)
            if entry is not None and entry.owned and entry.location is not None:
                entry.copies = (entry.copies or set()) | {node_id}
                return
            self.refs.free_copy(node_id, store_id)
        self._schedule_frees()

    def _serve_copied(self, identity, object_id, entry: Entry) -> None:
        """The bytes of our value stored on another node, for a borrower with no store to copy
        it into (a driver joined over TCP): copied into our node's store first (pull.py)."""
        spec = self._stored_for(self.home.node_id, object_id, entry, f"object {object_id.hex()[:16]}")
        self._copy_here(object_id, spec,
                        lambda location: self._serve_stored(identity, object_id, location, location.path),
                        lambda error: self._reply_object(identity, object_id, FAILED, None, [], error, remote=True))

    def _serve_stored(self, identity, object_id, location: tuple, path: str | None = None) -> None:
        """Send a borrower on another node the bytes of a value in a node store.

        The buffers go as views of the mapping (no copy); they keep it mapped, and the
        segment pinned, until zmq has sent them.  A spilled value is restored first,
        without blocking this thread: the agent's answer continues here (``path``).
        """
        _, node_id, store_id, stored_path, size = location
        try:
            payload, buffers = segments.read_segment(path or stored_path, size, store_id=store_id)
        except FileNotFoundError:
            agent = self.agents.get(node_id)
            if path is None and agent is not None:
                request_id = next(self._request_ids)
                self.pending_requests[request_id] = (
                    lambda answer: self._serve_restored(identity, object_id, location, *answer))
                transport.send(agent.socket, encode("RestoreObject", (request_id, store_id)))
                return
            error = exc_mod.ObjectLostError(f"object {object_id.hex()} is gone from the store of node "
                                            f"{node_id[:8]}")
            self._reply_object(identity, object_id, FAILED, None, [], error, remote=True)
            return
        self._reply_object(identity, object_id, READY, bytes(payload), buffers, None, remote=True)

    def _serve_restored(self, identity, object_id, location, path, error, full) -> None:
        if path is None:
            kind = exc_mod.ObjectStoreFullError if full else exc_mod.ObjectLostError
            self._reply_object(identity, object_id, FAILED, None, [], kind(
                f"object {object_id.hex()} was spilled and cannot be restored on node "
                f"{location[1][:8]}: {error}"), remote=True)
        else:
            self._serve_stored(identity, object_id, location, path)

    def _reply_object(self, identity, object_id, state, payload, buffers, error, remote: bool = False) -> None:
        if error is not None:
            try:
                protocol.pickle.dumps(error)
            except Exception:
                error = exc_mod.FarpoolError(str(error))
        frames = encode("ObjectValue", (object_id, state, payload, error), buffers)
        if remote:
            transport.send(self.home.socket, [b"ToPeer", identity, *frames])
        else:
            transport.send(self.owner_socket, [identity, *frames])

    # ------------------------------------------------------------------ actors
    def _dispatch_actor(self, aq: ActorQueue) -> None:
        if aq.state == "DEAD":
            self._fail_calls(ActorCalls.fail_all(aq))
            return
        if not aq.subscribed:
            aq.subscribed = True
            transport.send(self.head, encode("WaitActor", (aq.actor_id,)))
        batch, failed = self.actor_calls.next_batch(aq, self._failed_argument)
        for task, entry in failed:
            self._finish_failed(task, self._error_of(entry))
        if batch:
            self._send_tasks(aq.lease, batch)

    def _fail_calls(self, failed: list) -> None:
        for task, error in failed:
            self._finish_failed(task, error)

    def pin_for_actor(self, actor_id: str, refs: list) -> None:
        """Refs inside an actor's constructor arguments: kept until the actor is dead for good
        (a restart runs __init__ again with them; the actor may keep them all its life)."""
        with self.lock:
            pinned = self.actor_arg_pins.setdefault(actor_id, [])
            for ref in refs:
                entry = self.objects.get(ref._id)
                if entry is not None:
                    entry.task_pins += 1
                    pinned.append(ref._id)
        self.loop.call_soon(transport.send, self.head, encode("WaitActor", (actor_id,)))

    def _on_ActorInfo(self, actor_id: str, info: dict) -> None:
        if info["state"] == "DEAD" and actor_id in self.actor_arg_pins:
            with self.lock:
                self.refs.unpin(self.actor_arg_pins.pop(actor_id))
            self._flush_frees()
        update = self.actor_calls.update(actor_id, info["state"], info["incarnation"], info.get("cause") or "")
        if update is None:
            return
        self._fail_calls(update.failed)
        aq = self.actor_calls.actor(actor_id)
        if update.connect:
            channel = self._actor_channel(info)
            if channel is None:
                return
            ActorCalls.set_lease(aq, LeaseState(aq.incarnation, info["worker_id"], info["node_id"], channel, [],
                                                ("actor", actor_id), actor_id=actor_id))
        self._dispatch_actor(aq)

    def _actor_channel(self, info: dict):
        path = info.get("path")
        agent = self.agents.get(info["node_id"])
        if path and os.path.exists(path) and (agent is None or agent.local):
            channel = self.worker_channels.get(path)
            if channel is None:
                try:
                    stream = transport.StreamChannel.connect(path, self.loop)
                except OSError:
                    return None  # it died meanwhile: the head will say so
                self.loop.add_reader(stream.fd, lambda s=stream: self._on_worker(s))
                channel = self.worker_channels[path] = DirectChannel(stream)
            return channel
        if agent is None:
            agent, _ = self._agent_conn(info["node_id"])
            if agent is None:
                return None  # its node is gone or unknown yet: the head will say
        return RelayChannel(agent, info["worker_id"])

    def submit_actor_call(self, actor_id: str, method: str, qualname: str, args, kwargs, num_returns: int,
                          max_task_retries: int, token=None) -> list:
        info = self.actor_method_infos.get((actor_id, method))
        if info is None:
            info = self.actor_method_infos[(actor_id, method)] = RemoteFunctionInfo(
                qualname, b"actor:" + method.encode(), b"")
        return self.submit(info, args, kwargs, num_returns, {}, max_task_retries, False, qualname,
                           actor_id=actor_id, token=token)

    def actor_token(self, actor_id: str) -> ObjectRef:
        """A small object whose lifetime is the actor's: freed -> the actor ends."""
        oid = self.new_object_id()
        with self.lock:
            self.objects[oid] = Entry(state=READY, payload=pickle.dumps(actor_id), actor_id=actor_id)
        return ObjectRef(oid, self.owner_address)

    def kill_actor(self, actor_id: str, no_restart: bool) -> None:
        """Ask the head to end the actor; with no_restart, later calls from here fail at once."""
        def kill():
            if no_restart:
                self._fail_calls(self.actor_calls.kill(actor_id)[1])
            transport.send(self.head, encode("KillActor", (actor_id, no_restart)))
        self.loop.call_soon(kill)

    def send_head(self, tag: str, fields: tuple) -> None:
        self.loop.call_soon(lambda: transport.send(self.head, encode(tag, fields)))

    # ------------------------------------------------------------------ cancel
    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        self.loop.call_soon(self._cancel, ref._id, force, recursive)

    def register_pool(self, pool_key: str, initializer=None, initargs=(), max_tasks: int | None = None) -> None:
        """Tasks submitted with ``pool_key`` get workers of their own that first run
        ``initializer(*initargs)`` and retire after ``max_tasks`` tasks (facades' hooks)."""
        setup = {"max_tasks": max_tasks, "initializer": None, "initargs": None}
        if initializer is not None:
            setup["initializer"] = protocol.dumps_function(initializer)
            import cloudpickle
            try:
                setup["initargs"] = cloudpickle.dumps(tuple(initargs), protocol=5)
            except Exception as exc:
                raise protocol.SerializationError(f"cannot pickle initargs: {exc}") from exc
        self.pools[pool_key] = setup

    def add_done_callback(self, ref: ObjectRef, fn) -> None:
        """Call ``fn(ref)`` on the callback thread once the object is ready or failed. Any thread."""
        entry = self._entry_for(ref)
        with self.lock:
            pending = entry.state == PENDING
            if pending:
                entry.waiters.append(lambda _entry: self.run_callback(fn, ref))
        if not pending:
            self.run_callback(fn, ref)

    def try_cancel(self, ref: ObjectRef, timeout: float = 30.0) -> bool:
        """Cancel the task making ``ref`` only if it was not dispatched to a worker yet.

        True: it will never run (``get`` raises TaskCancelledError).  False: it is
        running or done.  Decided on the I/O thread, so it cannot race a dispatch.
        """
        done = threading.Event()
        answer = [False]

        def decide():
            entry = self.objects.get(ref._id)
            task = entry.task if entry is not None else None
            if task is not None and not task.cancelled and task.state in (TaskState.WAITING, TaskState.QUEUED):
                self._cancel(ref._id, False, True)
                answer[0] = True
            done.set()
        self.loop.call_soon(decide)
        if not done.wait(timeout):
            return False
        return answer[0]

    def task_state(self, ref: ObjectRef) -> str:
        """WAITING (arguments), QUEUED, RUNNING (dispatched), or DONE. Any thread; a snapshot."""
        # Through the object table: a task just submitted is there before the I/O thread sees it.
        entry = self.objects.get(ref._id)
        task = entry.task if entry is not None else None
        return "DONE" if task is None else task.state.value

    def has_failed(self, ref: ObjectRef) -> bool:
        """True if the ref's task failed (value_of raises its error, not an unpickling one). Any thread."""
        entry = self.objects.get(ref._id)
        return entry is not None and entry.state == FAILED

    def cancel_children(self, parent_task_id: str) -> None:
        """Cancel every task the given task (running in this worker) submitted. Any thread."""
        for child in self.children.pop(parent_task_id, []):
            self.loop.call_soon(self._cancel, child, False, True)

    def _cancel(self, task_id: bytes, force: bool, recursive: bool) -> None:
        """Queued: it never runs.  Running: SIGKILL its worker (``force``), else interrupt its
        code (SIGINT, which cancels the tasks it submitted too; SIGUSR2 leaves them running)."""
        task = self.tasks.get(task_id)
        if task is None or task.cancelled:
            return
        task.cancelled = True
        if task.state in (TaskState.WAITING, TaskState.QUEUED):
            if task.actor_id is not None:
                self.actor_calls.remove_queued(task)
            else:
                self.queues.remove_queued(task)
            self._finish_failed(task, exc_mod.TaskCancelledError(
                f"task {task.name} was cancelled before it ran"))
        elif task.state == TaskState.RUNNING and task.lease is not None and task.actor_id is None:
            import signal as _signal
            agent = self.agents.get(task.lease.node_id)
            if agent is not None:
                sig = _signal.SIGKILL if force else _signal.SIGINT if recursive else _signal.SIGUSR2
                transport.send(agent.socket, encode("SignalWorker", (task.lease.worker_id, int(sig))))

    # ------------------------------------------------------------------ introspection
    def timeline(self) -> list[dict]:
        """Chrome-trace events ("X" complete events, microseconds) of recent finished tasks."""
        events = []
        for name, started, ended, node_id, worker_id, ok in list(self.timeline_events):
            events.append({"name": name, "cat": "task" if ok else "task,error", "ph": "X",
                           "ts": started * 1e6, "dur": max(0.0, ended - started) * 1e6,
                           "pid": f"node {node_id[:8]}", "tid": f"worker {worker_id}",
                           "args": {"ok": ok}})
        return events

    def request_nodes(self, timeout: float = 10) -> list[dict]:
        return self.head_request("GetNodes", (), timeout)


def _write_output(stream: str, data: bytes) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    try:
        out.write(log_repeats.driver_filter.filter(data.decode("utf-8", "replace"), time.monotonic()))
        out.flush()
    except (OSError, ValueError):
        pass


def function_info(fn, name: str, wrapper=None) -> RemoteFunctionInfo:
    data = protocol.dumps_function(fn, wrapper)
    return RemoteFunctionInfo(name, hashlib.sha1(data).digest(), data)
