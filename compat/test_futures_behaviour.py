"""One concurrent.futures behaviour suite, run against ProcessPoolExecutor and DistributedExecutor.

Written once in the manner of CPython's ``create_executor_tests``: every test
takes the ``make`` fixture, which builds the executor under test ("process":
``concurrent.futures.ProcessPoolExecutor``; "farpool":
``farpool.DistributedExecutor``).  Each test states the stdlib's behaviour;
where farpool deliberately differs, the test is an expected failure for
farpool, listed in ``DIFFERENCES`` with the reason (strict: if farpool starts
to behave like the stdlib there, the suite says so).

Run with ``python compat/run.py`` (or ``python -m pytest compat/test_futures_behaviour.py``).
"""

import concurrent.futures as cf
import concurrent.futures.process
import multiprocessing
import os
import threading
import time

import pytest

from farpool_testing import TIMEOUT, Gate, add, get_value, pid_of, set_value, square, wait_at_gate


# test name -> {implementation: why it differs}; every entry is an expected failure (strict).
DIFFERENCES = {
    "test_worker_crash_breaks_the_executor": {
        "farpool": "a worker that dies is retried (max_retries) instead of breaking the executor; past the "
                   "retries only that future fails, with a WorkerCrashedError that is also a BrokenProcessPool, "
                   "and the executor goes on",
    },
    "test_lambda_cannot_be_submitted": {
        "farpool": "farpool ships lambdas and closures (cloudpickle); the stdlib cannot pickle them",
    },
    "test_map_input_error_is_raised_by_map_itself": {
        "farpool": "map reads its input as work is handed out (a bounded prefetch): an input error past the "
                   "first items is raised when iteration reaches it, not by map() itself",
    },
}


# ---------------------------------------------------------------------------- task functions


class CustomError(Exception):
    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code


def raise_custom(code):
    raise CustomError(code, "custom failure")  # marker-line


def exit_task():
    raise SystemExit(5)


def return_lock():
    return threading.Lock()


def crash():
    os._exit(7)


def mutate(arr):
    arr += 1
    return arr


def bad_init():
    raise ValueError("initializer failed")


# ---------------------------------------------------------------------------- the two implementations
IMPLEMENTATIONS = ["process", "farpool"]


@pytest.fixture(params=IMPLEMENTATIONS)
def kind(request):
    reason = DIFFERENCES.get(request.node.originalname, {}).get(request.param)
    if reason:
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    return request.param


@pytest.fixture
def make(kind):
    made = []

    def factory(max_workers=2, **kwargs):
        if kind == "process":
            ex = cf.ProcessPoolExecutor(max_workers, **kwargs)
        else:
            from farpool import DistributedExecutor
            ex = DistributedExecutor(max_workers, **kwargs)
        made.append(ex)
        return ex
    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def gate(tmp_path):
    g = Gate(str(tmp_path / "gate.sock"))
    yield g
    g.close()


# ---------------------------------------------------------------------------- submit and results
def test_submit_returns_a_future_with_the_result(make):
    ex = make()
    fut = ex.submit(add, 1, 2, c=3)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=TIMEOUT) == 6
    assert fut.done() and not fut.cancelled() and not fut.running()
    assert fut.exception(timeout=TIMEOUT) is None


def test_submit_keyword_named_fn(make):
    ex = make()
    assert ex.submit(dict, fn=1).result(timeout=TIMEOUT) == {"fn": 1}


def test_exception_keeps_its_type_args_and_remote_traceback(make):
    ex = make()
    fut = ex.submit(raise_custom, 42)
    with pytest.raises(CustomError) as info:
        fut.result(timeout=TIMEOUT)
    assert type(info.value) is CustomError
    assert info.value.code == 42 and info.value.args == (42, "custom failure")
    cause = info.value.__cause__
    assert type(cause).__name__ == "_RemoteTraceback"
    assert "marker-line" in str(cause)
    assert isinstance(fut.exception(timeout=TIMEOUT), CustomError)


def test_system_exit_in_a_task_is_returned(make):
    ex = make()
    with pytest.raises(SystemExit):
        ex.submit(exit_task).result(timeout=TIMEOUT)
    assert ex.submit(square, 2).result(timeout=TIMEOUT) == 4


def test_unpicklable_argument_fails_its_future(make):
    ex = make()
    with pytest.raises(TypeError):
        ex.submit(square, threading.Lock()).result(timeout=TIMEOUT)
    assert ex.submit(square, 3).result(timeout=TIMEOUT) == 9


