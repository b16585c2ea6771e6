"""The head's bounded history of every owner's tasks, fed by their TaskEvents batches.

Owned by the head (its one thread); pure: batches in, answers out, no sockets or
clocks.  Owners record events off the task path (task_events.py) and send them in
batches; the head folds each batch into one record per task::

    owners --TaskEvents(batch)--> TaskHistory.add_batch --> records (newest HISTORY_TASKS)
                                                       \\-> counts per (function, shape, state)
    status / list / timeline / dashboard <-- summary(), tasks(), timeline()

The counts cover every task the head ever heard of; the records only the newest
``HISTORY_TASKS`` (tasks that ended go first; live ones only past twice that).
"""

from __future__ import annotations

import os
from collections import deque

from farpool._private import scheduling
from farpool._private import task_events as ev

# Task records the head keeps (about 300 bytes each): more shows a longer past in
# `farpool list tasks` and the timeline, fewer bounds the head's memory.  Ended tasks
# are forgotten first; tasks still pending or running only beyond twice this.
HISTORY_TASKS = int(os.environ.get("FARPOOL_TASK_HISTORY", "100000"))

PENDING, RUNNING, FINISHED, FAILED = ev.STATES
STATES = ev.STATES
LIVE = (PENDING, RUNNING)


class TaskEntry:
    """What the head knows of one task."""
    __slots__ = ("task_id", "job_id", "owner_pid", "name", "shape", "actor_id", "state", "submitted",
                 "started", "ended", "node_id", "worker_id", "error_type", "reason", "runs")

    def __init__(self, task_id: bytes, job_id, owner_pid: int):
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


class TaskHistory:
    def __init__(self, max_tasks: int = HISTORY_TASKS):
        if max_tasks < 1:
            raise ValueError(f"the task history must hold at least 1 task, got {max_tasks}")
        self.max_tasks = max_tasks
        self.records: dict[bytes, TaskEntry] = {}   # insertion order: oldest first
        self.ended_order: deque = deque()           # task ids in the order they ended (may be stale)
        self.counts: dict[tuple, dict] = {}         # (name, shape) -> {state: n}
        self.dropped = 0            # events owners dropped (their buffer was full)
        self.forgotten = 0          # records evicted from the history
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
        try:
            updates = ev.updates_of(batch)
        except (ValueError, TypeError, IndexError, KeyError):
            self.bad_events += 1  # (a whole batch of garbage: one bad event)
            return
        for raw in updates:
            try:
                update = ev.decode(raw)
            except ValueError:
                self.bad_events += 1
                continue
            self._apply(update, job_id, pid)
        self._trim()

    def _apply(self, u, job_id, pid) -> None:
        entry = self.records.get(u.task_id)
        if entry is None:
            entry = self.records[u.task_id] = TaskEntry(u.task_id, job_id, pid)
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
        group = self.counts.get((entry.name, entry.shape))
        if group is None:
            group = self.counts[(entry.name, entry.shape)] = dict.fromkeys(STATES, 0)
        group[entry.state] += delta

    def _set_state(self, entry: TaskEntry, state: str) -> None:
        if entry.state != state:
            self._count(entry, -1)
            entry.state = state
            self._count(entry, +1)

    def _trim(self) -> None:
        records = self.records
        while len(records) > self.max_tasks and self.ended_order:
            entry = records.get(self.ended_order.popleft())
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
            self.ended_order = deque(t for t in self.ended_order
                                     if t in records and records[t].state not in LIVE)

    def job_ended(self, job_id, why: str) -> int:
        """The job's owner left: its tasks still pending or running will not end (returns how many)."""
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
        groups.sort(key=lambda g: (-(g[PENDING] + g[RUNNING]), g["name"]))
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
        return {"groups": groups, "totals": totals, "infeasible": list(waiting.values()),
                "events_dropped": self.dropped, "forgotten": self.forgotten, "kept": len(self.records),
                "history_limit": self.max_tasks}

    def tasks(self, state: str | None = None, node: str | None = None, limit: int | None = 100,
              name: str | None = None, job=None) -> list[dict]:
        """The newest tasks first, filtered (``node``: a prefix of its node id)."""
        out = []
        for entry in reversed(self.records.values()):
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

    def tasks_per_second(self, now: float, window_s: float = 60.0) -> list[int]:
        """Tasks ended in each of the last ``window_s`` seconds (oldest first)."""
        bins = [0] * int(window_s)
        start = now - window_s
        for task_id in reversed(self.ended_order):
            entry = self.records.get(task_id)
            if entry is None or entry.ended is None:
                continue
            if entry.ended < start:
                break
            i = int(entry.ended - start)
            if 0 <= i < len(bins):
                bins[i] += 1
        return bins

    def timeline(self, limit: int | None = None, copies=()) -> list[dict]:
        """Chrome-trace events of the tasks kept: a process per node, a lane (thread) per worker,
        a complete ("X") event per run, and the time each waited between submit and start; and
        of ``copies`` (copy_events.CopyRecord) on lanes of their own (see _copy_events)."""
        lanes: dict = {}      # (node, worker) -> tid
        nodes: dict = {}      # node -> pid
        out = []
        entries = [e for e in self.records.values() if e.started is not None and e.node_id is not None]
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
        live = dict.fromkeys(STATES, 0)
        for entry in self.records.values():
            assert entry.state in STATES, entry.state
            live[entry.state] += 1
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
