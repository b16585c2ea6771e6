"""DistributedExecutor on a real embedded cluster: what ProcessPoolExecutor code relies on, and farpool's extras.

The behaviours shared with ProcessPoolExecutor are asserted against both in
compat/futures_suite.py; here are the farpool-specific ones (retries, resource
hints, cancel before dispatch, shared arrays, the facades' cluster) and the
essentials again, so that `pytest` alone covers them.
"""

import concurrent.futures as cf
import os
import pickle
import threading
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

import farpool
from farpool import DistributedExecutor
from farpool.executor import BrokenDistributedExecutor, DistributedFuture
from farpool_testing import (TIMEOUT, add, crash_once, get_value, pid_of, run_script, set_value, square,
                             wait_at_gate)


# ---------------------------------------------------------------------------- task functions
class Oops(Exception):
    pass


def fail(x):
    raise Oops(f"bad {x}")


def exit_task():
    raise SystemExit(3)


def bad_initializer():
    raise RuntimeError("initializer failed on purpose")


def crash_always():
    os._exit(1)


def mutate_and_sum(arr, i):
    arr[i] = -1.0  # in place, as code written for the stdlib may do
    return float(arr.sum())


def is_writable(arr):
    return bool(arr.flags.writeable)


def make_array(n):
    return np.arange(n, dtype=np.float64)


def touch(path):
    open(path, "w").close()
    return path


def _refuse_to_unpickle():
    raise pickle.UnpicklingError("refused on purpose")


def _exit_while_unpickling():
    raise SystemExit(4)


class BadUnpickle:
    """Pickles fine; unpickling it raises (in a worker as an argument, here as a result)."""
    def __reduce__(self):
        return _refuse_to_unpickle, ()


class ExitUnpickle:
    def __reduce__(self):
        return _exit_while_unpickling, ()


class BadPickle:
    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle this on purpose")


def identity(x):
    return x


def make_bad_unpickle():
    return BadUnpickle()


def make_exit_unpickle():
    return ExitUnpickle()


def make_bad_pickle():
    return BadPickle()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def ex(cluster):
    with DistributedExecutor() as executor:
        yield executor


# ---------------------------------------------------------------------------- basics
def test_submit_result_and_object_ref(ex):
    fut = ex.submit(add, 1, 2, c=3)
    assert isinstance(fut, cf.Future) and isinstance(fut, DistributedFuture)
    assert fut.result(timeout=TIMEOUT) == 6
    assert isinstance(fut.object_ref, farpool.ObjectRef)
    assert fut.done() and not fut.running() and not fut.cancelled()
    assert isinstance(ex, cf.Executor)


def test_exception_is_the_users_own_with_remote_traceback(ex):
    fut = ex.submit(fail, 7)
    with pytest.raises(Oops, match="bad 7") as info:
        fut.result(timeout=TIMEOUT)
    assert type(info.value) is Oops
    cause = info.value.__cause__
    assert type(cause).__name__ == "_RemoteTraceback"
    assert 'raise Oops(f"bad {x}")' in cause.tb
    assert "fail" in cause.tb and "node" in cause.tb  # names the function and where it ran
    assert isinstance(fut.exception(timeout=TIMEOUT), Oops)


def test_system_exit_in_a_task_comes_back(ex):
    with pytest.raises(SystemExit):
        ex.submit(exit_task).result(timeout=TIMEOUT)
    assert ex.submit(square, 3).result(timeout=TIMEOUT) == 9  # the executor goes on


def test_lambdas_and_closures(ex):
    k = 10
    assert ex.submit(lambda x: x + k, 1).result(timeout=TIMEOUT) == 11
    assert list(ex.map(lambda x, y: x * y + k, range(5), range(5))) == [i * i + k for i in range(5)]


def test_map_in_order_with_chunksize_and_several_iterables(ex):
    assert list(ex.map(square, range(50), timeout=TIMEOUT)) == [i * i for i in range(50)]
    assert list(ex.map(square, range(50), chunksize=7, timeout=TIMEOUT)) == [i * i for i in range(50)]
    assert list(ex.map(add, range(5), range(100), timeout=TIMEOUT)) == [2 * i for i in range(5)]
    assert list(ex.map(square, [], timeout=TIMEOUT)) == []
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(square, range(3), chunksize=0)


def test_map_reraises_at_the_failing_item(ex):
    def maybe(x):
        if x == 5:
            raise Oops(x)
        return x
    results = ex.map(maybe, range(10), timeout=TIMEOUT)
    got = []
    with pytest.raises(Oops):
        for r in results:
            got.append(r)
    assert got == [0, 1, 2, 3, 4]


