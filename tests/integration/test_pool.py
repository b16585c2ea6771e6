"""farpool.Pool on a real embedded cluster: multiprocessing.pool.Pool's contract and where farpool does better.

CPython's own pool tests run against farpool.Pool in compat/ (python compat/run.py);
these are the essentials and the farpool-specific behaviours.
"""

import gc
import logging
import multiprocessing
import multiprocessing.pool
import pickle

import pytest

import farpool
from farpool import Pool
from farpool.pool import AsyncResult, BrokenPoolError
from farpool_testing import TIMEOUT, crash_once, get_value, pid_of, run_script, set_value, square, wait_at_gate


def mul(a, b):
    return a * b


def kw(a, b=0, *, c=0):
    return (a, b, c)


def fail_on(x, bad=3):
    if x == bad:
        raise KeyError(x)
    return x


def bad_initializer():
    raise RuntimeError("pool initializer failed on purpose")


@pytest.fixture
def pool(cluster):
    p = Pool(4)
    yield p
    p.terminate()
    p.join()


# ---------------------------------------------------------------------------- the methods
def test_apply_map_starmap(pool):
    assert pool.apply(square, (5,)) == 25
    assert pool.apply(kw, (1,), {"b": 2, "c": 3}) == (1, 2, 3)
    assert pool.map(square, range(100)) == [i * i for i in range(100)]
    assert pool.map(square, range(100), chunksize=7) == [i * i for i in range(100)]
    assert pool.map(square, (i for i in range(10))) == [i * i for i in range(10)]
    assert pool.starmap(mul, [(i, i + 1) for i in range(20)]) == [i * (i + 1) for i in range(20)]
    assert pool.map(int, ["1", "2"]) == [1, 2]  # classes and builtins as functions
    assert pool.map(square, []) == []


def test_async_results_and_callbacks(pool):
    got, errors = [], []
    r = pool.apply_async(square, (7,), callback=got.append, error_callback=errors.append)
    assert isinstance(r, AsyncResult)
    assert r.get(timeout=TIMEOUT) == 49
    r.wait(TIMEOUT)
    assert r.ready() and r.successful()
    m = pool.map_async(square, range(10), callback=got.append)
    assert m.get(timeout=TIMEOUT) == [i * i for i in range(10)]
    s = pool.starmap_async(mul, [(2, 3)], callback=got.append)
    assert s.get(timeout=TIMEOUT) == [6]
    assert got == [49, [i * i for i in range(10)], [6]]
    e = pool.map_async(fail_on, range(6), chunksize=1, callback=got.append, error_callback=errors.append)
    with pytest.raises(KeyError):
        e.get(timeout=TIMEOUT)
    assert not e.successful()
    assert len(errors) == 1 and isinstance(errors[0], KeyError)
    assert pool.map_async(square, []).get(timeout=TIMEOUT) == []


def test_errors_are_the_users_with_remote_traceback(pool):
    with pytest.raises(KeyError) as info:
        pool.apply(fail_on, (3,))
    assert type(info.value) is KeyError
    cause = info.value.__cause__
    assert type(cause) is multiprocessing.pool.RemoteTraceback
    assert "raise KeyError(x)" in cause.tb


def test_async_result_timeout_and_not_ready(pool, gate):
    r = pool.apply_async(wait_at_gate, (gate.path, "late"))
    gate.wait_arrivals(1)
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    assert not r.ready()
    with pytest.raises(ValueError, match="not ready"):
        r.successful()
    gate.open()
    assert r.get(timeout=TIMEOUT) == "late"


def test_imap_in_order_and_imap_unordered(pool):
    assert list(pool.imap(square, range(30))) == [i * i for i in range(30)]
    assert list(pool.imap(square, range(30), chunksize=4)) == [i * i for i in range(30)]
    assert sorted(pool.imap_unordered(square, range(30), chunksize=3)) == [i * i for i in range(30)]
    assert list(pool.imap(square, [])) == []
    with pytest.raises(ValueError, match="Chunksize must be 1"):
        pool.imap(square, range(3), chunksize=0)


def test_imap_reads_a_generator_lazily_and_raises_its_error_in_place(pool):
    import itertools
    seen = []

    def numbers():
        for i in itertools.count():
            seen.append(i)
            yield i
    it = pool.imap(square, numbers())
    assert [it.next(timeout=TIMEOUT) for _ in range(10)] == [i * i for i in range(10)]
    assert len(seen) < 10_000  # bounded prefetch over an endless input

    def failing():
        yield from range(3)
        raise ValueError("input broke")
    it = pool.imap(square, failing())
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(ValueError, match="input broke"):
        next(it)


def fail_every_500th(x):
    if x % 500 == 7:
        raise KeyError(x)
    return x