def test_unpicklable_result_fails_its_future(make):
    ex = make()
    with pytest.raises(TypeError):
        ex.submit(return_lock).result(timeout=TIMEOUT)
    assert ex.submit(square, 3).result(timeout=TIMEOUT) == 9


def test_lambda_cannot_be_submitted(make):
    ex = make()
    with pytest.raises(Exception):
        ex.submit(lambda: 1).result(timeout=TIMEOUT)


def test_result_timeout(make, gate):
    ex = make()
    fut = ex.submit(wait_at_gate, gate.path, "x")
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    gate.open()
    assert fut.result(timeout=TIMEOUT) == "x"


def test_arrays_are_copies_both_ways(make):
    np = pytest.importorskip("numpy")
    ex = make()
    for n in (10, 20_000, 400_000):
        arr = np.zeros(n)
        out = ex.submit(mutate, arr).result(timeout=TIMEOUT)
        assert arr.sum() == 0 and out.sum() == n
        out[0] = 5.0  # results are writable


def test_submit_from_many_threads(make):
    ex = make()
    results = {}

    def run(t):
        results[t] = [f.result(timeout=TIMEOUT) for f in [ex.submit(square, t * 100 + i) for i in range(20)]]
    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == {t: [(t * 100 + i) ** 2 for i in range(20)] for t in range(4)}


# ---------------------------------------------------------------------------- map
def test_map_in_order(make):
    ex = make()
    assert list(ex.map(square, range(30), timeout=TIMEOUT)) == [i * i for i in range(30)]
    assert list(ex.map(square, range(30), chunksize=4, timeout=TIMEOUT)) == [i * i for i in range(30)]
    assert list(ex.map(add, range(3), range(10))) == [0, 2, 4]
    assert list(ex.map(square, [])) == []


def test_map_chunksize_must_be_positive(make):
    ex = make()
    with pytest.raises(ValueError):
        ex.map(square, range(3), chunksize=0)


def test_map_exception_raised_at_its_item(make):
    ex = make()
    it = ex.map(raise_custom_if_three, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CustomError):
        next(it)


def raise_custom_if_three(x):
    if x == 3:
        raise CustomError(3, "three")
    return x


def test_map_timeout(make, gate):
    ex = make(max_workers=1)
    it = ex.map(wait_at_gate, [gate.path, gate.path], timeout=0.2)
    with pytest.raises(TimeoutError):
        list(it)
    gate.open()


def failing_input():
    yield 1
    yield 2
    yield 3
    raise CustomError(0, "input")


def test_map_input_error_is_raised_by_map_itself(make):
    ex = make()
    with pytest.raises(CustomError):
        ex.map(square, failing_input())


def test_map_input_error_is_raised(make):
    ex = make()
    with pytest.raises(CustomError):
        list(ex.map(square, failing_input()))


# ---------------------------------------------------------------------------- cancel and state
def test_cancel_queued_work(make, gate):
    ex = make(max_workers=1)
    blocker = ex.submit(wait_at_gate, gate.path, "b")
    gate.wait_arrivals()
    rest = [ex.submit(square, i) for i in range(6)]
    cancelled = [f for f in rest if f.cancel()]
    if isinstance(ex, cf.ProcessPoolExecutor):
        # The stdlib moves up to max_workers + 1 calls into its call queue, where they run.
        assert len(cancelled) >= len(rest) - 2
    else:
        assert len(cancelled) == len(rest)  # nothing was dispatched past the busy worker
    for f in cancelled:
        assert f.cancelled() and f.done()
        with pytest.raises(cf.CancelledError):
            f.result(timeout=TIMEOUT)
    assert blocker.running() and not blocker.cancel()
    gate.open()
    assert blocker.result(timeout=TIMEOUT) == "b"
    assert not blocker.cancel()  # done


def test_done_callbacks(make):
    ex = make()
    seen = []
    fut = ex.submit(square, 4)
    fut.add_done_callback(lambda f: seen.append(("first", f.result())))
    assert fut.result(timeout=TIMEOUT) == 16
    fut.add_done_callback(lambda f: seen.append(("after", f.result())))  # runs at once
    ex.shutdown(wait=True)
    assert ("after", 16) in seen and ("first", 16) in seen and len(seen) == 2


