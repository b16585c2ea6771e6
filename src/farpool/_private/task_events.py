"""Task events: what an owner tells the head about its tasks, in batches, off the task path.

Owned by the core client of every owner (a driver, or a worker that submits nested
tasks).  The task path appends a few values to columns (lists of ids, times, names),
never an object per event, and never keeps a task record alive; the I/O thread takes
the columns as they are, once a second, and the head merges them per task::

    submit() (under the client's lock) -- id, time, name, shape, actor --> submitted columns
    a batch sent to a worker ------------ (seq, ids, time, node, worker) --> sent: one per batch
    a run ended on a worker (I/O thread)  seq, id, start, end, result, lease --> ended columns
    failed for good without a run ------- (seq, id, time, error type) ------> failed   (rare)
    no node fits now -------------------- (seq, ids, reason) ---------------> waiting  (rare)
                                        |
    take(): on a timer (FLUSH_INTERVAL_S), or at once when BATCH_EVENTS wait (one wake-up)
                                        v
         TaskEvents(Batch of columns) --> head: updates_of(batch), one TaskUpdate per task
                                               (its events merged in ``seq`` order)
                                          --> task_history.py

Why columns: an object per event (a tuple, or the task record itself kept until the
take) is an allocation the garbage collector then walks, again and again while it
lives; appending an id, a float and a reference to a name that already exists is not.
Nothing is sent per task.  ``FARPOOL_TASK_EVENTS=0`` turns recording off
(benchmarks/task_events_ab.py compares both).

The buffer (``TaskEventBuffer``) is pure: events in, batches out, no clock of its own
or sockets; ``Reporter`` is the small shell that flushes it on the client's event loop.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from array import array
from collections import deque
from typing import NamedTuple

# Events an owner holds between flushes.  More rides out a longer burst (or a slow
# head) without losing events; fewer bounds the owner's memory.  Beyond it events are
# dropped and counted: the head shows the count.
BUFFER_EVENTS = int(os.environ.get("FARPOOL_TASK_EVENTS_BUFFER", "100000"))
# This many submitted or ended tasks wake the I/O thread to send them without waiting
# for the timer: lower keeps the head's view fresher under load, higher sends fewer batches.
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
    is "nothing new"; the fields of its submission come only in the task's first update."""
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
    """What TaskEvents carries (see the module docstring): the columns since the last batch,
    how many events were dropped, and whose they are.  Ids are joined into one bytes per
    column (an owner's task ids are all ``id_size`` long), numbers are arrays."""
    id_size: int
    submitted: tuple            # (ids, created (time.time()), names, shapes, actor ids)
    sent: tuple                 # per batch sent: (seqs, ids, how many, when (perf_counter), node ids, worker ids)
    ended: tuple                # per run: (seqs, ids, started, ended (the worker's time.time()), results, node ids,
    #                             worker ids); a result is True or the type name of what the run raised
    failed: list                # (seq, id, time.time(), error type)
    waiting: list               # (seq, [ids], reason)
    wall: float                 # time.time() - time.perf_counter() on the owner (for ``sent``)
    dropped: int
    job_id: object              # the owner's job (a worker's nested tasks: its task's job)
    pid: int


_time = time.time