def test_map_reads_its_input_lazily(ex):
    import itertools
    seen = []

    def numbers():
        for i in itertools.count():
            seen.append(i)
            yield i
    results = ex.map(square, numbers(), timeout=TIMEOUT)
    assert [next(results) for _ in range(20)] == [i * i for i in range(20)]
    results.close()  # an endless input: the stdlib's map would never return
    assert len(seen) < 10_000


def test_map_results_closed_mid_chunk_give_nothing_more(ex):
    """close() as on the stdlib's generator: no more items, also from a chunk already here."""
    results = ex.map(square, range(40), timeout=TIMEOUT, chunksize=10)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    results.close()
    with pytest.raises(StopIteration):
        next(results)
    assert list(results) == []


def test_map_input_error_is_raised(ex):
    def numbers():
        yield 1
        raise Oops("input")
    with pytest.raises(Oops, match="input"):
        list(ex.map(square, numbers(), timeout=TIMEOUT))


def test_map_timeout(cluster, gate):
    with DistributedExecutor(max_workers=1) as ex:
        results = ex.map(wait_at_gate, [gate.path] * 3, timeout=0.5)
        with pytest.raises(TimeoutError):
            list(results)
        gate.open()


def test_as_completed_wait_and_callbacks_on_one_thread(ex):
    threads = set()
    done = []
    lock = threading.Lock()

    def callback(f):
        with lock:
            threads.add(threading.current_thread().name)
            done.append(f.result())
    futures = [ex.submit(square, i) for i in range(40)]
    for f in futures:
        f.add_done_callback(callback)
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=TIMEOUT)) == [i * i for i in range(40)]
    finished, not_finished = cf.wait(futures, timeout=TIMEOUT)
    assert len(finished) == 40 and not not_finished
    ex.shutdown(wait=True)
    assert sorted(done) == [i * i for i in range(40)]
    threads.discard(threading.main_thread().name)  # a callback added after completion runs at once
    assert len(threads) <= 1


def test_results_are_writable_arrays(ex):
    for n in (10, 20_000, 1_000_000):  # inline, mid-sized frame, big frame
        arr = ex.submit(make_array, n).result(timeout=TIMEOUT)
        arr[0] = 42.0
        assert arr[0] == 42.0


# ---------------------------------------------------------------------------- cancel, shutdown, max_workers
def test_max_workers_caps_tasks_in_flight_and_cancel_before_dispatch(cluster, gate, tmp_path):
    with DistributedExecutor(max_workers=1) as ex:
        first = ex.submit(wait_at_gate, gate.path, "first")
        queued = ex.submit(touch, str(tmp_path / "never"))
        gate.wait_arrivals(1)
        assert first.running()
        assert queued.object_ref is None  # still in this process: max_workers=1 is busy
        assert not first.cancel()
        assert queued.cancel() and queued.cancelled() and queued.done()
        with pytest.raises(cf.CancelledError):
            queued.result(timeout=TIMEOUT)
        gate.open()
        assert first.result(timeout=TIMEOUT) == "first"
    assert not (tmp_path / "never").exists()


def test_cancel_of_a_task_queued_in_the_runtime(cluster, gate, tmp_path):
    # Workers of its own (an initializer), both busy; three tasks in flight (more than the cluster
    # runs at once, which the executor only does for quick tasks), so the third waits in the runtime.
    from farpool._facade import _Limit
    with DistributedExecutor(initializer=set_value, initargs=(1,)) as ex:
        ex._limit = _Limit(3, 3)
        blockers = [ex.submit(wait_at_gate, gate.path, i) for i in range(2)]
        gate.wait_arrivals(2)
        waiting = ex.submit(touch, str(tmp_path / "never"))
        assert waiting.object_ref is not None, "handed to the runtime"
        assert not waiting.running()
        assert waiting.cancel(), "a task not yet dispatched to a worker can be cancelled"
        assert waiting.cancelled()
        gate.open()
        assert [b.result(timeout=TIMEOUT) for b in blockers] == [0, 1]
    assert not (tmp_path / "never").exists()


def test_shutdown_rules(cluster, gate):
    ex = DistributedExecutor(max_workers=1)
    running = ex.submit(wait_at_gate, gate.path, "ran")
    gate.wait_arrivals(1)
    pending = [ex.submit(square, i) for i in range(5)]
    threading.Timer(0.2, gate.open).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=TIMEOUT) == "ran"
    assert all(f.cancelled() for f in pending)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(square, [1])
    ex.shutdown()  # idempotent


def test_shutdown_without_wait_lets_work_finish(cluster):
    ex = DistributedExecutor()
    futures = [ex.submit(square, i) for i in range(20)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=TIMEOUT) for f in futures] == [i * i for i in range(20)]


