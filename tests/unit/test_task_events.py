"""Task events: the owner's bounded buffer (task_events.py) and the head's history (task_history.py)."""

import pickle
import time
from types import SimpleNamespace

import pytest

from farpool._private import task_events as ev
from farpool._private.protocol import TaskFailure
from farpool._private.task_history import FAILED, FINISHED, PENDING, RUNNING, TaskHistory


class Task:
    def __init__(self, n, name="f", shape=None, actor_id=None):
        self.task_id = n.to_bytes(16, "little")
        self.name = name
        self.shape = shape if shape is not None else {"CPU": 10_000}
        self.actor_id = actor_id


def lease(node, worker):
    return SimpleNamespace(node_id=node, worker_id=worker)


def start(buf, task, node, worker):
    """What the client does as it sends ``task`` to a worker (one batch of one)."""
    buf.sent([task], lease(node, worker), time.perf_counter())


def ran(buf, task, ok, started, ended, node, worker, error_type=None):
    buf.ran(task, lease(node, worker), started, ended, True if ok else error_type)


def _updates(batch):
    """What the head makes of a batch (after a trip through pickle, as on the wire)."""
    return [ev.decode(u) for u in ev.updates_of(pickle.loads(pickle.dumps(tuple(batch), protocol=5)))]


def test_a_tasks_events_in_one_batch_become_one_update():
    buf = ev.TaskEventBuffer(capacity=100, batch=100)
    a, b = Task(1, "train"), Task(2)
    buf.submitted(a)
    start(buf, a, "n1", "w1")
    buf.submitted(b)
    ran(buf, a, True, 1.0, 2.0, "n1", "w1")
    batch = buf.take(job_id=7, pid=42)
    assert batch.job_id == 7 and batch.pid == 42 and batch.dropped == 0
    first, second = _updates(batch)
    assert (first.name, first.state, first.started, first.ended, first.node_id, first.runs) == (
        "train", FINISHED, 1.0, 2.0, "n1", 1)
    assert second.state == PENDING and second.started is None
    assert buf.take() is None
    buf.validate_state()


def test_a_tasks_events_over_two_batches_say_what_is_new_in_each():
    buf = ev.TaskEventBuffer(capacity=100, batch=3)
    t = Task(1)
    buf.submitted(t)
    start(buf, t, "n", "w")
    buf.submitted(Task(2))
    (running, pending) = _updates(buf.take())
    assert (running.state, running.runs, pending.state) == (RUNNING, 1, PENDING)
    ran(buf, t, False, 1.0, 2.0, "n", "w", "ValueError")
    (later,) = _updates(buf.take())
    assert later.name is None and later.state == FAILED and later.error_type == "ValueError" and later.runs == 0


def test_a_failed_run_and_its_retry_in_one_batch_leave_the_task_running_then_finished():
    buf = ev.TaskEventBuffer()
    t = Task(1)
    buf.submitted(t)
    start(buf, t, "n", "w1")
    ran(buf, t, False, 1.0, 2.0, "n", "w1", "OSError")
    start(buf, t, "n", "w2")  # retried: recorded after the failed run, so it wins
    (u,) = _updates(buf.take())
    assert (u.state, u.worker_id, u.runs, u.ended, u.error_type) == (RUNNING, "w2", 2, None, None)
    ran(buf, t, True, 3.0, 4.0, "n", "w2")
    (u,) = _updates(buf.take())
    assert (u.state, u.worker_id, u.started, u.ended) == (FINISHED, "w2", 3.0, 4.0)


def test_a_full_buffer_drops_and_counts_and_says_so_in_the_next_batch():
    buf = ev.TaskEventBuffer(capacity=2, batch=10)
    for i in range(5):
        buf.submitted(Task(i))
    assert len(buf) == 2 and buf.dropped == 3
    batch = buf.take()
    assert len(_updates(batch)) == 2 and batch.dropped == 3
    assert buf.dropped == 0 and buf.dropped_total == 3
    assert buf.take() is None
    buf.validate_state()


def test_a_filled_batch_signals_once_until_taken():
    calls = []
    buf = ev.TaskEventBuffer(capacity=100, batch=2)
    buf.on_batch_ready = lambda: calls.append(1)
    for i in range(5):
        buf.submitted(Task(i))
    assert calls == [1]
    while buf.take() is not None:
        pass
    for i in range(3):
        buf.submitted(Task(10 + i))
    assert calls == [1, 1]


def test_recording_off_records_nothing():
    buf = ev.TaskEventBuffer(enabled=False)
    buf.submitted(Task(1))
    start(buf, Task(1), "n", "w")
    ran(buf, Task(1), True, 1.0, 2.0, "n", "w")
    buf.failed(Task(1), ValueError("x"))
    assert len(buf) == 0 and buf.take() is None


