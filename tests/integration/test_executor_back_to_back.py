"""The embedded cluster the facades start, ended and started again back to back, and lost under them.

Issue #17: under load, a cluster started right after another one ended was seen
to die with nothing in its logs, and once a driver hung on a dead one.  Here,
executors (and pools) open and close many times in a row, each with a cluster
of its own, and the embedded head or node agent is killed (SIGKILL) while
futures wait: they must fail with ``BrokenExecutor`` (a pool's results with
its error), never hang.  The CPython tests that run subprocess scripts
importing the executor by name from ``concurrent.futures`` are here too, with
farpool's import (compat/cpython_futures.py lists them as excluded).
"""

import concurrent.futures as cf
import os
import pickle
import signal
import threading

import pytest

import farpool
from farpool import DistributedExecutor, Pool
from farpool._private import session
from farpool_testing import TIMEOUT, run_script, square, wait_at_gate, wait_until

# Iterations of the back-to-back test: bounded for CI on 2 cores; the slow variant runs more.
BACK_TO_BACK = 24
BACK_TO_BACK_SLOW = 300


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle this on purpose")


@pytest.fixture
def no_cluster():
    """Nothing initialized: the facades start (and end) clusters of their own."""
    farpool.shutdown()
    yield
    farpool.shutdown()


def _one_round(i: int) -> None:
    """One facade, used and closed in one of the ways programs do; its cluster ends with it."""
    kind = i % 4
    if kind == 0:
        with DistributedExecutor(max_workers=2) as ex:
            assert list(ex.map(square, range(6))) == [x * x for x in range(6)]
    elif kind == 1:
        ex = DistributedExecutor(max_workers=2)
        futures = [ex.submit(square, x) for x in range(4)]
        ex.shutdown(wait=False)  # the cluster ends once the work is done, on the callback thread
        _, not_done = cf.wait(futures, timeout=TIMEOUT)
        assert not not_done, f"round {i}: {len(not_done)} futures still pending\n{_cluster_report()}"
        assert [f.result(timeout=0) for f in futures] == [0, 1, 4, 9]
    elif kind == 2:
        ex = DistributedExecutor(max_workers=2)
        futures = [ex.submit(square, x) for x in range(20)]
        ex.shutdown(wait=True, cancel_futures=True)
        assert all(f.cancelled() or f.result(timeout=0) == x * x for x, f in enumerate(futures))
    else:
        with Pool(2) as pool:
            assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def _cluster_report() -> str:
    """What a failure should show: this process's sessions, their processes and their logs' ends."""
    root = session.tmp_root()
    lines = [f"threads: {[t.name for t in threading.enumerate()]}"]
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        lines.append(f"{path}: {sorted(os.listdir(path))}")
        for pidfile in ("head.pid", "node.pid"):
            try:
                pid = int(open(os.path.join(path, pidfile)).read())
                lines.append(f"  {pidfile} {pid} alive={session.pid_alive(pid)}")
            except (OSError, ValueError):
                pass
        for log in ("head.log", "node.log"):
            try:
                lines.append(f"  {log}: " + "".join(open(os.path.join(path, log)).readlines()[-15:]))
            except OSError:
                pass
    return "\n".join(lines)


def _back_to_back(n: int) -> None:
    for i in range(n):
        _one_round(i)
        # The cluster of this round is gone before the next one starts (unless a shutdown(wait=False)
        # is still stopping it on the callback thread: then the next facade joins or follows it).
        if i % 4 != 1:
            assert not farpool.is_initialized(), f"round {i}: the last facade left its cluster running"


@pytest.mark.timeout(300)
def test_executors_back_to_back(no_cluster):
    _back_to_back(BACK_TO_BACK)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a hang guard: 300 rounds took over 1200 s at a load of 17 on 2 cores (6 s a round)
def test_executors_back_to_back_many(no_cluster):
    _back_to_back(BACK_TO_BACK_SLOW)


# ---------------------------------------------------------------------------- a cluster killed under the facades
def _runtime_pid(which: str) -> int:
    """The pid of this process's embedded head or node agent, from its session's pid files."""
    root = session.tmp_root()
    mine = []
    for name in os.listdir(root):
        try:
            with open(os.path.join(root, name, "owner.pid")) as f:
                if int(f.read()) == os.getpid():
                    mine.append(os.path.join(root, name))
        except (OSError, ValueError):
            continue
    assert len(mine) == 1, f"expected one session of this process in {root}, found {mine}"
    path = os.path.join(mine[0], f"{which}.pid")
    wait_until(lambda: os.path.exists(path) and open(path).read().strip(), f"{path} to be written")
    with open(path) as f:
        return int(f.read())