class TaskEventBuffer:
    """Columns of events.  ``submitted`` is called holding ``lock`` (the client's, which the
    submitter holds anyway); ``ran`` on the I/O thread; ``sent``, ``failed`` and ``waiting``
    from any thread (each appends one object to a deque); ``take`` on the I/O thread.

    The drop count may miss an increment when two threads drop at the same instant (a
    count, not a ledger).
    """

    def __init__(self, capacity: int = BUFFER_EVENTS, batch: int = BATCH_EVENTS, enabled: bool = ENABLED,
                 lock=None):
        if capacity < 1 or batch < 1:
            raise ValueError(f"capacity and batch must be >= 1, got {capacity} and {batch}")
        self.capacity = capacity
        self.batch = batch
        self.enabled = enabled
        self.lock = lock if lock is not None else threading.Lock()
        self.dropped = 0            # since the last take
        self.dropped_total = 0
        self.on_batch_ready = None  # called once when a batch fills (the reporter wakes the I/O thread)
        self._ready_signalled = False
        self._threshold = min(batch, capacity)  # below it, recording checks nothing else
        self._seq = itertools.count()  # orders a task's events after its submission
        self._new_columns()
        if not enabled:  # the hooks do nothing (still one call each)
            self.submitted = self.sent = self.ran = self.failed = self.waiting = _nothing

    def _new_columns(self) -> None:
        """(at start) The columns, empty."""
        self._sub_ids, self._sub_created, self._sub_names, self._sub_shapes, self._sub_actors = [], [], [], [], []
        self._end_seqs, self._end_ids, self._end_started, self._end_ended, self._end_results, self._end_leases = \
            [], [], [], [], [], []
        self._sent: deque = deque()
        self._failed: deque = deque()
        self._waiting: deque = deque()

    def __len__(self) -> int:
        return len(self._sub_ids) + len(self._end_ids) + len(self._sent) + len(self._failed) + len(self._waiting)

    def _full(self, column: list) -> bool:
        """(rarely) A column reached a batch: wake the reporter once; True when it is full."""
        if len(column) >= self.capacity:
            self.dropped += 1
            return True
        if not self._ready_signalled and self.on_batch_ready is not None:
            self._ready_signalled = True
            self.on_batch_ready()
        return False

    # The owner's hooks, on the task path: a length check and a few appends.
    def submitted(self, task) -> None:
        """(holding ``lock``) remote() accepted ``task``."""
        ids = self._sub_ids
        if len(ids) < self._threshold or not self._full(ids):
            ids.append(task.task_id)
            self._sub_created.append(_time())
            self._sub_names.append(task.name)
            self._sub_shapes.append(task.shape)
            self._sub_actors.append(task.actor_id)

    def sent(self, tasks, lease, at: float) -> None:
        """``tasks`` went to ``lease``'s worker at ``at`` (time.perf_counter()): one call per batch."""
        if tasks:
            self._sent.append((next(self._seq), b"".join([t.task_id for t in tasks]), len(tasks), at, lease))

    def ran(self, task, lease, started: float, ended: float, result) -> None:
        """(I/O thread) A run of ``task`` on ``lease``'s worker ended: ``result`` is True, or the
        type name of what it raised (a run that never started, its worker retiring, is not one)."""
        ids = self._end_ids
        if len(ids) < self._threshold or not self._full(ids):
            self._end_seqs.append(next(self._seq))
            ids.append(task.task_id)
            self._end_started.append(started)
            self._end_ended.append(ended)
            self._end_results.append(result)
            self._end_leases.append(lease)

    def failed(self, task, error) -> None:
        """The task failed for good without a run to report (crash, cancel, no node, bad argument)."""
        self._failed.append((next(self._seq), task.task_id, _time(), error_type_of(error)))

    def waiting(self, tasks, reason: str) -> None:
        """No node can run these tasks now (``reason``); they wait."""
        self._waiting.append((next(self._seq), [t.task_id for t in tasks], reason))

    def take(self, job_id=None, pid: int = 0) -> Batch | None:
        """Everything recorded since the last take, or None when there is nothing to say."""
        self._ready_signalled = False  # the next record past a batch signals again
        if not (self._sub_ids or self._end_ids or self._sent or self._failed or self._waiting or self.dropped):
            return None
        with self.lock:  # (submitted() appends to five columns holding it)
            sub = (self._sub_ids, self._sub_created, self._sub_names, self._sub_shapes, self._sub_actors)
            self._sub_ids, self._sub_created, self._sub_names, self._sub_shapes, self._sub_actors = \
                [], [], [], [], []
        # (deques other threads append to, one object per event: popped, never swapped)
        sent, failed, waiting = (_popped(self._sent), _popped(self._failed), _popped(self._waiting))
        ended = (self._end_seqs, self._end_ids, self._end_started, self._end_ended, self._end_results,
                 self._end_leases)
        self._end_seqs, self._end_ids, self._end_started, self._end_ended, self._end_results, self._end_leases = \
            [], [], [], [], [], []
        dropped = self.dropped
        self.dropped -= dropped
        self.dropped_total += dropped
        # Numbers travel as arrays (one bytes object each when pickled), ids joined (an owner's
        # ids are all of one size), names and the like as lists (pickled once each, then referred to).
        ids, created, names, shapes, actors = sub
        size = len(ids[0]) if ids else len(ended[1][0]) if ended[1] else (
            len(sent[0][1]) // sent[0][2] if sent else len(failed[0][1]) if failed else 0)
        submitted = (b"".join(ids), array("d", created), names, shapes, actors)
        if sent:
            seqs, joined, counts, at, leases = zip(*sent)
            sent = (array("q", seqs), b"".join(joined), array("q", counts), array("d", at),
                    [lease.node_id for lease in leases], [lease.worker_id for lease in leases])
        else:
            sent = (array("q"), b"", array("q"), array("d"), [], [])
        seqs, ids, started, ended_at, results, leases = ended
        ended = (array("q", seqs), b"".join(ids), array("d", started), array("d", ended_at), results,
                 [lease.node_id for lease in leases], [lease.worker_id for lease in leases])
        return Batch(size, submitted, sent, ended, failed, waiting, _time() - time.perf_counter(), dropped, job_id,
                     pid)

    def validate_state(self) -> None:
        assert self.dropped >= 0 and self.dropped_total >= 0
        n = len(self._sub_ids)
        assert n == len(self._sub_created) == len(self._sub_names) == len(self._sub_shapes) == len(self._sub_actors)
        n = len(self._end_ids)
        assert n == len(self._end_seqs) == len(self._end_started) == len(self._end_ended) == \
            len(self._end_results) == len(self._end_leases)


def _nothing(*_args) -> None:
    pass


def _popped(events: deque) -> list:
    """The events in ``events`` now, taken out (appends from other threads meanwhile stay)."""
    pop = events.popleft
    return [pop() for _ in range(len(events))]


def _split(joined, size: int, n: int) -> list:
    """The ``n`` ids of a joined column (``size`` bytes each); ValueError if it is not that."""
    if not isinstance(joined, bytes) or len(joined) != size * n or (n and size <= 0):
        raise ValueError("a column of task ids that does not match its length")
    return [joined[i:i + size] for i in range(0, len(joined), size)] if n else []


# Below every seq an owner's events carry (the head puts events it held from an earlier
# batch just below the seqs of the next one: task_history.Carry).
BEFORE_ALL = -(1 << 62)


def split_ids(batch) -> tuple[list, list, list]:
    """(head) The task ids of a batch's submitted, sent and ended columns; ValueError if they
    do not match their columns."""
    size, submitted, sent, ended = batch[:4]
    return (_split(submitted[0], size, len(submitted[1])), _split(sent[1], size, sum(sent[2])),
            _split(ended[1], size, len(ended[0])))


def updates_of(batch, skip=frozenset(), ids=None) -> list:
    """(head) One update (TaskUpdate's fields, a list) per task of an owner's batch as it came
    off the wire, its events merged in the order the owner recorded them; ValueError or
    TypeError for a batch that is not one.  Tasks in ``skip`` are left out (the head kept
    them as columns: task_history.Segment); ``ids``: split_ids(batch), when known."""
    size, submitted, sent, ended, failed, waiting, wall = batch[:7]
    sub_ids, sent_ids, end_ids = ids if ids is not None else split_ids(batch)
    if not isinstance(size, int) or not isinstance(wall, float):
        raise ValueError("a task events batch without its id size or clock")
    merged: dict = {}
    order: dict = {}            # task id -> seq of the event that set its state

    def update(task_id):
        u = merged.get(task_id)
        if u is None:
            u = merged[task_id] = [task_id, None, None, None, None, None, None, None, None, None, None, None, 0]
            order[task_id] = BEFORE_ALL
        return u

    joined, created, names, shapes, actors = submitted
    ids = sub_ids
    if not (len(names) == len(shapes) == len(actors) == len(ids)):
        raise ValueError("submitted columns of different lengths")
    for task_id, at, name, shape, actor_id in zip(ids, created, names, shapes, actors):
        if task_id in skip:
            continue
        u = update(task_id)
        u[1], u[2], u[3], u[4], u[5] = name, shape, actor_id, at, PENDING
    seqs, joined, counts, at, nodes, workers = sent
    ids = sent_ids
    if not (len(counts) == len(at) == len(nodes) == len(workers) == len(seqs)):
        raise ValueError("sent columns of different lengths")
    pos = 0
    for seq, count, when, node_id, worker_id in zip(seqs, counts, at, nodes, workers):
        when += wall
        for task_id in ids[pos:pos + count]:
            if task_id in skip:
                continue
            u = update(task_id)
            u[12] += 1
            if seq > order[task_id]:
                order[task_id] = seq
                u[5], u[6], u[7], u[8], u[9], u[10], u[11] = RUNNING_STATE, when, None, node_id, worker_id, None, None
        pos += count
    seqs, joined, started, ended_at, results, nodes, workers = ended
    ids = end_ids
    if not (len(started) == len(ended_at) == len(results) == len(nodes) == len(workers) == len(ids)):
        raise ValueError("ended columns of different lengths")
    for seq, task_id, start, end, result, node_id, worker_id in zip(seqs, ids, started, ended_at, results, nodes,
                                                                     workers):
        if task_id in skip:
            continue
        u = update(task_id)
        if seq > order[task_id]:
            order[task_id] = seq
            ok = result is True
            u[5], u[6], u[7], u[8], u[9], u[10], u[11] = (FINISHED if ok else FAILED, start, end, node_id, worker_id,
                                                          None if ok else result, None)
    for seq, task_id, at, error_type in failed:
        u = update(task_id)
        if seq > order[task_id]:
            order[task_id] = seq
            u[5], u[7], u[10], u[11] = FAILED, at, error_type, None
    for seq, task_ids, reason in waiting:
        for task_id in task_ids:
            u = update(task_id)
            if seq > order[task_id]:
                u[11] = reason
    return list(merged.values())


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
