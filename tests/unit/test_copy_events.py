"""Copies of objects between nodes on the timeline (copy_events.py, task_history.timeline): no processes."""

import pytest

from farpool._private import copy_events, pull
from farpool._private.copy_events import CopyHistory, CopyLog, CopyRecord
from farpool._private.task_history import TaskHistory

A, B, C = "a" * 32, "b" * 32, "c" * 32


def record(started=10.0, ended=12.0, to=B, sources=((A, 100),), size=100, error=None, oid=b"\x01" * 20):
    return CopyRecord(oid, size, "put", to, list(sources), started, ended, error)


def copies_of(events):
    return [e for e in events if e.get("cat", "").startswith("copy")]


def lane_names(events):
    """(pid, tid) -> thread name, and pid -> process name."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    return threads, processes


def test_the_log_hands_its_copies_over_once_and_counts_what_did_not_fit():
    log = CopyLog(limit=2)
    assert log.take() is None
    for i in range(3):
        log.add(record(started=float(i)))
    batch = log.take()
    assert [r[5] for r in batch["records"]] == [0.0, 1.0] and batch["dropped"] == 1
    assert log.take() is None


def test_the_history_keeps_the_newest_and_skips_garbage():
    history = CopyHistory(limit=2)
    history.add({"records": [tuple(record(started=float(i))) for i in range(3)] + [("junk",)], "dropped": 4})
    history.add("not a batch")
    assert [r.started for r in history.newest()] == [1.0, 2.0]
    assert (history.total, history.dropped, history.bad) == (3, 4, 2)
    history.add({"records": [tuple(record(error="node a died"))], "dropped": 0})
    assert (history.total, history.failed, history.total_bytes) == (4, 1, 300)
    with pytest.raises(ValueError, match="at least 1"):
        CopyHistory(limit=0)


def test_a_copy_shows_on_the_readers_lane_and_on_each_senders():
    history = TaskHistory()
    events = history.timeline(copies=[record(sources=[(A, 60), (C, 40), ("d" * 32, 0)])])
    bars = copies_of(events)
    threads, processes = lane_names(events)
    incoming = [e for e in bars if e["name"].startswith("copy in")]
    outgoing = [e for e in bars if e["name"].startswith("copy out")]
    assert len(incoming) == 1 and len(outgoing) == 2  # (the source that sent nothing has no bar)
    bar = incoming[0]
    assert bar["ph"] == "X" and bar["ts"] == 10e6 and bar["dur"] == 2e6
    assert bar["args"]["object_id"] == ("01" * 20) and bar["args"]["bytes"] == 100
    assert bar["args"]["to"] == B and bar["args"]["from"] == {A: 60, C: 40}
    assert processes[bar["pid"]] == f"node {B[:8]}" and threads[(bar["pid"], bar["tid"])] == "object copies"
    assert {processes[e["pid"]] for e in outgoing} == {f"node {A[:8]}", f"node {C[:8]}"}
    assert sorted(e["args"]["bytes"] for e in outgoing) == [40, 60]


def test_overlapping_copies_of_one_node_get_lanes_of_their_own_and_failures_say_why():
    history = TaskHistory()
    events = history.timeline(copies=[record(0.0, 5.0), record(1.0, 2.0, oid=b"\x02" * 20),
                                      record(6.0, 7.0, oid=b"\x03" * 20, error="node a died", sources=[(A, 0)])])
    threads, _ = lane_names(events)
    incoming = {e["args"]["object_id"][:2]: e for e in copies_of(events) if e["name"].startswith("copy in")}
    assert threads[(incoming["01"]["pid"], incoming["01"]["tid"])] == "object copies"
    assert threads[(incoming["02"]["pid"], incoming["02"]["tid"])] == "object copies 2"
    assert incoming["03"]["tid"] == incoming["01"]["tid"]  # (the first lane is free again by then)
    assert incoming["03"]["cat"] == "copy,error" and incoming["03"]["args"]["error"] == "node a died"


def test_a_pull_counts_the_bytes_each_source_sent():
    job = pull.Pull(1, b"x", 10, [A, C], chunk=4, window=1)
    asks = job.requests()
    for source, offset, length in asks:
        assert job.received_chunk(source, offset, length)
    job.source_failed(C, "gone")
    for source, offset, length in job.requests():
        assert job.received_chunk(source, offset, length)
    assert job.done and sum(job.sent.values()) == 10 and job.sent[C] == 4 and job.sent[A] == 6
    assert copy_events.HISTORY_COPIES >= 1
