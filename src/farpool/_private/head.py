"""The head: membership and heartbeats of nodes, the cluster resource view, jobs, a small KV.

Runs as its own process (``python -m farpool._private.head``), one thread, one
event loop.  Not on the per-task path: clients talk to it when they join, when
they need the node table, and for introspection::

    node agents --RegisterNode/Heartbeat--> +------+ --NodeTableDelta--> agents, drivers
    agents' liveness threads --NodeAlive--> |      |
    drivers -----Hello/GetNodes/KV--------> | head |
    lifeline (embedded only) -------------> +------+

Listens on ``ipc://<session>/head`` and, for a cluster from ``farpool start``,
on a CURVE-protected TCP port.  A node that misses heartbeats for
``NODE_TIMEOUT_S`` is marked dead and every subscriber is told; heartbeats come
from a thread of the agent that nothing blocks (pulse.py), so a busy node is not a
dead one.  The embedded cluster's agent is judged by its process instead (a pidfd:
the driver started both, on one machine): it is dead when it exits, never for
being late.

Subscribers (agents, clients) get the node table whole when they join (NodeRegistered,
Welcome) or ask (SyncNodes, after a version gap), and then only its changes, versioned
(node_table.py): at once when a node dies, else at most every ``TABLE_BATCH_S`` (the
first change after a quiet spell at once), so 500 nodes joining or reporting other free
resources cost one diff and one message per subscriber per batch, not one per change.

The head is one class, ``Head``, in two modules, both run on its one thread:

- head.py (this): start-up and its tables on disk, the tables of what each kind of peer
  may send (MAY_SEND) and the dispatch through them, nodes joining, beating and dying,
  the node table sent to subscribers, jobs, the KV, task events and GetState (cluster_state.py),
  placement groups, and ``main()``;
- head_actors.py: actors (creating, placing on a node, watching, killing, restarting).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from farpool._private import (addresses, cluster_state, copy_events, head_tables, node_table, placement_groups,
                              protocol, scheduling, session, task_history, transport, versions)
from farpool._private.actor_table import DEAD, PENDING, ActorTable
from farpool._private.head_actors import ActorsPart
from farpool._private.protocol import encode

log = logging.getLogger("farpool.head")

# A node silent this long is declared dead.  Shorter detects a lost machine
# sooner; longer tolerates a node stalled by swapping or a long GC pause.
NODE_TIMEOUT_S = float(os.environ.get("FARPOOL_NODE_TIMEOUT_S", "10"))
CHECK_INTERVAL_S = 1.0
# A head restarted on its database waits this long for the drivers of the jobs it had to
# say Hello again; a job whose driver did not ends (its actors, detached ones excepted).
# Longer spares a driver whose network is slow to come back; shorter frees sooner what
# a driver that died meanwhile held.
REJOIN_GRACE_S = float(os.environ.get("FARPOOL_REJOIN_GRACE_S", "10"))
# Changes of the node table (joins, free resources) are sent to subscribers at most this
# often (deaths at once).  Shorter gives agents a fresher view for spilling leases back;
# longer sends fewer, larger messages when many nodes are busy or join together.
TABLE_BATCH_S = float(os.environ.get("FARPOOL_TABLE_BATCH_S", "0.2"))

# What each kind of peer may send the head; anything else is dropped with one log line
# naming the peer's kind and the tag.  A peer's kind is the prefix of the identity it
# connects with (peer_kind), on the ipc socket and the TCP one alike.
MAY_SEND = {
    # a node agent, "node:<node id>": it joins, beats, and answers the head's leases for actors
    "node agent": frozenset({"Ping", "RegisterNode", "Heartbeat", "Goodbye", "DriverDied", "LeaseGranted",
                             "SyncNodes",
                             "LeaseInfeasible", "WorkerExited", "ActorCreated",
                             "BundlesPrepared", "BundlesCommitted", "BundlesReleased"}),
    # an agent's liveness thread (pulse.py), "pulse:<node id>:<pid>"
    "liveness thread": frozenset({"NodeAlive"}),
    # a driver's or a worker's client (and the CLI's), "c:<client id>"
    "client": frozenset({"Ping", "Hello", "Goodbye", "GetNodes", "SyncNodes", "KVPut", "KVGet", "CreateActor",
                         "GetNamedActor", "WaitActor", "KillActor",
                         "TaskEvents", "GetState",  # task events in batches; status/list/timeline
                         "CreatePlacementGroup", "RemovePlacementGroup", "WaitPlacementGroup", "GetPlacementGroups"}),
}


def peer_kind(identity: bytes) -> str | None:
    """The kind of peer (a key of MAY_SEND) behind ``identity``; None for one no peer uses."""
    for prefix, kind in ((b"node:", "node agent"), (b"pulse:", "liveness thread"), (b"c:", "client")):
        if identity.startswith(prefix):
            return kind
    return None


class Head(ActorsPart):
    def __init__(self, session_dir: str, token: str, host: str | None, port: int, embedded: bool,
                 advertise: str | None = None, db_path: str | None = None, restore: bool = False):
        self.session_dir = session_dir
        # The tables on disk (started clusters: a supervisor may restart us on them).
        self.store = None
        if db_path:  # (imported here: sqlite3 costs the embedded head, which has no tables on disk, 1.5 MB)
            from farpool._private import head_store
            self.store = head_store.HeadStore(db_path)
        saved = self.store.load() if self.store is not None else None
        meta = saved["meta"] if saved else {}
        self.epoch = meta.get("epoch", 0) + 1
        port = port or meta.get("port", 0)  # a restarted head listens where its peers reconnect
        self.token = token
        self.embedded = embedded
        self.loop = transport.EventLoop()
        self.ipc = transport.router()
        self.ipc.bind(session.ipc(session_dir, "head"))
        self.loop.add_reader(self.ipc, lambda: self._on_socket(self.ipc))
        self.tcp = None
        self.port = None
        self.host = host
        self.advertise = advertise or host  # what others connect to (``host`` may be 0.0.0.0)
        if host is not None:
            self.zap = transport.ZapHandler(token)
            self.loop.add_reader(self.zap.socket, self.zap.handle)
            self.tcp = transport.router()
            transport.make_curve_server(self.tcp, token)
            try:
                self.port = transport.bind_tcp(self.tcp, host, port)
            except OSError:
                if not (restore and port == meta.get("port")):
                    raise
                log.warning("port %s of the saved head is taken on this machine: listening on a free one "
                            "(start the node agents with the new address)", port)
                self.port = transport.bind_tcp(self.tcp, host, 0)
            self.loop.add_reader(self.tcp, lambda: self._on_socket(self.tcp))
        self.nodes: dict[str, dict] = {}        # node_id -> public record
        self.node_peers: dict[str, tuple] = {}  # node_id -> (socket, identity)
        self.last_seen: dict[str, float] = {}
        self.node_pidfds: dict[str, int] = {}   # embedded: node id -> pidfd of its agent
        self.subscribers: dict[tuple, bool] = {}  # (socket, identity) -> True
        self.table_changes = node_table.Changes(self.epoch)  # what subscribers have of the node table
        self.table_flush = None                  # the timer of a batch of changes (TABLE_BATCH_S)
        self.table_sent_at = float("-inf")       # when changes were last sent
        self.kv: dict[str, bytes] = {}
        self.next_job = 1
        self.actors = ActorTable()
        self.actor_requests: dict[int, str] = {}    # lease request id -> actor id
        self.client_job: dict[tuple, int] = {}      # (socket, identity) of a driver -> its job
        self.pgs = placement_groups.PlacementGroups(embedded)
        self.pg_waiters: dict[str, list] = {}       # group id -> (socket, identity, request id) of WaitPlacementGroup
        self.history = task_history.TaskHistory()   # every owner's tasks, bounded (FARPOOL_TASK_HISTORY)
        self.copies = copy_events.CopyHistory()     # copies of objects between nodes (FARPOOL_COPY_HISTORY)
        self.unconfirmed: set[str] = set()          # restored nodes that have not registered again
        self.unconfirmed_jobs: set = set()          # restored jobs whose driver has not said Hello again
        # Placement groups' rows as last written (head_store "placement_groups"): group id ->
        # (creation order, row); see _save_groups.
        self.pg_rows: dict[str, tuple] = {}
        self.pg_seq = 0  # the next group's place in creation order
        if saved and meta:  # a database a head wrote before
            self._restore(saved)
        self._save("meta", "epoch", self.epoch)
        self._save("meta", "port", self.port)
        self._save("meta", "address", self.address())
        self.check_due = time.monotonic() + CHECK_INTERVAL_S
        self.loop.call_later(CHECK_INTERVAL_S, self._check_nodes)
        self.handlers = self._build_handlers()

    # --- the tables on disk (head_store.py) ---
    def _save(self, table: str, key, value) -> None:
        if self.store is not None:
            self.store.put(table, key, value)

    def _save_actor(self, record, new: bool = False) -> None:
        if self.store is not None:
            self.store.put_actor(record.actor_id, record.spec if new else None, head_tables.actor_state(record))

    def _restore(self, saved: dict) -> None:
        """Start from the tables a previous head left: every node it had alive is unconfirmed
        until its agent registers again (NODE_TIMEOUT_S, then dead), every job running until
        its driver says Hello again (REJOIN_GRACE_S, then ended)."""
        now = time.monotonic()
        meta = saved["meta"]
        self.next_job = meta.get("next_job", 1)
        self.kv = dict(saved["kv"])
        for node_id, record in saved["nodes"].items():
            self.nodes[node_id] = record
            if record.get("alive"):
                self.unconfirmed.add(node_id)
                self.last_seen[node_id] = now
        self.actor_requests = head_tables.restore_actors(self.actors, saved["actors"], self.epoch)
        for job_id, job in saved["jobs"].items():
            if job.get("running"):
                self.unconfirmed_jobs.add(job["job_id"])
        self.pg_rows = {pg_id: (seq, row) for pg_id, (seq, row) in saved["placement_groups"].items()}
        self.pg_seq = max((seq for seq, _ in self.pg_rows.values()), default=-1) + 1
        forgotten = self.pgs.restore([row for _, row in sorted(self.pg_rows.values(), key=lambda item: item[0])],
                                     list(self.nodes.values()))
        self._forget_groups(forgotten)
        if self.unconfirmed_jobs:
            self.loop.call_later(REJOIN_GRACE_S, self._jobs_not_back)
        log.info("the head starts again (epoch %d) on its database: %d nodes to confirm, %d actors (%d named), "
                 "%d jobs to confirm, %d keys, %d placement groups", self.epoch, len(self.unconfirmed),
                 len(self.actors.actors), len(self.actors.names), len(self.unconfirmed_jobs), len(self.kv),
                 len(self.pg_rows))

    def _jobs_not_back(self) -> None:
        for job_id in sorted(self.unconfirmed_jobs):
            self._job_ended(job_id, f"its driver did not come back within {REJOIN_GRACE_S:.0f} s of the "
                                    "head's restart")
        self.unconfirmed_jobs.clear()

    def _restarted(self, node_id: str) -> bool:
        """A node this head has not heard register: one it restored, or (the database lost
        it) one it never knew although a head ran before it."""
        return node_id in self.unconfirmed or (node_id not in self.nodes and self.epoch > 1)

    # --- messages ---
    def _build_handlers(self) -> dict:
        """MAY_SEND as handlers, built once: kind -> tag -> handler(sock, identity, *fields)."""
        return {kind: {tag: getattr(self, "_on_" + tag) for tag in tags} for kind, tags in MAY_SEND.items()}

    def _on_socket(self, sock) -> None:
        for frames in transport.recv_all(sock):
            identity, rest = frames[0], frames[1:]
            try:
                tag, fields, _ = protocol.decode(rest)
                peer = peer_kind(identity)
                handler = self.handlers.get(peer, {}).get(tag)
                if handler is None:
                    log.warning("dropped %s from %s %r: a %s may not send it", tag, peer or "an unknown peer",
                                identity[:24], peer or "peer with such an identity")
                    continue
                handler(sock, identity, *fields)
            except (protocol.ProtocolError, TypeError, ValueError, KeyError, IndexError) as exc:
                log.warning("dropped a bad message from %r: %s", identity[:16], exc)
            except Exception:  # a bug handling one message must not take the whole node down
                log.exception("failed to handle a message from %r; still serving", identity[:24])

    def _reply(self, sock, identity, tag, *fields) -> None:
        transport.send(sock, [identity, *encode(tag, fields)])

    def _on_Ping(self, sock, identity, *args) -> None:
        self._reply(sock, identity, "Pong", *args)

    def _refused(self, sock, identity, what: str, info: dict) -> bool:
        """Refuse a joining peer whose farpool or Python version differs from ours (and say so)."""
        why = versions.mismatch(info.get("versions"), what, f"the head at {self.address() or 'this machine'}")
        if why is None:
            return False
        log.warning("refused %s", why)
        self._reply(sock, identity, "Error", "version-mismatch", why)
        return True

    def _on_Hello(self, sock, identity, kind: str, info: dict) -> None:
        if self._refused(sock, identity, f"this {kind} (pid {info.get('pid')})", info):
            return
        job_id = None
        if kind == "driver" and info.get("job_id") is not None:  # its head restarted: the same job
            job_id = info["job_id"]
            self.unconfirmed_jobs.discard(job_id)
            if isinstance(job_id, int) and job_id >= self.next_job:
                self.next_job = job_id + 1
                self._save("meta", "next_job", self.next_job)
            log.info("the driver of job %s (pid %s) is back", job_id, info.get("pid"))
        elif kind == "driver":
            job_id = self.next_job
            self.next_job += 1
            self._save("meta", "next_job", self.next_job)
        self.subscribers[(sock, identity)] = True
        if job_id is not None:
            self.client_job[(sock, identity)] = job_id
            self._save("jobs", job_id, {"job_id": job_id, "running": True, "pid": info.get("pid"),
                                        "driver": identity.decode(errors="replace"), "since": time.time()})
        self._reply(sock, identity, "Welcome", {
            "job_id": job_id, "embedded": self.embedded, "session_dir": self.session_dir,
            "nodes": self.table_changes.rows(), "nodes_version": self.table_changes.version,
            "address": self.address(),
            "versions": versions.ours(),
        })

    def _on_RegisterNode(self, sock, identity, info: dict) -> None:
        node_id = info["node_id"]
        if self._refused(sock, identity, f"node agent {node_id[:8]} on {info.get('hostname')}", info):
            return
        record = dict(info)
        held = record.pop("held", None)  # a node registering again after the head restarted
        record["alive"] = True
        record.setdefault("available", dict(info["total"]))
        record["actors"] = 0
        rejoined = node_id in self.nodes and node_id not in self.unconfirmed
        first_again = node_id in self.unconfirmed or node_id not in self.nodes
        self.unconfirmed.discard(node_id)
        self.nodes[node_id] = record
        self.node_peers[node_id] = (sock, identity)
        self.last_seen[node_id] = time.monotonic()
        self._save("nodes", node_id, record)
        if held is not None:
            # Heartbeats queued while we were away each got "register again": reconcile once.
            if first_again:
                log.info("node %s registered again after the head restarted, holding %d leases of actors",
                         node_id, len(held.get("leases", ())))
                self._reconcile(node_id, sock, identity, held)
        elif rejoined:
            log.warning("node %s joined again after it was declared dead", node_id)
        else:
            log.info("node %s joined with %s", node_id, info["total"])
        if self.embedded and info.get("pid") and node_id not in self.node_pidfds:
            self._watch_node_process(node_id, info["pid"])
        self._table_changed()
        self.subscribers[(sock, identity)] = True  # the table as last sent, then the changes (its own record)
        self._reply(sock, identity, "NodeRegistered", self.table_changes.rows(), self.address(),
                    self.table_changes.version)
        for record in list(self.actors.actors.values()):
            if record.state == PENDING and record.node_id is None and record.request_id is None:
                self._schedule_actor(record)

    def _reconcile(self, node_id: str, sock, identity, held: dict) -> None:
        """What the node still holds against what the previous head wrote (head_tables.reconcile)."""
        found = head_tables.reconcile(self.actors, node_id, held)
        for lease_id in found.stray:
            transport.send(sock, [identity, *encode("ReturnLease", (lease_id, True))])
        for record in found.lost:
            why = f"its worker on node {node_id[:8]} ended while the head was away"
            if self.actors.died(record, why):
                log.warning("actor %s: %s; restarting it", record.actor_id[:8], why)
                self._schedule_actor(record)
            self._notify_actor(record)
        for record in found.recreate:  # not a restart: its creation was never confirmed
            record.worker_id = record.path = record.lease_id = record.request_id = None
            self._schedule_actor(record)
        for record in found.kept:  # callers that asked meanwhile were not answered yet
            self._notify_actor(record)
        # Its placement group bundles: those the table places there stay, the others go.
        self._apply_groups(self.pgs.node_back(node_id, held.get("bundles", ())))

    def _on_Heartbeat(self, sock, identity, node_id: str, available: dict, stats: dict) -> None:
        record = self.nodes.get(node_id)
        if self._restarted(node_id):
            self._reply(sock, identity, "Error", "head-restarted",
                        f"the head restarted (epoch {self.epoch}); register again with what you hold")
            return
        if record is None or not record["alive"]:
            self._reply(sock, identity, "Error", "unknown-node",
                        f"node {node_id} is not registered (it was declared dead); restart it")
            return
        self.last_seen[node_id] = time.monotonic()
        self._reply(sock, identity, "HeartbeatAck")
        copies = stats.pop("copies", None)  # for the timeline, not the node table
        if copies is not None:
            self.copies.add(copies)
        changed = record["available"] != available or record.get("draining", False) != stats.get("draining", False)
        record["available"] = available
        record.update(stats)
        if changed:
            self._table_changed()

    def _on_NodeAlive(self, sock, identity, node_id: str, beat: int) -> None:
        """From an agent's liveness thread (pulse.py): it lives, however busy its loop is."""
        record = self.nodes.get(node_id)
        if self._restarted(node_id):  # its agent's loop registers again (answer to its Heartbeat)
            if node_id in self.unconfirmed:
                self.last_seen[node_id] = time.monotonic()
            self._reply(sock, identity, "Error", "head-restarted", f"the head restarted (epoch {self.epoch})")
            return
        if record is None:
            # Not registered yet: its liveness thread's socket is not its loop's, so a first beat
            # may come before the RegisterNode its loop sent first.  Taken for "declared dead",
            # the node joined again under a new id at start-up, and its driver lost its node.
            return
        if not record["alive"]:
            self._reply(sock, identity, "Error", "unknown-node",
                        f"node {node_id} is not registered (it was declared dead: {record.get('death_reason')})")
            return
        self.last_seen[node_id] = time.monotonic()
        self._reply(sock, identity, "NodeAliveAck", beat)

    def _watch_node_process(self, node_id: str, pid: int) -> None:
        """Embedded: the agent is our sibling on this machine; it is dead when its process is."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self._mark_dead(node_id, f"its agent (pid {pid}) is gone")
            return
        self.node_pidfds[node_id] = fd

        def exited():
            self.loop.remove_reader(fd)
            os.close(fd)
            self.node_pidfds.pop(node_id, None)
            self._mark_dead(node_id, f"its agent (pid {pid}) exited")
        self.loop.add_reader(fd, exited)

    def _on_GetNodes(self, sock, identity, request_id) -> None:
        self._reply(sock, identity, "Nodes", request_id, self._table())

    def _on_SyncNodes(self, sock, identity) -> None:
        """A subscriber missed a change (a version gap): the whole table again, as last sent."""
        if (sock, identity) in self.subscribers:
            self._reply(sock, identity, "NodeTable", self.table_changes.rows(), self.table_changes.version)

    def _on_KVPut(self, sock, identity, request_id, key: str, value: bytes) -> None:
        self.kv[key] = value
        self._save("kv", key, value)
        self._reply(sock, identity, "KVValue", request_id, True)

    def _on_KVGet(self, sock, identity, request_id, key: str) -> None:
        self._reply(sock, identity, "KVValue", request_id, self.kv.get(key))

    def _on_TaskEvents(self, sock, identity, *batch) -> None:
        self.history.add_batch(batch)

    def _on_GetState(self, sock, identity, request_id, what: str, params: dict) -> None:
        """status, list, timeline: answered as {"ok": data} or {"error": text} (cluster_state.py)."""
        try:
            answer = {"ok": cluster_state.query(self, what, params)}
        except ValueError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # a bug here must not leave the asker waiting
            log.exception("failed to answer GetState %r", what)
            answer = {"error": f"the head failed to answer {what!r}: {exc!r} (see head.log)"}
        self._reply(sock, identity, "Reply", request_id, answer)

    def _on_Goodbye(self, sock, identity, kind: str, ident: str) -> None:
        self.subscribers.pop((sock, identity), None)
        if kind == "node" and ident in self.nodes and identity == f"node:{ident}".encode():  # itself only
            self._mark_dead(ident, "it shut down")
        job_id = self.client_job.pop((sock, identity), None)
        if job_id is not None:
            self._job_ended(job_id, "its creator's job ended")

    def _on_DriverDied(self, sock, identity, job_id, why: str) -> None:
        """From a node agent: a driver attached to it died without a Goodbye (its pid, or
        its TCP connection gone for good).  Its job ends as if it had said Goodbye.  Not
        from a node we declared dead: cut off from the network, it took the driver for dead
        because it could not reach it either (its word arrives when the link returns)."""
        node_id = identity[len(b"node:"):].decode(errors="replace")
        if not self.nodes.get(node_id, {}).get("alive"):
            log.warning("ignored node %s's word that the driver of job %s died (%s): that node was "
                        "declared dead, and likely could not reach the driver for the same reason", node_id[:8],
                        job_id, why)
            return
        for peer in [p for p, j in self.client_job.items() if j == job_id]:
            del self.client_job[peer]
            self.subscribers.pop(peer, None)
        self._job_ended(job_id, f"its driver died ({why})")

    def _job_ended(self, job_id, why: str) -> None:
        """A job's actors end with it, except detached ones (idempotent)."""
        self.history.job_ended(job_id, why)
        self._save("jobs", job_id, {"job_id": job_id, "running": False, "why": why, "ended": time.time()})
        for record in list(self.actors.actors.values()):
            if record.spec.get("job_id") == job_id and not record.spec.get("detached") \
                    and record.state != DEAD:
                log.info("ending actor %s: %s", record.actor_id[:16], why)
                self._kill_actor(record, no_restart=True, why=why)
        self._apply_groups(self.pgs.job_ended(job_id))

    # --- membership ---
    def _table(self) -> list[dict]:
        counts = self.actors.live_counts()
        for node_id, record in self.nodes.items():
            record["actors"] = counts.get(node_id, 0)
        return list(self.nodes.values())

    def address(self) -> str | None:
        return addresses.join(self.advertise, self.port) if self.tcp is not None else None

    def _table_changed(self) -> None:
        """The node table changed: send it now if nothing was sent for TABLE_BATCH_S, else with
        whatever else changes until then."""
        if self.table_flush is not None:
            return
        wait = self.table_sent_at + TABLE_BATCH_S - time.monotonic()
        if wait <= 0:
            self._broadcast()
        else:
            self.table_flush = self.loop.call_later(wait, self._broadcast)

    def _broadcast(self) -> None:
        """Send every subscriber what changed in the node table since the last time (node_table.py)."""
        self.loop.cancel_timer(self.table_flush)
        self.table_flush = None
        self.table_sent_at = time.monotonic()
        delta = self.table_changes.take({n["node_id"]: n for n in self._table()})
        if delta is not None:
            frames = encode("NodeTableDelta", delta)
            for sock, identity in list(self.subscribers):
                if not transport.send(sock, [identity, *frames]):
                    self.subscribers.pop((sock, identity), None)
        self._apply_groups(self.pgs.nodes_changed(list(self.nodes.values())))

    # --- placement groups (decisions: placement_groups.py; bundles held by the agents) ---
    def _on_CreatePlacementGroup(self, sock, identity, request_id, group_id: str, bundles: list, strategy: str,
                                 name: str, detached: bool, job_id) -> None:
        if not isinstance(group_id, str) or not isinstance(bundles, list) or not bundles:
            raise ValueError(f"CreatePlacementGroup of {group_id!r} with bundles {bundles!r}")
        for shape in bundles:
            scheduling.check_shape(shape)
        self._apply_groups(self.pgs.nodes_changed(list(self.nodes.values())))
        acts, error = self.pgs.create(group_id, bundles, strategy, name, job_id, detached)
        warning = acts.warnings[0] if acts.warnings else None
        self._reply(sock, identity, "PlacementGroupReply", request_id, (error, warning))
        self._apply_groups(acts)

    def _on_RemovePlacementGroup(self, sock, identity, request_id, group_id: str) -> None:
        group = self.pgs.get(group_id)
        what = f"placement group {group.name or group_id}" if group else f"placement group {group_id}"
        self._apply_groups(self.pgs.remove(group_id, f"{what} was removed (farpool.util.remove_placement_group)"))
        self._reply(sock, identity, "PlacementGroupReply", request_id, group is not None)

    def _on_WaitPlacementGroup(self, sock, identity, request_id, group_id: str) -> None:
        """Answered once the group is CREATED or REMOVED: (state, why)."""
        group = self.pgs.get(group_id)
        if group is None:
            self._reply(sock, identity, "PlacementGroupReply", request_id,
                        (placement_groups.REMOVED, f"placement group {group_id} is unknown to this cluster"))
        elif group.state in (placement_groups.CREATED, placement_groups.REMOVED):
            self._reply(sock, identity, "PlacementGroupReply", request_id, (group.state, group.cause))
        else:
            self.pg_waiters.setdefault(group_id, []).append((sock, identity, request_id))

    def placement_group_rows(self) -> list[dict]:
        """The groups as `farpool list placement-groups` shows them (cluster_state)."""
        return [{**info, "nodes": sorted(set(info["bundles_to_node_id"].values()))} for info in self.pgs.table().values()]

    def _on_GetPlacementGroups(self, sock, identity, request_id, group_id=None) -> None:
        """Every group's info by id, or only ``group_id``'s ({} when unknown)."""
        if group_id is None:
            table = self.pgs.table()
        else:
            group = self.pgs.get(group_id)
            table = {group_id: group.info()} if group is not None else {}
        self._reply(sock, identity, "PlacementGroupReply", request_id, table)

    def _bundles_answer(self, node_id: str, total: dict, available: dict) -> None:
        """An agent's bundles changed its resources: take its word for them (totals too)."""
        record = self.nodes.get(node_id)
        if record is not None and record["alive"]:
            record["total"], record["available"] = total, available

    def _on_BundlesPrepared(self, sock, identity, group_id, attempt, ok, why, node_id, total, available) -> None:
        self._bundles_answer(node_id, total, available)
        self._apply_groups(self.pgs.nodes_changed(list(self.nodes.values())))  # (a refusal is judged in it)
        self._apply_groups(self.pgs.prepared(group_id, attempt, node_id, ok, why))

    def _on_BundlesCommitted(self, sock, identity, group_id, attempt, node_id, total, available) -> None:
        self._bundles_answer(node_id, total, available)
        self._apply_groups(self.pgs.nodes_changed(list(self.nodes.values())))  # (the next group sees it)
        acts = self.pgs.committed(group_id, attempt, node_id)
        self._broadcast()  # before the group's waiters hear: the agents learn where its bundles are
        self._apply_groups(acts)

    def _on_BundlesReleased(self, sock, identity, group_id, node_id, total, available) -> None:
        self._bundles_answer(node_id, total, available)
        self._broadcast()

    def _apply_groups(self, acts) -> None:
        for node_id, group_id, attempt, items in acts.prepare:
            self._to_node(node_id, "PrepareBundles", group_id, attempt, items)
        for node_id, group_id, attempt, indexes in acts.commit:
            self._to_node(node_id, "CommitBundles", group_id, attempt, indexes)
        for node_id, group_id, attempt in acts.abort:
            self._to_node(node_id, "ReleaseBundles", group_id, attempt, "")
        for message in acts.warnings:
            log.warning("%s", message)
        for group in acts.removed:
            for record in list(self.actors.actors.values()):
                if record.spec.get("placement_group") == group.pg_id and record.state != DEAD:
                    self._kill_actor(record, no_restart=True, why=group.cause)
            for node_id in list(self.node_peers):  # also those that only heard of it: late requests fail
                self._to_node(node_id, "ReleaseBundles", group.pg_id, None, group.cause)
            self._wake_group_waiters(group)
        for group in acts.created:
            self._wake_group_waiters(group)
            for record in list(self.actors.actors.values()):
                if record.spec.get("placement_group") == group.pg_id and record.state == PENDING \
                        and record.request_id is None:
                    self._schedule_actor(record)
        self._save_groups([g for g in acts.removed if g.pg_id in self.pgs.groups])
        self._forget_groups(acts.forgotten)

    def _forget_groups(self, pg_ids: list) -> None:
        """Removed groups the table let go (placement_groups.REMEMBER_REMOVED): their rows too,
        so the database does not grow with every group ever removed."""
        for pg_id in pg_ids:
            if self.pg_rows.pop(pg_id, None) is not None and self.store is not None:
                self.store.delete("placement_groups", pg_id)

    def _save_groups(self, removed: list) -> None:
        """Write the rows of the groups that changed (a restarted head takes them back:
        placement_groups.restore): every live one is compared with its row as last written."""
        if self.store is None:
            return
        for group in [g for g in self.pgs.groups.values() if g.state != placement_groups.REMOVED] + removed:
            row = group.row()
            seq, saved = self.pg_rows.get(group.pg_id, (self.pg_seq, None))
            if saved is None:
                self.pg_seq += 1  # (creation order, kept when older rows are deleted)
            if row != saved:
                self.pg_rows[group.pg_id] = (seq, row)
                self._save("placement_groups", group.pg_id, (seq, row))

    def _wake_group_waiters(self, group) -> None:
        for sock, identity, request_id in self.pg_waiters.pop(group.pg_id, ()):
            self._reply(sock, identity, "PlacementGroupReply", request_id, (group.state, group.cause))

    def _to_node(self, node_id: str, tag: str, *fields) -> None:
        peer = self.node_peers.get(node_id)
        if peer is not None:
            transport.send(peer[0], [peer[1], *encode(tag, fields)])

    def _mark_dead(self, node_id: str, why: str) -> None:
        record = self.nodes.get(node_id)
        if record is None or not record["alive"]:
            return
        record["alive"] = False
        record["death_reason"] = why
        self.unconfirmed.discard(node_id)
        self._save("nodes", node_id, record)
        peer = self.node_peers.pop(node_id, None)
        if peer:
            self.subscribers.pop(peer, None)
        log.warning("node %s is dead: %s", node_id, why)
        self._broadcast()
        for record in list(self.actors.actors.values()):
            if record.node_id == node_id and record.state != DEAD:
                if self.actors.died(record, f"its node {node_id[:8]} died ({why})"):
                    self._schedule_actor(record)
                self._notify_actor(record)

    def _check_nodes(self) -> None:
        now = time.monotonic()
        if now - self.check_due > NODE_TIMEOUT_S / 2:
            # We did not run for a while ourselves (stopped, frozen, starved): the nodes'
            # heartbeats of that time are still unread in our sockets, or were not sent
            # because the whole machine stood still.  Their silence says nothing about
            # them: give every node a fresh NODE_TIMEOUT_S to be heard (timers run before
            # sockets are read, so judging now would declare live nodes dead).
            log.warning("the head did not run for %.0f s: not judging nodes by heartbeats missed "
                        "meanwhile", now - self.check_due + CHECK_INTERVAL_S)
            for node_id in self.last_seen:
                self.last_seen[node_id] = now
        for node_id, seen in list(self.last_seen.items()):
            if node_id in self.node_pidfds:  # judged by its process, not by heartbeats
                continue
            if self.nodes[node_id]["alive"] and now - seen > NODE_TIMEOUT_S:
                self._mark_dead(node_id, f"no heartbeat for {now - seen:.0f} s")
        self.check_due = now + CHECK_INTERVAL_S
        self.loop.call_later(CHECK_INTERVAL_S, self._check_nodes)

    def close(self) -> None:
        for sock in (self.ipc, self.tcp):
            if sock is not None:
                sock.close(0)
        if self.store is not None:
            self.store.close()