def test_failures_carry_the_error_type():
    t = Task(1)
    for record, expected in [
            (lambda b: ran(b, t, False, 1.0, 2.0, "n", "w", "ZeroDivisionError"), "ZeroDivisionError"),
            (lambda b: b.failed(t, ("task", b"", "KeyError", "tb", "f", "where")), "KeyError"),
            (lambda b: b.failed(t, TaskFailure(b"", "IndexError", "tb", "f", "where")), "IndexError"),
            (lambda b: b.failed(t, TimeoutError("no")), "TimeoutError")]:
        buf = ev.TaskEventBuffer()
        record(buf)
        (u,) = _updates(buf.take())
        assert (u.state, u.error_type) == (FAILED, expected)


def test_decode_refuses_garbage():
    good = (b"t" * 16, None, None, None, None, FINISHED, None, None, None, None, None, None, 0)
    assert ev.decode(good).state == FINISHED
    for bad in [(), ("S",), "S", None, good[:-1], ("x",) + good[1:], good[:5] + ("WEIRD",) + good[6:],
                good[:-1] + ("1",)]:
        with pytest.raises(ValueError):
            ev.decode(bad)


def test_updates_of_refuses_a_batch_whose_columns_do_not_match():
    buf = ev.TaskEventBuffer()
    buf.submitted(Task(1))
    ran(buf, Task(1), True, 1.0, 2.0, "n", "w")
    batch = tuple(buf.take())
    ids, created, names, shapes, actors = batch[1]
    for bad in [(ids[:-1], created, names, shapes, actors), (ids, created, names[:0], shapes, actors)]:
        with pytest.raises(ValueError):
            ev.updates_of((batch[0], bad) + batch[2:])
    seqs, joined, started, ended, results, nodes, workers = batch[3]
    with pytest.raises(ValueError):
        ev.updates_of(batch[:3] + ((seqs, joined, started, ended, results, nodes, workers[:0]),) + batch[4:])


class FakeLoop:
    def __init__(self):
        self.timers = []
        self.soon = []

    def call_later(self, delay, fn, *args):
        entry = [delay, fn, args]
        self.timers.append(entry)
        return entry

    def cancel_timer(self, entry):
        self.timers.remove(entry)

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))


def test_the_reporter_flushes_on_its_timer_at_a_full_batch_and_at_stop():
    loop, sent = FakeLoop(), []
    buf = ev.TaskEventBuffer(capacity=100, batch=2)
    rep = ev.Reporter(buf, loop, sent.append, job_id=3, interval_s=1.0)
    rep.start()
    assert len(loop.timers) == 1
    buf.submitted(Task(1))
    _, tick, _ = loop.timers.pop()
    tick()
    assert len(sent) == 1 and sent[0].job_id == 3 and len(loop.timers) == 1  # rearmed
    for i in range(3):
        buf.submitted(Task(2 + i))  # past a full batch: the I/O thread is woken once
    assert len(loop.soon) == 1
    fn, args = loop.soon.pop()
    fn(*args)
    assert len(sent) == 2 and len(_updates(sent[1])) == 3  # (a take sends everything recorded)
    buf.submitted(Task(9))
    rep.stop()
    assert len(sent) == 3 and loop.timers == []


def _feed(history, record, job=1):
    """Events recorded on an owner's buffer, taken as a batch, folded into ``history``."""
    buf = ev.TaskEventBuffer()
    record(buf)
    history.add_batch(pickle.loads(pickle.dumps(tuple(buf.take(job_id=job, pid=10)), protocol=5)))


@pytest.fixture(params=[1, 10 ** 9], ids=["columns", "records"])
def make_history(request):
    """A TaskHistory that keeps every task born and ended in one batch as columns (a Segment:
    fast_min=1), or none (every task a record): the answers must be the same."""
    def make(**kw):
        return TaskHistory(fast_min=request.param, **kw)
    return make


def test_the_history_follows_a_task_through_its_states_and_counts_by_function_and_shape(make_history):
    h = make_history(max_tasks=10)
    a, b = Task(1, "train", {"CPU": 20_000}), Task(2, "train", {"CPU": 20_000})
    _feed(h, lambda buf: (buf.submitted(a), buf.submitted(b)))
    assert h.summary()["totals"][PENDING] == 2
    _feed(h, lambda buf: start(buf, a, "node1", "w1"))
    assert h.tasks(state=RUNNING)[0]["node_id"] == "node1"
    _feed(h, lambda buf: (ran(buf, a, True, 101.5, 103.0, "node1", "w1"), start(buf, b, "node1", "w2"),
                          ran(buf, b, False, 101.2, 102.0, "node1", "w2", "ValueError")))
    groups = h.summary()["groups"]
    assert groups == [{"name": "train", "shape": "{CPU: 2}", PENDING: 0, RUNNING: 0, FINISHED: 1, FAILED: 1}]
    rows = h.tasks()
    assert [r["state"] for r in rows] == [FAILED, FINISHED]  # newest first
    assert rows[0]["error_type"] == "ValueError" and rows[1]["started"] == 101.5 and rows[1]["ended"] == 103.0
    assert h.tasks(state=FAILED, limit=5)[0]["task_id"] == b.task_id.hex()
    assert h.tasks(node="nodeX") == [] and len(h.tasks(node="node")) == 2
    h.validate_state()


