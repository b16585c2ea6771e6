"""Task events: what an owner tells the head about its tasks, in batches, off the task path.

Owned by the core client of every owner (a driver, or a worker that submits nested
tasks).  Events are recorded on whichever thread sees them (a user thread in
``submit`` and on the direct path, the I/O thread for the rest) and taken in
batches by the I/O thread only::

    submit() -------------- (task, t) --------+
    task sent to a worker - the task record --+--> TaskEventBuffer: a bounded deque
    result / failure ------ (task, t, ...) ---+    (full: dropped, counted)
    no node fits ---------- (task, t, ..., why) +                  |
                                                                   | take(): on a timer (FLUSH_INTERVAL_S)
                                                                   v   or at BATCH_EVENTS, one wake-up
         TaskEvents(Batch: one TaskUpdate per task, its events merged) --> head (task_history.py)

Nothing is sent per task.  Recording is a ``time.time()``, a small tuple holding the
task record itself, and a deque append: the task's fields are read, and its events
merged into one update per task, when the I/O thread takes the batch (a short task
submitted, run and finished within one interval costs the head one update, not three).
``FARPOOL_TASK_EVENTS=0`` turns recording off (the benchmark of its cost compares both).

The buffer (``TaskEventBuffer``) is pure: events in, batches out, no clock of its own
or sockets; ``Reporter`` is the small shell that flushes it on the client's event loop.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import NamedTuple

# Events an owner holds between flushes.  More rides out a longer burst (or a slow
# head) without losing events; fewer bounds the owner's memory (an event holds its
# task record up to one interval longer).  Beyond it events are dropped and counted:
# the head shows the count.
BUFFER_EVENTS = int(os.environ.get("FARPOOL_TASK_EVENTS_BUFFER", "100000"))
# A batch this large is sent without waiting for the timer: larger batches cost the
# owner's I/O thread fewer sends, smaller ones keep the head's view fresher under load.
BATCH_EVENTS = 20_000
# How old the head's view of an owner's tasks may be: shorter is fresher, longer sends
# fewer (larger) batches and merges more events per task.
FLUSH_INTERVAL_S = 1.0
# Recording on (the default) or off: FARPOOL_TASK_EVENTS=0.
ENABLED = os.environ.get("FARPOOL_TASK_EVENTS", "1") not in ("0", "false", "no", "off")

# Task states, as the head shows them.
PENDING, RUNNING_STATE, FINISHED, FAILED = "PENDING", "RUNNING", "FINISHED", "FAILED"
STATES = (PENDING, RUNNING_STATE, FINISHED, FAILED)


class TaskUpdate(NamedTuple):
    """What a batch says of one task: its events since the last batch, merged.  ``None``
    is "nothing new"; the fields of ``Submitted`` come only in the task's first update."""
    task_id: bytes
    name: str | None            # function name, or Class.method for actor calls
    shape: dict | None          # resources, fixed-point (scheduling.UNIT)
    actor_id: str | None
    submitted: float | None     # time.time() when remote() accepted it
    state: str | None           # its latest state (STATES)
    started: float | None       # when its (latest) run started: sent to a worker, then the worker's clock
    ended: float | None
    node_id: str | None
    worker_id: str | None
    error_type: str | None      # the exception's type name when it failed
    reason: str | None          # why it waits (no node can run it now)
    runs: int                   # runs started since the last update


def decode(update) -> TaskUpdate:
    """The TaskUpdate of a wire list; ValueError for anything else (a peer's garbage)."""
    if not isinstance(update, (list, tuple)) or len(update) != len(TaskUpdate._fields):
        raise ValueError(f"a task update must be a list of {len(TaskUpdate._fields)} fields, got "
                         f"{type(update).__name__} of {len(update) if isinstance(update, (list, tuple)) else '?'}")
    u = TaskUpdate._make(update)
    if not isinstance(u.task_id, bytes) or (u.state is not None and u.state not in STATES) \
            or not isinstance(u.runs, int):
        raise ValueError(f"a malformed task update for {u.task_id!r}")
    return u


class Batch(NamedTuple):
    """What TaskEvents carries: the updates since the last batch, and how many events were dropped."""
    updates: list
    dropped: int
    job_id: object              # the owner's job (a worker's nested tasks: its task's job)
    pid: int


_time = time.time


