"""The node agent's worker and lease state machine: pure, no sockets or clocks.

The agent's I/O shell feeds events (a lease request, a worker that became
ready or exited, a lease returned, a client gone) and carries out the actions
returned.  Worker lifecycle::

    STARTING --ready--> IDLE --grant--> LEASED --return--> IDLE
        \\________________ exited (any state) ________________/--> gone

A worker serves one job (driver) at a time: prestarted workers are unbound and
bind to the first job that leases them.  Leases hold the shape's resources
until returned.  Requests that cannot be met now wait in FIFO order; requests
this node can never meet are spilled back to a node that can (from the head's
view) or reported infeasible.

A lease is held while its client has tasks of its shape (it feeds the worker
without returning it), so a request of another shape, or of another client,
could wait for ever behind it.  The shell calls ``tick()`` every LEASE_HOLD_S
while requests wait: leases held through a whole interval that stand in the way
of a waiting request are asked back (``yields``: YieldLease to their client,
which returns the lease once its running tasks end, and asks again for more at
the back of the line).  Leases of the waiting request's own queue (same client,
shape and pool) and actors' are never asked.  What they free is kept for that
request ("starved": it goes first, its shape promised), or the busy queue's next
request would take it back at once; so a lease whose task runs long holds up the
requests behind the starved one on this node until it ends (no backfill).

A draining node (``farpool stop`` on it: ``drain()``) grants nothing more: every
request waiting or arriving goes to another node that fits (spillback) if it may, or
waits here until the node stops (its clients then ask elsewhere); the clients' leases
are asked back (yields); no worker is started;
``drained()`` says when no client's task can still be running here.
"""

from __future__ import annotations

import itertools
from collections import deque

from farpool._private import placement_groups, scheduling
from farpool._private.scheduling import Allocation, NodeResources

STARTING, IDLE, LEASED = "STARTING", "IDLE", "LEASED"

# How long a lease is held at least before it is asked back for a request that waits behind
# it (see tick): longer wastes less on taking leases again, shorter serves the waiting sooner.
LEASE_HOLD_S = 0.5


def _plus(available: dict, more: dict) -> dict:
    if not more:
        return available
    out = dict(available)
    for name, amount in more.items():
        out[name] = out.get(name, 0) + amount
    return out


def _queue_of(req) -> tuple:
    """What tells one of a client's task queues from another: shape, pool and strategy."""
    return (tuple(sorted(req.shape.items())), req.pool_key, req.strategy)


def _minus(available: dict, promised: dict) -> dict:
    if not promised:
        return available
    return {name: amount - promised.get(name, 0) for name, amount in available.items()}


# (Plain classes, not dataclasses: see scheduling.Allocation.)

class LeaseRequest:
    def __init__(self, client, request_id: int, shape: dict, job_id, pool_key=None, strategy: str = "DEFAULT",
                 spillback_ok: bool = True, starved: bool = False):
        self.client = client            # opaque address of the requester (the shell's routing info)
        self.request_id = request_id
        self.shape = shape
        self.job_id = job_id
        self.pool_key = pool_key        # workers dedicated to one executor/pool (initializer), or None
        self.strategy = strategy
        self.spillback_ok = spillback_ok
        # Leases were asked back for it (tick): it goes first, and what it waits for is kept for it.
        self.starved = starved

    def __repr__(self) -> str:
        return f"LeaseRequest({self.client!r}, {self.request_id}, {self.shape}, strategy={self.strategy})"


class Worker:
    def __init__(self, worker_id: str, state: str = STARTING, job_id=None, pool_key=None,
                 pid: int | None = None, lease_id: int | None = None, blocked: bool = False):
        self.worker_id = worker_id
        self.state = state
        self.job_id = job_id
        self.pool_key = pool_key
        self.pid = pid
        self.lease_id = lease_id
        self.blocked = blocked

    def __repr__(self) -> str:
        return f"Worker({self.worker_id}, {self.state}, pid={self.pid}, lease={self.lease_id})"


class Lease:
    def __init__(self, lease_id: int, worker_id: str, client, request_id: int, alloc: Allocation,
                 job_id=None, queue: tuple = (), ticks: int = 0, asked_back: bool = False):
        self.lease_id = lease_id
        self.worker_id = worker_id
        self.client = client
        self.request_id = request_id
        self.alloc = alloc
        self.job_id = job_id
        self.queue = queue            # (shape items, pool key, strategy) of the request it was granted for
        self.ticks = ticks            # tick() calls it was held through (see LEASE_HOLD_S)
        self.asked_back = asked_back  # a YieldLease went to its client

    def __repr__(self) -> str:
        return f"Lease({self.lease_id}, worker {self.worker_id}, {self.client!r}, request {self.request_id})"