def test_a_retried_run_goes_back_to_running_and_a_late_final_failure_keeps_the_run(make_history):
    h = make_history()
    t = Task(1)
    _feed(h, lambda buf: (buf.submitted(t), start(buf, t, "n", "w1"), ran(buf, t, False, 2.1, 3.0, "n", "w1", "OSError")))
    _feed(h, lambda buf: start(buf, t, "n", "w2"))
    row = h.tasks()[0]
    assert row["state"] == RUNNING and row["runs"] == 2 and row["ended"] is None
    _feed(h, lambda buf: (ran(buf, t, False, 4.1, 5.0, "n", "w2", "OSError"), buf.failed(t, OSError("x"))))
    row = h.tasks()[0]
    assert row["state"] == FAILED and row["worker_id"] == "w2" and row["started"] == 4.1
    assert h.summary()["totals"][FAILED] == 1
    h.validate_state()


def test_the_history_is_bounded_and_forgets_ended_tasks_first(make_history):
    h = make_history(max_tasks=5)
    live = [Task(i, "live") for i in range(3)]
    done = [Task(100 + i, "short") for i in range(10)]
    _feed(h, lambda buf: [buf.submitted(t) for t in live])
    _feed(h, lambda buf: [(buf.submitted(t), ran(buf, t, True, 1.5, 2.0, "n", "w")) for t in done])
    assert len(h) == 5
    assert len([r for r in h.tasks(limit=None) if r["name"] == "live"]) == 3
    s = h.summary()
    assert s["totals"][FINISHED] == 10 and s["totals"][PENDING] == 3  # counts cover the forgotten
    assert s["forgotten"] == 8
    _feed(h, lambda buf: [buf.submitted(Task(200 + i, "live")) for i in range(20)])
    assert len(h) <= 10
    h.validate_state()


def test_the_tasks_of_an_ended_job_are_not_left_running(make_history):
    h = make_history()
    f, g = Task(1, "f"), Task(2, "g")
    _feed(h, lambda buf: (buf.submitted(f), start(buf, f, "n", "w")), job=4)
    _feed(h, lambda buf: buf.submitted(g), job=5)
    assert h.job_ended(4, "its driver died") == 1
    assert {r["name"]: r["state"] for r in h.tasks()} == {"f": FAILED, "g": PENDING}
    h.validate_state()


def test_waiting_tasks_are_listed_with_the_reason_until_they_run(make_history):
    h = make_history()
    t = Task(1, "big", {"GPU": 80_000})
    _feed(h, lambda buf: (buf.submitted(t), buf.waiting([t], "no node has 8 GPUs")))
    assert h.summary()["infeasible"] == [{"name": "big", "shape": "{GPU: 8}", "reason": "no node has 8 GPUs",
                                          "tasks": 1}]
    _feed(h, lambda buf: start(buf, t, "n", "w"))
    assert h.summary()["infeasible"] == []


def test_garbage_batches_are_counted_and_skipped(make_history):
    h = make_history()
    h.add_batch((16, ("S", "not bytes"), 7, None, [], [], 0.0, 0, 1, 1))
    h.add_batch((16, (b"x" * 15, [1.0], ["f"], [{}], [None]), ((), b"", (), (), [], []),
                 ((), b"", (), (), [], [], []), [], [], 0.0, 0, 1, 1))  # an id of the wrong size
    assert h.bad_events == 2 and len(h) == 0
    with pytest.raises(ValueError):
        h.add_batch(([],))
    h.validate_state()


def test_the_timeline_has_a_lane_per_worker_and_names_them(make_history):
    h = make_history()
    f, g, never = Task(1, "f"), Task(2, "g"), Task(3, "h")
    _feed(h, lambda buf: (buf.submitted(f), ran(buf, f, True, 2.0, 3.0, "nodeA", "w1"),
                          buf.submitted(g), ran(buf, g, True, 2.5, 3.5, "nodeA", "w2"), buf.submitted(never)))
    events = h.timeline()
    runs = [e for e in events if e["ph"] == "X"]
    assert sorted(e["name"] for e in runs) == ["f", "g"]  # one that never ran is not there
    assert len({e["tid"] for e in runs}) == 2 and len({e["pid"] for e in runs}) == 1
    run_f = next(e for e in runs if e["name"] == "f")
    assert run_f["ts"] == 2.0e6 and run_f["dur"] == 1.0e6 and run_f["args"]["waited_ms"] >= 0
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {"node nodeA", "worker w1", "worker w2"}


