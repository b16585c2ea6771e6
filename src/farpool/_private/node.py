"""The node agent: one per machine; owns its workers, their leases and resources.

Runs as its own process (``python -m farpool._private.node_main``), one thread, one
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

The agent is one class, ``NodeAgent``, in six modules, all run on its one thread:

- node.py (this): start-up, the head (and joining again when it declared us dead),
  the tables of what each kind of peer may send (MAY_SEND) and the dispatch through
  them, leases and workers, the launcher, applying the lease actions, and ``main()``;
- node_clients.py: clients arriving, leaving or dying, and routing between peers
  (Relay, ToPeer, WatchPeer, PeerGone);
- node_objects.py: the object store and copies of objects from other nodes;
- node_diagnostics.py: workers' stacks and logs (``farpool stack``, ``farpool logs``);
- node_bundles.py: placement group bundles (the head's two phases, our side);
- node_drain.py: draining before the node stops (``farpool stop`` on this node).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import time
from collections import OrderedDict

from farpool._private import (addresses, copy_events, host_usage, launcher, node_table, protocol, pull, pulse,
                              scheduling, session, spill, store, transport, versions)
from farpool._private import leases as leases_mod
from farpool._private.leases import LeaseManager, LeaseRequest
from farpool._private.node_bundles import BundlesPart
from farpool._private.node_clients import HEAD, HEAD_CLIENT, IPC, TCP, Client, ClientsPart
from farpool._private.node_diagnostics import DiagnosticsPart
from farpool._private.node_drain import DRAIN_TIMEOUT_S, DrainPart
from farpool._private.node_objects import ObjectsPart, Upload
from farpool._private.protocol import encode

log = logging.getLogger("farpool.node")

HEARTBEAT_S = 1.0
# The head silent this long means the cluster is gone: the agent exits.
HEAD_TIMEOUT_S = float(os.environ.get("FARPOOL_HEAD_TIMEOUT_S", "15"))

# In the agent's session directory: the node id it has now (see write_node_id).
NODE_ID_FILE = "node.id"
# The signal that asks a node agent to drain and then stop (SIGTERM stops it at once).
DRAIN_SIGNAL = signal.SIGUSR1

# In the agent's session directory: the drain timeout (seconds) that came with the signal.
DRAIN_FILE = "drain"


def ask_to_drain(pid: int, session_dir: str, timeout_s: float) -> bool:
    """Ask the node agent ``pid`` to drain for at most ``timeout_s`` and then stop (what
    ``farpool stop`` does); False when it is not running."""
    with open(os.path.join(session_dir, DRAIN_FILE), "w") as f:
        f.write(repr(float(timeout_s)))
    try:
        os.kill(pid, DRAIN_SIGNAL)
    except ProcessLookupError:
        return False
    return True


def _drain_timeout(session_dir: str) -> float:
    try:
        with open(os.path.join(session_dir, DRAIN_FILE)) as f:
            return float(f.read())
    except (OSError, ValueError):
        return DRAIN_TIMEOUT_S


# What each kind of peer may send the agent; anything else is dropped with one log
# line naming the peer's kind and the tag.  A peer's kind is its socket and the prefix
# of the identity it connects with (see peer_kind).  Relay and ToPeer are routed raw.
_CLIENT_ANYWHERE = frozenset({
    "Hello", "Ping", "Goodbye", "RequestLease", "CancelLease", "ReturnLease", "SignalWorker",
    "FreeObjects", "RestoreObject", "StoreStats", "GetNodes", "WatchPeer", "Relay", "ToPeer",
    "DumpStacks", "ReadLogs",  # farpool stack / farpool logs (a CLI is a client)
    "ObjectsSaved"})  # (we drain: it copied away what it owns here)
MAY_SEND = {
    # a client on this machine (a driver, a worker's own client, the CLI), ipc, "c:..."
    "local client": _CLIENT_ANYWHERE | {"WorkerBlocked", "WorkerUnblocked", "AllocateObject", "PullObject"},
    # a client on another machine, TCP, "c:...": nothing that maps this machine's store; it
    # puts large values here in chunks (UploadObject, WriteChunk) and reads them back (ReadChunk)
    "remote client": _CLIENT_ANYWHERE | {"UploadObject", "WriteChunk", "ReadChunk"},
    # one of our workers, ipc, "w:<worker id>": Relay carries its answers back to clients
    "worker": frozenset({"WorkerReady", "AllocateObject", "Relay", "WatchCaller", "UnwatchCaller"}),
    # a worker's argument reader (task_args.py), ipc, an identity zmq made up
    "argument reader": frozenset({"PullObject"}),
    # the agent of another node copying our objects (pull.py), TCP, "a:<node id>"
    "peer agent": frozenset({"Hello", "Ping", "ReadChunk", "WatchPeer"}),
    # the head, on our connection to it (Relay: it creates an actor in one of our workers)
    "head": frozenset({"Relay", "RequestLease", "ReturnLease", "SignalWorker", "NodeRegistered", "NodeTable",
                       "NodeTableDelta",
                       "Error", "HeartbeatAck", "PrepareBundles", "CommitBundles", "ReleaseBundles"}),
}
# Tags whose handler also takes the message's buffers (the bytes of a chunk), last.
TAKES_BUFFERS = frozenset({"WriteChunk"})
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


class NodeAgent(ClientsPart, ObjectsPart, DiagnosticsPart, BundlesPart, DrainPart):
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
        memory = args.memory if args.memory is not None else host_usage.memory()[0] - capacity
        totals = scheduling.make_totals(args.num_cpus, args.num_gpus, json.loads(args.resources or "{}"),
                                        memory=max(0, memory), object_store_memory=capacity)
        self.leases = LeaseManager(self.node_id, totals, embedded=args.embedded)
        self.yield_timer = None  # leases.tick() is due (requests wait: see _apply)
        self.loop = transport.EventLoop()
        self.mover = spill.Mover(self.loop.call_soon, self._on_move_done)
        self.allocating: dict[bytes, list] = {}  # store id -> readers of a copy whose segment awaits room
        self.pulse: pulse.Pulse | None = None
        self.register_info: dict | None = None  # our RegisterNode (set once connect_head sent it)
        self.rejoining = False
        self.registered = False  # the head confirmed our RegisterNode (NodeRegistered), as the id we have now
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
        # Clients on TCP not watched by pid: client -> (is a driver, job id); see node_clients._check_tcp_clients
        self.tcp_clients: dict[tuple, tuple] = {}
        self.unreachable: dict[tuple, float] = {}  # tcp client -> when it was first found down
        self.tcp_checks: list[float] = []  # when the checks scheduled are due
        self.pid_space = session.pid_space()
        # Copies of objects from other nodes' stores (see pull.py)
        self.pulls: dict[int, pull.Pull] = {}          # pull id -> in progress
        self.pulls_by_store: dict[bytes, pull.Pull] = {}
        self.pull_ids = itertools.count(1)
        self.pull_timer = None
        self.uploads: dict[bytes, Upload] = {}         # store id -> a remote client's put arriving
        self.peer_agents: dict[str, object] = {}      # node id -> our DEALER to that node's agent
        self.copy_counts = {"pulls": 0, "pulled_bytes": 0, "pull_failures": 0, "chunks_sent": 0,
                            "uploaded_bytes": 0}
        self.copy_log = copy_events.CopyLog()  # copies made, for the timeline: each heartbeat takes them
        self.watched_owners: set = set()  # owners on other nodes of copies we hold (WatchPeer)
        # Owners of the streams our workers run, watched for them: identity -> (its node, workers)
        self.watched_callers: dict[bytes, tuple] = {}
        self.callers_gone: OrderedDict = OrderedDict()  # of those, the ones gone (oldest first)
        self.last_ack = time.monotonic()
        self.head = None
        self.cluster_nodes: list[dict] = []
        self.table = node_table.NodeTable()  # the head's node table: whole, then changes
        self.table_syncing = False           # we asked for the whole table (SyncNodes) after a gap
        self.drain_deadline: float | None = None  # draining (farpool stop on this node) until then
        self.drained = None  # called once, when drained or at the deadline (main(): stop the loop)
        self.saving: dict | None = None  # draining: owners asked to copy objects away -> how many

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
            error = protocol.Error._make(fields) if tag == "Error" else None
            if error is not None and error.code == "version-mismatch":
                raise ConnectionError(f"the head refused this node: {error.detail}")
            self._on_head_message(reply)
        self.loop.add_reader(self.head, self._on_head)
        self.heartbeat_due = time.monotonic() + HEARTBEAT_S
        self.loop.call_later(HEARTBEAT_S, self._heartbeat)
        self.register_info = info
        self._start_pulse()

    def _open_head(self, hello: list) -> None:
        """A connection to the head of our own (its identity names our node id), opened
        without waiting: ``hello`` goes first once it is up (joining again as a new node)."""
        self.head = transport.dealer(f"node:{self.node_id}".encode())
        if self.args.head_address.startswith("ipc://"):
            self.head.connect(self.args.head_address)
            transport.send(self.head, hello)
        else:
            transport.start_tcp(self.head, self.args.head_address, self.token, hello)
        self.loop.add_reader(self.head, self._on_head)

    def _start_pulse(self) -> None:
        node_id = self.node_id
        self.pulse = pulse.Pulse(node_id, self.args.head_address, self.token,
                                 lambda why: self.loop.call_soon(self._declared_dead, why, node_id))
        self.pulse.start()

    def start_workers(self) -> None:
        self._apply(self.leases.prestart())
        launcher.send_msg(self.launcher_sock, ("started_up",))  # see launcher.PRELOAD_LATER

    def _build_handlers(self) -> dict:
        """MAY_SEND as handlers, built once: kind -> tag -> handler(client, *fields); the head's
        take (*fields) (they come on our connection to it; Relay and ToPeer are routed raw)."""
        handlers = {kind: {tag: getattr(self, "_on_" + tag) for tag in tags - {"Relay", "ToPeer"}}
                    for kind, tags in MAY_SEND.items() if kind != HEAD}
        handlers[HEAD] = {
            "RequestLease": lambda *fields: self._on_RequestLease(HEAD_CLIENT, *fields),
            "ReturnLease": lambda *fields: self._on_ReturnLease(HEAD_CLIENT, *fields),
            "SignalWorker": lambda *fields: self._on_SignalWorker(HEAD_CLIENT, *fields),
            "NodeRegistered": lambda nodes, head_address, version=None:
                self._on_node_table("NodeRegistered", nodes, version),
            "NodeTable": lambda nodes, version=None: self._on_node_table("NodeTable", nodes, version),
            "NodeTableDelta": self._on_node_delta,
            "Error": self._on_head_error,
            "HeartbeatAck": lambda *_: None,  # the head heard us: every message from it sets last_ack
            "PrepareBundles": self._on_PrepareBundles, "CommitBundles": self._on_CommitBundles,
            "ReleaseBundles": self._on_ReleaseBundles,
        }
        return handlers

    # --- declared dead by the head: joining again as a new node ---
    def _declared_dead(self, why: str, node_id: str | None = None) -> None:
        """The head took us for dead (late, not gone: it heard nothing for NODE_TIMEOUT_S, the
        machine stood still or the network was cut).  Clients have given up our leases and
        retried their tasks elsewhere, the head restarted our actors elsewhere, owners took
        the objects here for lost.  So we end every worker (a result they still send would
        come from an attempt given up on) and join again as a NEW node, with a new id: the
        old one stays dead in the node table, and nothing of this incarnation is confused
        with the last.  ``node_id``: the id the news was about (a late word about an id we
        dropped already is ignored)."""
        if self.rejoining or not self.registered or (node_id is not None and node_id != self.node_id):
            return  # (not registered yet: our liveness thread's connection beat our RegisterNode)
        self.rejoining = True
        # Not now: we may be reading the connection to the head this closes (_on_head).
        self.loop.call_soon(self._join_as_new_node, why)

    def _join_as_new_node(self, why: str) -> None:
        old, new = self.node_id, os.urandom(8).hex()
        log.warning("the head declared this node (%s) dead (%s); ending its workers and joining again "
                    "as a new node, %s", old, why, new)
        acts = None
        for lease_id in list(self.leases.leases):
            more = self.leases.return_lease(lease_id, kill=True)
            acts = more if acts is None else acts.extend(more)
        if acts is not None:
            self._apply(acts)
        self.leases.drop_all_bundles()  # the head places them again (on us too, once we are back)
        self.node_id = new
        self.registered = False
        write_node_id(self.session_dir, new)
        launcher.send_msg(self.launcher_sock, ("node_id", new))
        self._apply(self.leases.renamed(new, HEAD_CLIENT))
        # Objects here of owners elsewhere: they took them for lost with the old node (rebuilt
        # or failed) and free them no more here; copies of ours they would not look for here.
        local = {client.identity.decode(errors="replace") for client in self.client_pidfds}  # on this machine
        orphans = [oid for oid, seg in self.store.objects.items() if seg.owner not in local]
        if orphans:
            log.warning("freeing %d object(s) of the old node's store: their owners took them for lost",
                        len(orphans))
            self._free_objects(orphans, f"node {old[:8]} was declared dead ({why})")
        for sock in self.peer_agents.values():  # they named us by the old id
            self.loop.remove_reader(sock)
            sock.close(0)
        self.peer_agents.clear()
        self.register_info = dict(self.register_info, node_id=new)
        self.loop.remove_reader(self.head)
        self.head.close(0)
        self._open_head(encode("RegisterNode", (self.register_info,)))
        if self.pulse is not None:  # a new one once the head has us (its beats must not come first)
            self.pulse.stop()
            self.pulse = None

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

    def _on_node_table(self, tag: str, nodes, version) -> None:
        """The head's whole node table (when we join, or after SyncNodes)."""
        if tag == "NodeRegistered":
            self.registered = True
            if self.rejoining:
                log.warning("this node joined the cluster again, as node %s", self.node_id)
                self.rejoining = False
            if self.pulse is None and self.register_info is not None:  # (joined again as a new node)
                self._start_pulse()
        if not isinstance(nodes, list):
            raise protocol.ProtocolError(f"{tag} carries a {type(nodes).__name__}, expected the node table")
        self.table_syncing = False
        self._new_cluster_view(self.table.full(version, nodes))

    def _on_node_delta(self, base, version, changes) -> None:
        """Changes of the head's node table (node_table.py); after a gap, the whole table again."""
        rows = self.table.delta(base, version, changes)
        if rows is not None:
            self._new_cluster_view(rows)
        elif not self.table_syncing:
            self.table_syncing = True
            transport.send(self.head, encode("SyncNodes", ()))

    def _new_cluster_view(self, rows: list) -> None:
        self.cluster_nodes = rows
        self._apply(self.leases.set_cluster_view(self.cluster_nodes))
        self._sources_died()
        self._caller_nodes_died()

    def _on_GetNodes(self, client, request_id) -> None:
        self._send(client, "Nodes", request_id, self.cluster_nodes)

    def _on_head_error(self, code: str, detail: str) -> None:
        if code == "unknown-node":
            self._declared_dead(detail)
        elif code == "head-restarted":  # a new head on the old one's tables: keep working, tell it
            self._register_again()
        elif code == "head-gone":  # its supervisor gave up (head_supervisor.py): nobody to wait for
            log.error("the head is gone for good: %s; exiting", detail)
            self.loop.stop()

    def _register_again(self) -> None:
        """Register with a restarted head, with the actors' leases and requests it granted
        before (it reconciles them: head_tables.reconcile).  Tasks on our leases go on."""
        head_leases = [(lease.lease_id, lease.worker_id, self.leases.workers[lease.worker_id].pool_key)
                       for lease in self.leases.leases.values()
                       if lease.client == HEAD_CLIENT and lease.worker_id in self.leases.workers]
        requests = [req.request_id for req in self.leases.pending if req.client == HEAD_CLIENT]
        bundles = [(group, index, bundle.attempt, bundle.committed)
                   for (group, index), bundle in self.leases.bundles.items()]
        # (its totals now: committed bundles add resources of their own)
        info = dict(self.register_info, total=dict(self.leases.resources.total),
                    available=self.leases.resources.available,
                    held={"leases": head_leases, "requests": requests, "bundles": bundles})
        log.warning("the head restarted: registering again (holding %d leases of actors)", len(head_leases))
        transport.send(self.head, encode("RegisterNode", (info,)))

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
        self._send_heartbeat()
        self.loop.call_later(HEARTBEAT_S, self._heartbeat)

    def _send_heartbeat(self) -> None:
        stats = dict(self.leases.stats(), object_store=self._store_stats(), host=host_usage.host())
        beat = {"stats": stats, "draining": self.leases.draining}
        copies = self.copy_log.take()
        if copies is not None:  # (the head keeps them apart from our record: copy_events.py)
            beat["copies"] = copies
        transport.send(self.head, encode("Heartbeat", (self.node_id, self.leases.resources.available, beat)))

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
                tag, fields, buffers = protocol.decode(frames[1:])
                handler = self.handlers.get(peer, {}).get(tag)
                if handler is None:
                    self._refuse(peer, identity, tag)
                    continue
                if tag in TAKES_BUFFERS:
                    handler(Client(kind, identity), *fields, buffers)
                else:
                    handler(Client(kind, identity), *fields)
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

    def _on_RequestLease(self, client, request_id, shape, job_id, pool_key, strategy, spillback_ok) -> None:
        hash((request_id, job_id, pool_key, strategy))  # keys of the tables that hold them: TypeError here, not later
        try:
            scheduling.check_shape(shape)
        except ValueError as exc:
            log.warning("refused a lease request from %r: %s", client.identity[:24], exc)
            self._send(client, "LeaseInfeasible", request_id, f"this lease request cannot be granted: {exc}", True)
            return
        self.client_jobs.setdefault(client, job_id)
        req = LeaseRequest(client, request_id, shape, job_id, pool_key, strategy, spillback_ok)
        self._apply(self.leases.request(req))

    def _on_CancelLease(self, client, request_id) -> None:
        self.leases.cancel_request(client, request_id)

    def _on_ReturnLease(self, client, lease_id, kill) -> None:
        self._apply(self.leases.return_lease(lease_id, kill))

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

    # --- launcher ---
    def _on_launcher(self) -> None:
        msgs = self.launcher_reader.read()
        if msgs is None:
            log.error("the worker launcher died; exiting")
            self.loop.stop()
            return
        for tag, *fields in msgs:
            if tag not in LAUNCHER_MAY_SEND:
                log.warning("dropped %r from the launcher: it may not send it", tag)
            elif tag == "output":
                worker_id, stream, data = fields
                self._forward_output(worker_id, stream, data)
            elif tag == "started":
                worker_id, pid = fields
                self.worker_pids[worker_id] = pid
                self.pids_ever[worker_id] = pid
            elif tag == "exited":
                worker_id, pid, code, sig = fields
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
                self._unwatch_callers(Client(IPC, b"w:" + worker_id.encode()))
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
        for req, message in acts.refused:
            self._send(req.client, "LeaseInfeasible", req.request_id, message, True)
        for lease, info in acts.lost:
            self._send(lease.client, "WorkerExited", lease.lease_id, info)
        for lease in acts.yields:
            self._send(lease.client, "YieldLease", lease.lease_id)
        if self.yield_timer is None and self.leases.waiting():
            self.yield_timer = self.loop.call_later(leases_mod.LEASE_HOLD_S, self._yield_tick)
        if self.drain_deadline is not None:
            self._check_drained()

    def _yield_tick(self) -> None:
        """Requests wait: ask back the leases that have long stood in their way (leases.tick)."""
        self.yield_timer = None
        self._apply(self.leases.tick())

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


