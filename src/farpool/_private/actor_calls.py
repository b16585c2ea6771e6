"""Actor calls: one caller's calls to each actor, in order, through the actor's restarts.

Pure state, no sockets: the client (client.py, the shell) feeds it what the head
says of an actor (``ActorInfo``), the calls it submits and what comes back, and
sends what it returns::

    submit_actor_call --> add ----------------+
    argument ready / reply / restart --------> next_batch(actor) --> [calls to send on actor.lease]
    ActorInfo(state, incarnation) --> update --> Update: lost calls to fail, whether a lease to
                                                 the new incarnation is wanted
    farpool.kill(no_restart=True) --> kill

A call is sent once it is first in line and its arguments are ready, so a later
call never overtakes an earlier one (the actor reorders by the caller's
sequence anyway).  When the actor's process dies, calls in flight are retried
on its next incarnation while ``max_task_retries`` allows (an attempt is spent
per loss), first in line and in their order, or fail with ActorDiedError.

I/O thread only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from farpool import exceptions as exc_mod
from farpool._private.task_queues import LeaseState, TaskQueues, TaskRecord, TaskState

# Calls in flight to one actor from one caller: deep, since an actor runs them in order anyway.
ACTOR_PIPELINE_DEPTH = 1000


@dataclass
class ActorQueue:
    """One caller's calls to one actor, sent in submission order on the lease of its worker."""
    actor_id: str
    queue: deque = field(default_factory=deque)
    state: str = "UNKNOWN"      # as the head says: UNKNOWN, PENDING, ALIVE, RESTARTING, DEAD
    incarnation: int = -1
    lease: LeaseState | None = None  # reaches the actor's worker while it is ALIVE
    subscribed: bool = False    # the head sends us its ActorInfo (WaitActor was sent)
    cause: str = ""             # why it is DEAD


class Update:
    """What an ActorInfo means for this caller."""
    __slots__ = ("failed", "connect")

    def __init__(self):
        self.failed: list = []      # (call, error): fail them now
        self.connect = False        # it is ALIVE in a new incarnation: open its lease (set_lease)


