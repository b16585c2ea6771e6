"""farpool micro-benchmarks: the workloads of issue 7, runnable alone.

This module is self-contained (standard library only at import time; numpy and
psutil are used when present) so that ``farpool microbenchmark`` can load it by
path or copy it into the package.  ``benchmarks/harness.py`` imports it for the
shared workload code and runs the same workloads for the peers, each in its own
subprocess.

Public entry points
-------------------
``main(quick: bool) -> dict``
    Run every farpool workload in this process and return the results.
``run_system(factory, workloads, cfg, progress=None, workload_timeout=None)``
    Run ``workloads`` for any adapter (farpool or a peer).
``format_report(result) -> str``
    Markdown table of one ``main()`` result.

Every workload function takes an ``Adapter`` (or an adapter factory for the
workloads that start their own runtime) and a ``cfg`` dict (``sizes()``), and
returns ``{"metrics": {...}, "na": {metric: reason}, "note": str}``.  An
``NA`` exception means "this system does not support that": it is reported as
``n/a (reason)``, never as a crash.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import signal
import sys
import time
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))

#: workload names in report and run order.  ``cpu`` runs before the large-memory workloads:
#: on this kind of virtual machine the host takes CPU time from the guest (steal) for a while
#: after it has freed gigabytes (13-30 jiffies of steal per 2 s repetition after ``store``,
#: 1-5 before), which a system that ran ``store`` first paid in its efficiency and one without
#: put/get did not.  Its steal is reported beside its efficiency.
WORKLOADS = ["startup", "noop", "roundtrip", "map", "cpu", "bigarg", "bigresult", "store",
             "actor", "footprint", "tree"]
#: workloads that start (and stop) their own runtime each repetition
FRESH = ("startup", "footprint")

FULL = dict(reps=3, workers=2, noop=10_000, roundtrip=1_000, map=100_000,
            array_mb=200, bigarg_tasks=8, store_mb=1000, store_gets=20,
            actor_seq=1_000, actor_pipe=10_000, cpu_tasks=16, cpu_task_s=0.25, tree_leaves=1_024, settle_s=1.0,
            rep_budget_s=30.0)
QUICK = dict(reps=1, workers=2, noop=1_000, roundtrip=100, map=10_000,
             array_mb=20, bigarg_tasks=8, store_mb=100, store_gets=20,
             actor_seq=100, actor_pipe=1_000, cpu_tasks=16, cpu_task_s=0.1, tree_leaves=64, settle_s=0.5,
             rep_budget_s=30.0)


def sizes(quick: bool = False, **overrides) -> dict:
    cfg = dict(QUICK if quick else FULL)
    cfg["quick"] = bool(quick)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


class NA(Exception):
    """The system does not support this workload (reported as n/a)."""


# --------------------------------------------------------------------------
# task functions (module level so every system can pickle them by reference)
# --------------------------------------------------------------------------

def noop(*args):
    return None


def inc(x):
    return x + 1


def first(arr):
    """Read one element of a (big) array argument."""
    return float(arr[0])


def make_array(n):
    import numpy as np
    return np.ones(n)


def leaf(i):
    return i


def add(a, b):
    return a + b


def spin(n):
    """Pure-Python CPU work (``n`` loop iterations); returns the CPU seconds it used."""
    c0 = time.thread_time()
    x = 0
    for i in range(n):
        x = (x + i * i) % 1_000_003
    return time.thread_time() - c0 + (x & 0)


# spin_for looks at its thread's CPU clock every this many iterations (~1 ms of work):
# more overshoots the target by more, fewer spends more of the task in the clock.
SPIN_CHECK = 10_000


def spin_for(cpu_s):
    """The work unit calibrated in the process that runs it: ``spin``'s loop until this
    thread has used ``cpu_s`` CPU seconds, however fast that process runs the loop (a
    fixed iteration count calibrated elsewhere gives systems whose workers run it faster
    less work and a lower efficiency for the same wall time).  Returns the CPU seconds used."""
    clock = time.thread_time
    c0 = clock()
    end = c0 + cpu_s
    x = 0
    while clock() < end:
        for i in range(SPIN_CHECK):
            x = (x + i * i) % 1_000_003
    return clock() - c0 + (x & 0)


def map_chunk(fn, chunk):
    return [fn(x) for x in chunk]


class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


def calibrate_spin(target_s: float, tries: int = 7) -> tuple[int, float]:
    """Iterations of ``spin`` that take ``target_s`` on an idle core, and ``target_s``.

    The fastest of several short probes estimates the uncontended speed (the
    machine may be shared), so the ideal wall time is ``target_s`` per task.
    """
    probe = 100_000
    spin(probe)
    best = min(_timed(spin, probe) for _ in range(tries))
    return max(1, int(probe * target_s / best)), float(target_s)


def _timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def ensure_importable():
    """Let worker processes import this module (tasks are pickled by name)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    pp = os.environ.get("PYTHONPATH", "")
    parts = [p for p in pp.split(os.pathsep) if p]
    if HERE not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([HERE] + parts)


