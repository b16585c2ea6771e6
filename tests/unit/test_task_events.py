"""Task events: the owner's bounded buffer (task_events.py) and the head's history (task_history.py)."""

import pytest

from farpool._private import task_events as ev
from farpool._private.task_history import FAILED, FINISHED, PENDING, RUNNING, TaskHistory


class Task:
    def __init__(self, n, name="f", shape=None, actor_id=None):
        self.task_id = n.to_bytes(16, "little")
        self.name = name
        self.shape = shape if shape is not None else {"CPU": 10_000}
        self.actor_id = actor_id


def test_events_come_out_in_batches_in_order():
    buf = ev.TaskEventBuffer(capacity=100, batch=3)
    a, b = Task(1), Task(2)
    buf.submitted(a)
    buf.running(a, "n1", "w1")
    buf.submitted(b)
    buf.ran(a, True, 1.0, 2.0, "n1", "w1")
    first = buf.take(job_id=7, pid=42)
    assert [e[0] for e in first.events] == [ev.SUBMITTED, ev.RUNNING, ev.SUBMITTED]
    assert first.job_id == 7 and first.pid == 42 and first.dropped == 0
    second = buf.take()
    assert [ev.decode(e).kind for e in second.events] == [ev.ENDED]
    assert buf.take() is None
    buf.validate_state()


def test_a_full_buffer_drops_and_counts_and_says_so_in_the_next_batch():
    buf = ev.TaskEventBuffer(capacity=2, batch=10)
    for i in range(5):
        buf.submitted(Task(i))
    assert len(buf) == 2 and buf.dropped == 3
    batch = buf.take()
    assert len(batch.events) == 2 and batch.dropped == 3
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
    buf.submitted(Task(9))
    buf.submitted(Task(10))
    assert calls == [1, 1]


def test_recording_off_records_nothing():
    buf = ev.TaskEventBuffer(enabled=False)
    buf.submitted(Task(1))
    buf.failed(Task(1), ValueError("x"))
    assert len(buf) == 0 and buf.take() is None


def test_failures_carry_the_error_type_and_a_retired_run_is_not_an_event():
    buf = ev.TaskEventBuffer()
    t = Task(1)
    buf.ran(t, "retired", 1.0, 1.0, "n", "w")
    buf.ran(t, False, 1.0, 2.0, "n", "w", "ZeroDivisionError")
    buf.failed(t, ("task", b"", "KeyError", "tb", "f", "where"))
    buf.failed(t, TimeoutError("no"))
    events = [ev.decode(e) for e in buf.take().events]
    assert [(e.state, e.error_type) for e in events] == [
        (ev.FAILED, "ZeroDivisionError"), (ev.FAILED, "KeyError"), (ev.FAILED, "TimeoutError")]


def test_decode_refuses_garbage():
    for bad in [(), ("S",), ("X", 1, 2), "S", None, ("E", b"t", 1.0)]:
        with pytest.raises(ValueError):
            ev.decode(bad)


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
    buf.submitted(Task(2))
    buf.submitted(Task(3))  # a full batch: the I/O thread is woken once
    assert len(loop.soon) == 1
    fn, args = loop.soon.pop()
    fn(*args)
    assert len(sent) == 2 and len(sent[1].events) == 2
    buf.submitted(Task(4))
    rep.stop()
    assert len(sent) == 3 and loop.timers == []


def _batch(*events, job=1, pid=10, dropped=0):
    return (list(events), dropped, job, pid)


def _t(n):
    return n.to_bytes(16, "little")


def test_the_history_follows_a_task_through_its_states_and_counts_by_function_and_shape():
    h = TaskHistory(max_tasks=10)
    h.add_batch(_batch(("S", _t(1), 100.0, "train", {"CPU": 20_000}, None),
                       ("S", _t(2), 100.0, "train", {"CPU": 20_000}, None)))
    assert h.summary()["totals"][PENDING] == 2
    h.add_batch(_batch(("R", _t(1), 101.0, "node1", "w1")))
    h.add_batch(_batch(("E", _t(1), 103.0, "FINISHED", 101.5, "node1", "w1", None),
                       ("R", _t(2), 101.0, "node1", "w2"),
                       ("E", _t(2), 102.0, "FAILED", 101.2, "node1", "w2", "ValueError")))
    groups = h.summary()["groups"]
    assert groups == [{"name": "train", "shape": "{CPU: 2}", PENDING: 0, RUNNING: 0, FINISHED: 1, FAILED: 1}]
    rows = h.tasks()
    assert [r["state"] for r in rows] == [FAILED, FINISHED]  # newest first
    assert rows[0]["error_type"] == "ValueError" and rows[1]["started"] == 101.5
    assert h.tasks(state=FAILED, limit=5)[0]["task_id"] == _t(2).hex()
    assert h.tasks(node="nodeX") == []
    h.validate_state()