@pytest.fixture
def grouping(monkeypatch):
    """imap groups small chunks into tasks at once (however slowly tasks come back on a loaded
    machine); the sizes of the groups read are recorded."""
    from farpool._facade import dispatcher
    monkeypatch.setattr(dispatcher, "GROUP_TASK_S", 3600.0)
    sizes = []
    read = dispatcher._Feed._read

    def spy(feed, want):
        sizes.append(want // feed.chunksize)
        return read(feed, want)
    monkeypatch.setattr(dispatcher._Feed, "_read", spy)
    return sizes


def outcomes(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(it.next(timeout=TIMEOUT))
        except KeyError as error:
            out.append(("error", error.args[0], type(error.__cause__).__name__))
    with pytest.raises(StopIteration):
        it.next(timeout=TIMEOUT)
    return out


def test_imap_groups_small_chunks_and_each_fails_alone(pool, grouping):
    expected = [("error", i, "RemoteTraceback") if i % 500 == 7 else i for i in range(3000)]
    assert outcomes(pool.imap(fail_every_500th, range(3000)), 3000) == expected
    assert max(grouping) > 1, grouping
    grouping.clear()
    got = outcomes(pool.imap_unordered(fail_every_500th, range(3000)), 3000)
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    assert max(grouping) > 1, grouping
    # chunks of 3: a failing chunk fails alone, its neighbours in the group arrive
    expected = [i for i in range(3000) if i // 3 not in {j // 3 for j in range(7, 3000, 500)}]
    got = [x for x in outcomes(pool.imap(fail_every_500th, range(3000), 3), len(expected) + 6) if type(x) is int]
    assert got == expected


def test_imap_input_error_inside_a_group_comes_after_the_whole_chunks_before_it(pool, grouping):
    def numbers(n):
        yield from range(n)
        raise ValueError("input broke")
    it = pool.imap(square, numbers(1501), 2)  # the error inside the chunk (1500, ...)
    assert [it.next(timeout=TIMEOUT) for _ in range(1500)] == [i * i for i in range(1500)]
    with pytest.raises(ValueError, match="input broke"):
        it.next(timeout=TIMEOUT)
    assert max(grouping) > 1, grouping


def test_imap_next_timeout(pool, gate):
    it = pool.imap(wait_at_gate, [gate.path])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    gate.open()
    assert it.next(timeout=TIMEOUT) is None


def test_work_goes_to_whichever_worker_is_free(cluster, gate):
    # One task blocks a worker; every other task still finishes on the other one (no chunk pinning).
    with Pool(2) as p:
        it = p.imap_unordered(wait_at_gate, [gate.path])
        short = p.imap_unordered(square, range(20), chunksize=1)
        gate.wait_arrivals(1)
        assert sorted(short.next(timeout=TIMEOUT) for _ in range(20)) == [i * i for i in range(20)]
        gate.open()
        assert it.next(timeout=TIMEOUT) is None


# ---------------------------------------------------------------------------- lifecycle
def test_close_join_terminate_and_states(cluster, gate):
    p = Pool(2)
    assert p._processes == 2 and len(p._pool) == 2
    with pytest.raises(ValueError, match="Pool is still running"):
        p.join()
    r = p.map_async(square, range(10))
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(square, [1])
    p.join()
    assert r.get(timeout=0) == [i * i for i in range(10)]

    p = Pool(2)
    long = p.apply_async(wait_at_gate, (gate.path,))
    gate.wait_arrivals(1)
    p.terminate()  # kills the running task: no waiting for the gate
    p.join()
    with pytest.raises(farpool.TaskCancelledError):
        long.get(timeout=TIMEOUT)


def test_context_manager_terminates(cluster):
    with Pool(2) as p:
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]
    p.join()
    with pytest.raises(ValueError, match="Pool not running"):
        p.map_async(square, [1])
    with pytest.raises(ValueError):
        with p:
            pass


def test_pool_cannot_be_pickled_and_warns_when_left_running(cluster):
    p = Pool(1)
    with pytest.raises(NotImplementedError):
        pickle.dumps(p)
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del p
        gc.collect()


def test_constructor_validation(cluster):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="Number of processes must be at least 1"):
            Pool(bad)
    for bad in (0, -1, 0.5, "12"):
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(2, maxtasksperchild=bad)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Pool(initializer=1)


def test_raising_callback_is_logged_and_later_results_arrive(pool, caplog):
    def bad_callback(_):
        raise RuntimeError("callback bug")
    with caplog.at_level(logging.ERROR, logger="farpool.pool"):
        first = pool.apply_async(square, (2,), callback=bad_callback)
        assert first.get(timeout=TIMEOUT) == 4
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    assert any("callback" in rec.getMessage() for rec in caplog.records)


# ---------------------------------------------------------------------------- workers of its own, faults
def test_initializer_and_maxtasksperchild(cluster):
    with Pool(2, initializer=set_value, initargs=("init",)) as p:
        assert set(p.map(get_value, range(20), chunksize=1)) == {"init"}
    with Pool(1, maxtasksperchild=2) as p:
        pids = [p.apply(pid_of) for _ in range(6)]
    assert all(pids.count(x) <= 2 for x in pids), pids


def touch(path):
    open(path, "w").close()


def test_initializer_runs_in_an_idle_pool(cluster, tmp_path):
    """The stdlib's pool starts its processes at once, each running the initializer: so does ours."""
    marker = tmp_path / "initialized"
    p = Pool(1, initializer=touch, initargs=(str(marker),))
    p.close()
    p.join()
    assert marker.exists()


def test_initializer_that_raises_breaks_the_pool(cluster):
    with Pool(1, initializer=bad_initializer) as p:
        # The pool starts its worker at once: apply_async itself raises if the initializer
        # already failed there, else the result does.
        with pytest.raises(BrokenPoolError, match="pool initializer failed on purpose"):
            p.apply_async(square, (2,)).get(timeout=TIMEOUT)
        with pytest.raises(BrokenPoolError):
            p.apply_async(square, (3,))


def test_worker_killed_mid_task_is_retried(pool, tmp_path):
    assert pool.apply(crash_once, (str(tmp_path / "m"),)) == "survived"
    assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_infeasible_resources_fail_at_once(cluster):
    with Pool(1, num_gpus=1) as p:  # the test cluster has no GPU
        with pytest.raises(ValueError, match="no node of this cluster can run"):
            p.apply_async(square, (1,))


def test_pool_in_a_script_with_initializer_in_main(tmp_path):
    result = run_script(tmp_path, """
        from farpool import Pool
        COUNTER = 0
        def init(start):
            global COUNTER
            COUNTER = start
        def bump(x):
            global COUNTER
            COUNTER += 1
            return COUNTER >= 100
        if __name__ == "__main__":
            with Pool(2, initializer=init, initargs=(100,)) as pool:
                print(all(pool.map(bump, range(20))))
    """, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def writable_sum(arr):
    arr[0] += 1  # the stdlib hands each task a writable array of its own
    return float(arr.sum())


def frozen_array(n):
    import numpy as np
    arr = np.full(n, float(n))
    arr.flags.writeable = False
    return arr


def get_ref(n):
    return farpool.put(n)


def test_map_results_of_every_kind_arrive_as_with_the_stdlib(pool):
    # arrays come back writable (read-only in the task, small or large), refs stay usable, lambdas arrive
    for n in (3, 20_000):
        out = pool.map(frozen_array, [n, n + 1], chunksize=2)
        out[0][0] = -1.0
        assert out[0].tolist()[:2] == [-1.0, float(n)] and out[1].flags.writeable
    refs = pool.map(get_ref, [4, 5], chunksize=2)
    assert farpool.get(refs) == [4, 5]
    assert [f() for f in pool.map(make_lambda, [1, 2], chunksize=2)] == [1, 2]
    assert [x.tolist() for x in pool.imap(frozen_array, [1, 2])] == [[1.0], [2.0, 2.0]]


def make_lambda(n):
    return lambda: n


def test_map_items_of_every_kind_arrive_as_with_the_stdlib(pool):
    import numpy as np
    frozen = np.ones(8)
    frozen.flags.writeable = False  # read-only in the caller; the task still gets a writable copy
    ref = farpool.put(5)
    assert pool.map(writable_sum, [frozen] * 3 + [np.ones(4)], chunksize=2) == [9.0, 9.0, 9.0, 5.0]
    assert pool.map(square, [ref, 3, ref], chunksize=3) == [25, 9, 25]  # refs are resolved
    assert pool.map(apply_it, [lambda: 1, lambda: 2]) == [1, 2]  # items only cloudpickle can carry
    assert pool.starmap(mul, [(2, 3), (4, 5)], chunksize=2) == [6, 20]


def apply_it(f):
    return f()


def a_lock(_=None):
    import threading
    return threading.Lock()


def test_a_result_that_cannot_be_pickled_is_a_maybe_encoding_error_and_the_pool_goes_on(pool):
    # CPython's test_unpickleable_result (left out in compat/: its lambda result arrives with farpool,
    # which ships what cloudpickle can), with a result nothing can pickle: each time the caller and the
    # error callback get a MaybeEncodingError, and the pool keeps its workers.
    for _ in range(5):
        seen = []
        res = pool.apply_async(a_lock, error_callback=seen.append)
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
            res.get(timeout=TIMEOUT)
        assert seen and isinstance(seen[0], multiprocessing.pool.MaybeEncodingError)
        assert info.value.exc is not None and info.value.value is not None
    assert pool.map(square, range(4)) == [0, 1, 4, 9]