def test_constructor_validation(cluster):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(max_workers=0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        DistributedExecutor(initializer=1)
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        DistributedExecutor(max_tasks_per_child=0)
    with pytest.raises(ValueError, match="`num_cpus` must be >= 0, got -1"):
        DistributedExecutor(num_cpus=-1)
    with DistributedExecutor(3, None) as ex:  # positional like ProcessPoolExecutor; mp_context ignored
        assert ex._max_workers == 3


# ---------------------------------------------------------------------------- workers of its own
def test_initializer_sets_a_global_the_tasks_read(cluster):
    with DistributedExecutor(initializer=set_value, initargs=("from-init",)) as ex:
        assert set(ex.map(get_value, range(20), timeout=TIMEOUT)) == {"from-init"}
    with DistributedExecutor() as plain:  # other executors do not share those workers
        assert plain.submit(get_value).result(timeout=TIMEOUT) != "from-init"


def test_initializer_that_raises_breaks_the_executor(cluster):
    ex = DistributedExecutor(initializer=bad_initializer)
    fut = ex.submit(square, 2)
    with pytest.raises(cf.BrokenExecutor) as info:
        fut.result(timeout=TIMEOUT)
    assert isinstance(info.value, BrokenDistributedExecutor)
    assert isinstance(info.value, cf.process.BrokenProcessPool)
    assert "initializer failed on purpose" in str(info.value)
    with pytest.raises(BrokenDistributedExecutor):
        ex.submit(square, 3)
    ex.shutdown()


def test_a_multiprocessing_queue_in_initargs_is_refused_at_construction_with_the_way_out(cluster):
    import multiprocessing
    queue = multiprocessing.get_context("forkserver").Queue()
    try:
        with pytest.raises(TypeError, match=r"through inheritance.*Manager\(\)\.Queue\(\)"):
            DistributedExecutor(initializer=set_value, initargs=(queue,))
    finally:
        queue.close()
        queue.join_thread()


def test_max_tasks_per_child_replaces_workers(cluster):
    with DistributedExecutor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(pid_of).result(timeout=TIMEOUT) for _ in range(6)]
    assert all(pids.count(p) <= 2 for p in pids), pids
    assert len(set(pids)) >= 3


# ---------------------------------------------------------------------------- faults
def test_worker_crash_is_retried(cluster, tmp_path):
    with DistributedExecutor() as ex:
        assert ex.submit(crash_once, str(tmp_path / "m")).result(timeout=TIMEOUT) == "survived"


def test_worker_crash_past_retries_fails_only_that_future(cluster):
    with DistributedExecutor(max_retries=0) as ex:
        doomed = ex.submit(crash_always)
        fine = [ex.submit(square, i) for i in range(10)]
        with pytest.raises(farpool.WorkerCrashedError) as info:
            doomed.result(timeout=TIMEOUT)
        assert isinstance(info.value, BrokenProcessPool)  # what ProcessPoolExecutor code catches
        assert "crash_always" in str(info.value) and "max_retries=0" in str(info.value)
        assert [f.result(timeout=TIMEOUT) for f in fine] == [i * i for i in range(10)]
        assert ex.submit(square, 4).result(timeout=TIMEOUT) == 16
        # It pickles (and stays both) like any exception a program may pass on.
        again = pickle.loads(pickle.dumps(info.value))
        assert isinstance(again, farpool.WorkerCrashedError) and isinstance(again, BrokenProcessPool)
        assert str(again) == str(info.value)


@pytest.mark.parametrize("make, expected", [
    (lambda ex: ex.submit(identity, BadUnpickle()), pickle.UnpicklingError),   # arguments, in the worker
    (lambda ex: ex.submit(identity, ExitUnpickle()), pickle.UnpicklingError),
    (lambda ex: ex.submit(make_bad_unpickle), pickle.UnpicklingError),         # the result, here
    (lambda ex: ex.submit(make_exit_unpickle), pickle.UnpicklingError),
], ids=["args-raise", "args-exit", "result-raise", "result-exit"])
def test_what_does_not_unpickle_fails_its_future_as_broken_process_pool(ex, make, expected):
    with pytest.raises(expected) as info:
        make(ex).result(timeout=TIMEOUT)
    assert isinstance(info.value, BrokenProcessPool)
    assert "raised while unpickling" in "\n".join(getattr(info.value, "__notes__", []))
    assert not hasattr(info.value, "_farpool_phase")
    assert ex.submit(square, 3).result(timeout=TIMEOUT) == 9  # the executor goes on


