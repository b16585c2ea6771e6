"""Task events: what an owner tells the head about its tasks, in batches, off the task path.

Owned by the core client of every owner (a driver, or a worker that submits nested
tasks).  Events are recorded on whichever thread sees them (a user thread in
``submit`` and on the direct path, the I/O thread for the rest) and taken in
batches by the I/O thread only::

    submit() ---------- Submitted --+
    task sent to a worker -- Running -+--> TaskEventBuffer (bounded deque; full: dropped, counted)
    result / failure ---- Ended ----+              |
    no node fits -------- Waiting --+              | take(): a timer every FLUSH_INTERVAL_S, or at
                                                   v         BATCH_EVENTS (one wake-up per batch)
                                      TaskEvents(batch) --> head (task_history.py)

Nothing is sent per task: recording is a ``time.time()``, a tuple and a deque append.
An event is a plain tuple on the task path; its fields are those of the NamedTuple of
its kind below (the head reads them with ``decode``).  ``FARPOOL_TASK_EVENTS=0`` turns
recording off (the benchmark of its cost compares both).

The buffer (``TaskEventBuffer``) is pure: events in, batches out, no clock or socket;
``Reporter`` is the small shell that flushes it on the client's event loop.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import NamedTuple

# Events an owner holds between flushes.  More rides out a longer burst (or a slow
# head) without losing events; fewer bounds the owner's memory (~100 bytes an event).
# Beyond it events are dropped and counted: the head shows the count.
BUFFER_EVENTS = int(os.environ.get("FARPOOL_TASK_EVENTS_BUFFER", "100000"))
# A batch this large is sent without waiting for the timer: larger batches cost the
# owner's I/O thread fewer sends, smaller ones keep the head's view fresher under load.
BATCH_EVENTS = 5000
# How old the head's view of an owner's tasks may be: shorter is fresher, longer sends
# fewer (larger) batches from an owner that runs a few tasks a second.
FLUSH_INTERVAL_S = 1.0
# Recording on (the default) or off: FARPOOL_TASK_EVENTS=0.
ENABLED = os.environ.get("FARPOOL_TASK_EVENTS", "1") not in ("0", "false", "no", "off")

# Kinds of event (the first field of each).
SUBMITTED, RUNNING, ENDED, WAITING = "S", "R", "E", "W"
# How a task ended (Ended.state).
FINISHED, FAILED = "FINISHED", "FAILED"


class Submitted(NamedTuple):
    """The owner accepted the task (``remote()`` returned)."""
    kind: str
    task_id: bytes
    at: float                   # time.time()
    name: str                   # function name, or Class.method for actor calls
    shape: dict                 # resources, fixed-point (scheduling.UNIT)
    actor_id: str | None


class Running(NamedTuple):
    """The task was sent to a worker (a task is RUNNING once dispatched)."""
    kind: str
    task_id: bytes
    at: float
    node_id: str
    worker_id: str


class Ended(NamedTuple):
    """The task finished or failed for good (or one run of it ended, before a retry)."""
    kind: str
    task_id: bytes
    at: float                   # when it ended (the worker's clock when it ran)
    state: str                  # FINISHED or FAILED
    started: float | None       # when its run started on the worker; None if it never ran
    node_id: str | None
    worker_id: str | None
    error_type: str | None      # the exception's type name when it failed


class Waiting(NamedTuple):
    """No node can run the task now (its resources): it waits, and this says why."""
    kind: str
    task_id: bytes
    at: float
    reason: str


_KINDS = {SUBMITTED: Submitted, RUNNING: Running, ENDED: Ended, WAITING: Waiting}


def decode(event: tuple):
    """The NamedTuple of a wire event; ValueError for anything else (a peer's garbage)."""
    if not isinstance(event, tuple) or not event:
        raise ValueError(f"a task event must be a non-empty tuple, got {type(event).__name__}")
    cls = _KINDS.get(event[0])
    if cls is None or len(event) != len(cls._fields):
        raise ValueError(f"unknown task event {event[0]!r} with {len(event)} fields")
    return cls._make(event)


class Batch(NamedTuple):
    """What TaskEvents carries: the events since the last batch, and how many were dropped."""
    events: list
    dropped: int
    job_id: object              # the owner's job (a worker's nested tasks: its task's job)
    pid: int


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
        self._events: deque = deque()

    def __len__(self) -> int:
        return len(self._events)

    def record(self, event: tuple) -> None:
        events = self._events
        n = len(events)
        if n >= self.capacity:
            self.dropped += 1
            return
        events.append(event)
        if n + 1 >= self.batch and not self._ready_signalled and self.on_batch_ready is not None:
            self._ready_signalled = True
            self.on_batch_ready()

    # The owner's hooks (on the task path: keep them a tuple and an append).
    def submitted(self, task) -> None:
        if self.enabled:
            self.record((SUBMITTED, task.task_id, time.time(), task.name, task.shape, task.actor_id))

    def running(self, task, node_id: str, worker_id: str) -> None:
        if self.enabled:
            self.record((RUNNING, task.task_id, time.time(), node_id, worker_id))

    def ran(self, task, ok, started: float, ended: float, node_id: str, worker_id: str,
            error_type: str | None = None) -> None:
        """One run ended on a worker (``ok``: True, False, or "retired" when it never ran)."""
        if not self.enabled or ok == "retired":
            return
        self.record((ENDED, task.task_id, ended, FINISHED if ok else FAILED, started, node_id, worker_id,
                     error_type))

    def failed(self, task, error) -> None:
        """The task failed for good without a run to report (crash, cancel, no node, bad argument)."""
        if self.enabled:
            self.record((ENDED, task.task_id, time.time(), FAILED, None, None, None, error_type_of(error)))

    def waiting(self, tasks, reason: str) -> None:
        if self.enabled:
            now = time.time()
            for task in tasks:
                self.record((WAITING, task.task_id, now, reason))

    def take(self, job_id=None, pid: int = 0) -> Batch | None:
        """The next batch (at most ``batch`` events), or None when there is nothing to say."""
        events = self._events
        n = min(len(events), self.batch)
        dropped = self.dropped
        if n == 0 and not dropped:
            self._ready_signalled = False
            return None
        out = [events.popleft() for _ in range(n)]
        self.dropped -= dropped
        self.dropped_total += dropped
        self._ready_signalled = False  # the next record past a batch signals again
        return Batch(out, dropped, job_id, pid)

    def validate_state(self) -> None:
        assert 0 <= len(self._events) <= self.capacity, (len(self._events), self.capacity)
        assert self.dropped >= 0 and self.dropped_total >= 0
        for event in self._events:
            decode(event)


def error_type_of(error) -> str:
    """The type name of a failure: a worker's TaskFailure tuple ("task", payload, type name, ...)
    or an exception raised here."""
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