def _this_module():
    """This module under a name that workers can import."""
    mod = sys.modules.get(__name__)
    if __name__ == "__main__":  # run as a script: re-import under its own name
        ensure_importable()
        import importlib
        mod = importlib.import_module("farpool_bench")
    return mod


# --------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------

class Adapter:
    """One system's way of doing each basic operation.

    ``run_many`` submits everything, then gathers everything; ``call`` is one
    synchronous round trip.  Optional capabilities raise ``NA``.
    """

    name = "?"
    notes: dict = {}

    def __init__(self, workers: int = 2):
        self.workers = workers

    def start(self):
        raise NotImplementedError

    def stop(self):
        pass

    def run_many(self, fn, arglists):
        raise NotImplementedError

    def call(self, fn, *args):
        return self.run_many(fn, [args])[0]

    # objects ---------------------------------------------------------------
    def put(self, value):
        raise NA("no put/scatter API")

    def free(self, ref):
        pass

    # refs passed between tasks (tree) ----------------------------------------
    def submit(self, fn, *args):
        raise NA("no object refs/futures as task arguments")

    def get(self, handle):
        raise NA("no object refs")

    # drop-in facade (bigarg.facade_value_s) -------------------------------------
    def facade(self):
        """(run(fn, items) -> [fn(x) for x in items], close()) through the system's drop-in facade."""
        raise NA("no drop-in facade")

    # map ---------------------------------------------------------------------
    def mappers(self):
        """[(metric, open)] where open() -> (map(fn, items, chunksize) -> list, close())."""
        return []

    def chunked_mapper(self):
        """("chunked_items_per_s", open): the items cut into chunks, one task each."""
        def open_():
            def m(fn, items, cs):
                chunks = [items[i:i + cs] for i in range(0, len(items), cs)]
                out = []
                for part in self.run_many(map_chunk, [(fn, c) for c in chunks]):
                    out.extend(part)
                return out
            return m, lambda: None
        return ("chunked_items_per_s", open_)

    # actors ----------------------------------------------------------------
    def actor_new(self, cls):
        raise NA("no actors")

    def actor_call(self, handle, method):
        raise NA("no actors")

    def actor_pipeline(self, handle, method, n):
        raise NA("no actors")

    def actor_del(self, handle):
        pass


class FarpoolAdapter(Adapter):
    name = "farpool"
    notes = {
        "map": "farpool.Pool(2).map(chunksize); executor: DistributedExecutor(2).map(chunksize); "
               "chunked: one task per chunk",
        "bigarg": "put: farpool.put once, ref to 8 tasks; value: array as argument of each task; "
                  "facade: joblib.Parallel(n_jobs=2) with parallel_config(backend='farpool') "
                  "(farpool.joblib.register())",
        "store": "farpool.put / farpool.get; the ref is dropped to free the object",
        "tree": "leaves/internal tasks get refs as top-level arguments",
    }

    def __init__(self, workers: int = 2):
        super().__init__(workers)
        import farpool
        self.fp = farpool
        self._remote = {}
        missing = [n for n in ("init", "shutdown", "remote", "get") if not hasattr(farpool, n)]
        if missing:
            raise NA("farpool." + ", farpool.".join(missing) + " not available yet")

    def start(self):
        self.fp.init(num_cpus=self.workers)

    def stop(self):
        self.fp.shutdown()

    def _rf(self, fn):
        rf = self._remote.get(fn)
        if rf is None:
            rf = self._remote[fn] = self.fp.remote(fn)
        return rf

    def run_many(self, fn, arglists):
        rf = self._rf(fn)
        return self.fp.get([rf.remote(*a) for a in arglists])

    def call(self, fn, *args):
        return self.fp.get(self._rf(fn).remote(*args))

    def put(self, value):
        if not hasattr(self.fp, "put"):
            raise NA("farpool.put missing")
        return self.fp.put(value)

    def submit(self, fn, *args):
        return self._rf(fn).remote(*args)

    def get(self, handle):
        return self.fp.get(handle)

    def facade(self):
        try:
            from farpool.joblib import BACKEND_NAME, register
        except ImportError as e:  # joblib itself missing, or no farpool.joblib yet
            raise NA(f"farpool.joblib not importable: {e}")
        register()
        return joblib_runner(BACKEND_NAME, self.workers), lambda: None

    def mappers(self):
        fp, w = self.fp, self.workers

        def open_pool():
            if not hasattr(fp, "Pool"):
                raise NA("farpool.Pool not available yet")
            pool = fp.Pool(w)
            return (lambda fn, items, cs: pool.map(fn, items, chunksize=cs)), pool.terminate

        def open_executor():
            if not hasattr(fp, "DistributedExecutor"):
                raise NA("farpool.DistributedExecutor not available yet")
            ex = fp.DistributedExecutor(max_workers=w)
            return (lambda fn, items, cs: list(ex.map(fn, items, chunksize=cs))), ex.shutdown

        def open_imap():
            if not hasattr(fp, "Pool"):
                raise NA("farpool.Pool not available yet")
            pool = fp.Pool(w)
            return (lambda fn, items, cs: list(pool.imap(fn, items))), pool.terminate

        return [("items_per_s", open_pool), ("executor_items_per_s", open_executor),
                ("imap_items_per_s", open_imap), self.chunked_mapper()]

    def actor_new(self, cls):
        try:
            acls = self.fp.remote(cls)
        except Exception as e:  # decorator does not take classes yet
            raise NA(f"@farpool.remote on a class failed: {type(e).__name__}: {e}")
        if not hasattr(acls, "remote"):
            raise NA("@farpool.remote class has no .remote()")
        return acls.remote()

    def actor_call(self, handle, method):
        return self.fp.get(getattr(handle, method).remote())

    def actor_pipeline(self, handle, method, n):
        m = getattr(handle, method)
        return self.fp.get([m.remote() for _ in range(n)])

    def actor_del(self, handle):
        if hasattr(self.fp, "kill"):
            try:
                self.fp.kill(handle)
            except Exception:
                pass


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def median(xs):
    import statistics  # (here: workers import this module for its task functions)
    return statistics.median(xs) if xs else None