def test_columns_and_records_give_the_same_answers_for_any_lives():
    """Random task lives over several batches (born and ended in one, spanning two, retried,
    failed, waiting, run again later as lineage does) fed to a history keeping columns and
    to one keeping records only: the same counts, rows and timeline."""
    import random
    rng = random.Random(7)
    cols, recs = TaskHistory(max_tasks=400, fast_min=3), TaskHistory(max_tasks=400, fast_min=10 ** 9)
    tasks = [Task(i, rng.choice(["f", "g", "h"]), rng.choice([{"CPU": 10_000}, {"GPU": 5_000}])) for i in range(300)]
    now = 100.0
    started, running, ended = [], [], []
    queue = list(tasks)
    for batch in range(12):
        buf = ev.TaskEventBuffer()
        for _ in range(rng.randint(0, 40)):
            if queue:
                t = queue.pop()
                buf.submitted(t)
                started.append(t)
        for t in rng.sample(started, min(len(started), rng.randint(0, 30))):
            started.remove(t)
            start(buf, t, "node1", "w%d" % rng.randint(1, 3))
            running.append(t)
        for t in rng.sample(running, min(len(running), rng.randint(0, 30))):
            running.remove(t)
            now += 0.01
            ok = rng.random() < 0.85
            ran(buf, t, ok, now - 0.005, now, "node1", "w1", None if ok else "KeyError")
            if not ok and rng.random() < 0.5:
                started.append(t)  # retried: sent again later
            else:
                ended.append(t)
        if started and rng.random() < 0.3:
            buf.waiting(started[:2], "no node has a GPU")
        if started and rng.random() < 0.2:
            t = started.pop()
            buf.failed(t, ValueError("cancelled"))
            ended.append(t)
        if ended and rng.random() < 0.3:  # lineage runs a finished task again
            t = ended.pop(0)
            start(buf, t, "node1", "w9")
            running.append(t)
        taken = buf.take(job_id=1, pid=10)
        if taken is None:  # nothing happened in this round
            continue
        wire = pickle.dumps(tuple(taken), protocol=5)
        for h in (cols, recs):
            h.add_batch(pickle.loads(wire))
            h.validate_state()
    assert cols.segments, "no batch was kept as columns: the test does not test them"
    assert cols.summary() == recs.summary()
    by_id = lambda rows: sorted(rows, key=lambda r: r["task_id"])  # noqa: E731
    assert by_id(cols.tasks(limit=None)) == by_id(recs.tasks(limit=None))
    assert cols.tasks_per_second(now + 1, 60) == recs.tasks_per_second(now + 1, 60)
    key = lambda e: (e["ph"], e["ts"], e["name"], str(e.get("args")))  # noqa: E731
    assert sorted(cols.timeline(), key=key) == sorted(recs.timeline(), key=key)


def test_a_task_kept_as_columns_that_runs_again_becomes_a_record():
    h = TaskHistory(fast_min=2)
    a, b = Task(1, "f"), Task(2, "f")
    _feed(h, lambda buf: [(buf.submitted(t), start(buf, t, "n", "w"), ran(buf, t, True, 1.0, 2.0, "n", "w"))
                          for t in (a, b)])
    assert len(h.segments) == 1 and h.records == {} and h.summary()["totals"][FINISHED] == 2
    _feed(h, lambda buf: start(buf, a, "n", "w2"))  # its result was lost: lineage runs it again
    h.validate_state()
    assert h.summary()["totals"] == {PENDING: 0, RUNNING: 1, FINISHED: 1, FAILED: 0}
    row = next(r for r in h.tasks() if r["task_id"] == a.task_id.hex())
    assert row["state"] == RUNNING and row["runs"] == 2 and row["name"] == "f" and row["worker_id"] == "w2"
    assert len(h) == 2


def test_segments_are_forgotten_whole_and_only_while_enough_remain():
    h = TaskHistory(max_tasks=5, fast_min=2)
    for first in (0, 4, 8):
        _feed(h, lambda buf: [(buf.submitted(t), start(buf, t, "n", "w"), ran(buf, t, True, 1.0, 2.0, "n", "w"))
                              for t in (Task(first + i) for i in range(4))])
        h.validate_state()
    assert len(h) == 8 and len(h.segments) == 2  # the oldest went whole; 4 left would be too few
    assert h.summary()["forgotten"] == 4 and h.summary()["totals"][FINISHED] == 12
    assert {r["task_id"] for r in h.tasks(limit=None)} == {Task(i).task_id.hex() for i in range(4, 12)}