def run(args, token: str, launcher_pid: int, launcher_sock, ready_fd: int | None = None,
        head_ready_fd: int | None = None, head_pid: int | None = None) -> int:
    """The agent's life, once node_main has parsed ``args`` and forked the launcher; the two
    fds are the ready pipes of session.spawn (ours to close, the head's to wait on), or None;
    ``head_pid``: the embedded head node_main forked (ours to reap), or None."""
    session.set_process_name("farpool-node")
    if args.num_cpus is None:
        args.num_cpus = host_usage.cpu_count()  # (as loky.cpu_count(), without importing loky)
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
    write_node_id(args.session_dir, args.node_id)
    try:
        agent = NodeAgent(args, token, launcher_pid, launcher_sock)
    except OSError as exc:  # the port is taken, the host is not ours: say so, no traceback
        print(f"farpool-node: {exc.strerror or exc}", flush=True)
        _stop_launcher(launcher_pid, launcher_sock)
        return 1
    if ready_fd is not None:
        os.close(ready_fd)  # bound: the driver may connect (session.wait_ready)
    agent.start_workers()
    if head_ready_fd is not None:
        session.wait_ready([head_ready_fd], HEAD_TIMEOUT_S)
        os.close(head_ready_fd)
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
    if head_pid is not None:
        _reap_when_done(agent.loop, head_pid, "the embedded head")
    signal.signal(signal.SIGTERM, session.sigterm_handler(lambda *_: (clean.append("SIGTERM"), agent.loop.stop())))

    def on_drain_signal(*_):
        agent.drained = lambda: (clean.append("drained"), agent.loop.stop())
        agent.loop.call_soon(agent.drain, _drain_timeout(args.session_dir))
        agent.loop.wake()
    signal.signal(DRAIN_SIGNAL, on_drain_signal)
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


def write_node_id(session_dir: str, node_id: str) -> None:
    """``node.id`` in the agent's session directory: the id it has now (a new one each time
    it joins again after being declared dead), for ``farpool stop --node``."""
    path = os.path.join(session_dir, NODE_ID_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(node_id)
    os.replace(path + ".tmp", path)


def _reap_when_done(loop, pid: int, what: str) -> None:
    """Reap our child ``pid`` when it exits (a head that exits after us is reaped by init)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return

    def reap():
        loop.remove_reader(fd)
        os.close(fd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        code = os.waitstatus_to_exitcode(status)
        (log.info if code == 0 else log.warning)("%s (pid %d) exited with %s", what, pid,
                                                 f"signal {-code}" if code < 0 else f"code {code}")
    loop.add_reader(fd, reap)


def _stop_launcher(launcher_pid: int, launcher_sock) -> None:
    launcher_sock.close()  # the launcher sees EOF and kills the workers
    try:
        os.waitpid(launcher_pid, 0)
    except ChildProcessError:
        pass