def pctl(xs, q):
    """q-th percentile (0..100), linear interpolation."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _need_numpy():
    try:
        import numpy as np
    except ImportError:
        raise NA("numpy not installed")
    return np


def _need_psutil():
    try:
        import psutil
    except ImportError:
        raise NA("psutil not installed")
    return psutil


def _collect():
    gc.collect()


def joblib_runner(backend, n_jobs):
    """run(fn, items) for ``joblib.Parallel(n_jobs)`` under ``backend`` (None: joblib's default, loky)."""
    try:
        import joblib
    except ImportError:
        raise NA("joblib not installed")
    config = getattr(joblib, "parallel_config", None) or joblib.parallel_backend  # joblib < 1.3

    def run(fn, items):
        if backend is None:
            return joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(fn)(x) for x in items)
        with config(backend=backend):
            return joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(fn)(x) for x in items)
    return run


def _mb_text(mb):
    return f"{mb / 1000:g} GB" if mb >= 1000 else f"{mb:g} MB"


class Reps:
    """``for _ in Reps(cfg)``: up to cfg["reps"] repetitions, fewer when one
    repetition already overran cfg["rep_budget_s"] (slow systems; at least 1).

    ``min_s``: a measurement whose repetitions are short (milliseconds: one scheduler
    hiccup moves it 10%) repeats, past cfg["reps"] and up to ten times as many, until
    its repetitions took ``min_s`` in all; the median is then of all of them.  Every
    system gets the same rule."""

    def __init__(self, cfg, min_s: float = 0.0):
        self.max = cfg["reps"]
        self.budget = cfg.get("rep_budget_s")
        self.min_s = min_s
        self.done = 0

    def __iter__(self):
        t0 = time.perf_counter()
        while self.done < self.max or (self.done < 10 * self.max and time.perf_counter() - t0 < self.min_s):
            yield self.done
            self.done += 1
            if self.budget and time.perf_counter() - t0 > self.budget:
                break


def _result(metrics, na=None, note=None, **extra):
    out = {"metrics": metrics}
    if na:
        out["na"] = na
    if note:
        out["note"] = note
    out.update(extra)
    return out


# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------

def w_startup(factory, cfg):
    firsts, stops = [], []
    reps = Reps(cfg)
    for _ in reps:
        _collect()
        t0 = time.perf_counter()
        a = factory()
        a.start()
        try:
            r = a.call(inc, 1)
            t1 = time.perf_counter()
            assert r == 2, r
        except BaseException:
            a.stop()
            raise
        t2 = time.perf_counter()
        a.stop()
        t3 = time.perf_counter()
        firsts.append(t1 - t0)
        stops.append(t3 - t2)
    return _result({"first_result_s": median(firsts), "shutdown_s": median(stops)}, reps=reps.done)


