"""The task queues: tasks waiting for workers per resource shape, the leases that run them,
pipelining, take-back, retries and the parked lease of the submit fast path.

Pure state, no sockets or clocks: the client (client.py, the shell) feeds it
events and carries out what it returns::

    remote() ---> add ---> (arguments ready) enqueue ---> dispatch(key) ---> Plan
                                                               |   sends:    (lease, tasks) to send now
    LeaseGranted -> granted, add_lease ------------------------+   requests: how many leases to ask for
    TaskFinished -> finished / requeue / retry_after_error        take_back:  (lease, task ids) to ask back
    WorkerExited -> worker_exited -> (task, may retry) ...         linger:     idle leases that need a timer
    TakenBack    -> taken_back                                 idle(lease) when a linger timer fires

A task counts an attempt when one is spent (its worker died running it, or it
raised an exception it may be retried for), never when it is sent: a task
handed back unrun (take-back, a retiring worker, a worker gone before it got
the task) has spent nothing.

Threads: the I/O thread calls everything except ``take_parked`` (user threads,
the fast path of a sequential submit-then-get), which takes ``lock``; the I/O
thread takes it too wherever it touches ``parked`` or ``LeaseState.claimed``.
Actor calls have a queue of their own (client.py ``ActorQueue``); none of
their tasks come here.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from farpool._private.scheduling import describe as describe_shape

# Tasks in flight per leased worker once tasks are seen to be short: as many as run in
# PIPELINE_BUDGET_S at their measured time, from MIN_ to MAX_PIPELINE_DEPTH.  1 keeps load
# balancing exact and lets queued tasks be cancelled; more hides the round trip to the worker,
# and keeps the workers fed while a user thread submits: it holds the GIL between the I/O
# thread's turns (up to the 5 ms switch interval), and each turn tops every worker up only to
# the depth (16 tiny tasks ran in a tenth of a millisecond, then the worker waited).
MIN_PIPELINE_DEPTH = 16
MAX_PIPELINE_DEPTH = 256
PIPELINE_BUDGET_S = 0.002
# Tasks whose measured run time is below this are "short" and get pipelined.
SHORT_TASK_S = 0.002
# Tasks below this (but not short) get one task queued behind the running one in a deep
# backlog: the worker starts it at once instead of waiting a round trip to this process,
# which is ~0.1 ms when the caller is idle but up to the 5 ms GIL switch interval when a
# user thread keeps it busy (a map pickling its chunks: every chunk of 3 ms then waited
# ~1 ms).  Longer tasks go one at a time: a round trip is little beside them, and a task
# never waits behind a long one.
MID_TASK_S = 0.05
MID_PIPELINE_DEPTH = 2
# Lease requests in flight per resource shape at most (each may bring a worker).
MAX_LEASE_REQUESTS = 64
# max_retries / max_task_retries / max_restarts of -1: no limit, as in Ray.
UNLIMITED = -1


class TaskState(str, enum.Enum):
    """Where a task is; the str values are what ``task_state`` reports."""
    WAITING = "WAITING"   # for its arguments
    QUEUED = "QUEUED"     # for a worker
    RUNNING = "RUNNING"   # sent to a worker
    DONE = "DONE"         # finished, failed or cancelled


@dataclass
class RemoteFunctionInfo:
    name: str
    fn_hash: bytes
    fn_bytes: bytes


# (slots: one task record per remote() call, alive while it runs: without an instance dict
# it is one object for the garbage collector to walk instead of two, and cheaper to make.)
@dataclass(slots=True)
class TaskRecord:
    task_id: bytes
    fn: RemoteFunctionInfo
    args_payload: bytes
    arg_bufs: list
    ref_slots: list                # [(slot, ObjectRef)]
    return_ids: list
    shape: dict
    key: tuple
    max_retries: int               # runs after the first at most; -1: no limit (UNLIMITED)
    retry_exceptions: object
    pinned: list                   # ids pinned until the task finishes
    name: str
    strategy: str = "DEFAULT"
    pool_key: object = None
    attempts: int = 0              # runs spent: the worker died in it, or it raised a retryable error
    deps_left: int = 0
    state: TaskState = TaskState.WAITING
    lease: object = None
    ref_values: list | None = None
    submitted_at: float = 0.0
    cancelled: bool = False
    args_location: tuple | None = None  # large by-value arguments, stored once per call
    args_copies: set | None = None      # nodes that copied them (workers there read them)
    actor_id: str | None = None         # an actor call: its actor (its queue is the actor's)
    lineage_kept: bool = False          # finished, kept to rebuild its results (refs.keep_lineage)
    stream: object = None               # a streaming generator task: its streams.StreamState

    def spend_attempt(self) -> bool:
        """A run of this task was spent; True while it may run again (``max_retries``, -1: always)."""
        self.attempts += 1
        return self.max_retries == UNLIMITED or self.attempts <= self.max_retries

    def attempt_text(self) -> str:
        """The next run, for messages: "attempt 3 of 4", or "attempt 3" with no limit."""
        if self.max_retries == UNLIMITED:
            return f"attempt {self.attempts + 1}, retries without limit (max_retries=-1)"
        return f"attempt {self.attempts + 1} of {self.max_retries + 1}"


@dataclass
class LeaseState:
    lease_id: int
    worker_id: str
    node_id: str
    channel: object
    gpu_ids: list
    key: tuple
    inflight: dict = field(default_factory=dict)
    linger: object = None          # the shell's timer returning it when idle (None: none set)
    uses: int = 0                  # batches sent on it (its linger timer looks: used since it was set?)
    linger_uses: int = 0           # ``uses`` when the linger timer was set
    shipped: set = field(default_factory=set)
    job_sent: bool = False
    retiring: bool = False
    claimed: bool = False   # a caller thread sent a task on it; the I/O thread records it next
    taking_back: bool = False  # a TakeBack request is out (answered by TakenBack)
    nothing_to_take: bool = False  # the last TakeBack got nothing: not again before it reports
    direct: bool = False    # its worker is on our node, reached on its own stream: it may be parked
    yielding: bool = False  # its agent wants it back for another request: no more tasks, return it when idle
    actor_id: str | None = None  # the lease of an actor's worker (client.py ActorQueue), not of a shape


@dataclass
class KeyQueue:
    """Tasks of one resource shape waiting for a leased worker."""
    shape: dict
    pool_key: object
    strategy: object
    queue: deque = field(default_factory=deque)
    leases: list = field(default_factory=list)
    requests: dict = field(default_factory=dict)  # request_id -> agent connection
    depth: int = 1
    avg_run_s: float | None = None
    warned_infeasible: bool = False
    key: tuple = ()


class Plan:
    """What ``dispatch`` decided for one key."""
    __slots__ = ("sends", "requests", "take_back", "linger")

    def __init__(self):
        self.sends: list = []          # (lease, [task, ...]): marked RUNNING on it; send them
        self.requests = 0              # lease requests to make now
        self.take_back = None          # (lease, task ids): ask its worker to hand them back
        self.linger: list = []         # idle leases without a linger timer: start one


class TaskQueues:
    def __init__(self, lock):
        self.lock = lock
        self.tasks: dict[bytes, TaskRecord] = {}    # submitted and not done (actor calls too)
        self.keys: dict[tuple, KeyQueue] = {}
        self.leases: dict[tuple, LeaseState] = {}   # (node_id, lease_id) -> lease
        self.parked: dict = {}  # key -> an idle lease on this node a caller thread may take (under lock)
        self.lease_requests: dict[int, tuple] = {}  # request id -> key
        self.stale_results = 0  # results of attempts given up on, dropped (see stale_result)

    # ------------------------------------------------------------------ submission
    def enqueue(self, task: TaskRecord, front: bool = False) -> None:
        task.state = TaskState.QUEUED
        kq = self.keys.get(task.key)
        if kq is None:
            kq = self.keys[task.key] = KeyQueue(task.shape, task.pool_key, task.strategy, key=task.key)
        if front:
            kq.queue.appendleft(task)
        else:
            kq.queue.append(task)

    def remove_queued(self, task: TaskRecord) -> None:
        kq = self.keys.get(task.key)
        if kq is not None and task in kq.queue:
            kq.queue.remove(task)

    def drain(self, key) -> list:
        """Every task queued under ``key`` (they are to fail: the shape cannot run)."""
        kq = self.keys.get(key)
        if kq is None:
            return []
        tasks = list(kq.queue)
        kq.queue.clear()
        return tasks

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, key, cluster_cpus) -> Plan:
        """Send queued tasks to the key's leases, ask for more leases or take tasks back, and
        park or let linger the leases left idle.  ``cluster_cpus()``: CPU units of live nodes."""
        kq = self.keys[key]
        plan = Plan()
        q = kq.queue
        while q and q[0].cancelled:
            q.popleft()
        if q and key in self.parked:
            with self.lock:  # ours again (unless a caller thread took it first: then it is claimed)
                self.parked.pop(key, None)
        if q and kq.leases:
            # Pipeline (depth > 1) only into a deep backlog (more tasks queued and running than
            # the workers run at once); a few tasks go one per worker, so that a few long ones
            # never wait behind each other.
            slots = self._worker_slots(kq, cluster_cpus())
            backlog = len(q) + sum(len(lease.inflight) for lease in kq.leases)
            depth = 1 if backlog <= slots else min(kq.depth, -(-backlog // slots))
            batches: dict = {}
            leases = sorted((lease for lease in kq.leases if not lease.claimed), key=lambda l: len(l.inflight))
            progress = True
            while q and progress:  # round robin, least loaded first
                progress = False
                for lease in leases:
                    if not q:
                        break
                    if len(lease.inflight) + len(batches.get(id(lease), ())) >= depth:
                        continue
                    t = q.popleft()
                    if not t.cancelled:
                        batches.setdefault(id(lease), []).append(t)
                    progress = True
            for lease in leases:
                batch = batches.get(id(lease))
                if batch:
                    self.start(lease, batch)
                    plan.sends.append((lease, batch))
        if q:
            plan.requests = max(0, min(len(q), MAX_LEASE_REQUESTS) - len(kq.requests))
            return plan
        # Leases with nothing to do linger, then go back; one of them waits for a caller
        # thread's next task (the fast path of submit).
        plan.take_back = self._take_back_for_idle(kq)
        for lease in kq.leases:
            if not lease.inflight and not lease.claimed and lease.linger is None:
                plan.linger.append(lease)
            if (not lease.inflight and not lease.claimed and not lease.retiring and key not in self.parked
                    and lease.direct):
                with self.lock:
                    self.parked[key] = lease
        return plan

    @staticmethod
    def start(lease: LeaseState, batch: list) -> None:
        """These tasks go to ``lease``'s worker now."""
        for task in batch:
            task.state = TaskState.RUNNING
            task.lease = lease
            lease.inflight[task.task_id] = task

    @staticmethod
    def _worker_slots(kq: KeyQueue, cluster_cpus: int) -> int:
        """How many tasks of this shape the cluster can run at once (for pipelining decisions)."""
        cpu = kq.shape.get("CPU", 0)
        if cpu <= 0 or cluster_cpus <= 0:
            return max(1, len(kq.leases))
        return max(1, cluster_cpus // cpu)

    @staticmethod
    def _take_back_for_idle(kq: KeyQueue):
        """A worker of this shape has nothing to do while another has tasks queued behind its
        running one (pipelined): ask for the newer half of those back, to run them here."""
        if len(kq.leases) < 2 or not any(not l.inflight and not l.claimed and not l.retiring for l in kq.leases):
            return None  # (with one lease there is no other worker to take tasks back from)
        busy = max((l for l in kq.leases if len(l.inflight) >= 2 and not l.taking_back and not l.retiring
                    and not l.nothing_to_take), key=lambda l: len(l.inflight), default=None)
        if busy is None:
            return None
        busy.taking_back = True
        return busy, list(busy.inflight)[-(len(busy.inflight) // 2):]

    def taken_back(self, lease_key: tuple, task_ids) -> LeaseState | None:
        """Tasks a worker handed back unstarted: first in line again (no attempt spent)."""
        lease = self.leases.get(lease_key)
        if lease is None:  # its worker is gone meanwhile: worker_exited requeued them
            return None
        lease.taking_back = False
        lease.nothing_to_take = not task_ids  # ask again once it has reported progress
        for task_id in reversed(task_ids):  # each goes to the front: keep their order
            task = lease.inflight.pop(task_id, None)
            if task is not None:
                task.lease = None
                self.enqueue(task, front=True)
        return lease

    # ------------------------------------------------------------------ leases
    def request_sent(self, key, request_id: int, agent) -> None:
        self.keys[key].requests[request_id] = agent
        self.lease_requests[request_id] = key

    def answered(self, request_id: int, final: bool = True) -> KeyQueue | None:
        """A reply to a lease request: its key's queue (None: forgotten).  ``final``: no more
        replies come for it (a grant, a spillback, a fatal refusal)."""
        key = self.lease_requests.pop(request_id, None) if final else self.lease_requests.get(request_id)
        kq = self.keys.get(key) if key is not None else None
        if kq is not None and final:
            kq.requests.pop(request_id, None)
        return kq

    def requests_on(self, node_ids: set) -> list:
        """(key, request id, agent connection) of the lease requests waiting on those nodes."""
        return [(key, request_id, to) for key, kq in self.keys.items()
                for request_id, to in kq.requests.items() if to.node_id in node_ids]

    def forget_requests_to(self, agent) -> list:
        """The connection to ``agent`` is gone: its lease requests will not be answered; the
        keys that had some (to dispatch again)."""
        keys = []
        for key, kq in self.keys.items():
            for request_id, to in list(kq.requests.items()):
                if to is agent:
                    del kq.requests[request_id]
                    self.lease_requests.pop(request_id, None)
                    if not keys or keys[-1] != key:
                        keys.append(key)
        return keys

    def add_lease(self, lease: LeaseState) -> None:
        self.leases[(lease.node_id, lease.lease_id)] = lease
        self.keys[lease.key].leases.append(lease)

    def drop_lease(self, lease: LeaseState) -> None:
        with self.lock:
            if self.parked.get(lease.key) is lease:
                del self.parked[lease.key]
        self.leases.pop((lease.node_id, lease.lease_id), None)
        kq = self.keys.get(lease.key)
        if kq is not None and lease in kq.leases:
            kq.leases.remove(lease)

    def retire(self, lease: LeaseState) -> None:
        """Its worker exits now (max_tasks_per_child): no more tasks to it, but it stays known
        (by its id) until its WorkerExited hands back what it did not run."""
        lease.retiring = True
        self.drop_lease(lease)
        self.leases[(lease.node_id, lease.lease_id)] = lease

    def yield_lease(self, lease_key: tuple) -> LeaseState | None:
        """Its agent asks for it back (another request waits behind it): no more tasks go to
        it; returns it when it can go back now (dropped here), else None (``finished`` lets it
        go once its tasks end: see ``yielded``).  Its key asks for another lease if it still
        has work (at the back of the agent's line)."""
        lease = self.leases.get(lease_key)
        if lease is None or lease.retiring or lease.yielding:
            return None
        lease.yielding = True
        kq = self.keys.get(lease.key)
        if kq is not None and lease in kq.leases:
            kq.leases.remove(lease)  # (dispatch no longer sees it; results still find it)
        with self.lock:
            if self.parked.get(lease.key) is lease:
                del self.parked[lease.key]
            busy = bool(lease.inflight) or lease.claimed
        if busy:
            return None
        self.leases.pop(lease_key, None)
        return lease

    def yielded(self, lease: LeaseState) -> bool:
        """(after its results) A yielding lease whose tasks ended: True when it goes back now
        (dropped here)."""
        with self.lock:
            if not lease.yielding or lease.inflight or lease.claimed:
                return False
            if self.leases.get((lease.node_id, lease.lease_id)) is not lease:
                return False
            del self.leases[(lease.node_id, lease.lease_id)]
        return True

    def idle(self, lease: LeaseState) -> str:
        """Its linger timer fired: "keep" (in use again), "dispatch" (its key has work) or
        "return" (dropped here: give it back to its agent)."""
        lease.linger = None
        if lease.yielding:  # (it goes back as its tasks end, or went already)
            return "keep"
        with self.lock:
            if lease.claimed:
                return "keep"
            if self.parked.get(lease.key) is lease:
                del self.parked[lease.key]
        if lease.inflight:
            return "keep"
        kq = self.keys.get(lease.key)
        if kq is not None and kq.queue:
            return "dispatch"
        self.drop_lease(lease)
        return "return"

    def worker_exited(self, lease_key: tuple) -> tuple[LeaseState | None, list]:
        """The lease's worker is gone: the tasks it had.  Those of a retiring worker are queued
        again at once (no attempt spent); the others the shell retries or fails (spend_attempt)."""
        lease = self.leases.get(lease_key)
        if lease is None:
            return None, []
        self.drop_lease(lease)
        with self.lock:  # a caller thread that claimed it may be recording a task in it (take_parked)
            tasks = list(lease.inflight.values())
            lease.inflight.clear()
        lost = []
        for task in tasks:
            if lease.retiring and not task.cancelled:
                self.enqueue(task, front=True)
            else:
                lost.append(task)
        return lease, lost

    # ------------------------------------------------------------------ completion
    def stale_result(self, task_id: bytes, came_over=None) -> str | None:
        """Why a result of ``task_id`` that came over ``came_over`` (the agent connection that
        relayed it, or the worker's own stream; None: not known) is not from the attempt the
        task is on now, else None.  A stale result is dropped (and counted): its attempt was
        given up on (its worker or node was declared dead, its actor restarted) and the task
        is queued or running again, maybe already elsewhere; taking it would finish the task
        with a result from a node we no longer reach, and deliver the task twice.  A task
        that ended already is not stale: ``finished`` tells that (None)."""
        task = self.tasks.get(task_id)
        if task is None:
            return None
        lease = task.lease
        if lease is not None and task.state is TaskState.RUNNING and lease.inflight.get(task_id) is task:
            if came_over is None or lease.channel is None or lease.channel.carrier is came_over:
                return None  # (the task path: a result of the attempt it is on)
            why = f"it runs again on worker {lease.worker_id} of node {lease.node_id[:8]}"
        else:
            why = "it was given up on and is queued to run again"
        self.stale_results += 1
        return why

    def finished(self, task_id: bytes, run_s: float) -> TaskRecord | None:
        """A result (or error) of ``task_id`` came back after ``run_s`` of running."""
        task = self.tasks.get(task_id)
        if task is None:  # ended already (its worker's exit was reported first, or cancelled)
            return None
        lease = task.lease
        if lease is not None:
            lease.inflight.pop(task_id, None)
            lease.nothing_to_take = False
            kq = self.keys.get(lease.key) if task.actor_id is None else None
            if kq is not None:
                avg = kq.avg_run_s = run_s if kq.avg_run_s is None else 0.8 * kq.avg_run_s + 0.2 * run_s
                kq.depth = 1 if avg >= MID_TASK_S else MID_PIPELINE_DEPTH if avg >= SHORT_TASK_S else \
                    max(MIN_PIPELINE_DEPTH, min(MAX_PIPELINE_DEPTH, int(PIPELINE_BUDGET_S / max(avg, 1e-9))))
        return task

    def done(self, task: TaskRecord) -> None:
        self.tasks.pop(task.task_id, None)
        task.state = TaskState.DONE

    def park_if_idle(self, lease: LeaseState) -> None:
        """After a batch of results: an idle direct lease with nothing queued waits for the
        caller's next submit (before the waiters wake, so that submit finds it)."""
        if (lease.inflight or lease.claimed or lease.key in self.parked or not lease.direct or lease.retiring
                or lease.yielding):
            return
        kq = self.keys.get(lease.key)
        if kq is not None and not kq.queue:
            with self.lock:
                self.parked[lease.key] = lease

    # ------------------------------------------------------------------ the fast path
    def starts_now(self, key) -> bool:
        """(user thread: a look without the lock; a stale answer only picks the other way) Would
        a task of ``key`` go to a worker at once?  When a leased worker has nothing to do, or,
        for tasks too long to batch (a pipeline of at most MID_PIPELINE_DEPTH), room behind its
        running one.  The submitting thread then hands the task over itself (Submitter.submit):
        the loop thread, woken for it, waits for the GIL, which a thread going on submitting (a
        map pickling its next chunks) keeps for up to the 5 ms switch interval.  Short tasks go
        through the loop thread, in batches."""
        kq = self.keys.get(key)
        if kq is None:
            return False
        room = kq.depth if kq.depth <= MID_PIPELINE_DEPTH else 1
        return any(len(lease.inflight) < room and not lease.claimed for lease in kq.leases)

    def take_parked(self, key, task: TaskRecord) -> LeaseState | None:
        """(user thread) Claim the idle lease of ``key`` parked for a caller's next task, and
        record ``task`` in flight on it, before the caller sends it: its result may come back
        before the I/O thread runs ``sent_direct``, and must find the task known."""
        with self.lock:
            lease = self.parked.pop(key, None)
            if lease is None:
                return None
            lease.claimed = True
            task.state, task.lease = TaskState.RUNNING, lease
            self.tasks[task.task_id] = task
            lease.inflight[task.task_id] = task
            return lease

    def sent_direct(self, task: TaskRecord, lease: LeaseState) -> bool:
        """(I/O thread) The caller thread that claimed ``lease`` has sent ``task``: the lease is
        the I/O thread's again.  False when its worker exited first (worker_exited did not
        see the task): the task is queued again."""
        with self.lock:
            lease.claimed = False
            orphaned = (self.leases.get((lease.node_id, lease.lease_id)) is not lease
                        and lease.inflight.pop(task.task_id, None) is not None)
        if orphaned:
            self.enqueue(task, front=True)
        return not orphaned

    # ------------------------------------------------------------------ checks
    def where(self, task: TaskRecord) -> str:
        """Where a task that is not done is, for messages (a get() that timed out)."""
        if task.state is TaskState.WAITING:
            return f"waits for {task.deps_left} of its arguments"
        if task.state is TaskState.RUNNING and task.lease is not None:
            return f"runs on worker {task.lease.worker_id} of node {task.lease.node_id}"
        kq = self.keys.get(task.key)
        if task.state is TaskState.QUEUED and kq is not None:
            ahead = next((i for i, t in enumerate(kq.queue) if t is task), len(kq.queue))
            return (f"is queued for a worker of {describe_shape(task.shape)} behind {ahead} task(s), "
                    f"with {len(kq.leases)} worker(s) leased and {len(kq.requests)} lease request(s) "
                    "out to the node agents")
        return f"is {task.state.value}"

    def validate_state(self) -> None:
        """Raise AssertionError if the queues contradict themselves (tests call it after each event)."""
        for key, kq in self.keys.items():
            for task in kq.queue:
                assert task.key == key, (task.name, "queued under another key")
                assert task.state == TaskState.QUEUED, (task.name, task.state, "in a queue but not QUEUED")
                assert task.actor_id is None, (task.name, "an actor call in a task queue")
            for lease in kq.leases:
                assert self.leases.get((lease.node_id, lease.lease_id)) is lease, \
                    (lease.lease_id, "a key's lease unknown to the table")
                assert not lease.retiring, (lease.lease_id, "a retiring lease still takes tasks")
                assert not lease.yielding, (lease.lease_id, "a lease asked back still takes tasks")
            for request_id in kq.requests:
                assert self.lease_requests.get(request_id) == key, (request_id, "a request under two keys")
        for (node_id, lease_id), lease in self.leases.items():
            assert (lease.node_id, lease.lease_id) == (node_id, lease_id)
            kq = self.keys.get(lease.key)
            assert lease.retiring or lease.yielding or (kq is not None and lease in kq.leases), \
                (lease_id, "a lease in the table but not with its key")
            for task_id, task in lease.inflight.items():
                assert task.task_id == task_id and task.lease is lease, (task.name, "in flight elsewhere")
                assert task.state == TaskState.RUNNING, (task.name, task.state, "in flight but not RUNNING")
        for key, lease in self.parked.items():
            assert lease.key == key and not lease.inflight and lease.direct, (key, "a busy or remote lease parked")
            assert not lease.yielding, (key, "a lease asked back is parked")
            assert self.leases.get((lease.node_id, lease.lease_id)) is lease, (key, "a parked lease unknown")