@pytest.mark.parametrize("which", ["head", "node"])
def test_killed_runtime_fails_the_executors_futures(no_cluster, gate, which):
    ex = DistributedExecutor(max_workers=2)
    running = [ex.submit(wait_at_gate, gate.path, i) for i in range(2)]
    waiting = [ex.submit(square, i) for i in range(4)]  # still in this process (max_workers)
    gate.wait_arrivals(2)
    os.kill(_runtime_pid(which), signal.SIGKILL)
    # concurrent.futures.wait must return (a generous bound on the wait itself, not a timed assertion).
    done, not_done = cf.wait(running + waiting, timeout=TIMEOUT)
    assert not not_done, f"{len(not_done)} futures still pending after the {which} was killed"
    for fut in running + waiting:
        assert isinstance(fut.exception(timeout=0), cf.BrokenExecutor)
    assert f"{which if which == 'head' else 'node agent'}" in str(running[0].exception(timeout=0))
    with pytest.raises(cf.BrokenExecutor):
        ex.submit(square, 1)
    ex.shutdown()
    assert not farpool.is_initialized()
    with DistributedExecutor(max_workers=1) as ex2:  # the next one starts a fresh cluster
        assert ex2.submit(square, 7).result(timeout=TIMEOUT) == 49


@pytest.mark.parametrize("which", ["head", "node"])
def test_killed_runtime_fails_the_pools_results(no_cluster, gate, which):
    pool = Pool(2)
    running = [pool.apply_async(wait_at_gate, (gate.path, i)) for i in range(2)]
    mapped = pool.map_async(square, range(10))
    gate.wait_arrivals(2)
    os.kill(_runtime_pid(which), signal.SIGKILL)
    for result in running + [mapped]:
        result.wait(timeout=TIMEOUT)
        assert result.ready(), f"a result still pending after the {which} was killed"
        assert not result.successful()
        with pytest.raises(farpool.FarpoolError, match="cluster was lost"):
            result.get(timeout=0)
    pool.terminate()
    pool.join()
    assert not farpool.is_initialized()


# ---------------------------------------------------------------------------- CPython's subprocess scripts, farpool's import
_SLEEP_AND_TOUCH = """
    import sys, time
    from farpool import DistributedExecutor
    def sleep_and_touch(t, path):
        time.sleep(t)
        open(path, "w").close()
        return path
"""


def test_interpreter_exit_runs_pending_work(tmp_path):
    """CPython's test_interpreter_shutdown: work submitted and never waited for still runs at exit."""
    marker = tmp_path / "ran"
    result = run_script(tmp_path, _SLEEP_AND_TOUCH + f"""
    if __name__ == "__main__":
        t = DistributedExecutor(5)
        t.submit(sleep_and_touch, 1.0, {str(marker)!r})
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert marker.exists(), "the task submitted before exit did not run"


def test_shutdown_without_wait_at_exit_finishes_running_work(tmp_path):
    """CPython's test_hang_gh83386: shutdown(wait=False) then exit neither hangs nor drops the work."""
    marker = tmp_path / "ran"
    result = run_script(tmp_path, _SLEEP_AND_TOUCH + f"""
    if __name__ == "__main__":
        t = DistributedExecutor(max_workers=3)
        t.submit(sleep_and_touch, 1.0, {str(marker)!r})
        t.shutdown(wait=False)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert marker.exists(), "the task submitted before shutdown(wait=False) did not run"


def test_submit_at_interpreter_exit_raises(tmp_path):
    """CPython's test_submit_after_interpreter_shutdown, with farpool's import."""
    result = run_script(tmp_path, """
        import atexit
        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        from farpool import DistributedExecutor
        if __name__ == "__main__":
            t = DistributedExecutor(5)
            t.submit(id, 42).result()
    """)
    assert "RuntimeError: cannot schedule new futures" in result.stderr
    assert result.stdout.strip() == "runtime-error"


def test_unpicklable_task_then_shutdown_without_wait(no_cluster):
    """CPython's test_shutdown_deadlock_pickle without its private `_executor_manager_thread`."""
    with DistributedExecutor(max_workers=2) as ex:
        assert ex.submit(id, 42).result(timeout=TIMEOUT)
        fut = ex.submit(id, ErrorAtPickle())
        ex.shutdown(wait=False)
        with pytest.raises(pickle.PicklingError):
            fut.result(timeout=TIMEOUT)
    wait_until(lambda: not farpool.is_initialized(), "the executor's cluster to end")