class Bundle:
    """A placement group bundle held here: prepared (its resources taken), then committed
    (its resources of its own added, see placement_groups.bundle_resources)."""

    def __init__(self, attempt: int, shape: dict, alloc: Allocation, committed: bool = False):
        self.attempt = attempt
        self.shape = shape
        self.alloc = alloc
        self.committed = committed


class Actions:
    def __init__(self, grants=None, spawns=None, kills=None, spillbacks=None, infeasible=None, lost=None,
                 refused=None, yields=None):
        self.grants: list = grants or []          # (LeaseRequest, Lease)
        self.spawns: list = spawns or []          # (worker_id, Allocation-less env hints)
        self.kills: list = kills or []            # worker_id
        self.spillbacks: list = spillbacks or []  # (LeaseRequest, node_id)
        self.infeasible: list = infeasible or []  # (LeaseRequest, message)
        self.lost: list = lost or []              # (Lease, exit info)
        self.refused: list = refused or []        # (LeaseRequest, message): fails, on any cluster
        self.yields: list = yields or []          # Lease: ask its client to give it back

    def extend(self, other: "Actions") -> "Actions":
        for name in ("grants", "spawns", "kills", "spillbacks", "infeasible", "lost", "refused", "yields"):
            getattr(self, name).extend(getattr(other, name))
        return self


