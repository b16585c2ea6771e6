"""The core client: the per-process runtime of every owner (a driver, or a worker running
nested tasks), as a shell that composes parts.

All sockets live on one daemon I/O thread; user threads hand work over with
``EventLoop.call_soon`` and wait on events::

    user threads: remote() --pickle args--> call_soon(on_submit) --+
                  get()/wait() <--waiters-- entry completed <--+    |
                                                               |    v
    I/O thread:  deps ready -> queue per resource shape -> lease -> ExecuteTask -> worker
                 TaskFinished / WorkerExited / lease replies <-- sockets (agents, workers, head)

The parts, each in its own module, each owning one concern:

    refs.RefTable          owned and borrowed objects, counts, borrowers (pure)
    task_queues.TaskQueues queues per shape, leases, pipelining, take-back (pure)
    actor_calls.ActorCalls per-actor order, restarts, retries (pure)
    connections            every socket, one way to reach an agent, requests and answers
    values                 put / wait / get / futures for user threads, the callback thread
    stored                 node store reads, writes and copies
    borrowing              the reference table's outbox, watched processes, borrowed values
    object_service         what we answer borrowers about objects we own
    submitter              remote() to a leased worker: queues, leases, dispatch
    completion             TaskFinished / WorkerExited: results, retries, failures
    actor_client           actor calls: subscriptions, channels, what an actor pins
    stream_client          streaming generator tasks: items as they come, credit, stop (streams.py: pure)

This shell makes them, connects to the cluster, turns each peer's messages into calls
on the parts (one table per kind of peer: anything else is dropped and logged), and
offers the parts' entry points under the names the public modules use.  Parts reach
each other through the shell (``c.submitter``), never by importing each other.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import threading
import time
import warnings

from farpool import exceptions as exc_mod
from farpool._private import log_repeats, protocol, segments, session, task_events, transport, unix_streams, versions
from farpool._private.actor_calls import ActorCalls
from farpool._private.actor_client import ActorClient
from farpool._private.borrowing import Borrowing
from farpool._private.completion import Completion
from farpool._private.connections import AgentConn, Connections
from farpool._private.head_link import HeadLink
from farpool._private.node_table import NodeTable
from farpool._private.object_ref import ObjectRef
from farpool._private.object_service import ObjectService
from farpool._private.protocol import encode
from farpool._private.refs import FAILED, PENDING, READY, Entry, RefTable
from farpool._private.shared_args import SharedArgs
from farpool._private.stored import StoreReads
from farpool._private.stream_client import Streams
from farpool._private.submitter import Submitter
from farpool._private.task_queues import RemoteFunctionInfo, TaskQueues, TaskRecord, TaskState
from farpool._private.values import Values

__all__ = ["CoreClient", "Entry", "READY", "ObjectRef", "RemoteFunctionInfo", "TaskRecord", "function_info"]

log = logging.getLogger("farpool.client")

# How long shutdown waits for the callback thread to finish what arrived before it (worker
# output, future callbacks): longer delivers more of a flood of output, shorter bounds
# shutdown when a user callback blocks.
CALLBACKS_AT_SHUTDOWN_S = 5.0
# How many tasks down a chain of arguments a timed-out get() names (where_pending).
WHERE_DEPTH = 4


class CoreClient:
    """See the module docstring.  Made by ``runtime.init``/``join``; one per process."""

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
        self.job_setup = cfg.get("job_setup") or {}
        self.nodes: list[dict] = []
        self.node_table = NodeTable()  # the head's, whole then changes (node_table.py); rows in self.nodes
        self.table_syncing = False     # we asked the head for it whole (SyncNodes) after a gap
        self.broken: BaseException | None = None
        self.owner_address = None
        self.peer_address = None
        self._ids = itertools.count(1)
        self._release_scheduled = False
        self._thread: threading.Thread | None = None
        self.loop = transport.EventLoop()
        # The pure parts, and the table's lock and objects under the names the parts use.
        self.refs = RefTable(self.identity, self.in_worker)
        self.lock = self.refs.lock
        self.objects: dict[bytes, Entry] = self.refs.objects
        self.queues = TaskQueues(self.lock)
        self.tasks: dict[bytes, TaskRecord] = self.queues.tasks  # submitted and not done
        self.actor_calls = ActorCalls()
        self.events = task_events.TaskEventBuffer(lock=self.lock)  # reported to the head in batches (task_events.py)
        # The parts that act.
        self.conns = Connections(self.identity, self.token, self.loop, self._agent_hello,
                                 on_agent=self._on_agent, on_agent_silent=self._agent_silent,
                                 on_worker=self._on_worker, on_owner_reply=lambda s: self.borrowing.on_owner_reply(s))
        self.agents: dict[str, AgentConn] = self.conns.agents
        self.unreachable = self.conns.unreachable
        self.owner_conns = self.conns.owner_conns
        self.values = Values(self)
        self.stored = StoreReads(self)
        self.shared_args = SharedArgs(self)  # large by-value arguments stored once
        self.borrowing = Borrowing(self)
        self.object_service = ObjectService(self)
        self.submitter = Submitter(self)
        self.completion = Completion(self)
        self.actor_client = ActorClient(self)
        self.streams = Streams(self)
        self.submitter.bind()
        self.completion.bind()
        self._entry_points()
        self._peer_tables()

    def _entry_points(self) -> None:
        """The parts' entry points, under the names the public modules call (bound once:
        no extra call on the task path)."""
        v, s, a, conns = self.values, self.submitter, self.actor_client, self.conns
        self.add_local_ref = self.refs.add_ref  # what ObjectRef calls as it is made (on the task path)
        self.put, self.get, self.value_of = v.put, v.get, v.value_of
        self.wait_entries, self.future_for, self.add_done_callback = v.wait_entries, v.future_for, v.add_done_callback
        self.run_callback, self.set_blocked = v.run_callback, v.set_blocked
        self.fetch_here = self.stored.fetch_here
        self.submit, self.register_pool, self.children = s.submit, s.register_pool, s.children
        self.take_sub_borrowed = self.refs.take_sub_borrowed
        self.submit_actor_call, self.actor_token = a.submit_call, a.token
        self.pin_for_actor, self.kill_actor = a.pin_arguments, a.kill
        self.agent_request, self.head_request = conns.agent_request, conns.head_request

    @property
    def home(self) -> AgentConn | None:
        return self.conns.home

    @property
    def head(self):
        return self.conns.head

    # ------------------------------------------------------------------ start/stop
    def connect(self) -> dict:
        """Connect to the head and the home node agent (on the calling thread), then start I/O."""
        cfg = self.cfg
        conns = self.conns
        hello = encode("Hello", ("driver" if not self.in_worker else "worker",
                                 {"pid": os.getpid(), "client": self.identity, "versions": versions.ours()}))
        reply = conns.connect_head(cfg["head_address"], hello, cfg.get("start_deadline_s", 30), self.session_dir)
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
        self.nodes = self.node_table.full(welcome.get("nodes_version"), welcome["nodes"])
        self.cluster_embedded = welcome["embedded"]
        self.head_address = welcome.get("address")
        # The home agent: ours on this machine, else the head node's over TCP.
        home_info = cfg.get("agent_address")
        node_id = cfg.get("node_id")
        node = self._wait_for_node(welcome)  # the cluster is usable once a node has registered
        if home_info is None:
            node_id = node["node_id"]
            home_info = node["ipc"] if cfg.get("local") and node.get("ipc") else node["tcp"]
        home = conns.home = conns.open_agent(node_id, home_info)
        home_node = next((n for n in self.nodes if n["node_id"] == node_id), {})
        if home_node.get("store_in_shm") is False and not self.in_worker and home.local:
            warnings.warn(
                f"the object store of this node ({node_id[:8]}) lives on disk in {home_node.get('store_dir')}, "
                "not in shared memory: /dev/shm has less free space than object_store_memory. Large "
                "objects are slower to write and read. Give the container a larger /dev/shm "
                "(docker run --shm-size=...), or lower object_store_memory.", RuntimeWarning, stacklevel=3)
        # Borrowers on our node ask us for values on an ipc ROUTER of ours; over TCP (we may run
        # on another machine than our home agent's node) they ask through that agent.
        endpoint = None
        if home.local and self.session_dir and os.path.isdir(self.session_dir):
            endpoint = conns.bind_owner_socket(self.session_dir, f"o-{self.client_id.hex()}",
                                               self.object_service.on_socket)
        # (identity, node, ipc endpoint, pid): how refs name their owner and borrowers name themselves
        self.owner_address = protocol.OwnerAddress(self.identity, node_id, endpoint, os.getpid())
        # (as it goes in messages: the plain tuple, as pickling a named one costs more)
        self.peer_address = self.refs.peer_address = tuple(self.owner_address)
        self.loop.add_reader(conns.head, self._on_head)
        self.head_link = HeadLink(self)  # the head may go away and come back: every request waits for it
        self.head_request = self.head_link.request
        for pid, what in cfg.get("watch_pids", ()):
            # The embedded head and node agent: if one dies, fail everything at once, no hang.
            conns.watch_pid(("runtime", pid), pid, lambda pid=pid, what=what: self._runtime_died(pid, what))
        self.reporter = task_events.Reporter(
            self.events, self.loop, lambda b: transport.send(conns.head, encode("TaskEvents", tuple(b))), self.job_id)
        self.loop.call_soon(self.reporter.start)
        self._thread = threading.Thread(target=self._run, name="farpool-io", daemon=True)
        self._thread.start()
        return welcome

    def _wait_for_node(self, welcome) -> dict:
        nodes = [n for n in welcome["nodes"] if n.get("alive")]
        if nodes:
            return next((n for n in nodes if n.get("is_head_node")), nodes[0])
        # The embedded head is up before its node agent registers: wait for the table.
        head = self.conns.head
        deadline = time.monotonic() + self.cfg.get("start_deadline_s", 30)
        while time.monotonic() < deadline:
            if not head.poll(max(1, (deadline - time.monotonic()) * 1000)):
                break
            tag, fields, _ = protocol.decode(head.recv_multipart())
            if tag in ("NodeTable", "NodeTableDelta"):
                rows = self.node_table.full(fields[1], fields[0]) if tag == "NodeTable" \
                    else self.node_table.delta(*fields)
                if rows is None:  # (a gap: the head sends the table whole)
                    transport.send(head, encode("SyncNodes", ()))
                    continue
                self.nodes = rows
                nodes = [n for n in rows if n.get("alive")]
                if nodes:
                    return next((n for n in nodes if n.get("is_head_node")), nodes[0])
        raise ConnectionError("the cluster has no live node agent (none registered with the head in time); "
                              f"see the logs in {self.session_dir}")

    def _agent_hello(self) -> list:
        # The pid lets an agent on our machine (same pid_space) treat our death as our Goodbye.
        return encode("Hello", ("client", {"job_id": self.job_id, "worker_id": self.worker_id,
                                           "node_id": self.cfg.get("node_id"),
                                           "log_to_driver": self.cfg.get("log_to_driver", False),
                                           "pid": os.getpid(), "pid_space": session.pid_space(),
                                           "driver": not self.in_worker}))

    def _runtime_died(self, pid: int, what: str) -> None:
        self.conns.unwatch_pid(("runtime", pid))
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
        if getattr(self, "head_link", None) is not None:
            self.head_link.close()
        self.conns.close_all()
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
            self.reporter.stop()  # the last task events, before the Goodbye
            transport.send(self.conns.head, encode("Goodbye", ("driver", self.identity.decode())))
            self.loop.stop()
        try:
            self.loop.call_soon(bye)
        except OSError:  # the I/O thread ended (and closed its loop) since we looked
            pass
        self._thread.join(timeout=10)
        self._thread = None
        self._break(exc_mod.FarpoolError("farpool was shut down while this was pending"))
        # Worker output and callbacks that arrived before shutdown run before it returns.
        self.values.stop_callbacks(CALLBACKS_AT_SHUTDOWN_S)

    def _break(self, error: BaseException) -> None:
        """Fail every pending object and request with ``error`` (the cluster is gone)."""
        self.broken = error
        self.conns.break_all(error)
        self.values.fail_pending(error)

    # ------------------------------------------------------------------ refs (any thread)
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
            self.borrowing.schedule_frees()

    def _drain_released(self) -> None:
        self._release_scheduled = False
        self.refs.drain_released()
        self.borrowing.flush()

    def pin_quietly(self, refs: list) -> None:
        """Refs handed on where no borrower protocol reaches (results, actor arguments): keep them."""
        self.refs.pin_quietly([ref._id for ref in refs])

    def mark_registered(self, refs: list, caller: tuple | None = None) -> None:
        """Borrowed refs this process now reports holding (see RefTable.mark_registered)."""
        self.refs.mark_registered([ref._id for ref in refs], caller)
        self.borrowing.schedule_frees()

    def lend_returned(self, refs: list, caller: tuple | None) -> None:
        """Refs nested in a value this worker returns to ``caller``: the caller borrows them."""
        self.borrowing.lend_returned(refs, caller)

    def pin_forever(self, ref: ObjectRef) -> None:
        if self.refs.pin_forever(ref._id):
            warnings.warn(f"ObjectRef {ref.hex()} was pickled outside farpool (not as a task argument, "
                          "result or put value); it stays pinned until this session ends. Pass refs to "
                          "tasks, actors or put() so farpool can track who holds them.", RuntimeWarning,
                          stacklevel=3)

    # ------------------------------------------------------------------ messages (I/O thread)
    # What each kind of peer may send us: (peer, fields, buffers) -> None.  Anything else
    # is dropped and logged (Connections.receive).
    def _peer_tables(self) -> None:
        s, done, b, conns = self.submitter, self.completion, self.borrowing, self.conns

        def answer(_peer, fields, _buffers):
            conns.answer(fields[0], fields[1])

        def answer_rest(_peer, fields, _buffers):
            conns.answer(fields[0], tuple(fields[1:]))

        self._from_head = {
            "NodeTable": lambda _peer, fields, _buffers: self._on_whole_node_table(*fields),
            "NodeTableDelta": lambda _peer, fields, _buffers: self._on_node_delta(*fields),
            "ActorInfo": lambda _peer, fields, _buffers: self.actor_client.on_actor_info(*fields),
            "ActorRegistered": answer_rest, "Nodes": answer, "KVValue": answer, "Reply": answer,
            "PlacementGroupReply": answer}
        self._from_worker = {
            "TaskFinished": lambda peer, fields, buffers: done.on_task_finished(fields, buffers, peer),
            "TakenBack": lambda _peer, fields, _buffers: s.on_taken_back(*fields),
            "ItemReady": lambda peer, fields, buffers: self.streams.on_item_ready(fields, buffers, peer)}
        self._from_agent = {  # and what its remote workers send us through it
            **self._from_worker, "Reply": answer, "Nodes": answer,
            "ObjectAllocated": answer_rest, "StoreStats": answer_rest, "ObjectCopied": answer_rest,
            # a put of ours into our node's store on another machine, and reading it back (stored.py)
            "ChunkWritten": answer_rest, "Chunk": lambda _conn, fields, buffers: conns.answer(fields[0], (*fields[1:], buffers)),
            "Welcome": lambda conn, _fields, _buffers: conns.agent_answered(conn),
            "Probe": lambda _conn, _fields, _buffers: None,  # an agent checked our TCP connection is up
            "SegmentsDropped": lambda _conn, fields, _buffers: segments.forget_written(fields[0]),
            # worker output for this driver: written on the callback thread, never here
            "WorkerLog": lambda _conn, fields, _buffers: self.values.run_callback(_write_output, *fields),
            "LeaseGranted": lambda conn, fields, _buffers: s.on_lease_granted(conn, *fields),
            "LeaseSpillback": lambda _conn, fields, _buffers: s.on_lease_spillback(*fields),
            "LeaseInfeasible": lambda _conn, fields, _buffers: s.on_lease_infeasible(*fields),
            "WorkerExited": lambda _conn, fields, _buffers: done.on_worker_exited(*fields),
            "YieldLease": lambda conn, fields, _buffers: s.on_yield_lease(conn, *fields),
            "PeerGone": lambda _conn, fields, _buffers: b.peer_gone(*fields),
            # the node drains: what we own only there is copied away before it leaves
            "ObjectsLeaving": lambda conn, fields, _buffers: self.stored.save_from(conn, *fields)}

    def _on_head(self) -> None:
        for frames in transport.recv_all(self.conns.head):
            self.conns.receive(frames, None, self._from_head, "the head")

    def _on_agent(self, conn: AgentConn) -> None:
        for frames in transport.recv_all(conn.socket):
            if frames[0] == b"FromPeer":  # an owner message routed by an agent (see Borrowing.send_owner)
                self._on_peer_message(frames)
            else:
                self.conns.receive(frames, conn, self._from_agent, f"the agent of node {conn.node_id[:8]}")
        self._drain_released()

    def _on_worker(self, stream: unix_streams.StreamChannel) -> None:
        for frames in stream.read():
            self.conns.receive(frames, stream, self._from_worker, "a worker")
        if stream.eof:  # the worker exited; the agent's WorkerExited drives the retries
            self.conns.worker_stream_ended(stream)
        self._drain_released()

    def _on_peer_message(self, frames) -> None:
        """FromPeer(sender, *message): an owner message from a process on another node, to
        us as an owner (object_service) or as a borrower (its ObjectValue answer)."""
        if len(frames) < 4:
            log.warning("dropped a bad message routed by an agent: FromPeer has %d frame(s), expected at "
                        "least 3", len(frames) - 1)
            return
        sender = bytes(frames[1])
        message = protocol.decode_or_log(frames[2:], "a process on another node", log)
        if message is None:
            return
        tag, fields, buffers = message
        if tag != "ObjectValue":
            self.object_service.on_request(sender, tag, fields, remote=True)
            return
        try:
            self.borrowing.take_value(fields, buffers, remote=True)
        except (TypeError, ValueError) as exc:
            log.warning("dropped a bad ObjectValue from %r: %s", sender[:24], exc)

    def _on_whole_node_table(self, nodes: list, version=None) -> None:
        self.table_syncing = False
        self._on_node_table(self.node_table.full(version, nodes))

    def _on_node_delta(self, base, version, changes: list) -> None:
        """Changes of the head's node table; after a gap (one missed), the whole table again."""
        rows = self.node_table.delta(base, version, changes)
        if rows is not None:
            self._on_node_table(rows)
        elif not self.table_syncing:
            self.table_syncing = True
            transport.send(self.conns.head, encode("SyncNodes", ()))

    def _on_node_table(self, nodes: list) -> None:
        """The head's node table: leases, lease requests, borrowers, owners and stored objects
        on nodes it declared dead are lost (retried elsewhere, released, failed, rebuilt)."""
        self.nodes = nodes
        dead = {n["node_id"]: n.get("death_reason", "") for n in nodes if not n["alive"]}
        for node_id, reason in dead.items():
            self.borrowing.owner_lost(lambda owner, n=node_id: owner.node_id == n,
                                      f"node {node_id[:8]} died ({reason or 'no reason given'})")
        for identity in self.refs.borrowers_on(dead):  # a borrower on a dead node holds nothing any more
            self.borrowing.borrower_died(identity)
        for (node_id, lease_id), lease in list(self.queues.leases.items()):
            if node_id in dead:
                self.completion.on_worker_exited(lease_id, {
                    "node_id": node_id, "worker_id": lease.worker_id, "pid": "?", "exitcode": None,
                    "signal": None, "node_died": dead[node_id]})
        draining = {n["node_id"] for n in nodes if n["alive"] and n.get("draining")}
        if draining:
            self.submitter.nodes_draining(draining)
        if dead:  # our stored objects whose every copy was there: rebuilt, or failed (lineage)
            with self.lock:
                lost = self.refs.lost_on(dead)
            self.completion.objects_lost(lost, dead)
        for node_id in dead:
            conn = self.agents.get(node_id)
            if conn is not None and conn is not self.conns.home:
                del self.agents[node_id]
                self._close_agent(conn)

    def _close_agent(self, conn: AgentConn) -> None:
        self.conns.close_agent(conn)
        self.submitter.agent_closed(conn)

    def _agent_silent(self, conn: AgentConn, why: str) -> None:
        """An agent we opened never answered (Connections gave it up and closed it)."""
        self.submitter.agent_closed(conn)
        self.borrowing.owner_lost(lambda owner: owner.node_id == conn.node_id, why)

    def send_home(self, tag: str, fields: tuple) -> None:
        """(I/O thread) A message to our home agent."""
        transport.send(self.conns.home.socket, encode(tag, fields))

    def send_head(self, tag: str, fields: tuple) -> None:
        """A message to the head (any thread)."""
        self.loop.call_soon(lambda: transport.send(self.conns.head, encode(tag, fields)))

    def agent_of(self, node_id: str, timeout: float = 30.0) -> AgentConn:
        """Our connection to the agent of ``node_id`` (opened if needed). Any thread but the I/O one."""
        return self.conns.agent_of(node_id, lambda: self.nodes, timeout)

    def request_nodes(self, timeout: float = 10) -> list[dict]:
        return self.head_request("GetNodes", (), timeout)

    # ------------------------------------------------------------------ cancel
    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        self.loop.call_soon(self._cancel, ref._id, force, recursive)

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

    def where_pending(self, ref: ObjectRef) -> str:
        """For a get() that timed out: where the task making ``ref`` is, as seen here (", its
        task f is queued for ..."), or "" when it is not ours.  Any thread; a snapshot read
        without the I/O thread's help, so a table changing under it gives "" instead."""
        entry = self.objects.get(ref._id)
        task = entry.task if entry is not None else None
        if task is None:
            return "" if entry is None or entry.owned else f", owned by {entry.owner}"
        text = ""
        try:
            for _ in range(WHERE_DEPTH):  # down the chain of arguments it waits for
                where = (self.actor_calls.where(task) if task.actor_id is not None
                         else self.queues.where(task))
                text += f"{', its' if not text else '; whose'} task {task.name} {where}"
                pending = next((e for e in (self.objects.get(r._id) for _, r in task.ref_slots)
                                if e is not None and e.state == PENDING), None) if task.deps_left else None
                if pending is None or pending.task is None:
                    break
                task = pending.task
        except RuntimeError:  # (a table changed size while read)
            pass
        return text

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
            self.completion.finish_failed(task, exc_mod.TaskCancelledError(
                f"task {task.name} was cancelled before it ran"))
            return
        if task.stream is not None and task.state == TaskState.RUNNING and task.lease is not None:
            self.streams.stop_running(task)  # its producer stops before its next item (actor methods too)
        if task.state == TaskState.RUNNING and task.lease is not None and task.actor_id is None:
            agent = self.agents.get(task.lease.node_id)
            if agent is not None:
                sig = signal.SIGKILL if force else signal.SIGINT if recursive else signal.SIGUSR2
                transport.send(agent.socket, encode("SignalWorker", (task.lease.worker_id, int(sig))))


def _write_output(stream: str, data: bytes) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    try:
        out.write(log_repeats.driver_filter.filter(data.decode("utf-8", "replace"), time.monotonic()))
        out.flush()
    except (OSError, ValueError):
        pass


def function_info(fn, name: str, wrapper=None) -> RemoteFunctionInfo:
    try:  # CPython's own BLAKE2: hashlib would load OpenSSL (4 ms at a driver's first remote(), 4 MB)
        from _blake2 import blake2b
    except ImportError:  # (an interpreter built without it)
        from hashlib import blake2b
    data = protocol.dumps_function(fn, wrapper)
    return RemoteFunctionInfo(name, blake2b(data, digest_size=20).digest(), data)