def test_raising_callback_does_not_stop_others(make, caplog):
    ex = make()
    seen = []
    fut = ex.submit(square, 5)

    def bad(_):
        raise RuntimeError("callback bug")
    fut.add_done_callback(bad)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert fut.result(timeout=TIMEOUT) == 25
    ex.shutdown(wait=True)
    assert seen == [25]


def test_as_completed_and_wait(make, gate):
    ex = make()
    futures = [ex.submit(square, i) for i in range(10)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=TIMEOUT)) == [i * i for i in range(10)]
    done, not_done = cf.wait(futures, timeout=TIMEOUT, return_when=cf.ALL_COMPLETED)
    assert len(done) == 10 and not not_done
    slow = ex.submit(wait_at_gate, gate.path)
    failing = ex.submit(raise_custom, 1)
    done, not_done = cf.wait([slow, failing], timeout=TIMEOUT, return_when=cf.FIRST_EXCEPTION)
    assert failing in done and slow in not_done
    done, not_done = cf.wait([slow], timeout=0.05, return_when=cf.FIRST_COMPLETED)
    assert not done
    with pytest.raises(TimeoutError):
        list(cf.as_completed([slow], timeout=0.05))
    gate.open()
    assert slow.result(timeout=TIMEOUT) is None


# ---------------------------------------------------------------------------- lifecycle
def test_submit_after_shutdown_raises(make):
    ex = make()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(square, 1)
    ex.shutdown()  # again: no error


def test_context_manager_waits(make):
    with make() as ex:
        futures = [ex.submit(square, i) for i in range(10)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(10)]


def test_shutdown_cancel_futures(make, gate):
    ex = make(max_workers=1)
    blocker = ex.submit(wait_at_gate, gate.path, "b")
    gate.wait_arrivals()
    rest = [ex.submit(square, i) for i in range(6)]
    threading.Timer(0.1, gate.open).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert blocker.result(timeout=0) == "b"
    assert sum(f.cancelled() for f in rest) >= len(rest) - 2  # the stdlib has queued up to two more
    assert all(f.done() for f in rest)


def test_shutdown_without_wait_still_completes(make):
    ex = make()
    futures = [ex.submit(square, i) for i in range(10)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=TIMEOUT) for f in futures] == [i * i for i in range(10)]


def test_constructor_validation(kind):
    cls = cf.ProcessPoolExecutor
    if kind == "farpool":
        from farpool import DistributedExecutor as cls
    for bad in (0, -1):
        with pytest.raises(ValueError):
            cls(bad)
    with pytest.raises(TypeError):
        cls(1, initializer=1)


# ---------------------------------------------------------------------------- workers
def test_initializer_sets_worker_state(make):
    ex = make(initializer=set_value, initargs=("ready",))
    assert set(ex.map(get_value, range(8))) == {"ready"}


def test_failing_initializer_breaks_the_executor(make):
    ex = make(initializer=bad_init)
    with pytest.raises(cf.BrokenExecutor):
        ex.submit(square, 1).result(timeout=TIMEOUT)
    with pytest.raises(cf.BrokenExecutor):
        ex.submit(square, 2).result(timeout=TIMEOUT)


def test_max_tasks_per_child(make):
    ex = make(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=2)
    pids = [ex.submit(pid_of).result(timeout=TIMEOUT) for _ in range(6)]
    assert all(pids.count(p) <= 2 for p in pids), pids


def test_worker_crash_fails_its_future_with_broken_process_pool(make):
    ex = make()
    with pytest.raises(cf.process.BrokenProcessPool):
        ex.submit(crash).result(timeout=TIMEOUT)


def test_worker_crash_breaks_the_executor(make):
    ex = make()
    with pytest.raises(cf.process.BrokenProcessPool):
        ex.submit(crash).result(timeout=TIMEOUT)
    with pytest.raises(cf.process.BrokenProcessPool):  # submit itself raises, or its future does
        ex.submit(square, 2).result(timeout=TIMEOUT)


def test_running_task_state(make, gate):
    ex = make(max_workers=1)
    fut = ex.submit(wait_at_gate, gate.path, 1)
    gate.wait_arrivals()
    deadline = time.monotonic() + TIMEOUT
    while not fut.running() and time.monotonic() < deadline:  # a state the executor reaches on its own
        time.sleep(0.01)
    assert fut.running() and not fut.done()
    gate.open()
    assert fut.result(timeout=TIMEOUT) == 1