class TaskEventBuffer:
    """Bounded buffer of events.  ``record`` from any thread; ``take`` from one (the I/O thread).

    ``deque.append`` and ``popleft`` are atomic, so recording needs no lock; the drop
    count may miss an increment when two threads drop at the same instant (a count,
    not a ledger).
    """

    def __init__(self, capacity: int = BUFFER_EVENTS, batch: int = BATCH_EVENTS, enabled: bool = ENABLED):
        if capacity < 1 or batch < 1:
            raise ValueError(f"capacity and batch must be >= 1, got {capacity} and {batch}")
        self.capacity = capacity
        self.batch = batch
        self.enabled = enabled
        self.dropped = 0            # since the last take
        self.dropped_total = 0
        self.on_batch_ready = None  # called once when a batch fills (the reporter wakes the I/O thread)
        self._ready_signalled = False
        self._threshold = min(batch, capacity)  # below it, recording checks nothing else
        self._events: deque = deque()
        if not enabled:  # the hooks do nothing (still one call each)
            self.submitted = self.running = self.ran = self.failed = self.waiting = _nothing

    def __len__(self) -> int:
        return len(self._events)

    def _full(self) -> bool:
        """(rarely) The buffer reached a batch: wake the reporter once; True when it is full."""
        if len(self._events) >= self.capacity:
            self.dropped += 1
            return True
        if not self._ready_signalled and self.on_batch_ready is not None:
            self._ready_signalled = True
            self.on_batch_ready()
        return False

    # The owner's hooks, on the task path: each is one call, a length check and an append.
    # An event is (task, time) when submitted, the task record itself when sent to a
    # worker (its time and worker are read from it at take()), and an 8-tuple when it ended.
    def submitted(self, task) -> None:
        if len(self._events) < self._threshold or not self._full():
            self._events.append((task, _time()))

    def running(self, task, node_id: str = "", worker_id: str = "") -> None:
        """``task`` was sent to a worker (its ``lease`` and ``submitted_at``, a perf_counter time, say
        where and when)."""
        if len(self._events) < self._threshold or not self._full():
            self._events.append(task)

    def ran(self, task, ok, started: float, ended: float, node_id: str, worker_id: str,
            error_type: str | None = None) -> None:
        """One run ended on a worker (``ok``: True, False, or "retired" when it never ran)."""
        if ok != "retired" and (len(self._events) < self._threshold or not self._full()):
            self._events.append((task, ended, FINISHED if ok else FAILED, started, node_id, worker_id, error_type,
                                 None))

    def failed(self, task, error) -> None:
        """The task failed for good without a run to report (crash, cancel, no node, bad argument)."""
        if len(self._events) < self._threshold or not self._full():
            self._events.append((task, _time(), FAILED, None, None, None, error_type_of(error), None))

    def waiting(self, tasks, reason: str) -> None:
        """No node can run these tasks now (``reason``); they wait."""
        now = _time()
        for task in tasks:
            if len(self._events) < self._threshold or not self._full():
                self._events.append((task, now, None, None, None, None, None, reason))

    def take(self, job_id=None, pid: int = 0) -> Batch | None:
        """The next batch (the events of at most ``batch`` records, merged per task), or None
        when there is nothing to say."""
        events = self._events
        n = min(len(events), self.batch)
        dropped = self.dropped
        self._ready_signalled = False  # the next record past a batch signals again
        if n == 0 and not dropped:
            return None
        merged: dict = {}
        get = merged.get
        pop = events.popleft
        wall = _time() - time.perf_counter()  # perf_counter -> time.time()
        for _ in range(n):
            event = pop()
            if type(event) is not tuple:  # sent to a worker: the task record itself
                u = get(event.task_id)
                if u is None:
                    u = merged[event.task_id] = [event.task_id, None, None, None, None, None, None, None, None,
                                                 None, None, None, 0]
                lease = event.lease
                u[5], u[6], u[7], u[11] = RUNNING_STATE, event.submitted_at + wall, None, None
                if lease is not None:
                    u[8], u[9] = lease.node_id, lease.worker_id
                u[12] += 1
            elif len(event) == 2:  # submitted: a task's first event ever
                task = event[0]
                merged[task.task_id] = [task.task_id, task.name, task.shape, task.actor_id, event[1], PENDING,
                                        None, None, None, None, None, None, 0]
            else:
                task_id = event[0].task_id
                u = get(task_id)
                if u is None:
                    u = merged[task_id] = [task_id, None, None, None, None, None, None, None, None, None, None,
                                           None, 0]
                if event[2] is not None:  # ended
                    u[5], u[7] = event[2], event[1]
                    if event[3] is not None:
                        u[6], u[8], u[9] = event[3], event[4], event[5]
                    if event[6] is not None:
                        u[10] = event[6]
                else:  # waiting
                    u[11] = event[7]
        self.dropped -= dropped
        self.dropped_total += dropped
        return Batch(list(merged.values()), dropped, job_id, pid)  # (updates travel as lists)

    def validate_state(self) -> None:
        assert 0 <= len(self._events) <= self.capacity, (len(self._events), self.capacity)
        assert self.dropped >= 0 and self.dropped_total >= 0
        for event in self._events:
            task = event[0] if type(event) is tuple else event
            assert isinstance(task.task_id, bytes), event
            assert type(event) is not tuple or len(event) in (2, 8), event


def _nothing(*_args) -> None:
    pass


def error_type_of(error) -> str:
    """The type name of a failure: a worker's (protocol.TaskFailure, with its ``type_name``; older
    callers pass ("task", payload, type name, ...)) or an exception raised here."""
    type_name = getattr(error, "type_name", None)
    if isinstance(type_name, str):
        return type_name
    if isinstance(error, tuple) and len(error) > 2 and error[0] == "task":
        return str(error[2])
    return type(error).__name__


class Reporter:
    """Flushes a buffer to the head on the client's event loop: every ``interval_s``, and at
    once when a batch fills.  ``send(batch)`` runs on the loop's thread."""

    def __init__(self, buffer: TaskEventBuffer, loop, send, job_id=None, interval_s: float = FLUSH_INTERVAL_S):
        self.buffer = buffer
        self.loop = loop
        self.send = send
        self.job_id = job_id
        self.interval_s = interval_s
        self.timer = None
        self.stopped = False
        buffer.on_batch_ready = lambda: loop.call_soon(self.flush)

    def start(self) -> None:
        if self.buffer.enabled:
            self.timer = self.loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        self.timer = None
        self.flush()
        if not self.stopped:
            self.timer = self.loop.call_later(self.interval_s, self._tick)

    def flush(self) -> None:
        """Send everything recorded so far (a batch at a time).  On the loop's thread."""
        while True:
            batch = self.buffer.take(self.job_id, os.getpid())
            if batch is None:
                return
            self.send(batch)

    def stop(self) -> None:
        """The last flush (at shutdown, before the Goodbye)."""
        self.stopped = True
        if self.timer is not None:
            self.loop.cancel_timer(self.timer)
            self.timer = None
        self.flush()
