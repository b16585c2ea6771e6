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
    stream (a caller preempted after its send) are read by the I/O thread, as before, and so
    are those whose reply came while the I/O thread was awake (a timer, a message from the
    agent): the caller gives the stream back then without serving it.  So the design promises
    that the caller-read path is taken and serves replies, not that every wait on it does."""
    warm(served)
    for i in range(200):
        assert farpool.get(echo.remote(("x", i))) == ("x", i)
    assert served["read"] >= 1, served
    assert served["serve"] >= 1, served  # (the caller read some replies itself)
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
    """(A wait that found the I/O thread awake at the get is not lent: its round is run again.)"""
    for _ in range(10):
        warm(served)
        ref = gated.remote(gate.path, "late")
        gate.wait_arrivals()
        with pytest.raises(farpool.exceptions.GetTimeoutError):
            farpool.get(ref, timeout=0.2)
        gate.open()
        if served["lent"].is_set():
            break
        assert farpool.get(ref, timeout=60) == "late"
        gate.shut()
    assert served["read"] == 1, f"no timed-out wait of 10 was on the caller-read path: {served}"
    # Nobody waits now: the loop thread takes the result in, and a wait finds it ready.
    ready, _ = farpool.wait([ref], timeout=30)
    assert ready == [ref]
    assert farpool.get(ref) == "late"


def lent_round(served, gate, submit, act):
    """Submits (``submit()``) a task that waits at the gate and gets it, with ``act(ref)`` run
    by another thread once the caller was lent the worker's stream.  A wait that found the I/O
    thread awake at the get is not lent (that thread reads the reply then): its round opens the
    gate instead, and a new round starts.  Returns the lent round's result or exception."""
    for _ in range(10):
        warm(served)
        ref = submit()
        gate.wait_arrivals()

        def acting():
            assert served["decided"].wait(60), "the get never decided how to wait"
            if served["lent"].is_set():
                act(ref)
            else:
                gate.open()

        actor = threading.Thread(target=acting)
        actor.start()
        try:
            outcome = farpool.get(ref, timeout=60)
        except Exception as e:  # noqa: BLE001 (the caller's test names what it expects)
            outcome = e
        actor.join(60)
        if served["lent"].is_set():
            assert served["read"] == 1, served  # (the wait took the caller-read path)
            return outcome
        gate.shut()
    pytest.fail(f"no wait of 10 was lent its worker's stream: {served}")


def test_a_worker_that_dies_under_a_caller_read_is_retried(cluster, gate, tmp_path, served):
    """The first attempt waits at the gate, opened once its stream is lent, then its worker
    exits: the caller sees the end of the stream (and reads it, unless the agent's
    WorkerExited woke the I/O thread first: it closes the stream then), and the retry's
    result still comes."""
    markers = []

    def submit():
        markers.append(str(tmp_path / f"crashed-{len(markers)}"))
        return gated_crash_once.remote(gate.path, markers[-1])

    assert lent_round(served, gate, submit, lambda ref: gate.open()) == "survived"
    assert os.path.exists(markers[-1])
    assert farpool.get(echo.remote("after"), timeout=60) == "after"


def test_a_cancel_from_another_thread_ends_a_caller_read(cluster, gate, served):
    outcome = lent_round(
        served, gate, lambda: gated.remote(gate.path, "never"), lambda ref: farpool.cancel(ref, force=True)
    )
    assert isinstance(outcome, (farpool.exceptions.TaskCancelledError, farpool.exceptions.WorkerCrashedError)), outcome
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
    pidfile = str(tmp_path / "pid")

    def kill(ref):
        with open(pidfile) as f:
            os.kill(int(f.read()), signal.SIGKILL)

    outcome = lent_round(served, gate, lambda: gated_pid.options(max_retries=0).remote(gate.path, pidfile), kill)
    assert isinstance(outcome, farpool.exceptions.WorkerCrashedError), outcome
    assert farpool.get(echo.remote("after"), timeout=60) == "after"
