"""The head's bounded history of every owner's tasks, fed by their TaskEvents batches.

Owned by the head (its one thread); pure: batches in, answers out, no sockets or
clocks.  Owners record events off the task path (task_events.py) and send them in
batches; the head folds each batch::

    owners --TaskEvents(batch)--> TaskHistory.add_batch --+--> segments: tasks born and ended in the batch,
                                                         |    kept as its columns (the bulk, under load)
                                                         +--> records: one TaskEntry per other task
                                                         \\-> counts per (function, shape, state)
    status / list / timeline / dashboard <-- summary(), tasks(), timeline()

Why segments: under load almost every task is submitted, run and ended between two
flushes, and folding it into an object of its own cost the head 5-8 us of CPU per
task, taken from the workers on a small machine.  Such tasks stay in the batch's
columns (selected with set operations and ``itertools.compress``, counted with a
``Counter``): about 1 us per task.  A later event of one (a retry, a rebuild by
lineage) moves it into a record first.  Small batches (below ``fast_min`` such
tasks) fold into records only.

The counts cover every task the head ever heard of; the records and segments only
the newest ``HISTORY_TASKS`` or so (tasks that ended go first, a segment whole and
only while at least ``HISTORY_TASKS`` remain; live ones only past twice that).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections import Counter, deque
from itertools import accumulate, compress

from farpool._private import scheduling
from farpool._private import task_events as ev

# Task records the head keeps (about 300 bytes each): more shows a longer past in
# `farpool list tasks` and the timeline, fewer bounds the head's memory.  Ended tasks
# are forgotten first; tasks still pending or running only beyond twice this.
HISTORY_TASKS = int(os.environ.get("FARPOOL_TASK_HISTORY", "100000"))

# A batch keeps its tasks born and ended in it as a Segment from this many of them on;
# fewer fold into records (a segment costs about 1 KB of lists on its own).
FAST_MIN = 64

PENDING, RUNNING, FINISHED, FAILED = ev.STATES
STATES = ev.STATES
LIVE = (PENDING, RUNNING)


class TaskEntry:
    """What the head knows of one task."""
    __slots__ = ("task_id", "job_id", "owner_pid", "name", "shape", "actor_id", "state", "submitted",
                 "started", "ended", "node_id", "worker_id", "error_type", "reason", "runs", "batch")

    def __init__(self, task_id: bytes, job_id, owner_pid: int):
        self.batch = 0            # the batch that first named it (orders the newest first)
        self.task_id = task_id
        self.job_id = job_id
        self.owner_pid = owner_pid
        self.name = "?"           # not known when its Submitted event was dropped
        self.shape = "{}"
        self.actor_id = None
        self.state = PENDING
        self.submitted = None
        self.started = None
        self.ended = None
        self.node_id = None
        self.worker_id = None
        self.error_type = None
        self.reason = None        # why it waits (no node fits), while it does
        self.runs = 0

    def as_dict(self) -> dict:
        return {"task_id": self.task_id.hex(), "name": self.name, "state": self.state, "shape": self.shape,
                "job_id": self.job_id, "owner_pid": self.owner_pid, "actor_id": self.actor_id,
                "node_id": self.node_id, "worker_id": self.worker_id, "submitted": self.submitted,
                "started": self.started, "ended": self.ended, "error_type": self.error_type,
                "waiting_for": self.reason, "runs": self.runs}


class Segment:
    """Tasks of one owner's batch that were submitted, sent once and ended once in it: the
    batch's columns for them, in submission order (``ids`` ...) and in the order they ended
    (``end_ids`` ...).  ``gone``: ids moved into records since, or forgotten."""
    __slots__ = ("batch", "job_id", "owner_pid", "ids", "created", "names", "shapes", "actors", "end_ids",
                 "started", "ended", "results", "nodes", "workers", "gone", "shape_texts", "_pos", "ended_max")

    # (no index of task ids across segments: a task kept in one rarely speaks again, so the
    # few that do are looked for segment by segment, newest first: see TaskHistory._kept)

    def __init__(self, batch: int, job_id, owner_pid: int, sub: tuple, end: tuple):
        self.batch, self.job_id, self.owner_pid = batch, job_id, owner_pid
        self.ids, self.created, self.names, self.shapes, self.actors = sub
        self.end_ids, self.started, self.ended, self.results, self.nodes, self.workers = end
        self.gone: set = set()
        self.shape_texts: dict = {}  # id(a shape dict in shapes) -> its text
        self._pos = None
        self.ended_max = max(self.ended) if self.ended else 0.0

    def __len__(self) -> int:
        return len(self.ids) - len(self.gone)

    def _positions(self) -> dict:
        """task id -> its index in the submitted columns (made when first needed)."""
        if self._pos is None:
            self._pos = dict(zip(self.ids, range(len(self.ids))))
        return self._pos

    def entries(self):
        """A TaskEntry per task kept (newest ended first), made now (for answers)."""
        pos = self._positions()
        gone = self.gone
        for j in range(len(self.end_ids) - 1, -1, -1):
            task_id = self.end_ids[j]
            if task_id not in gone:
                yield self._entry(task_id, pos[task_id], j)

    def holds(self, task_id: bytes) -> bool:
        return task_id in self._positions() and task_id not in self.gone

    def entry(self, task_id: bytes) -> TaskEntry:
        return self._entry(task_id, self._positions()[task_id], self.end_ids.index(task_id))

    def _entry(self, task_id: bytes, i: int, j: int) -> TaskEntry:
        e = TaskEntry(task_id, self.job_id, self.owner_pid)
        e.batch = self.batch
        e.name, e.actor_id, e.submitted = self.names[i], self.actors[i], self.created[i]
        e.shape = self.shape_texts[id(self.shapes[i])]
        e.started, e.ended, e.node_id, e.worker_id = self.started[j], self.ended[j], self.nodes[j], self.workers[j]
        result = self.results[j]
        e.state, e.error_type = (FINISHED, None) if result is True else (FAILED, result)
        e.runs = 1
        return e


def _only(batch, split: tuple, only: set) -> tuple[tuple, tuple]:
    """``batch`` (and its split ids) with the events of the tasks in ``only`` alone (failed and
    waiting events all stay: few, and merged per task anyway).  A send to several tasks
    becomes one send per task kept, with its seq, time, node and worker."""
    size, submitted, sent, ended, failed, waiting, wall = batch[:7]
    ids, sent_ids, end_ids = split
    keep = only.__contains__
    mask = list(map(keep, ids))
    submitted = (None, *(list(compress(column, mask)) for column in submitted[1:]))
    seqs, _, counts, at, nodes, workers = sent
    positions = list(compress(range(len(sent_ids)), map(keep, sent_ids)))
    ends = list(accumulate(counts))
    groups = [bisect_right(ends, p) for p in positions]
    sent = ([seqs[g] for g in groups], None, [1] * len(groups), [at[g] for g in groups],
            [nodes[g] for g in groups], [workers[g] for g in groups])
    end_mask = list(map(keep, end_ids))
    ended = (*(list(compress(column, end_mask)) for column in ended[:1]), None,
             *(list(compress(column, end_mask)) for column in ended[2:]))
    split = (list(compress(ids, mask)), [sent_ids[p] for p in positions], list(compress(end_ids, end_mask)))
    return (size, submitted, sent, ended, failed, waiting, wall, *batch[7:]), split


class Carry:
    """An owner's tasks submitted in its last batch and not ended there: their columns, held
    until its next batch, so that a task whose life spans the two (a burst cut by a flush)
    is kept as columns too.  Counted as pending or running meanwhile; carried once."""
    __slots__ = ("batch", "job_id", "owner_pid", "ids", "created", "names", "shapes", "actors", "sends",
                 "shape_texts", "states")

    def __init__(self, batch: int, job_id, owner_pid: int):
        self.batch, self.job_id, self.owner_pid = batch, job_id, owner_pid
        self.ids, self.created, self.names, self.shapes, self.actors = [], [], [], [], []
        self.sends: list = []       # per task: (seq, wall time, node, worker) of its send, or None
        self.shape_texts: dict = {}  # id(a shape dict in shapes) -> its text
        self.states: list = []      # per task: PENDING or RUNNING

    def __len__(self) -> int:
        return len(self.ids)

    def entries(self):
        for i in range(len(self.ids) - 1, -1, -1):
            yield self.entry(i)

    def entry(self, i: int) -> TaskEntry:
        e = TaskEntry(self.ids[i], self.job_id, self.owner_pid)
        e.batch = self.batch
        e.name, e.actor_id, e.submitted = self.names[i], self.actors[i], self.created[i]
        e.shape = self.shape_texts[id(self.shapes[i])]
        e.state = self.states[i]
        send = self.sends[i]
        if send is not None:
            _, e.started, e.node_id, e.worker_id = send
            e.runs = 1
        return e

    def joined_with(self, batch, ids: tuple) -> tuple[tuple, tuple]:
        """(the batch with our tasks in front, as if they had been in it; its split ids)."""
        size, submitted, sent, ended, failed, waiting, wall = batch[:7]
        _, created, names, shapes, actors = submitted
        sub = (None, self.created + list(created), self.names + list(names), self.shapes + list(shapes),
               self.actors + list(actors))
        sends = [(send, task_id) for send, task_id in zip(self.sends, self.ids) if send is not None]
        seqs, _, counts, at, nodes, workers = sent
        # Our events came before the batch's: their seqs go just below its own (an owner's seqs
        # only grow, but a new process with the pid of one that ended starts again).
        first = min(min(seqs, default=0), min(ended[0], default=0), *(f[0] for f in failed),
                    *(w[0] for w in waiting))
        sent = (
            [first - len(sends) + k for k in range(len(sends))] + list(seqs), None,
            [1] * len(sends) + list(counts),
            [send[1] - wall for send, _ in sends] + list(at),  # (wall times back to the owner's clock)
            [send[2] for send, _ in sends] + list(nodes), [send[3] for send, _ in sends] + list(workers))
        joined = (size, sub, sent, ended, failed, waiting, wall, *batch[7:])
        return joined, (self.ids + ids[0], [task_id for _, task_id in sends] + ids[1], ids[2])


class TaskHistory:
    def __init__(self, max_tasks: int = HISTORY_TASKS, fast_min: int = FAST_MIN):
        if max_tasks < 1:
            raise ValueError(f"the task history must hold at least 1 task, got {max_tasks}")
        self.max_tasks = max_tasks
        self.fast_min = fast_min
        self.records: dict[bytes, TaskEntry] = {}   # insertion order: oldest first
        self.segments: deque = deque()              # oldest first
        self.in_segments = 0        # tasks kept in segments (not gone)
        self.carries: dict[tuple, Carry] = {}  # (job, pid) of an owner -> its carry
        self.carried = 0            # tasks in carries
        self.batches = 0
        self.ended_order: deque = deque()           # record ids and segments in the order they ended (ids may be stale)
        self.counts: dict[tuple, dict] = {}         # (name, shape) -> {state: n}
        self.dropped = 0            # events owners dropped (their buffer was full)
        self.forgotten = 0          # tasks evicted from the history (records, and segments whole)
        self.forgotten_live = 0     # ... of them, still pending or running
        self.bad_events = 0         # events that did not decode (a peer's garbage)
        self._shapes: dict = {}     # shape tuple -> its text (few distinct shapes)
        self.waiting: dict[bytes, TaskEntry] = {}  # pending tasks no node can run now (they have a reason)

    # --- input ---
    def add_batch(self, batch) -> None:
        """Fold in one owner's batch (a task_events.Batch as it came off the wire).  A batch that
        is not one raises ValueError; updates in it that do not decode are counted and skipped."""
        if not isinstance(batch, (list, tuple)) or len(batch) != len(ev.Batch._fields):
            raise ValueError(f"a task events batch must have {len(ev.Batch._fields)} fields")
        dropped, job_id, pid = batch[7:]
        if isinstance(dropped, int) and dropped > 0:
            self.dropped += dropped
        self.batches += 1
        carry = self.carries.pop((job_id, pid), None)
        if carry is not None:
            self._uncount(carry)
        try:
            ids = ev.split_ids(batch)
            if carry is not None:
                batch, ids = carry.joined_with(batch, ids)
            sets = (set(ids[0]), set(ids[1]), set(ids[2]))  # (built once: every step below selects with them)
            kept = self._keep_as_columns(batch, ids, sets, job_id, pid)
            if len(kept) == len(ids[0]) == len(ids[1]) == len(ids[2]) and not batch[4] and not batch[5]:
                updates = []  # (all of it kept as columns: the common case under load)
            else:
                carried = len(carry) if carry is not None else 0
                if len(ids[0]) - carried >= self.fast_min:
                    kept = kept | self._carry(batch, ids, sets, kept, carried, job_id, pid)
                if kept:  # the few left: the batch cut down to their events (C-level), then merged
                    rest = sets[0] - kept
                    rest |= sets[1] - kept
                    rest |= sets[2] - kept
                    batch, ids = _only(batch, ids, rest)
                updates = ev.updates_of(batch, frozenset(), ids)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            self.bad_events += 1  # (a whole batch of garbage: one bad event)
            if carry is not None:
                self._fold_carry(carry)
            return
        for raw in updates:
            try:
                update = ev.decode(raw)
            except ValueError:
                self.bad_events += 1
                continue
            self._apply(update, job_id, pid)
        self._trim()

    def _keep_as_columns(self, batch, split: tuple, sets: tuple, job_id, pid) -> set | frozenset:
        """Keep the tasks submitted, sent once and ended once in ``batch`` (and heard of
        nowhere else) as a Segment, counted; returns their ids (updates_of skips them).
        ``split``: ev.split_ids(batch); ``sets``: a set of each of its three columns."""
        _, submitted, _, ended, failed, waiting = batch[:6]
        joined, created, names, shapes, actors = submitted
        ids, sent_ids, end_ids = split
        if len(ids) < self.fast_min:
            return frozenset()
        fast = set(sets[0])
        if len(fast) != len(ids) or not (len(names) == len(shapes) == len(actors) == len(ids)) \
                or not (len(ended[0]) == len(ended[2]) == len(ended[3]) == len(ended[4]) == len(ended[5])
                        == len(ended[6])):
            return frozenset()  # (not what an owner sends: the slow path says what is wrong)
        for column, present in ((end_ids, sets[2]), (sent_ids, sets[1])):
            fast &= present
            if len(present) != len(column):  # ran twice in the batch (a retry): not a plain life
                fast -= {t for t, n in Counter(column).items() if n > 1}
        for _, task_id, _, _ in failed:
            fast.discard(task_id)
        for _, task_ids, _ in waiting:
            fast.difference_update(task_ids)
        fast -= self.records.keys() & fast
        if len(fast) < self.fast_min:
            return frozenset()
        if len(fast) == len(ids):
            sub = (ids, created, names, shapes, actors)
        else:
            mask = list(map(fast.__contains__, ids))
            sub = (list(compress(ids, mask)), list(compress(created, mask)), list(compress(names, mask)),
                   list(compress(shapes, mask)), list(compress(actors, mask)))
        _, _, started, ended_at, results, nodes, workers = ended
        if len(fast) == len(end_ids):
            end = (end_ids, started, ended_at, results, nodes, workers)
        else:
            mask = list(map(fast.__contains__, end_ids))
            end = (list(compress(end_ids, mask)), list(compress(started, mask)), list(compress(ended_at, mask)),
                   list(compress(results, mask)), list(compress(nodes, mask)), list(compress(workers, mask)))
        seg = Segment(self.batches, job_id, pid, sub, end)
        names, shapes = seg.names, seg.shapes
        seg.shape_texts = self._shape_texts(shapes)
        if len(seg.shape_texts) == 1 and names.count(names[0]) == len(names):
            groups = {(names[0], id(shapes[0])): len(names)}  # (one function: the usual batch)
        else:
            groups = Counter(zip(names, map(id, shapes)))
        for (name, key), n in groups.items():
            self._group(name, seg.shape_texts[key])[FINISHED] += n
        if seg.results.count(True) != len(seg.results):
            for j in [j for j, result in enumerate(seg.results) if result is not True]:
                entry = seg.entry(seg.end_ids[j])
                group = self._group(entry.name, entry.shape)
                group[FINISHED] -= 1
                group[FAILED] += 1
        self.segments.append(seg)
        self.ended_order.append(seg)
        self.in_segments += len(seg)
        return fast

    def _carry(self, batch, split: tuple, sets: tuple, kept: set, carried: int, job_id, pid) -> set:
        """Carry the tasks submitted in ``batch`` (past its first ``carried``: those were
        carried already) that did not end in it and have nothing else to say; returns their ids.
        (C-level selection throughout: a batch holds up to task_events.BATCH_EVENTS tasks.)"""
        _, submitted, sent, _, failed, waiting, wall = batch[:7]
        _, created, names, shapes, actors = submitted
        ids, sent_ids, end_ids = split
        candidates = sets[0] - kept
        candidates.difference_update(ids[:carried])
        candidates -= sets[2]
        for _, task_id, _, _ in failed:
            candidates.discard(task_id)
        for _, task_ids, _ in waiting:
            candidates.difference_update(task_ids)
        candidates -= self.records.keys() & candidates
        if not candidates or len(self) + len(candidates) > 2 * self.max_tasks:
            return set()  # (carried tasks are live: past twice the limit, records, which may go)
        sends: dict = {}
        positions = list(compress(range(len(sent_ids)), map(candidates.__contains__, sent_ids)))
        if positions:
            seqs, _, counts, at, nodes, workers = sent
            ends = list(accumulate(counts))  # (the send a position belongs to: bisect)
            twice = set()
            for p in positions:
                task_id = sent_ids[p]
                if task_id in sends:  # sent twice and not ended (its worker retired): a record
                    twice.add(task_id)
                    continue
                g = bisect_right(ends, p)
                sends[task_id] = (seqs[g], at[g] + wall, nodes[g], workers[g])
            if twice:
                candidates -= twice
                if not candidates:
                    return candidates
        carry = Carry(self.batches, job_id, pid)
        mask = list(map(candidates.__contains__, ids[carried:]))
        carry.ids = list(compress(ids[carried:], mask))
        carry.created = list(compress(created[carried:], mask))
        carry.names = list(compress(names[carried:], mask))
        carry.shapes = list(compress(shapes[carried:], mask))
        carry.actors = list(compress(actors[carried:], mask))
        carry.sends = [sends.get(task_id) for task_id in carry.ids] if sends else [None] * len(carry.ids)
        carry.states = [PENDING if send is None else RUNNING for send in carry.sends]
        carry.shape_texts = self._shape_texts(carry.shapes)
        self._count_carry(carry, +1)
        self.carries[(job_id, pid)] = carry
        self.carried += len(carry)
        return candidates

    def _count_carry(self, carry: Carry, delta: int) -> None:
        texts = carry.shape_texts
        for (name, key, state), n in Counter(zip(carry.names, map(id, carry.shapes), carry.states)).items():
            self._group(name, texts[key])[state] += delta * n

    def _uncount(self, carry: Carry) -> None:
        """(its tasks are folded again, with the owner's next batch)"""
        self._count_carry(carry, -1)
        self.carried -= len(carry)

    def _fold_carry(self, carry: Carry) -> None:
        """Its tasks become records (uncounted already)."""
        for i in range(len(carry)):
            entry = self.records[carry.ids[i]] = carry.entry(i)
            self._count(entry, +1)

    def _kept(self, task_id: bytes) -> Segment | None:
        """The segment keeping ``task_id``, if one does (newest first)."""
        for seg in reversed(self.segments):
            if seg.holds(task_id):
                return seg
        return None

    def _group(self, name: str, shape: str) -> dict:
        group = self.counts.get((name, shape))
        if group is None:
            group = self.counts[(name, shape)] = dict.fromkeys(STATES, 0)
        return group

    def _apply(self, u, job_id, pid) -> None:
        entry = self.records.get(u.task_id)
        if entry is None:
            seg = self._kept(u.task_id)
            if seg is not None:  # kept in a segment, and now it runs again: a record from here on
                entry = self.records[u.task_id] = seg.entry(u.task_id)
                seg.gone.add(u.task_id)
                self.in_segments -= 1
                self.ended_order.append(u.task_id)  # (ended: the segment was its place there)
        if entry is None:
            entry = self.records[u.task_id] = TaskEntry(u.task_id, job_id, pid)
            entry.batch = self.batches
            self._count(entry, +1)
        if u.name is not None:  # its first update: what it is
            self._count(entry, -1)
            entry.name = str(u.name)
            entry.shape = self._shape_text(u.shape)
            entry.actor_id = u.actor_id
            entry.submitted = u.submitted
            self._count(entry, +1)
        if u.started is not None:
            entry.started = u.started
            entry.node_id, entry.worker_id = u.node_id, u.worker_id
        entry.runs += u.runs
        if u.state is not None:
            self._set_state(entry, u.state)
            if u.state not in LIVE:
                self.ended_order.append(entry.task_id)
        if entry.state in LIVE:
            entry.ended = None  # (running again after a failed run)
            entry.reason = str(u.reason) if u.reason is not None and entry.state == PENDING else (
                entry.reason if entry.state == PENDING else None)
        else:
            entry.reason = None
            if u.ended is not None:
                entry.ended = u.ended
            if u.error_type is not None:
                entry.error_type = u.error_type
        if entry.reason is not None:
            self.waiting[entry.task_id] = entry
        else:
            self.waiting.pop(entry.task_id, None)

    def _shape_texts(self, shapes: list) -> dict:
        """id(shape) -> its text, for each distinct shape dict of a column: once per dict (an
        owner sends the same few again and again; the column holds them, so their ids stay
        theirs)."""
        ids = list(map(id, shapes))
        return {key: self._shape_text(shapes[ids.index(key)]) for key in set(ids)}

    def _shape_text(self, shape) -> str:
        try:
            key = tuple(sorted(shape.items()))
        except (AttributeError, TypeError):
            return "{}"
        text = self._shapes.get(key)
        if text is None:
            text = scheduling.describe(dict(key)) if len(self._shapes) < 10_000 else "{...}"
            self._shapes[key] = text
        return text

    def _count(self, entry: TaskEntry, delta: int) -> None:
        self._group(entry.name, entry.shape)[entry.state] += delta

    def _set_state(self, entry: TaskEntry, state: str) -> None:
        if entry.state != state:
            self._count(entry, -1)
            entry.state = state
            self._count(entry, +1)

    def __len__(self) -> int:
        """Tasks kept (records, segments and carries)."""
        return len(self.records) + self.in_segments + self.carried

    def _trim(self) -> None:
        records = self.records
        while len(self) > self.max_tasks and self.ended_order:
            oldest = self.ended_order[0]
            if isinstance(oldest, Segment):  # whole, while at least max_tasks remain
                if len(self) - len(oldest) < self.max_tasks:
                    break
                self.ended_order.popleft()
                self._forget_segment(oldest)
                continue
            self.ended_order.popleft()
            entry = records.get(oldest)
            if entry is not None and entry.state not in LIVE:
                del records[entry.task_id]
                self.waiting.pop(entry.task_id, None)
                self.forgotten += 1
        while len(records) > 2 * self.max_tasks:  # all live: the oldest go (their counts stay)
            entry = records.pop(next(iter(records)))
            self.waiting.pop(entry.task_id, None)
            self._count(entry, -1)  # (a later event of it makes a new record)
            self.forgotten += 1
            self.forgotten_live += 1
        if len(self.ended_order) > 4 * self.max_tasks:  # stale ids of tasks that ran again
            self.ended_order = deque(t for t in self.ended_order if isinstance(t, Segment)
                                     or t in records and records[t].state not in LIVE)

    def _forget_segment(self, seg: Segment) -> None:
        self.segments.remove(seg)  # (the oldest, or nearly)
        self.forgotten += len(seg)
        self.in_segments -= len(seg)
        seg.gone.update(seg.ids)

    def job_ended(self, job_id, why: str) -> int:
        """The job's owner left: its tasks still pending or running will not end (returns how many)."""
        for owner in [owner for owner in self.carries if owner[0] == job_id]:
            carry = self.carries.pop(owner)
            self._uncount(carry)
            self._fold_carry(carry)
        n = 0
        for entry in self.records.values():
            if entry.job_id == job_id and entry.state in LIVE:
                self._set_state(entry, FAILED)
                entry.error_type = "JobEnded"
                entry.reason = None
                self.waiting.pop(entry.task_id, None)
                self.ended_order.append(entry.task_id)
                n += 1
        return n

    # --- answers ---
    def summary(self) -> dict:
        """Counts by function and shape (every task heard of), and the tasks waiting for a node."""
        groups = []
        for (name, shape), counts in self.counts.items():
            if any(counts.values()):
                groups.append({"name": name, "shape": shape, **counts})
        groups.sort(key=lambda g: (-(g[PENDING] + g[RUNNING]), g["name"], g["shape"]))
        totals = dict.fromkeys(STATES, 0)
        for g in groups:
            for s in STATES:
                totals[s] += g[s]
        waiting: dict = {}
        for entry in self.waiting.values():
            if entry.reason is not None and entry.state == PENDING:
                w = waiting.setdefault((entry.name, entry.shape, entry.reason),
                                       {"name": entry.name, "shape": entry.shape, "reason": entry.reason, "tasks": 0})
                w["tasks"] += 1
        return {"groups": groups, "totals": totals, "infeasible": sorted(waiting.values(), key=lambda w: (-w["tasks"], w["name"], w["shape"], w["reason"])),
                "events_dropped": self.dropped, "forgotten": self.forgotten, "kept": len(self),
                "history_limit": self.max_tasks}

    def tasks(self, state: str | None = None, node: str | None = None, limit: int | None = 100,
              name: str | None = None, job=None) -> list[dict]:
        """The newest tasks first, filtered (``node``: a prefix of its node id)."""
        out = []
        for entry in self._newest_first():
            if state is not None and entry.state != state:
                continue
            if node is not None and not (entry.node_id or "").startswith(node):
                continue
            if name is not None and entry.name != name:
                continue
            if job is not None and entry.job_id != job:
                continue
            out.append(entry.as_dict())
            if limit is not None and len(out) >= limit:
                break
        return out

    def _newest_first(self):
        """Every task kept, as a TaskEntry, the newest batch first (records before the
        segment of their batch)."""
        for carry in sorted(self.carries.values(), key=lambda c: -c.batch):  # the newest, all live
            yield from carry.entries()
        records = reversed(self.records.values())
        record = next(records, None)
        for seg in reversed(self.segments):
            while record is not None and record.batch >= seg.batch:
                yield record
                record = next(records, None)
            yield from seg.entries()
        while record is not None:
            yield record
            record = next(records, None)

    def tasks_per_second(self, now: float, window_s: float = 60.0) -> list[int]:
        """Tasks ended in each of the last ``window_s`` seconds (oldest first)."""
        bins = [0] * int(window_s)
        start = now - window_s

        def add(ended: float) -> None:
            i = int(ended - start)
            if 0 <= i < len(bins):
                bins[i] += 1
        seen = set()
        for item in reversed(self.ended_order):
            if isinstance(item, Segment):
                if item.ended_max < start:
                    break
                for task_id, ended in zip(item.end_ids, item.ended):
                    if ended >= start and task_id not in item.gone:
                        add(ended)
                continue
            entry = self.records.get(item)
            if entry is None or entry.ended is None or item in seen:
                continue
            if entry.ended < start:
                break
            seen.add(item)  # (a task that ran again is in ended_order twice)
            add(entry.ended)
        return bins

    def timeline(self, limit: int | None = None, copies=()) -> list[dict]:
        """Chrome-trace events of the tasks kept: a process per node, a lane (thread) per worker,
        a complete ("X") event per run, and the time each waited between submit and start; and
        of ``copies`` (copy_events.CopyRecord) on lanes of their own (see _copy_events)."""
        lanes: dict = {}      # (node, worker) -> tid
        nodes: dict = {}      # node -> pid
        out = []
        entries = [e for e in self._newest_first() if e.started is not None and e.node_id is not None]
        entries.sort(key=lambda e: e.started)
        if limit is not None:
            entries = entries[-limit:]
        for e in entries:
            pid = nodes.setdefault(e.node_id, len(nodes) + 1)
            tid = lanes.setdefault((e.node_id, e.worker_id), len(lanes) + 1)
            end = e.ended if e.ended is not None else None
            args = {"task_id": e.task_id.hex(), "state": e.state, "shape": e.shape, "job": e.job_id}
            if e.submitted is not None:
                args["waited_ms"] = round(max(0.0, e.started - e.submitted) * 1e3, 3)
            if e.error_type:
                args["error"] = e.error_type
            if e.actor_id:
                args["actor_id"] = e.actor_id
            event = {"name": e.name, "cat": "task" if e.state != FAILED else "task,error",
                     "ph": "X" if end is not None else "B", "ts": e.started * 1e6, "pid": pid, "tid": tid,
                     "args": args}
            if end is not None:
                event["dur"] = max(0.0, end - e.started) * 1e6
            out.append(event)
            if e.submitted is not None and e.submitted < e.started:
                out.append({"name": "submitted " + e.name, "cat": "submit", "ph": "i", "s": "t",
                            "ts": e.submitted * 1e6, "pid": pid, "tid": tid, "args": {"task_id": e.task_id.hex()}})
        copy_lanes: dict = {}  # (node, n) -> tid
        out += _copy_events(copies, nodes, lanes, copy_lanes)
        meta = [{"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "args": {"name": f"node {node[:8]}"}}
                for node, pid in nodes.items()]
        meta += [{"name": "thread_name", "ph": "M", "ts": 0, "pid": nodes[node], "tid": tid,
                  "args": {"name": f"worker {worker}"}} for (node, worker), tid in lanes.items()]
        meta += [{"name": "thread_name", "ph": "M", "ts": 0, "pid": nodes[node], "tid": tid,
                  "args": {"name": "object copies" + (f" {n + 1}" if n else "")}}
                 for (node, n), tid in copy_lanes.items()]
        return meta + out

    def validate_state(self) -> None:
        assert len(self.records) <= 2 * self.max_tasks
        assert self.in_segments == sum(len(seg) for seg in self.segments)
        for seg in self.segments:
            assert seg in self.ended_order
            for task_id in seg.ids:
                assert (self._kept(task_id) is seg) == (task_id not in seg.gone), task_id
                assert task_id not in self.records or task_id in seg.gone, task_id
        live = dict.fromkeys(STATES, 0)
        for entry in self.records.values():
            assert entry.state in STATES, entry.state
            live[entry.state] += 1
        assert self.carried == sum(len(c) for c in self.carries.values())
        for carry in self.carries.values():
            for state in carry.states:
                live[state] += 1
            for task_id in carry.ids:
                assert task_id not in self.records and self._kept(task_id) is None, task_id
        for state in LIVE:  # live tasks are counted exactly once (ended ones also after they are forgotten)
            counted = sum(g[state] for g in self.counts.values())
            assert counted == live[state], (state, counted, live[state])
        for group in self.counts.values():
            assert all(v >= 0 for v in group.values()), group
        for task_id, entry in self.waiting.items():
            assert self.records.get(task_id) is entry and entry.state == PENDING and entry.reason, entry.as_dict()


COPY_LANES_MAX = 8  # lanes for one node's overlapping copies; past it, copies share the last


def _copy_events(copies, nodes: dict, lanes: dict, copy_lanes: dict) -> list[dict]:
    """Each copy as a bar on its reader's node ("copy in": from which nodes, how many bytes)
    and one on each node that sent part of it ("copy out"), in that node's "object copies"
    lanes.  Bars that overlap in time go to further lanes of the node ("object copies 2",
    ...): a Chrome-trace lane shows nested bars only.  Fills ``nodes`` (node -> pid) and
    ``copy_lanes`` ((node, n) -> tid); tids follow those of ``lanes``."""
    bars = []  # (node, start, end, event without pid/tid)
    for c in sorted(copies, key=lambda c: c.started):
        object_id = c.object_id.hex()
        ended = max(c.ended, c.started)
        sent_by = {node: n for node, n in c.sources}
        args = {"object_id": object_id, "bytes": c.size, "what": c.what, "to": c.to_node,
                "from": {node: n for node, n in c.sources if n}}
        if c.error is None:
            args["MB/s"] = round(c.size / max(1e-6, ended - c.started) / 1e6, 1)
        else:
            args["error"] = c.error
        cat = "copy" if c.error is None else "copy,error"
        senders = ", ".join(node[:8] for node, n in sent_by.items() if n) or "-"
        bars.append((c.to_node, c.started, ended, {"name": f"copy in from {senders}: {c.what}", "cat": cat,
                                                   "args": args}))
        for node, n in sent_by.items():
            if n:
                bars.append((node, c.started, ended, {
                    "name": f"copy out to {c.to_node[:8]}: {c.what}", "cat": cat,
                    "args": {"object_id": object_id, "bytes": n, "of": c.size, "what": c.what, "to": c.to_node}}))
    busy_until: dict = {}  # node -> [end of its lanes' last bar]
    out = []
    for node, start, end, event in sorted(bars, key=lambda b: b[1]):
        pid = nodes.setdefault(node, len(nodes) + 1)
        ends = busy_until.setdefault(node, [])
        n = next((i for i, e in enumerate(ends) if e <= start), None)
        if n is None:
            n = len(ends) if len(ends) < COPY_LANES_MAX else COPY_LANES_MAX - 1
            if n == len(ends):
                ends.append(end)
        ends[n] = max(ends[n], end)
        tid = copy_lanes.get((node, n))
        if tid is None:
            tid = copy_lanes[(node, n)] = len(lanes) + len(copy_lanes) + 1
        event.update(ph="X", ts=start * 1e6, dur=(end - start) * 1e6, pid=pid, tid=tid)
        out.append(event)
    return out