class ActorCalls:
    def __init__(self):
        self.actors: dict[str, ActorQueue] = {}

    def actor(self, actor_id: str) -> ActorQueue:
        aq = self.actors.get(actor_id)
        if aq is None:
            aq = self.actors[actor_id] = ActorQueue(actor_id)
        return aq

    def has_queued(self, actor_id: str) -> bool:
        aq = self.actors.get(actor_id)
        return aq is not None and bool(aq.queue)

    def idle(self, actor_id: str) -> bool:
        """ALIVE and reached, with no call of ours queued or in flight."""
        aq = self.actors.get(actor_id)
        return (aq is not None and aq.state == "ALIVE" and aq.lease is not None and not aq.queue
                and not aq.lease.inflight)

    def add(self, task: TaskRecord) -> ActorQueue:
        task.state = TaskState.QUEUED
        aq = self.actor(task.actor_id)
        aq.queue.append(task)
        return aq

    def requeue(self, task: TaskRecord) -> ActorQueue:
        """Run it again, first in line (its worker handed it back, or it is retried)."""
        task.state = TaskState.QUEUED
        task.lease = None
        aq = self.actor(task.actor_id)
        aq.queue.appendleft(task)
        return aq

    def remove_queued(self, task: TaskRecord) -> None:
        aq = self.actors.get(task.actor_id)
        if aq is not None and task in aq.queue:
            aq.queue.remove(task)

    def next_batch(self, aq: ActorQueue, failed_argument) -> tuple[list, list]:
        """(calls to send now on ``aq.lease``, marked RUNNING on it; (call, failed argument entry)
        to fail without running).  ``failed_argument(task)``: the entry of an argument that failed,
        or None.  A dead actor fails everything queued: see ``fail_all``."""
        lease = aq.lease
        batch, failed = [], []
        if lease is None or aq.state == "DEAD":
            return batch, failed
        q = aq.queue
        room = ACTOR_PIPELINE_DEPTH - len(lease.inflight)
        while q and (q[0].cancelled or q[0].deps_left == 0) and len(batch) < room:
            task = q.popleft()
            if task.cancelled:
                continue
            entry = failed_argument(task)
            if entry is not None:
                failed.append((task, entry))
            else:
                batch.append(task)
        if batch:
            TaskQueues.start(lease, batch)
        return batch, failed

    @staticmethod
    def fail_all(aq: ActorQueue) -> list:
        """(call, error) for every call queued to an actor that is DEAD for good."""
        error = exc_mod.ActorDiedError(aq.cause)
        failed = [(task, error) for task in aq.queue]
        aq.queue.clear()
        return failed

    def update(self, actor_id: str, state: str, incarnation: int, cause: str) -> Update | None:
        """The head's ActorInfo for an actor we call (None: we call it not, or it is dead already)."""
        aq = self.actors.get(actor_id)
        if aq is None or aq.state == "DEAD":  # killed from here, or dead already: final
            return None
        update = Update()
        if aq.lease is not None and (state != "ALIVE" or incarnation != aq.incarnation):
            update.failed = self.lost(aq, cause or "its process died")
        aq.state = state
        aq.cause = cause
        if state == "ALIVE" and aq.lease is None:
            aq.incarnation = incarnation
            update.connect = True
        return update

    @staticmethod
    def set_lease(aq: ActorQueue, lease: LeaseState) -> None:
        lease.job_sent = True  # the actor's worker was set up by its creation
        aq.lease = lease

    @staticmethod
    def lost(aq: ActorQueue, cause: str) -> list:
        """The actor's process died: calls in flight go first in line again while their
        retries last (max_task_retries); returns (call, error) for the others."""
        lease, aq.lease = aq.lease, None
        retry, failed = [], []
        for task in sorted(lease.inflight.values(), key=lambda t: t.task_id):
            if task.cancelled:
                failed.append((task, exc_mod.TaskCancelledError(f"actor call {task.name} was cancelled")))
            elif task.spend_attempt():
                task.state = TaskState.QUEUED
                task.lease = None
                retry.append(task)
            else:
                failed.append((task, exc_mod.ActorDiedError(
                    f"actor {aq.actor_id[:8]} died while running {task.name}: {cause}"
                    + (f" (max_task_retries={task.max_retries} used up)" if task.max_retries else
                       "; set max_task_retries to retry calls on a restarted actor"))))
        lease.inflight.clear()
        for task in reversed(retry):
            aq.queue.appendleft(task)
        return failed

    def kill(self, actor_id: str) -> tuple[ActorQueue, list]:
        """farpool.kill(no_restart=True) from here: DEAD for good; (call, error) for every call
        in flight or queued."""
        aq = self.actor(actor_id)
        aq.state = "DEAD"
        aq.cause = "it was killed with farpool.kill()"
        failed = self.lost(aq, aq.cause) if aq.lease is not None else []
        return aq, failed + self.fail_all(aq)

    def where(self, task: TaskRecord) -> str:
        """Where an actor call that is not done is, for messages."""
        aq = self.actors.get(task.actor_id)
        if aq is None:
            return f"is a call to actor {task.actor_id}, unknown here"
        if task.state is TaskState.RUNNING:
            return f"was sent to actor {task.actor_id} ({aq.state}) and has not answered"
        ahead = next((i for i, t in enumerate(aq.queue) if t is task), len(aq.queue))
        waits = "its worker" if aq.lease is None else f"{task.deps_left} of its arguments" if task.deps_left else "its turn"
        return f"is queued for actor {task.actor_id} ({aq.state}) behind {ahead} call(s), waiting for {waits}"

    def validate_state(self) -> None:
        for actor_id, aq in self.actors.items():
            assert aq.actor_id == actor_id
            assert aq.state != "DEAD" or (not aq.queue and aq.lease is None), (actor_id, "a dead actor holds calls")
            for task in aq.queue:
                assert task.actor_id == actor_id and task.state == TaskState.QUEUED, (task.name, task.state)
            if aq.lease is not None:
                for task in aq.lease.inflight.values():
                    assert task.state == TaskState.RUNNING and task.lease is aq.lease, (task.name, "in flight")