def test_a_retried_run_goes_back_to_running_and_a_late_final_failure_keeps_the_run():
    h = TaskHistory()
    h.add_batch(_batch(("S", _t(1), 1.0, "f", {}, None), ("R", _t(1), 2.0, "n", "w1"),
                       ("E", _t(1), 3.0, "FAILED", 2.1, "n", "w1", "OSError"), ("R", _t(1), 4.0, "n", "w2")))
    assert h.tasks()[0]["state"] == RUNNING and h.tasks()[0]["runs"] == 2
    h.add_batch(_batch(("E", _t(1), 5.0, "FAILED", 4.1, "n", "w2", "OSError"),
                       ("E", _t(1), 5.1, "FAILED", None, None, None, "OSError")))
    row = h.tasks()[0]
    assert row["state"] == FAILED and row["worker_id"] == "w2" and row["started"] == 4.1
    assert h.summary()["totals"][FAILED] == 1
    h.validate_state()


def test_the_history_is_bounded_and_forgets_ended_tasks_first():
    h = TaskHistory(max_tasks=5)
    live = [("S", _t(i), 1.0, "live", {}, None) for i in range(3)]
    done = []
    for i in range(100, 110):
        done += [("S", _t(i), 1.0, "short", {}, None), ("E", _t(i), 2.0, "FINISHED", 1.5, "n", "w", None)]
    h.add_batch(_batch(*live))
    h.add_batch(_batch(*done))
    assert len(h.records) == 5
    assert {r["name"] for r in h.tasks(limit=None)} == {"live", "short"}
    assert len([r for r in h.tasks(limit=None) if r["name"] == "live"]) == 3
    s = h.summary()
    assert s["totals"][FINISHED] == 10 and s["totals"][PENDING] == 3  # counts cover the forgotten
    assert s["forgotten"] == 8
    more = [("S", _t(i), 1.0, "live", {}, None) for i in range(200, 220)]
    h.add_batch(_batch(*more))
    assert len(h.records) <= 10
    h.validate_state()


def test_the_tasks_of_an_ended_job_are_not_left_running():
    h = TaskHistory()
    h.add_batch(_batch(("S", _t(1), 1.0, "f", {}, None), ("R", _t(1), 2.0, "n", "w"), job=4))
    h.add_batch(_batch(("S", _t(2), 1.0, "g", {}, None), job=5))
    assert h.job_ended(4, "its driver died") == 1
    assert {r["name"]: r["state"] for r in h.tasks()} == {"f": FAILED, "g": PENDING}
    h.validate_state()


def test_waiting_tasks_are_listed_with_the_reason_until_they_run():
    h = TaskHistory()
    h.add_batch(_batch(("S", _t(1), 1.0, "big", {"GPU": 80_000}, None),
                       ("W", _t(1), 1.5, "no node has 8 GPUs")))
    assert h.summary()["infeasible"] == [{"name": "big", "shape": "{GPU: 8}", "reason": "no node has 8 GPUs",
                                          "tasks": 1}]
    h.add_batch(_batch(("R", _t(1), 2.0, "n", "w")))
    assert h.summary()["infeasible"] == []


def test_garbage_events_are_counted_and_skipped():
    h = TaskHistory()
    h.add_batch(_batch(("S", "not bytes", 1.0, "f", {}, None), ("Z",), 7, ("E", _t(1), 1.0, "WEIRD", None, None,
                                                                          None, None)))
    assert h.bad_events == 4
    h.validate_state()


def test_the_timeline_has_a_lane_per_worker_and_names_them():
    h = TaskHistory()
    h.add_batch(_batch(("S", _t(1), 1.0, "f", {}, None), ("E", _t(1), 3.0, "FINISHED", 2.0, "nodeA", "w1", None),
                       ("S", _t(2), 1.0, "g", {}, None), ("E", _t(2), 3.5, "FINISHED", 2.5, "nodeA", "w2", None),
                       ("S", _t(3), 1.0, "h", {}, None)))  # never ran: not on the timeline
    events = h.timeline()
    runs = [e for e in events if e["ph"] == "X"]
    assert sorted(e["name"] for e in runs) == ["f", "g"]
    assert len({e["tid"] for e in runs}) == 2 and len({e["pid"] for e in runs}) == 1
    f = next(e for e in runs if e["name"] == "f")
    assert f["ts"] == 2.0e6 and f["dur"] == 1.0e6 and f["args"]["waited_ms"] == 1000.0
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {"node nodeA"[:13], "worker w1", "worker w2"}
