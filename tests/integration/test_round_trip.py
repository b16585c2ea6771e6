"""A caller waiting on one task that runs on a worker of this machine reads that worker's
stream itself (values.Values._read_reply, EventLoop.lend/run_here): the round trip's result,
and everything that can happen to the task meanwhile (a timeout, its worker killed, a
cancel from another thread, other threads waiting on the same worker)."""

import os
import signal
import threading

import pytest

import farpool
from farpool._private import transport, values
from farpool_testing import wait_at_gate


@farpool.remote
def echo(x):
    return x


@farpool.remote(max_retries=1)
def gated_crash_once(path, marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        wait_at_gate(path)
        os._exit(1)
    return "survived"


@farpool.remote
def gated(path, value):
    return wait_at_gate(path, value)


@farpool.remote
def gated_pid(path, pidfile):
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    return wait_at_gate(path, "x")


@pytest.fixture
def served(monkeypatch):
    """Counts the waits read by their caller (_read_reply True) and the fds it served;
    ``lent`` is set once a worker's stream is lent to a waiting caller (from then on only
    that caller can read it: the test's other thread acts then)."""
    counts = {"read": 0, "serve": 0, "lent": threading.Event(), "decided": threading.Event()}
    read_reply, serve, lend = values.Values._read_reply, transport.EventLoop.serve_now, transport.EventLoop.lend

    def counting_read_reply(self, *args):
        took = read_reply(self, *args)
        counts["read"] += took
        if not took:  # (the I/O thread was awake, or the task not on a local worker: it reads)
            counts["decided"].set()
        return took

    def noting_lend(self, fd):
        lent = lend(self, fd)
        if lent:
            counts["lent"].set()
            counts["decided"].set()
        return lent

    def counting_serve(self, fd):
        counts["serve"] += 1
        return serve(self, fd)

    monkeypatch.setattr(values.Values, "_read_reply", counting_read_reply)
    monkeypatch.setattr(transport.EventLoop, "serve_now", counting_serve)
    monkeypatch.setattr(transport.EventLoop, "lend", noting_lend)
    return counts


def warm(served):
    """A few round trips (the worker's lease parked for this caller), then counts from 0."""
    for i in range(5):
        assert farpool.get(echo.remote(i)) == i
    served["read"] = served["serve"] = 0
    served["lent"].clear()
    served["decided"].clear()


def test_sequential_round_trips(cluster, served):
    """Most are read by their caller: those whose reply came before the caller lent the
    stream (a caller preempted after its send) are read by the I/O thread, as before."""
    warm(served)
    for i in range(200):
        assert farpool.get(echo.remote(("x", i))) == ("x", i)
    assert served["read"] >= 1, served
    assert served["serve"] >= served["read"]
    # The stream was given back each time: the loop thread reads it again.
    refs = [echo.remote(i) for i in range(50)]
    assert farpool.get(refs) == list(range(50))


def test_a_reply_that_comes_after_the_lend_is_read_by_its_caller(cluster, gate, served):
    """The task waits at a gate opened once its caller decided how to wait: when its stream
    was lent, the loop thread no longer sees that stream, and the caller reads the reply
    itself, unless it finds the I/O thread awake (for a timer, a message from the agent)
    when the reply comes: it gives the stream back then, and the loop thread reads it.
    Rounds where the caller found the I/O thread awake at the get, or at the reply, do not
    count; three rounds read by their caller must come."""
    read_rounds = 0
    for round_ in range(20):
        warm(served)
        ref = gated.remote(gate.path, round_)
        gate.wait_arrivals()
        opener = threading.Thread(target=lambda: served["decided"].wait(60) and gate.open())
        opener.start()
        assert farpool.get(ref, timeout=60) == round_
        opener.join(60)
        if served["lent"].is_set():
            assert served["read"] == 1, served  # (the wait took the caller-read path)
            read_rounds += served["serve"] >= 1
        gate.shut()
        if read_rounds == 3:
            break
    assert read_rounds == 3, f"only {read_rounds} of 20 rounds had their reply read by the caller"


def test_a_timed_out_wait_gives_the_stream_back(cluster, gate, served):
    warm(served)
    ref = gated.remote(gate.path, "late")
    gate.wait_arrivals()
    with pytest.raises(farpool.exceptions.GetTimeoutError):
        farpool.get(ref, timeout=0.2)
    assert served["read"] == 1, "the timed-out wait was not on the caller-read path"
    gate.open()
    # Nobody waits now: the loop thread takes the result in, and a wait finds it ready.
    ready, _ = farpool.wait([ref], timeout=30)
    assert ready == [ref]
    assert farpool.get(ref) == "late"


def test_a_worker_that_dies_under_a_caller_read_is_retried(cluster, gate, tmp_path, served):
    """The first attempt waits at the gate, opened once its stream is lent, then its worker
    exits: the caller sees the end of the stream (and reads it, unless the agent's
    WorkerExited woke the I/O thread first: it closes the stream then), and the retry's
    result still comes."""
    warm(served)
    marker = str(tmp_path / "crashed")
    ref = gated_crash_once.remote(gate.path, marker)
    gate.wait_arrivals()
    opener = threading.Thread(target=lambda: served["lent"].wait(60) and gate.open())
    opener.start()
    assert farpool.get(ref, timeout=60) == "survived"
    opener.join(60)
    assert os.path.exists(marker)
    assert served["read"] == 1, served  # (the wait took the caller-read path: its stream was lent)
    assert farpool.get(echo.remote("after"), timeout=60) == "after"


def test_a_cancel_from_another_thread_ends_a_caller_read(cluster, gate, served):
    warm(served)
    ref = gated.remote(gate.path, "never")
    gate.wait_arrivals()

    def cancel_once_waiting():
        assert served["lent"].wait(60)
        farpool.cancel(ref, force=True)

    canceller = threading.Thread(target=cancel_once_waiting)
    canceller.start()
    with pytest.raises((farpool.exceptions.TaskCancelledError, farpool.exceptions.WorkerCrashedError)):
        farpool.get(ref, timeout=60)
    canceller.join(60)
    assert served["read"] == 1
    assert farpool.get(echo.remote("after"), timeout=60) == "after"


def test_threads_waiting_on_one_worker_are_all_answered(cluster, gate):
    """Tasks pipelined to one worker (the other one is held at the gate) and waited on by
    two threads: one reads the stream, the other finds it lent and waits on the I/O
    thread's path, fired by the first one's reads."""
    held = gated.remote(gate.path, "held")
    gate.wait_arrivals()
    refs = [echo.remote(("t", i)) for i in range(2)]
    results = {}

    def waiter(i):
        results[i] = farpool.get(refs[i], timeout=60)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert results == {0: ("t", 0), 1: ("t", 1)}
    gate.open()
    assert farpool.get(held, timeout=60) == "held"


def test_a_worker_killed_by_signal_during_a_caller_read(cluster, gate, served, tmp_path):
    """SIGKILL from outside while the caller polls the worker's stream: EOF on the stream,
    the agent's WorkerExited fails the task (no retries left), nothing hangs."""
    warm(served)
    pidfile = str(tmp_path / "pid")
    ref = gated_pid.options(max_retries=0).remote(gate.path, pidfile)
    gate.wait_arrivals()
    with open(pidfile) as f:
        pid = int(f.read())

    def kill_once_waiting():
        assert served["lent"].wait(60)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_waiting)
    killer.start()
    with pytest.raises(farpool.exceptions.WorkerCrashedError):
        farpool.get(ref, timeout=60)
    killer.join(60)
    assert served["read"] == 1
    assert farpool.get(echo.remote("after"), timeout=60) == "after"