class LeaseManager:
    """Workers, resources and lease requests of one node."""

    def __init__(self, node_id: str, totals: dict, embedded: bool, max_workers: int | None = None):
        self.node_id = node_id
        self.resources = NodeResources(totals)
        self.embedded = embedded
        cpus = -(-totals.get("CPU", 0) // scheduling.UNIT)
        self.base_workers = max(1, cpus)
        # Hard cap on processes: zero-CPU tasks and blocked parents may need more.
        self.max_workers = max_workers or (4 * self.base_workers + 16)
        self.workers: dict[str, Worker] = {}
        self.leases: dict[int, Lease] = {}
        self.pending: deque[LeaseRequest] = deque()
        self.cluster_view: list[dict] = []
        self._ids = itertools.count(1)
        self._spread = itertools.count()
        self.bundles: dict[tuple, Bundle] = {}    # (group id, bundle index) -> held here
        self.removed_groups: dict[str, str] = {}  # group id -> why (the last REMEMBER_REMOVED)
        self.draining = False
        self.spilled: dict[str, dict] = {}  # node id -> shapes sent there since the last table

    # --- events ---
    def prestart(self) -> Actions:
        acts = Actions()
        for _ in range(self.base_workers):
            acts.spawns.append(self._new_worker(None, None))
        return acts

    def request(self, req: LeaseRequest) -> Actions:
        acts = Actions()
        if self.draining:
            return self._elsewhere(req, acts)
        group = placement_groups.group_of(req.shape)
        if group is not None and not self.resources.feasible(req.shape):
            # In a placement group whose bundle is not here: where it is, or wait for it quietly
            # (the group is being placed, or waits for nodes); a removed group's fails.
            if group in self.removed_groups:
                acts.refused.append((req, self.removed_groups[group]))
                return acts
            target = scheduling.choose_node(self.cluster_view, req.shape, exclude=self.node_id)
            if target is not None and req.spillback_ok:
                acts.spillbacks.append((req, target))
            else:
                self.pending.append(req)
            return acts
        if not self.resources.feasible(req.shape) or (
                req.strategy == "SPREAD" and req.spillback_ok and self._spread_elsewhere(req)):
            target = scheduling.choose_node(self.cluster_view, req.shape, exclude=self.node_id,
                                            spread_counter=next(self._spread), strategy=req.strategy)
            if target is not None and req.spillback_ok:
                acts.spillbacks.append((req, target))
                return acts
            if not self.resources.feasible(req.shape):
                acts.infeasible.append((req, self.infeasible_message(req.shape)))
                if not self.embedded:
                    self.pending.append(req)  # a node that fits may still join
                return acts
        if req.spillback_ok and not self.resources.can_acquire(req.shape):
            # Busy here but free elsewhere now: send the owner there instead of queueing.
            target = self._room_elsewhere(req.shape)
            if target is not None:
                acts.spillbacks.append((req, target))
                return acts
        self.pending.append(req)
        return self._schedule(acts)

    def _room_elsewhere(self, shape: dict) -> str | None:
        """Another node with ``shape`` free now, by the head's last table less what we already
        sent there since (``spilled``), which it takes; None when there is none.  Without
        that count every request of a burst would go to the one node that looked least loaded
        (a spilled request stays where it is sent: the others stay idle)."""
        ready = []
        for n in self.cluster_view:
            if n["alive"] and n["node_id"] != self.node_id:
                free = _minus(n["available"], self.spilled.get(n["node_id"]))
                if scheduling.fits(free, shape):
                    ready.append(dict(n, available=free))
        target = scheduling.choose_node(ready, shape)
        if target is not None:
            sent = self.spilled.setdefault(target, {})
            for name, amount in shape.items():
                sent[name] = sent.get(name, 0) + amount
        return target

    def cancel_request(self, client, request_id) -> None:
        self.pending = deque(r for r in self.pending
                             if not (r.client == client and r.request_id == request_id))

    def worker_ready(self, worker_id: str, pid: int) -> Actions:
        worker = self.workers.get(worker_id)
        if worker is None:
            return Actions(kills=[worker_id])
        worker.pid = pid
        worker.state = IDLE
        return self._schedule(Actions())

    def worker_exited(self, worker_id: str, info: dict) -> Actions:
        acts = Actions()
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return acts
        if worker.lease_id is not None:
            lease = self.leases.pop(worker.lease_id)
            if not worker.blocked:
                self.resources.release(lease.alloc)
            else:
                self._release_blocked(lease.alloc)
            acts.lost.append((lease, info))
        # Keep the prestarted pool full.
        unbound = sum(1 for w in self.workers.values() if w.job_id is None)
        if len(self.workers) < self.base_workers and unbound == 0 and not self.draining:
            acts.spawns.append(self._new_worker(None, None))
        return self._schedule(acts)

    def waiting(self) -> bool:
        """Requests wait that leases held here may stand in the way of: tick() has work."""
        return bool(self.pending) and bool(self.leases) and not self.draining

    def tick(self) -> Actions:
        """(every LEASE_HOLD_S while ``waiting()``) Ask back the leases held through a whole
        interval that keep a waiting request from fitting, enough of them for it to fit."""
        acts = Actions()
        for lease in self.leases.values():
            lease.ticks += 1
        asked: dict = {}  # resources the leases asked back (now or before) will free
        for lease in self.leases.values():
            if lease.asked_back:
                asked = _plus(asked, lease.alloc.shape)
        for req in self.pending:
            if not self.resources.feasible(req.shape) or self.resources.can_acquire(req.shape):
                continue  # (never here; or it waits for a worker to start, not for a lease)
            queue = _queue_of(req)
            picks, more = [], asked
            for lease in self.leases.values():
                if scheduling.fits(_plus(self.resources.available, more), req.shape):
                    break
                if lease.ticks < 2 or lease.asked_back or (lease.client, lease.queue) == (req.client, queue):
                    continue
                worker = self.workers.get(lease.worker_id)
                pool_key = worker.pool_key if worker is not None else None
                if worker is None or worker.blocked or (isinstance(pool_key, str) and pool_key.startswith("actor:")):
                    continue
                if not any(lease.alloc.shape.get(name, 0) > 0 for name in req.shape if req.shape[name] > 0):
                    continue  # (frees nothing it needs)
                picks.append(lease)
                more = _plus(more, lease.alloc.shape)
            if not scheduling.fits(_plus(self.resources.available, more), req.shape):
                continue  # leases asked back cannot make room for it now (actors, blocked workers)
            for lease in picks:
                lease.asked_back = True
                acts.yields.append(lease)
            asked = more
            req.starved = True
        return acts

    def return_lease(self, lease_id: int, kill: bool = False) -> Actions:
        acts = Actions()
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return acts
        worker = self.workers.get(lease.worker_id)
        if worker is not None:
            if worker.blocked:
                self._release_blocked(lease.alloc)
                worker.blocked = False
            else:
                self.resources.release(lease.alloc)
            worker.lease_id = None
            worker.state = IDLE
            if kill:  # it ends now: never granted again (a task sent to it would die with it)
                acts.kills.append(worker.worker_id)
                del self.workers[worker.worker_id]
        else:
            self.resources.release(lease.alloc)
        return self._schedule(acts)

    def client_gone(self, client, kill_running: bool = False) -> Actions:
        """The client left (or died: ``kill_running`` ends the tasks it still had running)."""
        acts = Actions()
        self.pending = deque(r for r in self.pending if r.client != client)
        for lease in [l for l in self.leases.values() if l.client == client]:
            acts.extend(self.return_lease(lease.lease_id, kill=kill_running))
        return acts

    def job_finished(self, job_id) -> Actions:
        """The job's driver left: its workers are of no use to anyone else."""
        acts = Actions()
        for worker in list(self.workers.values()):
            actor = isinstance(worker.pool_key, str) and worker.pool_key.startswith("actor:")
            if worker.job_id == job_id and not actor:  # the head decides when actors end
                acts.kills.append(worker.worker_id)
        return acts

    def worker_blocked(self, worker_id: str) -> Actions:
        """A leased worker waits in get(): lend its CPU so others can run (no deadlock)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.lease_id is None or worker.blocked:
            return Actions()
        worker.blocked = True
        self.resources.lend(self.leases[worker.lease_id].alloc.shape)
        return self._schedule(Actions())

    def worker_unblocked(self, worker_id: str) -> Actions:
        worker = self.workers.get(worker_id)
        if worker is None or not worker.blocked:
            return Actions()
        worker.blocked = False
        # Take the CPU back even if that oversubscribes for a moment: the task resumes now.
        self.resources.reclaim(self.leases[worker.lease_id].alloc.shape)
        return Actions()

    def set_cluster_view(self, nodes: list[dict]) -> Actions:
        self.cluster_view = nodes
        self.spilled = {}  # (the new table counts what went there)
        acts = Actions()
        if self.draining:  # what waits here may go to a node that joined or has room now
            waiting, self.pending = self.pending, deque()
            for req in waiting:
                self._elsewhere(req, acts)
            return acts
        # Requests waiting for a node that fits (on an embedded cluster: for a placement
        # group's bundle) may go there now.
        # Requests waiting here for room that another node has free now go there (room here
        # goes to the first in line: only those it would not reach move).
        still = deque()
        room = dict(self.resources.available)
        for req in self.pending:
            if not self.resources.feasible(req.shape):
                target = scheduling.choose_node(nodes, req.shape, exclude=self.node_id)
                if target is not None:
                    acts.spillbacks.append((req, target))
                    continue
            elif scheduling.fits(room, req.shape):
                room = _minus(room, req.shape)
            elif req.spillback_ok and placement_groups.group_of(req.shape) is None:
                target = self._room_elsewhere(req.shape)
                if target is not None:
                    acts.spillbacks.append((req, target))
                    continue
            still.append(req)
        self.pending = still
        return acts

    # --- draining (farpool stop on this node) ---
    def drain(self, owner) -> Actions:
        """Take no more leases: what waits goes to other nodes where one fits (else it waits
        here until the node stops).  Leases granted stay until returned or their worker exits;
        those of clients other than ``owner`` (the head: actors stay until the node stops) are
        asked back (yields: their clients send them no more tasks and return them once the
        tasks they run end)."""
        self.draining = True
        acts = Actions()
        waiting, self.pending = self.pending, deque()
        for req in waiting:
            self._elsewhere(req, acts)
        for lease in self.client_leases(owner):
            if not lease.asked_back:
                lease.asked_back = True
                acts.yields.append(lease)
        return acts

    def _elsewhere(self, req: LeaseRequest, acts: Actions) -> Actions:
        target = scheduling.choose_node(self.cluster_view, req.shape, exclude=self.node_id) \
            if req.spillback_ok else None
        if target is not None:
            acts.spillbacks.append((req, target))
        else:  # (a request that may not be sent on: its client asks elsewhere once we are gone)
            self.pending.append(req)
        return acts

    def client_leases(self, owner) -> list[Lease]:
        """Leases held by clients other than ``owner`` (the head, whose leases hold actors)."""
        return [lease for lease in self.leases.values() if lease.client != owner]

    # --- placement group bundles (the head decides: placement_groups.py) ---
    def prepare_bundles(self, group: str, attempt: int, items: list) -> tuple[bool, str]:
        """Take the resources of bundles ``items`` ((index, shape)) now, all or none: (ok, why not)."""
        taken = []
        for index, shape in items:
            scheduling.check_shape(shape)
            old = self.bundles.pop((group, index), None)
            if old is not None:  # an earlier attempt's, never released (its abort is on the way)
                self._drop_bundle(group, index, old)
            alloc = self.resources.acquire(shape) if self.resources.can_acquire(shape) else None
            if alloc is None:
                for key in taken:
                    self.resources.release(self.bundles.pop(key).alloc)
                return False, (f"bundle {index} needs {scheduling.describe(shape)} and this node has "
                               f"{scheduling.describe(self._plain(self.resources.available))} free")
            self.bundles[(group, index)] = Bundle(attempt, dict(shape), alloc)
            taken.append((group, index))
        return True, ""

    def commit_bundles(self, group: str, attempt: int, indexes: list) -> Actions:
        """The prepared bundles become resources only the group's tasks and actors ask for."""
        for index in indexes:
            bundle = self.bundles.get((group, index))
            if bundle is None or bundle.attempt != attempt or bundle.committed:
                continue
            bundle.committed = True
            self.resources.add_bundle(group, index, placement_groups.bundle_resources(group, index, bundle.shape),
                                      bundle.alloc.gpu_ids)
        return self._schedule(Actions())

    def release_bundles(self, group: str, attempt: int | None, why: str = "") -> Actions:
        """Give back the group's bundles held here: those of ``attempt`` (an aborted reservation),
        or all (None: the group was removed: its waiting requests fail; see end_group_leases)."""
        acts = Actions()
        for (g, index), bundle in list(self.bundles.items()):
            if g == group and (attempt is None or bundle.attempt == attempt):
                del self.bundles[(g, index)]
                self._drop_bundle(g, index, bundle)
        if attempt is None:
            self.removed_groups[group] = why
            while len(self.removed_groups) > placement_groups.REMEMBER_REMOVED:
                del self.removed_groups[next(iter(self.removed_groups))]
            still = deque()
            for req in self.pending:
                (acts.refused.append((req, why)) if placement_groups.group_of(req.shape) == group
                 else still.append(req))
            self.pending = still
        return self._schedule(acts)

    def end_group_leases(self, group: str) -> Actions:
        """The leases of a removed group that are still held: their workers are killed (their tasks
        fail, or are retried and then refused).  The shell calls it a moment after the removal,
        so that idle leases a client still keeps (client.LEASE_LINGER_S) come back unharmed."""
        return Actions(kills=[lease.worker_id for lease in self.leases.values()
                              if placement_groups.group_of(lease.alloc.shape) == group])

    def renamed(self, node_id: str, forget_client) -> Actions:
        """This node joins again as a new node, ``node_id`` (the head took it for dead): every
        worker ends, idle ones too (each knows itself by the old id, which its results would
        name as where they are stored), and fresh ones start; the waiting requests of
        ``forget_client`` (the head: it placed its actors elsewhere meanwhile) are dropped.
        Call once no lease is held."""
        self.node_id = node_id
        self.pending = deque(r for r in self.pending if r.client != forget_client)
        acts = Actions(kills=list(self.workers))
        self.workers.clear()
        return acts.extend(self.prestart())

    def drop_all_bundles(self) -> None:
        """The head took this node for dead: it places the bundles held here elsewhere."""
        for (group, index), bundle in list(self.bundles.items()):
            del self.bundles[(group, index)]
            self._drop_bundle(group, index, bundle)

    def _drop_bundle(self, group: str, index: int, bundle: Bundle) -> None:
        if bundle.committed:
            self.resources.remove_bundle(group, index, placement_groups.bundle_resources(group, index, bundle.shape))
        self.resources.release(bundle.alloc)

    @staticmethod
    def _plain(resources: dict) -> dict:
        return {k: v for k, v in resources.items() if "_group_" not in k}

    # --- internals ---
    def _spread_elsewhere(self, req: LeaseRequest) -> bool:
        live = [n for n in self.cluster_view if n["alive"] and scheduling.fits(n["total"], req.shape)]
        return len(live) > 1

    def _release_blocked(self, alloc: Allocation) -> None:
        # A blocked worker already lent its CPU: give back everything but that.
        shape = {k: v for k, v in alloc.shape.items() if not scheduling.is_cpu(k)}
        self.resources.release(Allocation(shape, alloc.gpu_ids, alloc.gpu_share))

    def _new_worker(self, job_id, pool_key) -> str:
        worker_id = f"{next(self._ids):x}"
        self.workers[worker_id] = Worker(worker_id, STARTING, job_id, pool_key)
        return worker_id

    def _schedule(self, acts: Actions) -> Actions:
        """Grant what can be granted, in FIFO order per shape; start workers where needed."""
        if not self.pending or self.draining:
            return acts
        granted = set()
        # Resources promised in this pass to requests waiting for a starting
        # worker, so one pass does not start a worker per pending request; and to starved
        # requests (tick): what the leases asked back free is theirs, not the next in line's.
        promised: dict = {}
        starting = {w.worker_id for w in self.workers.values() if w.state == STARTING}
        order = sorted(self.pending, key=lambda r: not r.starved) if any(r.starved for r in self.pending) \
            else self.pending  # (starved first; FIFO otherwise)
        for req in order:
            if not self.resources.feasible(req.shape) or not self.resources.can_acquire(req.shape) \
                    or not scheduling.fits(_minus(self.resources.available, promised), req.shape):
                if req.starved and self.resources.feasible(req.shape):
                    promised = _plus(promised, req.shape)
                continue
            worker = self._idle_worker(req)
            if worker is None:
                match = next((wid for wid in starting if self._compatible(self.workers[wid], req)), None)
                if match is None:
                    # Past the base pool, replace an idle worker of another job rather
                    # than growing; grow (up to the cap) only when none is idle.
                    actor = isinstance(req.pool_key, str) and req.pool_key.startswith("actor:")
                    victim = self._idle_victim(req) if len(self.workers) >= self.base_workers and not actor \
                        else None
                    if victim is not None:
                        acts.kills.append(victim.worker_id)
                        del self.workers[victim.worker_id]
                    if victim is not None or actor or \
                            len(self.workers) < self.max_workers + self._blocked_count():
                        match = self._new_worker(req.job_id, req.pool_key)
                        acts.spawns.append(match)
                if match is not None:
                    starting.discard(match)
                    promised = _plus(promised, req.shape)
                continue
            alloc = self.resources.acquire(req.shape)
            lease = Lease(next(self._ids), worker.worker_id, req.client, req.request_id, alloc, req.job_id,
                          _queue_of(req))
            self.leases[lease.lease_id] = lease
            worker.state = LEASED
            worker.lease_id = lease.lease_id
            worker.job_id = req.job_id
            worker.pool_key = req.pool_key
            acts.grants.append((req, lease))
            granted.add(id(req))
        if granted:
            self.pending = deque(r for r in self.pending if id(r) not in granted)
        return acts

    @staticmethod
    def _compatible(worker: Worker, req: LeaseRequest) -> bool:
        if (worker.job_id, worker.pool_key) == (req.job_id, req.pool_key):
            return True
        return worker.job_id is None and worker.pool_key is None

    def _blocked_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.blocked)

    def _idle_worker(self, req: LeaseRequest) -> Worker | None:
        """An idle worker of this job and pool, else an idle unbound (fresh) one."""
        fallback = None
        for w in self.workers.values():
            if w.state != IDLE:
                continue
            if w.job_id == req.job_id and w.pool_key == req.pool_key:
                return w
            if w.job_id is None and w.pool_key is None and fallback is None:
                fallback = w
        return fallback

    def _idle_victim(self, req: LeaseRequest) -> Worker | None:
        for w in self.workers.values():
            if w.state == IDLE and (w.job_id, w.pool_key) != (req.job_id, req.pool_key):
                return w
        return None

    def infeasible_message(self, shape: dict) -> str:
        totals = [n["total"] for n in self.cluster_view if n.get("alive")] or [self.resources.total]
        described = ", ".join(scheduling.describe(self._plain(t)) for t in totals)
        where = ("this embedded cluster cannot grow" if self.embedded
                 else "it waits until a node that fits joins")
        return (f"no node can run a task that needs {scheduling.describe(shape)}: the cluster's "
                f"nodes have {described}; {where}. Lower the task's resource request, or "
                "declare more at init(num_cpus=..., num_gpus=..., resources=...) / farpool start.")

    def stats(self) -> dict:
        return {"workers": len(self.workers),
                "leased": sum(1 for w in self.workers.values() if w.state == LEASED),
                "pending_leases": len(self.pending)}
