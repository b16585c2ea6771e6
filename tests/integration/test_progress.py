"""Progress bars: tqdm around the facades' iterators works as with the stdlib, and
farpool.progress(refs) and farpool.wait(..., progress=True) draw one on a terminal and
nothing elsewhere."""

import io
import sys

import joblib
import pytest
from tqdm import tqdm

import farpool
import farpool.joblib
from farpool import DistributedExecutor, Pool
from farpool_testing import TIMEOUT, wait_at_gate


def square(x):
    return x * x


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_tqdm_counts_pool_imap_and_executor_map(cluster):
    out = io.StringIO()
    with Pool(2) as pool:
        got = list(tqdm(pool.imap(square, range(12)), total=12, file=out, desc="imap"))
    assert got == [x * x for x in range(12)] and "imap: 100%" in out.getvalue() and "12/12" in out.getvalue()
    out = io.StringIO()
    with DistributedExecutor(2) as ex:
        got = list(tqdm(ex.map(square, range(12), timeout=TIMEOUT), total=12, file=out, desc="map"))
    assert got == [x * x for x in range(12)] and "12/12" in out.getvalue()


def test_tqdm_counts_joblib_results_as_they_come(cluster):
    farpool.joblib.register()
    out = io.StringIO()
    with joblib.parallel_config(backend="farpool", n_jobs=2):
        results = joblib.Parallel(return_as="generator")(joblib.delayed(square)(i) for i in range(10))
        got = list(tqdm(results, total=10, file=out))
    assert got == [x * x for x in range(10)] and "10/10" in out.getvalue()


def test_progress_draws_a_bar_on_a_terminal_and_nothing_elsewhere(cluster):
    task = farpool.remote(square)
    refs = [task.remote(i) for i in range(8)]
    screen = Terminal()
    assert farpool.progress(refs, desc="squares", file=screen) == refs
    assert "squares" in screen.getvalue() and "8/8" in screen.getvalue(), screen.getvalue()
    assert farpool.get(refs, timeout=TIMEOUT) == [x * x for x in range(8)]
    log = io.StringIO()
    farpool.progress([task.remote(2)], file=log)
    assert log.getvalue() == ""


def test_wait_with_progress_counts_towards_num_returns_on_a_terminal_and_is_silent_elsewhere(cluster, gate,
                                                                                         monkeypatch):
    task = farpool.remote(square)
    refs = [task.remote(i) for i in range(6)]
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    ready, not_ready = farpool.wait(refs, num_returns=6, timeout=TIMEOUT, progress=True)
    assert (ready, not_ready) == (refs, []) and "6/6" in screen.getvalue(), screen.getvalue()
    # one that never ends in time: the bar shows what was done when the timeout ran out
    held = farpool.remote(wait_at_gate).remote(gate.path, "late")
    gate.wait_arrivals(1)
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    ready, not_ready = farpool.wait([refs[0], held], num_returns=2, timeout=0.5, progress=True)
    assert (ready, not_ready) == ([refs[0]], [held]) and "1/2" in screen.getvalue(), screen.getvalue()
    gate.open()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert farpool.wait([held], timeout=TIMEOUT, progress=True) == ([held], [])
    assert log.getvalue() == "" and farpool.get(held, timeout=TIMEOUT) == "late"
    with pytest.raises(TypeError, match="`progress` must be a bool, got str"):
        farpool.wait(refs, progress="yes")