def test_a_result_that_does_not_pickle_raises_its_own_error(ex):
    with pytest.raises(pickle.PicklingError, match="cannot pickle this on purpose") as info:
        ex.submit(make_bad_pickle).result(timeout=TIMEOUT)
    assert not isinstance(info.value, BrokenProcessPool)  # the stdlib's worker reports it as itself
    assert "cannot pickle the result of make_bad_pickle" in "\n".join(info.value.__notes__)
    assert isinstance(info.value.__cause__, cf.process._RemoteTraceback)


def test_unpicklable_argument_fails_that_future_with_the_original_error(ex):
    fut = ex.submit(square, threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        fut.result(timeout=TIMEOUT)
    assert ex.submit(square, 5).result(timeout=TIMEOUT) == 25


# ---------------------------------------------------------------------------- resources and data
def test_options_resource_hints(ex):
    assert ex.options(num_cpus=0.5).submit(square, 6).result(timeout=TIMEOUT) == 36
    assert list(ex.options(num_cpus=1, max_retries=1).map(square, range(3))) == [0, 1, 4]
    with pytest.raises(ValueError, match="no node of this cluster can run"):
        ex.options(num_gpus=1).submit(square, 1)  # the embedded test cluster has no GPU
    with pytest.raises(TypeError, match="unknown option"):
        ex.options(num_cpu=1)


def test_big_array_shared_by_a_map_and_mutated_in_place(ex):
    arr = np.ones(300_000)  # 2.4 MB: put once for the whole map
    total = float(arr.sum())
    got = list(ex.map(mutate_and_sum, [arr] * 6, range(6), timeout=TIMEOUT))
    assert got == [total - 2.0] * 6  # each task saw a fresh copy
    assert float(arr.sum()) == total  # the caller's array is untouched
    assert all(ex.map(is_writable, [np.ones(10), np.ones(20_000), arr], timeout=TIMEOUT))


def test_object_ref_arguments_are_resolved(ex):
    ref = farpool.put(21)
    assert ex.submit(add, ref, ref).result(timeout=TIMEOUT) == 42
    assert list(ex.map(add, [ref, ref], [1, 2], timeout=TIMEOUT)) == [22, 23]


# ---------------------------------------------------------------------------- scripts
def test_initializer_in_main_sets_a_global(tmp_path):
    result = run_script(tmp_path, """
        from farpool import DistributedExecutor as ProcessPoolExecutor
        STATE = None
        def init(value):
            global STATE
            STATE = value
        def read(_):
            return STATE
        if __name__ == "__main__":
            with ProcessPoolExecutor(2, initializer=init, initargs=("ready",)) as ex:
                print(sorted(set(ex.map(read, range(10)))))
    """, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['ready']"


def test_facades_share_the_cluster_they_start_until_the_last_shuts_down(tmp_path):
    result = run_script(tmp_path, """
        import time
        import farpool
        from farpool import DistributedExecutor, Pool
        def sq(x):
            return x * x
        if __name__ == "__main__":
            assert not farpool.is_initialized()
            ex = DistributedExecutor()
            info = farpool.nodes()
            pool = Pool(2)
            assert farpool.nodes() == info or farpool.is_initialized()
            assert ex.submit(sq, 3).result(timeout=60) == 9
            ex.shutdown()
            assert farpool.is_initialized(), "the pool still uses it"
            assert pool.map(sq, range(4)) == [0, 1, 4, 9]
            pool.close(); pool.join()
            assert not farpool.is_initialized(), "the last facade stopped the cluster it started"
            farpool.init(num_cpus=1)
            with DistributedExecutor() as ex2:
                assert ex2.submit(sq, 2).result(timeout=60) == 4
            assert farpool.is_initialized(), "a cluster the user started is left alone"
            farpool.shutdown()
            stale = DistributedExecutor()  # starts one, which the user then stops under it
            farpool.shutdown()
            ex3 = DistributedExecutor()
            ex3.shutdown()
            assert not farpool.is_initialized(), "the stale executor does not keep the new cluster alive"
            ex4 = DistributedExecutor()
            fut = ex4.submit(sq, 5)
            ex4.shutdown(wait=False)  # the cluster stops once the work is done
            assert fut.result(timeout=60) == 25
            deadline = time.monotonic() + 60
            while farpool.is_initialized() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not farpool.is_initialized()
            print("ok")
    """, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lost_cluster_breaks_the_executor(cluster, gate):
    ex = DistributedExecutor()
    fut = ex.submit(wait_at_gate, gate.path)
    gate.wait_arrivals(1)
    farpool.shutdown()
    try:
        with pytest.raises(cf.BrokenExecutor):
            fut.result(timeout=TIMEOUT)
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(square, 1)
        ex.shutdown()
    finally:
        farpool.init(num_cpus=2)  # for the module's cluster fixture to shut down