def w_footprint(factory, cfg):
    psutil = _need_psutil()
    me = psutil.Process()
    rss, pss, procs, own_rss, own_pss = [], [], [], [], []
    by_process = {}  # process name -> [count, RSS MB, PSS MB], of the last repetition
    reps = Reps(cfg)
    for _ in reps:
        _collect()
        base = me.memory_full_info()
        a = factory()
        a.start()
        try:
            a.call(noop)
            time.sleep(cfg["settle_s"])
            t_rss = t_pss = n = 0
            by_process = {}
            for p in me.children(recursive=True):
                try:
                    mi = p.memory_full_info()
                    name = p.name()
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                t_rss += mi.rss
                t_pss += mi.pss
                n += 1
                item = by_process.setdefault(name, [0, 0.0, 0.0])
                item[0] += 1
                item[1] += mi.rss / 1e6
                item[2] += mi.pss / 1e6
            now = me.memory_full_info()
        finally:
            a.stop()
        d_rss = max(0, now.rss - base.rss)
        d_pss = max(0, now.pss - base.pss)
        rss.append((t_rss + d_rss) / 1e6)
        pss.append((t_pss + d_pss) / 1e6)
        procs.append(n)
        own_rss.append(d_rss / 1e6)
        own_pss.append(d_pss / 1e6)
    return _result({"rss_mb": median(rss), "pss_mb": median(pss), "procs": median(procs),
                    "driver_rss_inc_mb": median(own_rss), "driver_pss_inc_mb": median(own_pss)},
                   note="sum over the driver's descendant processes + the driver's own increment",
                   reps=reps.done,
                   by_process={name: {"count": c, "rss_mb": round(r, 1), "pss_mb": round(q, 1)}
                               for name, (c, r, q) in sorted(by_process.items(), key=lambda kv: -kv[1][1])})


def w_noop(a, cfg):
    n = cfg["noop"]
    rates = []
    reps = Reps(cfg, min_s=2.0)  # (10,000 no-op tasks take ~0.3 s: the median of more of them)
    for _ in reps:
        args = [()] * n
        t0 = time.perf_counter()
        out = a.run_many(noop, args)
        dt = time.perf_counter() - t0
        assert len(out) == n
        rates.append(n / dt)
        del out
    return _result({"tasks_per_s": median(rates)}, reps=reps.done)


def w_roundtrip(a, cfg):
    n = cfg["roundtrip"]
    meds, p90s = [], []
    reps = Reps(cfg, min_s=1.0)  # (1,000 round trips take ~0.2 s)
    for _ in reps:
        lat = []
        pc = time.perf_counter
        for _ in range(n):
            t0 = pc()
            a.call(noop)
            lat.append(pc() - t0)
        meds.append(median(lat) * 1e6)
        p90s.append(pctl(lat, 90) * 1e6)
    return _result({"median_us": median(meds), "p90_us": median(p90s)}, reps=reps.done)


