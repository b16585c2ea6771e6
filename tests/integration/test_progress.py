"""Progress bars: tqdm around the facades' iterators works as with the stdlib, and
farpool.progress(refs) draws one on a terminal and nothing elsewhere."""

import io

import joblib
from tqdm import tqdm

import farpool
import farpool.joblib
from farpool import DistributedExecutor, Pool
from farpool_testing import TIMEOUT


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
