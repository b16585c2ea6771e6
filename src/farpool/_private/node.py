"""The node agent: one per machine; owns its workers, their leases and resources.

Runs as its own process (``python -m farpool._private.node``), one thread, one
event loop.  The launcher is forked before anything else (see launcher.py)::

    local clients (ipc) --RequestLease/ReturnLease/Goodbye--> +-------+ --spawn/kill--> launcher
    remote clients (tcp, CURVE) --same + Relay(worker)------> | agent | <--started/exited--
    workers (ipc) --WorkerReady/Relay back/Blocked----------> |       | --Heartbeat--> head
    any client --ToPeer(client)--> FromPeer(sender) --------> +-------+ <--NodeTable--

Local clients send tasks straight to a leased worker's own ipc socket; remote
clients send them to the agent's TCP port wrapped in ``Relay`` and the agent
passes them on (workers need no ports of their own).  Owner messages between
processes on different nodes (``GetObject``, ``ObjectValue``, ``BorrowReleased``,
``AddBorrower``) travel the same way: ``ToPeer`` to the agent of the owner's
node, which hands them to the client with that identity as ``FromPeer``, and
tells the senders ``PeerGone`` when it cannot (see ``_to_peer``).  The lease
decisions are in leases.LeaseManager (pure); this module is the I/O shell
around it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import time

from farpool._private import (addresses, launcher, protocol, pull, pulse, scheduling, segments, session, spill,
                              stacks, store, transport, versions, worker_logs)
from farpool._private.leases import LeaseManager, LeaseRequest
from farpool._private.protocol import encode

log = logging.getLogger("farpool.node")

HEARTBEAT_S = 1.0
# The head silent this long means the cluster is gone: the agent exits.
HEAD_TIMEOUT_S = float(os.environ.get("FARPOOL_HEAD_TIMEOUT_S", "15"))

# A client on TCP whose connection closed and stayed down this long is taken for dead
# (its process, its machine or the network between us): what it held is released as if
# it had said Goodbye.  Shorter frees its leases and borrows sooner; longer lets it ride
# out a longer network cut (zmq reconnects by itself), since a client taken for dead
# while it lives has lost its leases and its borrows.  A killed process's connection
# closes at once; a lost machine's after transport.HEARTBEAT_TIMEOUT_MS.
CLIENT_GRACE_S = float(os.environ.get("FARPOOL_CLIENT_GRACE_S", "10"))
# How long after a connection closed its client is first looked for (zmq takes the
# connection's routing id away a moment after it reports the close).
CLOSE_SETTLE_S = min(0.5, CLIENT_GRACE_S)
# Checks of the TCP clients due this close together are done once.
CHECK_COALESCE_S = 0.25

IPC, TCP, HEAD = "ipc", "tcp", "head"
HEAD_CLIENT = (HEAD, b"")  # the head leases workers for actors like any client

# What each kind of peer may send the agent; anything else is dropped with one log
# line naming the peer's kind and the tag.  A peer's kind is its socket and the prefix
# of the identity it connects with (see peer_kind).  Relay and ToPeer are routed raw.
_CLIENT_ANYWHERE = frozenset({
    "Hello", "Ping", "Goodbye", "RequestLease", "CancelLease", "ReturnLease", "SignalWorker",
    "FreeObjects", "RestoreObject", "StoreStats", "GetNodes", "WatchPeer", "Relay", "ToPeer",
    "DumpStacks", "ReadLogs"})  # farpool stack / farpool logs (a CLI is a client)
MAY_SEND = {
    # a client on this machine (a driver, a worker's own client, the CLI), ipc, "c:..."
    "local client": _CLIENT_ANYWHERE | {"WorkerBlocked", "WorkerUnblocked", "AllocateObject", "PullObject"},
    # a client on another machine, TCP, "c:...": nothing that needs this machine's store
    "remote client": _CLIENT_ANYWHERE,
    # one of our workers, ipc, "w:<worker id>": Relay carries its answers back to clients
    "worker": frozenset({"WorkerReady", "AllocateObject", "Relay"}),
    # a worker's argument reader (task_args.py), ipc, an identity zmq made up
    "argument reader": frozenset({"PullObject"}),
    # the agent of another node copying our objects (pull.py), TCP, "a:<node id>"
    "peer agent": frozenset({"Hello", "Ping", "ReadChunk", "WatchPeer"}),
    # the head, on our connection to it (Relay: it creates an actor in one of our workers)
    "head": frozenset({"Relay", "RequestLease", "ReturnLease", "SignalWorker", "NodeRegistered", "NodeTable",
                       "Error", "HeartbeatAck"}),
}
# What the launcher (a forked child, over a pipe) may report.
LAUNCHER_MAY_SEND = frozenset({"output", "started", "exited"})


def peer_kind(socket_kind: str, identity: bytes) -> str | None:
    """The kind of peer (a key of MAY_SEND) behind ``identity`` on our ``socket_kind`` socket;
    None for an identity no kind of peer of that socket uses."""
    if socket_kind == IPC:
        if identity.startswith(b"c:"):
            return "local client"
        if identity.startswith(b"w:"):
            return "worker"
        return "argument reader" if identity[:1] == b"\x00" else None  # zmq's ids start with a 0 byte
    if identity.startswith(b"c:"):
        return "remote client"
    if identity.startswith(b"a:"):
        return "peer agent"
    return None


class NodeAgent:
    def __init__(self, args, token: str, launcher_pid: int, launcher_sock):
        self.args = args
        self.session_dir = args.session_dir
        self.node_id = args.node_id
        self.token = token
        self.embedded = args.embedded
        # Without object_store_memory: a share of the machine's memory, split among its agents.
        self.share = None if args.object_store_memory else store.MachineShare(
            os.path.join(session.tmp_root(), "agents"))
        capacity = int(args.object_store_memory or self.share.capacity())
        directory, self.store_in_shm = store.choose_dir(self.session_dir, self.node_id, capacity)
        # A directory of our own, also inside a spill directory that the user named (and
        # that others may share): we remove ours when we stop, never theirs.
        spill_dir = (os.path.join(os.path.abspath(args.spill_dir),
                                  f"farpool-{os.path.basename(self.session_dir)}-{self.node_id[:8]}")
                     if args.spill_dir else os.path.join(self.session_dir, "spill"))
        self.store = store.ObjectStore(directory, capacity, spill_dir)
        import psutil
        memory = args.memory if args.memory is not None else psutil.virtual_memory().total - capacity
        totals = scheduling.make_totals(args.num_cpus, args.num_gpus, json.loads(args.resources or "{}"),
                                        memory=max(0, memory), object_store_memory=capacity)
        self.leases = LeaseManager(self.node_id, totals, embedded=args.embedded)
        self.loop = transport.EventLoop()
        self.mover = spill.Mover(self.loop.call_soon, self._on_move_done)
        self.allocating: dict[bytes, list] = {}  # store id -> readers of a copy whose segment awaits room
        self.pulse: pulse.Pulse | None = None
        self.rejoining = False
        self.loop_lag_max = 0.0  # the agent loop's largest lateness (its heartbeat timer), seconds
        self.sockets = {}
        self.ipc = transport.router()
        self.ipc.bind(session.ipc(self.session_dir, "node"))
        self.sockets[IPC] = self.ipc
        self.loop.add_reader(self.ipc, lambda: self._on_socket(IPC))
        self.tcp_address = None
        if args.host:
            self.zap = transport.ZapHandler(token)
            self.loop.add_reader(self.zap.socket, self.zap.handle)
            self.tcp = transport.router()
            transport.make_curve_server(self.tcp, token)
            port = transport.bind_tcp(self.tcp, args.host, args.port)
            # What others connect to: --node-ip when we listen on more than one address.
            self.tcp_address = addresses.join(args.node_ip or args.host, port)
            self.sockets[TCP] = self.tcp
            self.loop.add_reader(self.tcp, lambda: self._on_socket(TCP))
            self.tcp_watch = transport.DisconnectWatch(self.tcp)
            self.loop.add_reader(self.tcp_watch.socket, self._on_tcp_closed)
        self.launcher_pid = launcher_pid
        self.launcher_sock = launcher_sock
        self.launcher_reader = launcher.MessageReader(launcher_sock)
        self.handlers = self._build_handlers()
        self.loop.add_reader(launcher_sock.fileno(), self._on_launcher)
        self.worker_pids: dict[str, int] = {}
        self.pids_ever: dict[str, int] = {}  # worker id -> pid, also of exited workers (their logs stay)
        self.stack_requests: list = []  # DumpStacks waiting, the first one in progress (see _on_DumpStacks)
        self.client_jobs: dict[tuple, object] = {}
        self.log_clients: dict[object, set] = {}  # job_id -> drivers that want worker output
        self.worker_clients: dict[str, set] = {}  # worker_id -> the nested clients inside it
        self.store_writers: set = set()  # local peers that allocated segments (they may cache mappings)
        self.trim_timer = None
        self.peer_senders: dict[bytes, set] = {}  # client identity -> clients that sent it ToPeer or WatchPeer
        self.connected: set = set()  # identities of the clients that said Hello and have not left
        self.client_pidfds: dict[tuple, tuple] = {}  # client -> (pidfd, is a driver, job id): see _on_Hello
        # Clients on TCP not watched by pid: client -> (is a driver, job id); see _check_tcp_clients
        self.tcp_clients: dict[tuple, tuple] = {}
        self.unreachable: dict[tuple, float] = {}  # tcp client -> when it was first found down
        self.tcp_checks: list[float] = []  # when the checks scheduled are due
        self.pid_space = session.pid_space()
        # Copies of objects from other nodes' stores (see pull.py)
        self.pulls: dict[int, pull.Pull] = {}          # pull id -> in progress
        self.pulls_by_store: dict[bytes, pull.Pull] = {}
        self.pull_ids = itertools.count(1)
        self.pull_timer = None
        self.peer_agents: dict[str, object] = {}      # node id -> our DEALER to that node's agent
        self.copy_counts = {"pulls": 0, "pulled_bytes": 0, "pull_failures": 0, "chunks_sent": 0}
        self.watched_owners: set = set()  # owners on other nodes of copies we hold (WatchPeer)
        self.last_ack = time.monotonic()
        self.head = None
        self.cluster_nodes: list[dict] = []

    # --- start ---
    def connect_head(self) -> None:
        info = {"node_id": self.node_id, "total": self.leases.resources.total,
                "ipc": session.ipc(self.session_dir, "node"), "tcp": self.tcp_address,
                "session_dir": self.session_dir, "hostname": os.uname().nodename,
                "pid": os.getpid(), "is_head_node": self.args.head_node,
                "store_dir": self.store.directory, "store_in_shm": self.store_in_shm,
                "versions": versions.ours()}
        hello = encode("RegisterNode", (info,))
        self.head = transport.dealer(f"node:{self.node_id}".encode())
        if self.args.head_address.startswith("ipc://"):
            self.head.connect(self.args.head_address)
            transport.send(self.head, hello)
        else:
            reply = transport.connect_tcp(self.head, self.args.head_address, self.token, hello)
            tag, fields, _ = protocol.decode(reply)
            if tag == "Error" and fields[0] == "version-mismatch":
                raise ConnectionError(f"the head refused this node: {fields[1]}")
            self._on_head_message(reply)
        self.loop.add_reader(self.head, self._on_head)
        self.heartbeat_due = time.monotonic() + HEARTBEAT_S
        self.loop.call_later(HEARTBEAT_S, self._heartbeat)
        self.register_info = info
        self.pulse = pulse.Pulse(self.node_id, self.args.head_address, self.token,
                                 lambda why: self.loop.call_soon(self._declared_dead, why))
        self.pulse.start()

    def _build_handlers(self) -> dict:
        """MAY_SEND as handlers, built once: kind -> tag -> handler(client, *fields); the head's
        take (*fields) (they come on our connection to it; Relay and ToPeer are routed raw)."""
        handlers = {kind: {tag: getattr(self, "_on_" + tag) for tag in tags - {"Relay", "ToPeer"}}
                    for kind, tags in MAY_SEND.items() if kind != HEAD}
        handlers[HEAD] = {
            "RequestLease": lambda *fields: self._on_RequestLease(HEAD_CLIENT, *fields),
            "ReturnLease": lambda *fields: self._on_ReturnLease(HEAD_CLIENT, *fields),
            "SignalWorker": lambda *fields: self._on_SignalWorker(HEAD_CLIENT, *fields),
            "NodeRegistered": lambda nodes, head_address: self._on_node_table("NodeRegistered", nodes),
            "NodeTable": lambda nodes: self._on_node_table("NodeTable", nodes),
            "Error": self._on_head_error,
            "HeartbeatAck": lambda *_: None,  # the head heard us: every message from it sets last_ack
        }
        return handlers

    def _declared_dead(self, why: str) -> None:
        """The head took us for dead (late, not gone: it heard nothing for NODE_TIMEOUT_S).
        Clients have given up our leases and retried their tasks elsewhere; we end those
        tasks too (their results would go nowhere) and register again, with what we hold."""
        if self.rejoining:
            return
        self.rejoining = True
        log.warning("the head declared this node dead (%s); ending its leased tasks and joining again", why)
        acts = None
        for lease_id in list(self.leases.leases):
            more = self.leases.return_lease(lease_id, kill=True)
            acts = more if acts is None else acts.extend(more)
        if acts is not None:
            self._apply(acts)
        transport.send(self.head, encode("RegisterNode", (self.register_info,)))

    def start_workers(self) -> None:
        self._apply(self.leases.prestart())

    # --- head ---
    def _on_head(self) -> None:
        for frames in transport.recv_all(self.head):
            self._on_head_message(frames)

    def _on_head_message(self, frames) -> None:
        try:
            if frames[0] == b"Relay":  # the head creating an actor in one of our workers
                if not transport.send(self.ipc, [b"w:" + frames[1], b"Relayed", b"c:head:", *frames[2:]]):
                    log.warning("relay from the head to worker %s failed: it is gone", frames[1])
                return
            tag, fields, _ = protocol.decode(frames)
            handler = self.handlers[HEAD].get(tag)
            if handler is None:
                log.warning("dropped %s from the head: the head may not send it to a node agent", tag)
                return
            self.last_ack = time.monotonic()
            handler(*fields)
        except (protocol.ProtocolError, TypeError, ValueError, KeyError, IndexError) as exc:
            log.warning("dropped a bad message from the head: %s", exc)
        except Exception:  # a bug handling one message must not take the whole node down
            log.exception("failed to handle a message from the head; still serving")

    def _on_node_table(self, tag: str, nodes) -> None:
        if tag == "NodeRegistered" and self.rejoining:
            log.warning("this node joined the cluster again")
            self.rejoining = False
        if not isinstance(nodes, list):
            raise protocol.ProtocolError(f"{tag} carries a {type(nodes).__name__}, expected the node table")
        self.cluster_nodes = nodes
        self._apply(self.leases.set_cluster_view(self.cluster_nodes))
        self._sources_died()

    def _on_head_error(self, code, *details) -> None:
        if code == "unknown-node":
            self._declared_dead(details[0])

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self.loop_lag_max = max(self.loop_lag_max, now - self.heartbeat_due)
        if self.pulse is not None:  # the liveness thread hears the head even while we are busy
            self.last_ack = max(self.last_ack, self.pulse.last_ack)
        if now - self.heartbeat_due > HEAD_TIMEOUT_S / 2:
            # We did not run for a while ourselves (stopped, frozen, starved): what the head
            # sent meanwhile is still unread (timers run before sockets are read), so its
            # silence says nothing yet; give it a fresh HEAD_TIMEOUT_S.
            self.last_ack = now
        self.heartbeat_due = now + HEARTBEAT_S
        if time.monotonic() - self.last_ack > HEAD_TIMEOUT_S:
            log.error("the head has not answered for %.0f s: the cluster is gone; exiting",
                      time.monotonic() - self.last_ack)
            self.loop.stop()
            return
        if self.share is not None:
            capacity = self.share.capacity()
            if capacity != self.store.capacity:  # an agent joined or left this machine
                log.info("object store capacity %.0f MB -> %.0f MB (shared by the agents on this machine)",
                         self.store.capacity / 1e6, capacity / 1e6)
                self.store.capacity = capacity
        stats = dict(self.leases.stats(), object_store=self._store_stats())
        transport.send(self.head, encode("Heartbeat", (self.node_id, self.leases.resources.available,
                                                       {"stats": stats})))
        self.loop.call_later(HEARTBEAT_S, self._heartbeat)

    # --- clients and workers ---
    def _on_socket(self, kind: str) -> None:
        sock = self.sockets[kind]
        for frames in transport.recv_all(sock):
            identity = frames[0]
            try:
                peer = peer_kind(kind, identity)
                may_send = MAY_SEND.get(peer, ())
                if frames[1] in (b"Relay", b"ToPeer"):
                    tag = frames[1].decode()
                    if tag not in may_send:
                        self._refuse(peer, identity, tag)
                    elif tag == "Relay":
                        self._relay(kind, identity, frames)
                    else:
                        self._to_peer(kind, identity, frames)
                    continue
                tag, fields, _ = protocol.decode(frames[1:])
                handler = self.handlers.get(peer, {}).get(tag)
                if handler is None:
                    self._refuse(peer, identity, tag)
                    continue
                handler((kind, identity), *fields)
            except (protocol.ProtocolError, TypeError, ValueError, KeyError, IndexError) as exc:
                log.warning("dropped a bad message from %r: %s", identity[:24], exc)
            except Exception:  # a bug handling one message must not take the whole node down
                log.exception("failed to handle a message from %r; still serving", identity[:24])

    @staticmethod
    def _refuse(peer: str | None, identity: bytes, tag: str) -> None:
        """A message of a tag its kind of peer may not send (MAY_SEND): dropped, changes nothing."""
        log.warning("dropped %s from %s %r: a %s may not send it", tag, peer or "an unknown peer", identity[:24],
                    peer or "peer with such an identity")

    def _send(self, client, tag, *fields) -> bool:
        kind, identity = client
        if kind == HEAD:
            return transport.send(self.head, encode(tag, fields))
        return transport.send(self.sockets[kind], [identity, *encode(tag, fields)])

    def _on_Ping(self, client, *args) -> None:
        self._send(client, "Pong", *args)

    def _on_Hello(self, client, kind: str, info: dict) -> None:
        # Worker ids are unique per node only: a worker's client from another node
        # (spillback, owner messages) is not inside our worker of the same id.
        if info.get("worker_id") is not None and info.get("node_id") == self.node_id:
            self.worker_clients.setdefault(info["worker_id"], set()).add(client)
        if info.get("job_id") is not None:
            self.client_jobs[client] = info["job_id"]
            if info.get("log_to_driver"):
                self.log_clients.setdefault(info["job_id"], set()).add(client)
        self.connected.add(client[1])
        self._watch_client(client, info)
        if client[0] == TCP and kind == "client" and client not in self.client_pidfds:
            self.tcp_clients[client] = (bool(info.get("driver")), info.get("job_id"))
            self.unreachable.pop(client, None)
        self._send(client, "Welcome", {"node_id": self.node_id, "session_dir": self.session_dir,
                                       "nodes": self.cluster_nodes})

    def _on_RequestLease(self, client, request_id, shape, job_id, pool_key, strategy, spillback_ok) -> None:
        hash((request_id, job_id, pool_key, strategy))  # keys of the tables that hold them: TypeError here, not later
        try:
            scheduling.check_shape(shape)
        except ValueError as exc:
            log.warning("refused a lease request from %r: %s", client[1][:24], exc)
            self._send(client, "LeaseInfeasible", request_id, f"this lease request cannot be granted: {exc}", True)
            return
        self.client_jobs.setdefault(client, job_id)
        req = LeaseRequest(client, request_id, shape, job_id, pool_key, strategy, spillback_ok)
        self._apply(self.leases.request(req))

    def _on_CancelLease(self, client, request_id) -> None:
        self.leases.cancel_request(client, request_id)

    def _on_ReturnLease(self, client, lease_id, kill) -> None:
        self._apply(self.leases.return_lease(lease_id, kill))

    def _on_Goodbye(self, client, kind: str, job_id) -> None:
        own = self.client_jobs.get(client)
        if kind == "driver" and job_id is not None and job_id != own:
            # Its job's workers end with it: only the job it said at its Hello, never another's.
            log.warning("a Goodbye from %r names job %r, but it joined for job %r: ending only what it held",
                        client[1][:24], job_id, own)
            job_id = None
        self._client_left(client, kind, job_id)

    def _client_left(self, client, kind: str, job_id, kill_running: bool = False) -> None:
        self._unwatch_client(client)
        self.tcp_clients.pop(client, None)
        self.unreachable.pop(client, None)
        for clients in self.log_clients.values():
            clients.discard(client)
        acts = self.leases.client_gone(client, kill_running=kill_running)
        if kind == "driver" and job_id is not None:
            acts.extend(self.leases.job_finished(job_id))
            if kill_running:  # it died without a Goodbye: the head ends its job (its actors)
                transport.send(self.head, encode("DriverDied", (job_id, f"noticed by node {self.node_id[:8]}")))
        self.client_jobs.pop(client, None)
        self._peer_gone(client)
        self._apply(acts)

    def _watch_client(self, client, info: dict) -> None:
        """Watch the process of a client on this machine (pidfd on the pid of its Hello), so
        that its death counts as its Goodbye: a killed driver (or any client we did not spawn)
        must not keep its leases, nor the borrows its owners watch through us (WatchPeer).
        The clients inside our own workers are left to the launcher ("exited").  A client on
        another machine is watched by its connection instead (_check_tcp_clients)."""
        pid = info.get("pid")
        if (not pid or self.pid_space is None or info.get("pid_space") != self.pid_space
                or client in self.client_pidfds or client[0] == HEAD
                or (info.get("worker_id") is not None and info.get("node_id") == self.node_id)):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            self.client_pidfds[client] = (None, info.get("driver", False), info.get("job_id"))
            self.loop.call_soon(self._client_died, client)
            return
        self.client_pidfds[client] = (fd, info.get("driver", False), info.get("job_id"))
        self.loop.add_reader(fd, lambda: self._client_died(client))

    def _unwatch_client(self, client) -> tuple | None:
        watch = self.client_pidfds.pop(client, None)
        if watch is not None and watch[0] is not None:
            self.loop.remove_reader(watch[0])
            os.close(watch[0])
        return watch

    def _client_died(self, client) -> None:
        """A watched client's process ended without a Goodbye: say it for it.  Its running
        tasks have no one to report to (as for the clients of an exited worker): end them."""
        watch = self._unwatch_client(client)
        if watch is None:
            return  # it said Goodbye first
        _, driver, job_id = watch
        log.info("client %r (a %s) exited without a goodbye", client[1][:24], "driver" if driver else "client")
        self._client_left(client, "driver" if driver else "client", job_id, kill_running=True)

    def _on_tcp_closed(self) -> None:
        """Connections to our TCP port closed (whose, the monitor does not say): look for
        the clients on TCP soon, and once more after the grace period."""
        if self.tcp_watch.read() and self.tcp_clients:
            now = time.monotonic()
            self._check_tcp_clients_at(now + CLOSE_SETTLE_S)
            self._check_tcp_clients_at(now + CLIENT_GRACE_S)

    def _check_tcp_clients_at(self, due: float) -> None:
        if any(abs(other - due) < CHECK_COALESCE_S for other in self.tcp_checks):
            return
        self.tcp_checks.append(due)
        self.loop.call_later(max(0.0, due - time.monotonic()), self._check_tcp_clients, due)

    def _check_tcp_clients(self, due: float) -> None:
        """A client on TCP found without a connection, and still without one CLIENT_GRACE_S
        later, died without a Goodbye (as _client_died for a client watched by pid): its
        leases come back, its running tasks end, its job ends if it was a driver, and
        those that watch it are told (PeerGone).  One found connected again is forgiven:
        zmq reconnected it (with ROUTER_HANDOVER, under the same identity)."""
        self.tcp_checks.remove(due)
        now = time.monotonic()
        probe = encode("Probe", ())
        for client, (driver, job_id) in list(self.tcp_clients.items()):
            if transport.reachable(self.tcp, client[1], probe):
                self.unreachable.pop(client, None)
                continue
            since = self.unreachable.setdefault(client, now)
            if now - since < CLIENT_GRACE_S:
                self._check_tcp_clients_at(since + CLIENT_GRACE_S)
                continue
            log.warning("client %r (a %s) on TCP has had no connection for %.1f s: taken for dead "
                        "(its process, its machine or the network is gone); releasing what it held",
                        client[1][:24], "driver" if driver else "client", now - since)
            self._client_left(client, "driver" if driver else "client", job_id, kill_running=True)

    def _on_WorkerReady(self, client, worker_id: str, pid: int) -> None:
        self._apply(self.leases.worker_ready(worker_id, pid))

    def _on_WorkerBlocked(self, client, worker_id: str) -> None:
        self._apply(self.leases.worker_blocked(worker_id))

    def _on_WorkerUnblocked(self, client, worker_id: str) -> None:
        self._apply(self.leases.worker_unblocked(worker_id))

    def _on_SignalWorker(self, client, worker_id: str, sig: int) -> None:
        pid = self.worker_pids.get(worker_id)
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # --- stacks (farpool stack) ---
    def _on_DumpStacks(self, client, request_id, pid) -> None:
        """Every worker's (or the one ``pid``'s) threads' stacks and task: Reply(request_id, {...}).

        One request at a time: each truncates the workers' stack files before signalling."""
        self.stack_requests.append((client, request_id, pid))
        if len(self.stack_requests) == 1:
            self._start_stack_dump()

    def _start_stack_dump(self) -> None:
        client, request_id, pid = self.stack_requests[0]
        chosen = {wid: p for wid, p in self.worker_pids.items() if pid is None or p == pid}
        ready = {}
        for wid, p in chosen.items():
            worker = self.leases.workers.get(wid)
            if worker is None or worker.state == "STARTING":  # not yet able to dump: see stacks.install
                continue
            path = stacks.stack_path(self.session_dir, wid)
            try:
                os.truncate(path, 0)
                os.kill(p, stacks.DUMP_SIGNAL)
            except OSError:  # it exited meanwhile (or never made its file)
                continue
            ready[p] = wid
        collection = stacks.StackCollection(list(ready), time.monotonic())
        self._check_stack_dump(chosen, ready, collection)

    def _check_stack_dump(self, chosen: dict, ready: dict, collection) -> None:
        sizes = {p: stacks.size_of(stacks.stack_path(self.session_dir, wid)) for p, wid in ready.items()}
        if not collection.observe(sizes, time.monotonic()):
            self.loop.call_later(stacks.DUMP_SETTLE_S / 5, self._check_stack_dump, chosen, ready, collection)
            return
        workers = []
        for wid, p in sorted(chosen.items(), key=lambda item: item[1]):
            if p in ready:
                status = collection.done[p]
                stack = stacks.read_dump(stacks.stack_path(self.session_dir, wid))
            else:
                status, stack = "starting", ""
            workers.append({"pid": p, "worker_id": wid, "status": status, "stack": stack,
                            "task": stacks.read_task(stacks.task_path(self.session_dir, wid))})
        client, request_id, pid = self.stack_requests.pop(0)
        self._send(client, "Reply", request_id, {"node_id": self.node_id, "workers": workers})
        if self.stack_requests:
            self._start_stack_dump()

    # --- logs (farpool logs) ---
    def _on_ReadLogs(self, client, request_id, pid, cursors: dict) -> None:
        """Worker output kept here after each worker's cursor (see worker_logs): Reply(request_id,
        {"node_id", "workers": [{"worker_id", "pid", "alive", "data", "cursor"}]}), at most
        worker_logs.READ_BYTES_PER_REPLY bytes in all (ask again with the cursors for more)."""
        budget = worker_logs.READ_BYTES_PER_REPLY
        workers = []
        for wid, files in sorted(worker_logs.worker_logs(self.session_dir).items(),
                                 key=lambda item: self.pids_ever.get(item[0], 0)):
            if pid is not None and self.pids_ever.get(wid) != pid:
                continue
            data, cursor = worker_logs.read(files, cursors.get(wid), budget)
            budget -= len(data)
            workers.append({"worker_id": wid, "pid": self.pids_ever.get(wid), "alive": wid in self.worker_pids,
                            "data": data, "cursor": cursor})
        self._send(client, "Reply", request_id, {"node_id": self.node_id, "workers": workers})

    # --- object store ---
    def _apply_store(self, acts: store.StoreActions) -> None:
        """Start the store's byte moves on the I/O threads, answer whom it answers."""
        for move in acts.moves:
            self.mover.submit(move)
        for path in acts.removals:
            self.mover.remove(path)
        for waiter, seg, error, full in acts.answers:
            waiter(seg, error, full)
        self._tell_writers()

    def _on_move_done(self, move, error) -> None:
        self._apply_store(self.store.move_done(move, error))

    def _on_AllocateObject(self, client, request_id, store_id: bytes, size: int, owner: str, what: str) -> None:
        """A segment for a new object (put, task result, large argument): at once, or once
        spills made room (the writer waits; this loop does not)."""
        self.store_writers.add(client)

        def answer(seg, error, full):
            self._send(client, "ObjectAllocated", request_id, seg and seg.path, error)
        self._apply_store(self.store.allocate(answer, store_id, size, owner, what))

    def _on_FreeObjects(self, client, store_ids: list) -> None:
        self._free_objects(store_ids)

    def _owner_gone(self, owner: str) -> None:
        """A client that owned objects here left for good (Goodbye, death, its worker's exit,
        or its agent told us): nobody frees them any more, so we do."""
        self.watched_owners.discard(owner)
        owned = self.store.owned_by(owner)
        if owned:
            log.info("freeing %d object(s) of %s, which is gone", len(owned), owner[:24])
            self._free_objects(owned, f"its owner ({owner[:24]}) is gone: the object was lost with it")

    def _free_objects(self, store_ids, why: str = "it was freed by its owner while it was being copied") -> None:
        for store_id in store_ids:
            copying = self.pulls_by_store.get(store_id)
            if copying is not None:  # nobody will read it
                self._end_pull(copying, why)
            for reader, reader_request in self.allocating.pop(store_id, ()):  # (its segment awaited room)
                self._send(reader, "ObjectCopied", reader_request, None, why, False)
            self._apply_store(self.store.free_object(store_id))
        if self.trim_timer is None and self.store.free:
            self.trim_timer = self.loop.call_later(store.FREE_IDLE_S, self._trim_store)

    def _trim_store(self) -> None:
        """Free segments not reused for a while go back to the system (see store.FREE_IDLE_S)."""
        self.trim_timer = None
        due = self.store.trim_idle()
        self._tell_writers()
        if due is not None:  # a segment still mapped by a reader, or freed more recently
            self.trim_timer = self.loop.call_later(max(0.05, due - time.monotonic()), self._trim_store)

    def _tell_writers(self) -> None:
        """Segments we unlinked (dropped or spilled): writers keep mappings of segments
        they wrote (segments._WriterMaps), which would hold the memory until they let go."""
        if not self.store.dropped:
            return
        dropped, self.store.dropped = self.store.dropped, []
        for writer in list(self.store_writers):
            if not self._send(writer, "SegmentsDropped", dropped):
                self.store_writers.discard(writer)  # gone

    def _on_RestoreObject(self, client, request_id, store_id: bytes) -> None:
        """The path of an object of our store, brought back first if it was spilled:
        ObjectCopied(path, error, no room for it), when the object is whole there."""
        def answer(seg, error, full):
            self._send(client, "ObjectCopied", request_id, seg and seg.path, error, full)
        self._apply_store(self.store.restore(answer, store_id))

    # --- copies from other nodes (pull.py) ---
    def _on_PullObject(self, client, request_id, store_id: bytes, size: int, sources: list, owner: tuple,
                       what: str) -> None:
        """A reader on this node wants an object stored on other nodes: answer the path of a
        local copy (ObjectCopied), pulling it first unless we have it or are pulling it.
        ``owner`` (identity, node id) frees the copy, or we do when it is gone."""
        owner_identity, owner_node = owner
        copying = self.pulls_by_store.get(store_id)
        if copying is not None:
            copying.waiters.append((client, request_id))
            return
        if store_id in self.allocating:  # its segment waits for room: so does this reader
            self.allocating[store_id].append((client, request_id))
            return
        if store_id in self.store.objects:  # the original, or a copy pulled before
            self._on_RestoreObject(client, request_id, store_id)
            return
        sources = [s for s in sources if s != self.node_id]
        if not sources:  # (a reader of ours restoring an object we no longer have)
            self._send(client, "ObjectCopied", request_id, None, "it is gone from this node's store", False)
            return
        self.allocating[store_id] = [(client, request_id)]

        def allocated(seg, error, full):
            readers = self.allocating.pop(store_id, [])
            if seg is None:
                for reader, reader_request in readers:
                    self._send(reader, "ObjectCopied", reader_request, None, error, full)
            elif readers:
                self._start_pull(seg, store_id, size, sources, owner, readers)
            else:  # every reader gave up meanwhile (its owner freed it)
                self._apply_store(self.store.free_object(store_id))
        self._apply_store(self.store.allocate(allocated, store_id, size, owner_identity, what, copy=True))

    def _start_pull(self, seg, store_id: bytes, size: int, sources: list, owner: tuple, readers: list) -> None:
        owner_identity, owner_node = owner
        seg.owner_node = owner_node
        if owner_node != self.node_id and owner_identity not in self.watched_owners:
            # Its agent tells us when it goes (PeerGone): the copies of what it owned go too.
            sock, _ = self._peer_agent(owner_node)
            if sock is not None:
                transport.send(sock, encode("WatchPeer", (owner_identity.encode(),)))
                self.watched_owners.add(owner_identity)
        job = pull.Pull(next(self.pull_ids), store_id, size, sources)
        job.fd = segments.open_to_fill(seg.path)
        job.path = seg.path
        job.waiters.extend(readers)
        self.pulls[job.pull_id] = job
        self.pulls_by_store[store_id] = job
        self.copy_counts["pulls"] += 1
        if self.pull_timer is None:
            self.pull_timer = self.loop.call_later(pull.SILENT_S / 3, self._check_pulls)
        self._pump(job)

    def _pump(self, job: pull.Pull) -> None:
        """Ask the sources for the next chunks; end the pull when none is left to ask."""
        while True:
            asks = job.requests()
            if not asks:
                break
            for source, offset, length in asks:
                sock, why = self._peer_agent(source)
                if sock is None or not transport.send(sock, encode("ReadChunk", (job.pull_id, job.store_id,
                                                                                offset, length))):
                    job.source_failed(source, why or f"node {source[:8]} cannot be reached")
        if job.failed:
            self._end_pull(job, job.error())

    def _peer_agent(self, node_id: str) -> tuple:
        """(our connection to the agent of ``node_id``, None), or (None, why there is none)."""
        sock = self.peer_agents.get(node_id)
        if sock is not None:
            return sock, None
        address, why = scheduling.agent_address(self.cluster_nodes, node_id)
        if address is None:
            return None, why
        sock = transport.dealer(f"a:{self.node_id}".encode())
        transport.start_tcp(sock, address, self.token, encode("Hello", ("agent", {"node_id": self.node_id})))
        self.peer_agents[node_id] = sock
        self.loop.add_reader(sock, lambda: self._on_peer_agent(node_id, sock))
        return sock, None

    def _on_peer_agent(self, node_id: str, sock) -> None:
        for frames in transport.recv_all(sock, copy=False):  # chunks go straight into a segment
            try:
                tag, fields, buffers = protocol.decode([f.bytes if i < 2 else f.buffer for i, f in enumerate(frames)])
                if tag == "Chunk":
                    self._on_chunk(node_id, *fields, buffers)
                elif tag == "PeerGone":  # an owner of copies we hold (WatchPeer in _on_PullObject)
                    self._owner_gone(fields[0].decode(errors="replace"))
            except (protocol.ProtocolError, TypeError, ValueError, IndexError) as exc:
                log.warning("dropped a bad message from the agent of node %s: %s", node_id[:8], exc)

    def _on_ReadChunk(self, client, pull_id: int, store_id: bytes, offset: int, length: int) -> None:
        """Another node's agent copies one of our objects: send it ``length`` bytes from ``offset``."""
        seg = self.store.objects.get(store_id)
        if seg is None or store_id in self.pulls_by_store:
            error = "it is not in its store (freed, or still arriving)"
            frames = encode("Chunk", (pull_id, offset, error))
        elif not (0 <= offset and 0 < length <= pull.MAX_CHUNK and offset + length <= seg.used):
            frames = encode("Chunk", (pull_id, offset, f"bad range: {length} bytes at {offset} of {seg.used}"))
        else:
            try:
                frames = encode("Chunk", (pull_id, offset, None),
                                [segments.read_range(seg.read_path(), offset, length)])
                self.copy_counts["chunks_sent"] += 1
            except OSError as exc:
                frames = encode("Chunk", (pull_id, offset, f"reading it failed: {exc}"))
        kind, identity = client
        transport.send(self.sockets[kind], [identity, *frames])

    def _on_chunk(self, source: str, pull_id: int, offset: int, error, buffers) -> None:
        job = self.pulls.get(pull_id)
        if job is None:
            return  # ended meanwhile (freed, or failed)
        expected = min(job.chunk, job.size - offset) if 0 <= offset < job.size else -1
        if error is None and (len(buffers) != 1 or len(buffers[0]) != expected):
            error = f"sent {sum(len(b) for b in buffers)} bytes for a chunk of {expected}"
        if error is not None:
            job.source_failed(source, f"node {source[:8]}: {error}")
        elif job.received_chunk(source, offset, expected):
            os.pwrite(job.fd, buffers[0], offset)
            self.copy_counts["pulled_bytes"] += expected
        if job.done:
            self._end_pull(job, None)
        else:
            self._pump(job)

    def _end_pull(self, job: pull.Pull, error: str | None) -> None:
        del self.pulls[job.pull_id]
        del self.pulls_by_store[job.store_id]
        os.close(job.fd)  # drops the fill lock
        if error is not None:
            log.warning("copying object %s to this node failed: %s", job.store_id.hex()[:16], error)
            self.copy_counts["pull_failures"] += 1
            self._apply_store(self.store.free_object(job.store_id))
        for client, request_id in job.waiters:
            self._send(client, "ObjectCopied", request_id, None if error else job.path, error, False)

    def _check_pulls(self) -> None:
        """Sources that stopped answering are given up on (their chunks go to the others)."""
        self.pull_timer = None
        now = time.monotonic()
        for job in list(self.pulls.values()):
            for source in job.silent_sources(now):
                job.source_failed(source, f"node {source[:8]} sent nothing for {pull.SILENT_S:.0f} s")
            self._pump(job)
        if self.pulls:
            self.pull_timer = self.loop.call_later(pull.SILENT_S / 3, self._check_pulls)

    def _sources_died(self) -> None:
        """Nodes the head declared dead send nothing more: pulls go on from the other sources."""
        dead = {n["node_id"] for n in self.cluster_nodes if not n["alive"]}
        orphans = [sid for sid, seg in self.store.objects.items() if seg.copy and seg.owner_node in dead]
        if orphans:  # copies of objects whose owner died with its node
            self._free_objects(orphans, "its owner died with its node: the object was lost with it")
        for node_id in dead & set(self.peer_agents):
            sock = self.peer_agents.pop(node_id)
            self.loop.remove_reader(sock)
            sock.close(0)
        for job in list(self.pulls.values()):
            for source in dead & set(job.load):
                job.source_failed(source, f"node {source[:8]} died")
            self._pump(job)

    def _store_stats(self) -> dict:
        return dict(self.store.stats(), **self.copy_counts, pulls_in_progress=len(self.pulls),
                    spill_busy_seconds=self.mover.busy[spill.SPILL],
                    restore_busy_seconds=self.mover.busy[spill.RESTORE],
                    heartbeat_gap_max_s=self.pulse.max_gap if self.pulse else None,
                    loop_lag_max_s=self.loop_lag_max)

    def _on_StoreStats(self, client, request_id) -> None:
        self._send(client, "StoreStats", request_id, self._store_stats(), self.store.listing())

    def _on_GetNodes(self, client, request_id) -> None:
        self._send(client, "Nodes", request_id, self.cluster_nodes)

    def _relay(self, kind: str, identity: bytes, frames) -> None:
        """Relay(target) from a client to a worker, or from a worker back to its client."""
        target = frames[2]
        if kind == IPC and identity.startswith(b"w:") and target.startswith(b"c:"):
            origin_kind, origin = target[2:].split(b":", 1)
            if origin_kind == b"head":
                transport.send(self.head, frames[3:])
            else:
                transport.send(self.sockets[origin_kind.decode()], [origin, *frames[3:]])
        else:
            origin = b"c:" + kind.encode() + b":" + identity
            if not transport.send(self.ipc, [b"w:" + target, b"Relayed", origin, *frames[3:]]):
                log.warning("relay to worker %s failed: it is gone", target.decode(errors="replace"))

    def _to_peer(self, kind: str, sender: bytes, frames) -> None:
        """ToPeer(target, *inner) from a client: hand ``inner`` to the client ``target`` as
        FromPeer(sender, *inner), on whichever of our sockets it is connected to.

        The inner message is not decoded here: the agent only routes it.  A target
        we cannot reach (its process ended, or it never connected) is answered with
        PeerGone(target), so that the sender fails what waits on it instead of hanging.
        """
        if len(frames) < 4:
            raise protocol.ProtocolError(f"ToPeer has {len(frames) - 2} frame(s), expected a target and a message")
        target = frames[2]
        if not target.startswith(b"c:"):
            raise protocol.ProtocolError(f"ToPeer to {target[:24]!r}, which is not a client")
        out = [b"FromPeer", sender, *frames[3:]]
        sender_client = (kind, sender)
        if transport.send(self.ipc, [target, *out]) or (
                TCP in self.sockets and transport.send(self.sockets[TCP], [target, *out])):
            # Remember who talks to ``target``, to tell them when it goes (_peer_gone).
            self.peer_senders.setdefault(target, set()).add(sender_client)
            return
        log.info("a message from %r to %r was not delivered: no such client is connected here",
                 sender[:24], target[:24])
        self._send(sender_client, "PeerGone", target)

    def _on_WatchPeer(self, client, target: bytes) -> None:
        """An owner counts ``target`` (a client of ours) as a borrower: tell it PeerGone(target)
        when that client leaves (Goodbye, death) -- at once if it is not connected here.

        A client says Hello to its home agent before it can hold any ref, and its address
        names that agent's node: one we do not know is gone (or never was ours)."""
        if not isinstance(target, bytes):
            raise protocol.ProtocolError(f"WatchPeer of {target!r}, which is not a client identity")
        if target in self.connected:
            self.peer_senders.setdefault(target, set()).add(client)
        else:
            self._send(client, "PeerGone", target)

    def _peer_gone(self, client) -> None:
        """A client left (Goodbye, death, or its worker exited): tell those that sent it
        ToPeer or WatchPeer, and free the objects it owned here."""
        identity = client[1]
        self.connected.discard(identity)
        if identity.startswith(b"c:"):
            self._owner_gone(identity.decode(errors="replace"))
        for sender in self.peer_senders.pop(identity, ()):
            self._send(sender, "PeerGone", identity)
        for senders in self.peer_senders.values():
            senders.discard(client)

    # --- launcher ---
    def _on_launcher(self) -> None:
        msgs = self.launcher_reader.read()
        if msgs is None:
            log.error("the worker launcher died; exiting")
            self.loop.stop()
            return
        for msg in msgs:
            if msg[0] not in LAUNCHER_MAY_SEND:
                log.warning("dropped %r from the launcher: it may not send it", msg[0])
            elif msg[0] == "output":
                _, worker_id, stream, data = msg
                self._forward_output(worker_id, stream, data)
            elif msg[0] == "started":
                _, worker_id, pid = msg
                self.worker_pids[worker_id] = pid
                self.pids_ever[worker_id] = pid
            elif msg[0] == "exited":
                _, worker_id, pid, code, sig = msg
                self.worker_pids.pop(worker_id, None)
                info = {"worker_id": worker_id, "pid": pid, "exitcode": code, "signal": sig,
                        "node_id": self.node_id}
                if code not in (0, None) or sig:
                    log.info("worker %s (pid %s) exited: code=%s signal=%s", worker_id, pid, code, sig)
                acts = self.leases.worker_exited(worker_id, info)
                # Tasks the dead worker owned (nested tasks) have no one to report to: end them.
                for client in self.worker_clients.pop(worker_id, ()):
                    acts.extend(self.leases.client_gone(client, kill_running=True))
                    self._peer_gone(client)
                self._apply(acts)

    def _forward_output(self, worker_id: str, stream: str, data: bytes) -> None:
        """A worker's stdout/stderr go to the drivers of its job that asked for them."""
        worker = self.leases.workers.get(worker_id)
        job_id = worker.job_id if worker is not None else None
        if job_id is None:
            return
        for client in self.log_clients.get(job_id, ()):
            self._send(client, "WorkerLog", stream, data)

    # --- actions ---
    def _apply(self, acts) -> None:
        for worker_id in acts.kills:
            pid = self.worker_pids.get(worker_id)
            if pid:
                launcher.send_msg(self.launcher_sock, ("kill", pid, signal.SIGKILL))
        for worker_id in acts.spawns:
            launcher.send_msg(self.launcher_sock, ("spawn", worker_id, {}))
        for req, lease in acts.grants:
            kind, _ = req.client
            address = os.path.join(self.session_dir, f"w-{lease.worker_id}") if kind in (IPC, HEAD) else None
            if not self._send(req.client, "LeaseGranted", req.request_id, lease.lease_id, lease.worker_id,
                              address, self.node_id, lease.alloc.gpu_ids):
                self._apply(self.leases.return_lease(lease.lease_id))
        for req, node_id in acts.spillbacks:
            node = next((n for n in self.cluster_nodes if n["node_id"] == node_id), None)
            self._send(req.client, "LeaseSpillback", req.request_id, node_id,
                       node and node.get("tcp"), node and node.get("ipc"))
        for req, message in acts.infeasible:
            self._send(req.client, "LeaseInfeasible", req.request_id, message, self.embedded)
        for lease, info in acts.lost:
            self._send(lease.client, "WorkerExited", lease.lease_id, info)

    def close(self) -> None:
        if self.pulse is not None:
            self.pulse.stop()
        self.mover.close()
        for job in list(self.pulls.values()):
            os.close(job.fd)
        for client in list(self.client_pidfds):
            self._unwatch_client(client)
        if TCP in self.sockets:
            self.tcp_watch.close()
        for sock in list(self.sockets.values()) + list(self.peer_agents.values()):
            sock.close(0)
        if self.head is not None:
            self.head.close(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="farpool-node")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--head-address", required=True, help="ipc://... or HOST:PORT")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--num-cpus", type=float, default=None, help="default: loky.cpu_count()")
    parser.add_argument("--num-gpus", type=float, default=None, help="default: the GPUs detected")
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--object-store-memory", type=float, default=None)
    parser.add_argument("--memory", type=float, default=None, help="bytes of memory tasks may reserve")
    parser.add_argument("--spill-dir", default=None,
                        help="where objects spill when the store is full (default: the session directory)")
    parser.add_argument("--host", default=None, help="also listen on TCP at this address")
    parser.add_argument("--node-ip", default=None,
                        help="the address registered for others to connect to (default: --host)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--embedded", action="store_true")
    parser.add_argument("--head-node", action="store_true")
    parser.add_argument("--lifeline", action="store_true")
    args = parser.parse_args(argv)
    token = os.environ.pop("FARPOOL_TOKEN", "")
    # Fork the launcher before any zmq context or thread exists.
    launcher_pid, launcher_sock = launcher.start({
        "session_dir": args.session_dir, "node_id": args.node_id,
        "agent_address": session.ipc(args.session_dir, "node"),
        "cluster_head": args.head_address, "token": token,
        "embedded": args.embedded, "num_gpus": args.num_gpus})
    session.set_process_name("farpool-node")
    if args.num_cpus is None:
        import loky
        args.num_cpus = loky.cpu_count()
    if args.num_gpus is None:
        args.num_gpus = session.detect_gpus()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # the kernel should kill a task before the node agent
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-100")
    except OSError:
        pass
    with open(os.path.join(args.session_dir, "node.pid"), "w") as f:
        f.write(str(os.getpid()))
    try:
        agent = NodeAgent(args, token, launcher_pid, launcher_sock)
    except OSError as exc:  # the port is taken, the host is not ours: say so, no traceback
        print(f"farpool-node: {exc.strerror or exc}", flush=True)
        _stop_launcher(launcher_pid, launcher_sock)
        return 1
    agent.start_workers()
    try:
        agent.connect_head()
    except Exception as exc:  # wrong token or address: say so and exit
        print(f"farpool-node: cannot join the head at {args.head_address}: {exc}", flush=True)
        _stop_launcher(launcher_pid, launcher_sock)
        return 2

    clean = []  # why we stop, when it is on purpose (else the logs are kept: see session.keep_logs)

    def on_lifeline():
        if not os.read(0, 4096):
            log.info("lifeline closed: the driver is gone; stopping")
            clean.append("lifeline")
            agent.loop.stop()
    if args.lifeline:
        agent.loop.add_reader(0, on_lifeline)
    signal.signal(signal.SIGTERM, session.sigterm_handler(lambda *_: (clean.append("SIGTERM"), agent.loop.stop())))
    if agent.tcp_address:
        with open(os.path.join(args.session_dir, "node.address"), "w") as f:
            f.write(agent.tcp_address)
    print(f"farpool-node ready pid={os.getpid()} node={args.node_id} tcp={agent.tcp_address}", flush=True)
    try:
        agent.loop.run()
    except BaseException:
        log.exception("the node agent failed")
        raise
    finally:
        try:
            transport.send(agent.head, encode("Goodbye", ("node", agent.node_id)))
        except Exception:
            pass
        _stop_launcher(launcher_pid, launcher_sock)
        agent.close()
        agent.store.close()
        if agent.share is not None:
            agent.share.close()
        transport.term_context()
        if args.embedded or args.lifeline:
            if not clean:  # the cluster fails with us: keep the logs that say why
                log.error("the node agent stops on its own; its logs are kept in %s",
                          session.keep_logs(args.session_dir))
            session.remove_session(args.session_dir)
        else:
            for name in os.listdir(args.session_dir):
                if name.startswith("w-") or name == "node":
                    try:
                        os.unlink(os.path.join(args.session_dir, name))
                    except OSError:
                        pass
    return 0


def _stop_launcher(launcher_pid: int, launcher_sock) -> None:
    launcher_sock.close()  # the launcher sees EOF and kills the workers
    try:
        os.waitpid(launcher_pid, 0)
    except ChildProcessError:
        pass


if __name__ == "__main__":
    sys.exit(main())