def w_map(a, cfg):
    n = cfg["map"]
    items = list(range(n))
    cs = max(1, n // (4 * a.workers))
    metrics, na = {}, {}
    mappers = a.mappers()
    if not mappers:
        raise NA("no map API")
    for metric, opener in mappers:
        try:
            fn, close = opener()
        except NA as e:
            na[metric] = str(e)
            continue
        try:
            rates = []
            fn(inc, items[:100], 25)  # warm up
            for _ in Reps(cfg, min_s=0.5):  # (a map of 100,000 tiny items takes ~10 ms)
                t0 = time.perf_counter()
                out = fn(inc, items, cs)
                dt = time.perf_counter() - t0
                assert len(out) == n and out[-1] == n and out[0] == 1, (len(out), out[-1])
                rates.append(n / dt)
                del out
            metrics[metric] = median(rates)
        except NA as e:
            na[metric] = str(e)
        except Exception as e:
            na[metric] = f"error: {type(e).__name__}: {e}"
        finally:
            try:
                close()
            except Exception:
                pass
    if not metrics and na:
        raise NA("; ".join(f"{k}: {v}" for k, v in na.items()))
    return _result(metrics, na, note=f"chunksize={cs}")


_fresh_arrays = itertools.count(2)


def _fresh_array(np, n):
    """A new touched array of ones whose last element differs from every earlier one's: no
    system may reuse an earlier copy, by identity or by content (farpool's shared_args)."""
    arr = np.ones(n)
    arr[-1] = next(_fresh_arrays)
    return arr


def w_bigarg(a, cfg):
    np = _need_numpy()
    n = int(cfg["array_mb"] * 1e6 / 8)
    k = cfg["bigarg_tasks"]
    metrics, na = {}, {}
    val, put = [], []
    reps = Reps(cfg)
    for _ in reps:
        # a fresh (touched) array each time: no system may reuse an earlier copy
        arr = _fresh_array(np, n)
        _collect()
        t0 = time.perf_counter()
        out = a.run_many(first, [(arr,)] * k)
        val.append(time.perf_counter() - t0)
        assert out == [1.0] * k, out
        _collect()
        if "put_s" in na:
            continue
        arr = _fresh_array(np, n)
        _collect()
        try:
            t0 = time.perf_counter()
            ref = a.put(arr)
            out = a.run_many(first, [(ref,)] * k)
            put.append(time.perf_counter() - t0)
            assert out == [1.0] * k, out
            a.free(ref)
            del ref
        except NA as e:
            na["put_s"] = str(e)
    metrics["value_s"] = median(val)
    if put:
        metrics["put_s"] = median(put)
    # the same by-value call through the system's drop-in facade (joblib backend, Pool.map,
    # executor.map); its own loop, so it does not eat the repetition budget of the two above
    fac, fac_reps = _bigarg_facade(a, np, n, k, cfg, na)
    if fac:
        metrics["facade_value_s"] = median(fac)
    return _result(metrics, na, reps=min(reps.done, fac_reps or reps.done),
                   note=f"{cfg['array_mb']} MB float64 to {k} tasks returning float(arr[0]); "
                        "a fresh array per measurement; facade: one untimed warm-up call with a 2 MB "
                        "array first")


def _bigarg_facade(a, np, n, k, cfg, na):
    """Seconds per facade call of ``first`` on k copies of one fresh array; errors go to ``na``."""
    times = []
    try:
        run, close = a.facade()
    except NA as e:
        na["facade_value_s"] = str(e)
        return times, None
    reps = Reps(cfg)
    try:
        # warm-up above joblib's 1 MB memmapping threshold: registering, starting, the sharing path
        out = run(first, [np.ones(250_000)] * k)
        assert list(out) == [1.0] * k, out
        for _ in reps:
            arr = _fresh_array(np, n)
            _collect()
            t0 = time.perf_counter()
            out = run(first, [arr] * k)
            times.append(time.perf_counter() - t0)
            assert list(out) == [1.0] * k, out
            del arr, out
            _collect()
    except NA as e:
        na["facade_value_s"] = str(e)
    except Exception as e:  # incl. WorkloadTimeout: keep the numbers measured above
        import traceback
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        na["facade_value_s"] = f"error: {type(e).__name__}: {msg}"[:300]
        times = []
    finally:
        try:
            close()
        except Exception:
            pass
    return times, reps.done


def w_store(a, cfg):
    """put, a memcpy of the same bytes for reference, and same-node get of a 1 MB and a big object."""
    np = _need_numpy()
    n = int(cfg["store_mb"] * 1e6 / 8)
    nbytes = n * 8
    try:  # systems without put/get are n/a, before anything big is allocated
        probe = a.put(0)
        assert a.get(probe) == 0
        a.free(probe)
        del probe
    except NA:
        raise NA("no put/get API")
    try:
        import psutil
        avail = psutil.virtual_memory().available
    except ImportError:
        avail = None
    if avail is not None and avail < 4 * nbytes:  # source, destination, the store's copy, a gathered copy
        raise NA(f"needs ~{4 * nbytes / 1e9:.1f} GB of free memory, {avail / 1e9:.1f} GB available")
    pc = time.perf_counter
    puts, copies = [], []
    src = np.ones(n)
    dst = np.zeros(n)
    np.copyto(dst, src)  # touch the destination: the timed copies fault in no pages
    # one untimed put: the first object of this size may need new store memory; report steady state
    # (its time is kept in the JSON as cold_put_s)
    t0 = pc()
    ref = a.put(src)
    cold_put_s = pc() - t0
    a.free(ref)
    del ref
    reps = Reps(cfg)
    for i in reps:
        src[-1] = float(i)  # new contents each time (Dask's scatter names data by its hash)
        _collect()
        t0 = pc()
        np.copyto(dst, src)
        copies.append(pc() - t0)
        t0 = pc()
        ref = a.put(src)
        puts.append(pc() - t0)
        a.free(ref)
        del ref
    del dst
    _collect()
    small = np.ones(125_000)  # 1 MB
    get_small, k_small = _timed_gets(a, small, cfg)
    get_big, k_big = _timed_gets(a, src, cfg)
    del src, small
    _collect()
    put_s, copy_s = median(puts), median(copies)
    return _result({"put_gbps": nbytes / 1e9 / put_s, "copy_gbps": nbytes / 1e9 / copy_s,
                    "put_vs_copy": put_s / copy_s, "get_1mb_us": get_small * 1e6,
                    "get_1gb_us": get_big * 1e6, "put_s": put_s, "copy_s": copy_s, "cold_put_s": cold_put_s,
                    "gets_1mb": k_small, "gets_1gb": k_big}, reps=reps.done,
                   note=f"{_mb_text(cfg['store_mb'])} float64 ({n:,} elements); put: median of the "
                        "repetitions after one untimed put, each ref freed before the next; copy: np.copyto "
                        "into a touched array of the same size in the driver, next to each put; get: median "
                        f"of up to {cfg['store_gets']} gets of one put object, each result dropped before "
                        "the next")


def _timed_gets(a, value, cfg):
    """Median seconds of ``a.get`` on one put object, and how many gets (fewer past the rep budget)."""
    pc = time.perf_counter
    budget = cfg.get("rep_budget_s")
    ref = a.put(value)
    lat = []
    try:
        t_start = pc()
        for j in range(cfg["store_gets"]):
            t0 = pc()
            v = a.get(ref)
            lat.append(pc() - t0)
            ok = v.shape == value.shape and float(v[0]) == 1.0
            del v
            assert ok
            if j >= 2 and budget and pc() - t_start > budget:
                break
    finally:
        a.free(ref)
        del ref
        _collect()
    return median(lat), len(lat)


def w_bigresult(a, cfg):
    _need_numpy()
    n = int(cfg["array_mb"] * 1e6 / 8)
    times = []
    reps = Reps(cfg)
    for _ in reps:
        _collect()
        t0 = time.perf_counter()
        out = a.call(make_array, n)
        ok = out.shape == (n,) and float(out[-1]) == 1.0
        times.append(time.perf_counter() - t0)
        assert ok
        del out
    return _result({"s": median(times)}, reps=reps.done,
                   note=f"task returns np.ones({n}) ({cfg['array_mb']} MB)")


def w_actor(a, cfg):
    h = a.actor_new(Counter)
    try:
        for _ in range(3):
            a.actor_call(h, "inc")
        seq_meds, rates = [], []
        pc = time.perf_counter
        reps = Reps(cfg)
        for _ in reps:
            lat = []
            for _ in range(cfg["actor_seq"]):
                t0 = pc()
                a.actor_call(h, "inc")
                lat.append(pc() - t0)
            seq_meds.append(median(lat) * 1e6)
            n = cfg["actor_pipe"]
            t0 = pc()
            out = a.actor_pipeline(h, "inc", n)
            dt = pc() - t0
            out = list(out)
            assert len(out) == n and out[-1] - out[0] == n - 1, (len(out), out[:1], out[-1:])
            rates.append(n / dt)
    finally:
        a.actor_del(h)
    return _result({"seq_us": median(seq_meds), "pipelined_per_s": median(rates)}, reps=reps.done)


def _steal_s() -> float:
    """CPU time the hypervisor took from this machine so far, all CPUs (0 where not told)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def w_cpu(a, cfg):
    task_s = cfg["cpu_task_s"]  # (cpu_iters, calibrated by the harness, is not used: see spin_for)
    k = cfg["cpu_tasks"]
    nominal = k * task_s / a.workers
    walls, effs, ideals, steals = [], [], [], []
    reps = Reps(cfg)
    for _ in reps:
        steal0 = _steal_s()
        t0 = time.perf_counter()
        out = a.run_many(spin_for, [(task_s,)] * k)
        wall = time.perf_counter() - t0
        steals.append(_steal_s() - steal0)
        assert len(out) == k
        # ideal = the CPU time the tasks really used, spread over the workers:
        # independent of calibration error and of other load on the machine
        ideal = sum(out) / a.workers
        walls.append(wall)
        ideals.append(ideal)
        effs.append(ideal / wall)
    return _result({"wall_s": median(walls), "efficiency": median(effs), "ideal_s": median(ideals),
                    "nominal_ideal_s": nominal, "steal_s": median(steals)}, reps=reps.done,
                   note=f"{k} tasks x {task_s:g} s of CPU each (spin_for) on {a.workers} workers: nominal ideal "
                        f"{nominal:g} s; efficiency = (task CPU seconds / workers) / wall")


def w_tree(a, cfg):
    n = cfg["tree_leaves"]
    expect = n * (n - 1) // 2
    times = []
    reps = Reps(cfg)
    for _ in reps:
        t0 = time.perf_counter()
        refs = [a.submit(leaf, i) for i in range(n)]
        while len(refs) > 1:
            nxt = [a.submit(add, refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
            if len(refs) % 2:
                nxt.append(refs[-1])
            refs = nxt
        v = a.get(refs[0])
        times.append(time.perf_counter() - t0)
        assert v == expect, (v, expect)
        del refs
    return _result({"s": median(times)}, reps=reps.done, note=f"{n} leaves, {2 * n - 1} tasks")


FUNCS = {"startup": w_startup, "footprint": w_footprint, "noop": w_noop,
         "roundtrip": w_roundtrip, "map": w_map, "bigarg": w_bigarg,
         "bigresult": w_bigresult, "store": w_store, "actor": w_actor, "cpu": w_cpu, "tree": w_tree}


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------

class WorkloadTimeout(Exception):
    pass


@contextmanager
def _alarm(seconds):
    """Raise WorkloadTimeout in the main thread after ``seconds`` (if usable)."""
    usable = (seconds and hasattr(signal, "SIGALRM")
              and __import__("threading").current_thread() is __import__("threading").main_thread())
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise WorkloadTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _guard(fn, timeout):
    t0 = time.perf_counter()
    try:
        with _alarm(timeout):
            res = fn()
        res["status"] = "ok"
    except NA as e:
        res = {"status": "n/a", "reason": str(e)}
    except WorkloadTimeout as e:
        res = {"status": "error", "reason": str(e)}
    except Exception as e:
        import traceback
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res = {"status": "error", "reason": f"{type(e).__name__}: {msg}"[:300]}
    res["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return res


def run_system(factory, workloads=None, cfg=None, progress=None, workload_timeout=None,
               log=None):
    """Run ``workloads`` for the adapter made by ``factory()``.

    Fresh-runtime workloads (startup, footprint) run first, each starting and
    stopping its own runtime; the rest share one runtime, started once.
    ``progress(results)`` is called after each workload.
    """
    cfg = cfg or sizes(False)
    workloads = [w for w in WORKLOADS if w in (workloads or WORKLOADS)]
    ensure_importable()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = {}

    def done(w, res):
        results[w] = res
        log(f"  {w}: {res['status']} ({res['elapsed_s']:.1f} s)"
            + (f" {res.get('reason')}" if res["status"] != "ok" else ""))
        if progress:
            progress(results)

    for w in workloads:
        if w in FRESH:
            done(w, _guard(lambda w=w: FUNCS[w](factory, cfg), workload_timeout))

    shared = [w for w in workloads if w not in FRESH]
    if shared:
        a = None
        t0 = time.perf_counter()
        try:
            with _alarm(workload_timeout):
                a = factory()
                a.start()
                a.run_many(noop, [()] * (4 * a.workers))  # warm the workers
                for _ in range(5):
                    a.call(noop)
        except Exception as e:
            if isinstance(e, NA):
                status, reason = "n/a", str(e)
            else:
                import traceback
                traceback.print_exc()
                status, reason = "error", f"start failed: {type(e).__name__}: {e}"[:300]
            for w in shared:
                done(w, {"status": status, "reason": reason,
                         "elapsed_s": round(time.perf_counter() - t0, 3)})
            if a is not None:
                try:
                    with _alarm(60):
                        a.stop()
                except Exception:
                    pass
            return results
        try:
            for w in shared:
                done(w, _guard(lambda w=w: FUNCS[w](a, cfg), workload_timeout))
        finally:
            try:
                with _alarm(60):
                    a.stop()
            except Exception as e:
                log(f"  stop failed: {type(e).__name__}: {e}")
    return results


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def metric_rows(cfg):
    """(workload, metric, label, unit, better, ratio_base_metric); better=None: no ratio."""
    mb = cfg["array_mb"]
    smb = _mb_text(cfg.get("store_mb", 1000))
    return [
        ("startup", "first_result_s", "start to first result", "s", "lower", None),
        ("startup", "shutdown_s", "shutdown", "s", "lower", None),
        ("noop", "tasks_per_s", f"{cfg['noop']:,} no-op tasks", "tasks/s", "higher", None),
        ("roundtrip", "median_us", f"{cfg['roundtrip']:,} sync round trips, median", "us", "lower", None),
        ("roundtrip", "p90_us", f"{cfg['roundtrip']:,} sync round trips, p90", "us", "lower", None),
        ("map", "items_per_s", f"map {cfg['map']:,} items (Pool.map / native)", "items/s", "higher", None),
        ("map", "executor_items_per_s", f"map {cfg['map']:,} items (executor.map)", "items/s", "higher",
         "items_per_s"),
        ("map", "imap_items_per_s", f"imap {cfg['map']:,} items, chunksize 1 (imap's default)", "items/s",
         "higher", None),
        ("map", "chunked_items_per_s", f"map {cfg['map']:,} items (chunks as tasks)", "items/s", "higher",
         None),
        ("cpu", "wall_s", f"{cfg['cpu_tasks']} x {cfg['cpu_task_s']} s CPU tasks, wall", "s", "lower", None),
        ("cpu", "efficiency", "CPU efficiency vs ideal", "", "higher", None),
        # CPU the hypervisor took meanwhile (all CPUs, per repetition): a property of the machine
        ("cpu", "steal_s", "CPU stolen by the hypervisor meanwhile", "s", None, None),
        ("bigarg", "put_s", f"{mb} MB to {cfg['bigarg_tasks']} tasks via put/scatter", "s", "lower", None),
        ("bigarg", "value_s", f"{mb} MB to {cfg['bigarg_tasks']} tasks by value", "s", "lower", None),
        ("bigarg", "facade_value_s", f"{mb} MB to {cfg['bigarg_tasks']} tasks by value, through the drop-in "
         "facade", "s", "lower", None),
        ("bigresult", "s", f"{mb} MB result", "s", "lower", None),
        ("store", "put_gbps", f"put {smb} array", "GB/s", "higher", None),
        # a property of the process's memory bandwidth, not of the system: no ratio (better=None)
        ("store", "copy_gbps", f"np.copyto {smb} in the same process (reference)", "GB/s", None, None),
        ("store", "put_vs_copy", "put time / copy time", "", "lower", None),
        ("store", "get_1mb_us", "get 1 MB object, same node, median", "us", "lower", None),
        ("store", "get_1gb_us", f"get {smb} object, same node, median", "us", "lower", None),
        ("actor", "seq_us", f"{cfg['actor_seq']:,} sequential actor calls, median", "us", "lower", None),
        ("actor", "pipelined_per_s", f"{cfg['actor_pipe']:,} pipelined actor calls", "calls/s", "higher", None),
        ("footprint", "rss_mb", "idle footprint RSS", "MB", "lower", None),
        ("footprint", "pss_mb", "idle footprint PSS", "MB", "lower", None),
        ("footprint", "procs", "runtime processes", "", "lower", None),
        ("tree", "s", f"tree reduce {cfg['tree_leaves']:,} leaves ({2 * cfg['tree_leaves'] - 1:,} tasks)",
         "s", "lower", None),
    ]


def fmt_num(v):
    if v is None:
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _short(reason, width=48):
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def cell(sysres, workload, metric, width=48):
    """Markdown cell text for one system's metric, and its value (or None)."""
    if sysres is None:
        return "–", None
    st = sysres.get("status")
    if st == "not installed":
        return "not installed", None
    if st not in ("ok", "partial"):
        return f"n/a ({_short(sysres.get('reason', st), width)})", None
    res = (sysres.get("results") or {}).get(workload)
    if res is None:
        return "–", None
    if res.get("status") != "ok":
        return f"n/a ({_short(res.get('reason', res.get('status')), width)})", None
    m = res.get("metrics", {})
    if metric in m and m[metric] is not None:
        return fmt_num(m[metric]), m[metric]
    if metric in res.get("na", {}):
        return f"n/a ({_short(res['na'][metric], width)})", None
    return "–", None


def format_report(result: dict) -> str:
    """Markdown for one ``main()`` result (farpool alone)."""
    cfg = result["sizes"]
    lines = [f"farpool microbenchmark ({'quick' if cfg.get('quick') else 'full'}, "
             f"{cfg['workers']} workers, median of {cfg['reps']})", "",
             "| workload | unit | farpool |", "|---|---|---|"]
    for w, metric, label, unit, _better, _base in metric_rows(cfg):
        if w not in result["results"]:
            continue
        text, _ = cell(result, w, metric, width=70)
        if text == "–":
            continue
        lines.append(f"| {label} | {unit} | {text} |")
    return "\n".join(lines)


def main(quick: bool = False, workloads=None, workload_timeout=None, reps=None) -> dict:
    """Run the farpool workloads alone in this process; returns a dict.

    ``{"system": "farpool", "status": ..., "version": ..., "sizes": cfg,
    "results": {workload: {"status", "metrics", ...}}, "elapsed_s": ...}``
    ``reps`` overrides the repetitions (full sizes with ``reps=1`` is the
    quickest way to full-size numbers).
    """
    t0 = time.perf_counter()
    cfg = sizes(quick, reps=reps)
    out = {"system": "farpool", "sizes": cfg, "results": {}}
    mod = _this_module()
    try:
        import farpool
        out["version"] = getattr(farpool, "__version__", None)
    except ImportError as e:
        out.update(status="not installed", reason=str(e))
        return out
    except Exception as e:
        out.update(status="error", reason=f"import farpool failed: {type(e).__name__}: {e}")
        return out
    if "cpu" in (workloads or WORKLOADS):
        cfg["cpu_iters"], cfg["cpu_measured_s"] = calibrate_spin(cfg["cpu_task_s"])
    out["results"] = mod.run_system(mod.FarpoolAdapter, workloads, cfg,
                                    workload_timeout=workload_timeout)
    out["status"] = "ok"
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="farpool micro-benchmarks (farpool alone)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workloads", default=None, help="comma-separated subset of " + ",".join(WORKLOADS))
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ns = ap.parse_args()
    wl = ns.workloads.split(",") if ns.workloads else None
    res = main(ns.quick, wl, workload_timeout=60 if ns.quick else 120, reps=ns.reps)
    if res.get("status") != "ok":
        print(f"farpool: {res.get('status')}: {res.get('reason')}")
    else:
        print(format_report(res))
        print(f"\n({res['elapsed_s']:.1f} s)")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