OPTIONS = [
    session.Option("--session-dir", required=True),
    session.Option("--host", help="also listen on TCP at this address"),
    session.Option("--advertise-host", help="the address others connect to, when --host is 0.0.0.0 (default: --host)"),
    session.Option("--port", int, default=0),
    session.Option("--embedded", bool),
    session.Option("--lifeline", bool, help="exit when stdin closes"),
    session.Option("--dashboard-host", help="where the dashboard listens (default 127.0.0.1)"),
    session.Option("--dashboard-port", int, default=0),
    session.Option("--no-dashboard", bool),
    session.Option("--db", help="keep the tables in this SQLite file (and start from it)"),
    session.Option("--restore", bool, help="the database comes from another machine or boot: its port may be taken"),
]


def main(argv=None) -> int:
    args = session.parse_options("farpool-head", OPTIONS, argv)
    session.set_process_name("farpool-head")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = os.environ.pop("FARPOOL_TOKEN", "")
    try:
        head = Head(args.session_dir, token, args.host, args.port, args.embedded, args.advertise_host,
                    args.db, args.restore)
    except OSError as exc:  # the port is taken, the host is not ours: say so, no traceback
        print(f"farpool-head: {exc.strerror or exc}", flush=True)
        return 1
    with open(os.path.join(args.session_dir, "head.pid"), "w") as f:
        f.write(str(os.getpid()))
    session.announce_ready()  # bound (and head.pid written): the driver and the node agent may connect
    head.dashboard = None
    if not args.no_dashboard and os.environ.get("FARPOOL_DASHBOARD", "1") != "0":
        from farpool._private import dashboard
        try:
            head.dashboard = dashboard.start(head, token, args.dashboard_host, args.dashboard_port,
                                             args.advertise_host or args.host, args.session_dir)
        except OSError as exc:  # the cluster works without it: say why there is none
            log.warning("no dashboard: cannot listen on %s:%s: %s", args.dashboard_host or "127.0.0.1",
                        args.dashboard_port, exc)
    if head.port is not None:
        with open(os.path.join(args.session_dir, "head.port"), "w") as f:
            f.write(str(head.port))

    clean = []  # why we stop, when it is on purpose (else the logs are kept: see session.keep_logs)

    def on_lifeline():
        if not os.read(0, 4096):
            log.info("lifeline closed: the driver is gone; stopping")
            clean.append("lifeline")
            head.loop.stop()
    if args.lifeline:
        head.loop.add_reader(0, on_lifeline)
    signal.signal(signal.SIGTERM, session.sigterm_handler(lambda *_: (clean.append("SIGTERM"), head.loop.stop())))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"farpool-head ready pid={os.getpid()} port={head.port} epoch={head.epoch}", flush=True)
    try:
        head.loop.run()
    except BaseException:
        log.exception("the head failed")
        raise
    finally:
        if head.dashboard is not None:
            head.dashboard.close()
        head.close()
        if args.embedded:
            if not clean:  # the cluster fails with us: keep the logs that say why
                log.error("the head stops on its own; its logs are kept in %s",
                          session.keep_logs(args.session_dir))
            session.remove_session(args.session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
