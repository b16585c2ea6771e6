#!/usr/bin/env python
"""Side-by-side benchmark of farpool and its peers (issue 7).

    python benchmarks/harness.py [--quick] [--only farpool,mp_pool,...]
                                 [--workloads startup,noop,...] [--rounds N] [--json out.json]

Each system runs in its own subprocess
(``python benchmarks/harness.py --child SYSTEM --workloads ...``), which prints
one JSON line; this parent prints a markdown table of medians per workload per
system and a table of ratios farpool/peer, with the machine, the versions and
the git commit.  A peer that is not installed is reported as "not installed";
a workload a system does not support, or that raised, as "n/a (reason)".
With ``--rounds N`` every system runs N times, the order rotating between rounds, and
each ratio is the median of the rounds' own ratios: this machine's speed drifts by tens of
percent within minutes, and one child per system compares whatever minutes each ran in.
A child that overruns its wall-clock budget is killed with every process it
started, and the workloads it finished are still reported.

The workloads themselves live in ``farpool_bench.py`` (shared by all systems).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import farpool_bench as fb  # noqa: E402
from farpool_bench import NA, Adapter  # noqa: E402

SYSTEMS = ["farpool", "mp_pool", "ppe", "loky", "joblib", "dask", "ray"]
#: run only when named in --only: farpool with task event recording off (FARPOOL_TASK_EVENTS=0),
#: to measure what recording costs the task path in the same run
EXTRA_SYSTEMS = ["farpool_noevents"]
ALIASES = {"multiprocessing": "mp_pool", "mp": "mp_pool", "pool": "mp_pool",
           "processpoolexecutor": "ppe", "concurrent": "ppe",
           "distributed": "dask"}
LABELS = {"farpool": "farpool", "mp_pool": "multiprocessing.Pool",
          "ppe": "ProcessPoolExecutor", "loky": "loky", "joblib": "joblib (loky)",
          "dask": "Dask distributed", "ray": "Ray", "farpool_noevents": "farpool, task events off"}
#: distributions whose versions are recorded
DISTS = ["farpool", "numpy", "psutil", "cloudpickle", "pyzmq", "loky", "joblib",
         "dask", "distributed", "ray"]


# ==========================================================================
# peer adapters
# ==========================================================================

class MpPoolAdapter(Adapter):
    name = "mp_pool"
    notes = {"map": "Pool.map(chunksize)", "bigarg": "facade: Pool.map(first, [arr] * 8)"}

    def __init__(self, workers=2):
        super().__init__(workers)
        import multiprocessing
        self.mp = multiprocessing
        self.notes = dict(self.notes, start_method=multiprocessing.get_start_method())

    def start(self):
        self.pool = self.mp.Pool(self.workers)

    def stop(self):
        self.pool.close()
        self.pool.join()

    def run_many(self, fn, arglists):
        rs = [self.pool.apply_async(fn, a) for a in arglists]
        return [r.get() for r in rs]

    def call(self, fn, *args):
        return self.pool.apply(fn, args)

    def facade(self):
        return (lambda fn, items: self.pool.map(fn, items)), (lambda: None)

    def mappers(self):
        return [("items_per_s", lambda: (lambda fn, items, cs: self.pool.map(fn, items, cs),
                                         lambda: None)),
                # imap at its default chunksize (1), the one a drop-in program passes
                ("imap_items_per_s", lambda: (lambda fn, items, cs: list(self.pool.imap(fn, items)),
                                              lambda: None))]


class _ExecutorAdapter(Adapter):
    """Anything with the concurrent.futures.Executor API."""

    def run_many(self, fn, arglists):
        fs = [self.ex.submit(fn, *a) for a in arglists]
        return [f.result() for f in fs]

    def call(self, fn, *args):
        return self.ex.submit(fn, *args).result()

    def facade(self):
        return (lambda fn, items: list(self.ex.map(fn, items))), (lambda: None)

    def mappers(self):
        return [("items_per_s", lambda: (lambda fn, items, cs: list(self.ex.map(fn, items, chunksize=cs)),
                                         lambda: None))]


class PpeAdapter(_ExecutorAdapter):
    name = "ppe"
    notes = {"map": "ProcessPoolExecutor.map(chunksize)", "bigarg": "facade: executor.map(first, [arr] * 8)"}

    def __init__(self, workers=2):
        super().__init__(workers)
        import concurrent.futures
        import multiprocessing
        self.cls = concurrent.futures.ProcessPoolExecutor
        self.notes = dict(self.notes, start_method=multiprocessing.get_start_method())

    def start(self):
        self.ex = self.cls(max_workers=self.workers)

    def stop(self):
        self.ex.shutdown(wait=True)


class LokyAdapter(_ExecutorAdapter):
    name = "loky"
    notes = {"map": "get_reusable_executor(2).map(chunksize)",
             "bigarg": "facade: get_reusable_executor(2).map(first, [arr] * 8)"}

    def __init__(self, workers=2):
        super().__init__(workers)
        import loky
        self.loky = loky

    def start(self):
        self.ex = self.loky.get_reusable_executor(max_workers=self.workers)

    def stop(self):
        self.ex.shutdown(wait=True)


class JoblibAdapter(Adapter):
    name = "joblib"
    notes = {"map": "Parallel(n_jobs=2, batch_size=chunksize)(delayed(f)(x) for x in items)",
             "noop": "one Parallel call (auto batching)",
             "roundtrip": "one Parallel call per task on a kept-open Parallel",
             "bigarg": "by value = joblib's automatic memory-mapping of arrays > 1 MB; facade: a new plain "
                       "Parallel(n_jobs=2) per call (the same memory-mapping)"}

    def __init__(self, workers=2):
        super().__init__(workers)
        import joblib
        self.joblib = joblib

    def start(self):
        self.par = self.joblib.Parallel(n_jobs=self.workers, backend="loky")
        self.par.__enter__()

    def stop(self):
        self.par.__exit__(None, None, None)
        # joblib keeps loky's reusable executor (and its workers) alive: end it
        from joblib.externals.loky import reusable_executor as re_
        ex = getattr(re_, "_executor", None)
        if ex is None and hasattr(re_, "_executor_storage"):
            ex = getattr(re_._executor_storage, "executor", None)
        if ex is not None:
            ex.shutdown(wait=True)
            if hasattr(re_, "_executor"):
                re_._executor = None

    def run_many(self, fn, arglists):
        d = self.joblib.delayed(fn)
        return self.par(d(*a) for a in arglists)

    def facade(self):
        return fb.joblib_runner(None, self.workers), (lambda: None)

    def call(self, fn, *args):
        return self.par([self.joblib.delayed(fn)(*args)])[0]

    def mappers(self):
        jl, w = self.joblib, self.workers

        def open_():
            def m(fn, items, cs):
                d = jl.delayed(fn)
                return jl.Parallel(n_jobs=w, backend="loky", batch_size=cs)(d(x) for x in items)
            return m, lambda: None
        return [("items_per_s", open_)]


class DaskAdapter(Adapter):
    name = "dask"
    notes = {"map": "dask.bag.from_sequence(partition_size=chunksize).map(f).compute() on the Client; "
                    "chunked: one client.submit per chunk",
             "bigarg": "put = client.scatter; value = array as argument of client.submit; facade: joblib "
                       "Parallel(n_jobs=2) with parallel_config(backend='dask') on the Client (it scatters "
                       "arguments > 1 kB once per call)",
             "store": "put = client.scatter(array) (hashes the data, sends it to a worker over TCP); "
                      "get = future.result(), i.e. a gather: the worker pickles the array and sends a copy "
                      "over TCP, so get time grows with size",
             "actor": "client.submit(Counter, actor=True)",
             "cluster": "LocalCluster(n_workers=2, threads_per_worker=1, processes=True)"}

    def __init__(self, workers=2):
        super().__init__(workers)
        import dask  # noqa: F401
        import distributed
        self.distributed = distributed

    def start(self):
        d = self.distributed
        self.cluster = d.LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None, host="127.0.0.1")
        self.client = d.Client(self.cluster)

    def stop(self):
        try:
            self.client.close()
        finally:
            self.cluster.close()

    def run_many(self, fn, arglists):
        c = self.client
        return c.gather([c.submit(fn, *a, pure=False) for a in arglists])

    def call(self, fn, *args):
        return self.client.submit(fn, *args, pure=False).result()

    def put(self, value):
        return self.client.scatter(value)

    def facade(self):
        return fb.joblib_runner("dask", self.workers), (lambda: None)

    def free(self, ref):
        ref.release()

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def get(self, handle):
        return handle.result()

    def mappers(self):
        def open_():
            import dask.bag as db

            def m(fn, items, cs):
                return db.from_sequence(items, partition_size=cs).map(fn).compute()
            return m, lambda: None
        return [("items_per_s", open_), self.chunked_mapper()]

    def actor_new(self, cls):
        fut = self.client.submit(cls, actor=True)
        return (fut, fut.result())

    def actor_call(self, handle, method):
        return getattr(handle[1], method)().result()

    def actor_pipeline(self, handle, method, n):
        m = getattr(handle[1], method)
        fs = [m() for _ in range(n)]
        return [f.result() for f in fs]

    def actor_del(self, handle):
        handle[0].release()


class RayAdapter(Adapter):
    name = "ray"
    notes = {"map": "ray.util.multiprocessing.Pool(2).map(chunksize); chunked: one task per chunk",
             "bigarg": "put = ray.put; value = array as argument of each task; facade: joblib "
                       "Parallel(n_jobs=2) with parallel_config(backend='ray') (ray.util.joblib.register_ray())",
             "store": "ray.put / ray.get (zero-copy numpy views of the object store); ref dropped to free",
             "init": "ray.init(num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1')"}

    def __init__(self, workers=2):
        super().__init__(workers)
        import ray
        self.ray = ray
        self._remote = {}

    def start(self):
        self.ray.init(num_cpus=self.workers, include_dashboard=False,
                      _node_ip_address="127.0.0.1", logging_level="warning")

    def stop(self):
        self.ray.shutdown()

    def _rf(self, fn):
        rf = self._remote.get(fn)
        if rf is None:
            rf = self._remote[fn] = self.ray.remote(fn)
        return rf

    def run_many(self, fn, arglists):
        rf = self._rf(fn)
        return self.ray.get([rf.remote(*a) for a in arglists])

    def call(self, fn, *args):
        return self.ray.get(self._rf(fn).remote(*args))

    def put(self, value):
        return self.ray.put(value)

    def facade(self):
        try:
            from ray.util.joblib import register_ray
            register_ray()
        except Exception as e:
            raise NA(f"ray.util.joblib unusable: {type(e).__name__}: {e}")
        return fb.joblib_runner("ray", self.workers), (lambda: None)

    def submit(self, fn, *args):
        return self._rf(fn).remote(*args)

    def get(self, handle):
        return self.ray.get(handle)

    def mappers(self):
        def open_():
            from ray.util.multiprocessing import Pool
            pool = Pool(processes=self.workers)
            return (lambda fn, items, cs: pool.map(fn, items, chunksize=cs)), pool.terminate
        return [("items_per_s", open_), self.chunked_mapper()]

    def actor_new(self, cls):
        self._actor_cls = self.ray.remote(cls)
        return self._actor_cls.remote()

    def actor_call(self, handle, method):
        return self.ray.get(getattr(handle, method).remote())

    def actor_pipeline(self, handle, method, n):
        m = getattr(handle, method)
        return self.ray.get([m.remote() for _ in range(n)])

    def actor_del(self, handle):
        self.ray.kill(handle)


ADAPTERS = {"farpool": fb.FarpoolAdapter, "mp_pool": MpPoolAdapter, "ppe": PpeAdapter,
            "loky": LokyAdapter, "joblib": JoblibAdapter, "dask": DaskAdapter, "ray": RayAdapter,
            "farpool_noevents": fb.FarpoolAdapter}
#: what must import for a system to count as installed
PROBES = {"farpool": ["farpool"], "farpool_noevents": ["farpool"], "mp_pool": ["multiprocessing"], "ppe": ["concurrent.futures"],
          "loky": ["loky"], "joblib": ["joblib"], "dask": ["dask", "distributed"], "ray": ["ray"]}


# ==========================================================================
# child side
# ==========================================================================

def _import_probe(system):
    """None when importable; else ("not installed" | "error", reason)."""
    import importlib
    for mod in PROBES[system]:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            top = mod.split(".")[0]
            if system.startswith("farpool") and e.name == "farpool" and os.path.isdir(os.path.join(REPO, "src", "farpool")):
                # a checkout without `pip install -e .`: use src/ (workers too)
                src = os.path.join(REPO, "src")
                sys.path.insert(0, src)
                os.environ["PYTHONPATH"] = os.pathsep.join(
                    [src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
                try:
                    importlib.import_module(mod)
                    continue
                except Exception as e2:
                    return "error", f"import farpool (from src/) failed: {type(e2).__name__}: {e2}"
            if e.name and (e.name == top or e.name.split(".")[0] == top):
                return "not installed", f"{e}"
            return "error", f"import {mod} failed: {type(e).__name__}: {e}"
        except Exception as e:
            return "error", f"import {mod} failed: {type(e).__name__}: {e}"
    return None


def child_main(ns):
    real_out = os.dup(1)            # our one JSON line goes here ...
    sys.stdout.flush()
    os.dup2(2, 1)                   # ... everything else (ours, libraries', workers') to stderr
    t0 = time.perf_counter()
    system = ns.child
    out = {"system": system, "pid": os.getpid()}
    try:
        fb.ensure_importable()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        probe = _import_probe(system)
        if probe:
            out.update(status=probe[0], reason=probe[1])
        else:
            cfg = fb.sizes(ns.quick, workers=ns.workers, reps=ns.reps, rep_budget_s=ns.rep_budget,
                           cpu_iters=ns.cpu_iters, cpu_measured_s=ns.cpu_task_s)
            out["sizes"] = cfg
            cls = ADAPTERS[system]
            out["notes"] = dict(getattr(cls, "notes", {}))
            if system.startswith("farpool"):
                import farpool
                out["version"] = getattr(farpool, "__version__", None)
                out["farpool_file"] = getattr(farpool, "__file__", None)

            def progress(results):
                if ns.progress:
                    tmp = ns.progress + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump(results, f, default=str)
                    os.replace(tmp, ns.progress)

            def factory():
                return cls(ns.workers)
            print(f"[{system}] running {','.join(ns.workloads)}", file=sys.stderr, flush=True)
            out["results"] = fb.run_system(factory, ns.workloads, cfg, progress=progress,
                                           workload_timeout=ns.workload_timeout)
            out["status"] = "ok"
    except BaseException as e:  # never die without the JSON line
        import traceback
        traceback.print_exc()
        out.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    os.write(real_out, (json.dumps(out, default=str) + "\n").encode())
    os.close(real_out)
    sys.stderr.flush()
    # exit normally (atexit cleanups run), but never hang on the way out
    import threading

    def watchdog():
        time.sleep(30)
        os._exit(0)
    threading.Thread(target=watchdog, daemon=True).start()


# ==========================================================================
# parent side
# ==========================================================================

def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info():
    info = {"cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except Exception:
        pass
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    info["kernel"] = platform.release()
    info["os"] = platform.platform()
    info["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    info["executable"] = sys.executable
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if env:
        info["env"] = env
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def versions():
    from importlib import metadata
    out = {}
    for d in DISTS:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


def git_info():
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
        except Exception:
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or "none (no commits yet)",
            "dirty": bool(status) if status is not None else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


# --- process hygiene ---------------------------------------------------------

def _become_subreaper():
    """Orphans of our children re-parent to us, so we can find and end them."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


def _proc_table():
    """{pid: (ppid, state, name)} from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        r = s.rfind(")")
        name = s[s.find("(") + 1:r]
        fields = s[r + 2:].split()
        table[int(d)] = (int(fields[1]), fields[0], name)
    return table


def _descendants(root):
    table = _proc_table()
    kids = {}
    for pid, (ppid, _st, _n) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        for c in kids.get(stack.pop(), []):
            if table[c][1] != "Z":
                out.append((c, table[c][2]))
            stack.append(c)
    return out


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cleanup_leftovers(grace_s):
    """End processes that outlived a child (they re-parented to us). Returns names."""
    deadline = time.time() + grace_s
    time.sleep(0.2)  # let orphans of a killed tree re-parent to us
    _reap()
    left = _descendants(os.getpid())
    while left and time.time() < deadline:
        time.sleep(0.2)
        _reap()
        left = _descendants(os.getpid())
    if not left:
        _reap()
        return []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t = time.time() + 3
        while time.time() < t and _descendants(os.getpid()):
            time.sleep(0.1)
            _reap()
        if not _descendants(os.getpid()):
            break
    _reap()
    return sorted({n for _, n in left})


def _kill_tree(proc):
    for pid, _ in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_child(system, workloads, args, cfg, tmpdir):
    progress = os.path.join(tmpdir, f"{system}.progress.json")
    errlog = os.path.join(tmpdir, f"{system}.stderr.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system,
           "--workloads", ",".join(workloads), "--progress", progress,
           "--workers", str(cfg["workers"]), "--workload-timeout", str(args.workload_timeout)]
    if args.quick:
        cmd.append("--quick")
    if args.reps:
        cmd += ["--reps", str(args.reps)]
    if args.rep_budget is not None:
        cmd += ["--rep-budget", str(args.rep_budget)]
    if cfg.get("cpu_iters"):
        cmd += ["--cpu-iters", str(cfg["cpu_iters"]), "--cpu-task-s", repr(cfg["cpu_measured_s"])]
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if system == "farpool_noevents":
        env["FARPOOL_TASK_EVENTS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    t0 = time.perf_counter()
    with open(errlog, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, cwd=REPO, start_new_session=True)
        timed_out = False
        try:
            stdout, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
            stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    res = None
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                res = json.loads(line)
                break
            except ValueError:
                pass
    if res is None:
        tail = [ln for ln in _read(errlog).splitlines() if ln.strip()][-15:]
        partial = {}
        if os.path.exists(progress):
            try:
                partial = json.loads(_read(progress))
            except ValueError:
                pass
        if timed_out:
            why = f"timeout after {args.timeout:.0f} s"
        else:
            why = f"child exited with {proc.returncode} without a result"
        for w in workloads:
            partial.setdefault(w, {"status": "error", "reason": why})
        res = {"system": system, "status": "partial" if any(
            r.get("status") == "ok" for r in partial.values()) else "error",
            "reason": why, "results": partial, "stderr_tail": tail}
    res["wall_s"] = round(wall, 2)
    res["loadavg_before"] = load
    leftovers = _cleanup_leftovers(grace_s=5.0)
    if leftovers:
        res.setdefault("notes", {})["leftover_processes_killed"] = ", ".join(leftovers)
    return res


# --- report -----------------------------------------------------------------

def merge_rounds(results: list) -> dict:
    """One system's children of several rounds as one result: each metric the median of the
    rounds that have it (the rest of the first result that ran: notes, footprint by process)."""
    import copy
    import statistics
    ran = [r for r in results if r.get("status") in ("ok", "partial")]
    if not ran:
        return results[0]
    merged = copy.deepcopy(ran[0])
    merged["wall_s"] = round(sum(r.get("wall_s", 0) for r in results), 2)
    merged["results"] = results_of = merged.get("results") or {}
    for w in dict.fromkeys(w for r in ran for w in (r.get("results") or {})):  # every round's, in order
        ok = [r["results"][w] for r in ran if (r.get("results") or {}).get(w, {}).get("status") == "ok"]
        if ok:  # the first round where it ran, if the first round's failed or never got to it
            results_of[w] = copy.deepcopy(ok[0])
        wr = results_of.get(w) or {}
        for metric in list(wr.get("metrics") or {}):
            values = [v for v in (_metric(r, w, metric) for r in ran) if v is not None]
            if values:
                wr["metrics"][metric] = statistics.median(values)
    return merged


def _metric(result: dict, workload: str, metric: str):
    wr = ((result or {}).get("results") or {}).get(workload) or {}
    if wr.get("status") != "ok":
        return None
    return (wr.get("metrics") or {}).get(metric)


def _ratio_cell(report, workload, metric, peer, base) -> str:
    """farpool / peer: the ratio of the medians; with several rounds the median of each
    round's own ratio (both measured minutes apart at most), with their range."""
    rounds = report.get("rounds")
    if not rounds:
        _, fv = fb.cell(report["systems"].get("farpool"), workload, metric)
        _, pv = fb.cell(report["systems"].get(peer), workload, base or metric)
        return f"{fv / pv:.2f}x" if (fv is not None and pv) else "–"
    import statistics
    ratios = []
    for r in rounds:
        fv, pv = _metric(r.get("farpool"), workload, metric), _metric(r.get(peer), workload, base or metric)
        if fv is not None and pv:
            ratios.append(fv / pv)
    if not ratios:
        return "–"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def render(report):
    cfg = report["sizes"]
    systems = report["order"]
    res = report["systems"]
    peers = [s for s in systems if s != "farpool"]
    m, v, g = report["machine"], report["versions"], report["git"]
    lines = []
    lines.append(f"## farpool benchmark ({'quick' if cfg['quick'] else 'full'} run, "
                 f"{report['started']})")
    lines.append("")
    lines.append(f"- machine: {m.get('cpu_count')} CPUs (affinity {m.get('cpu_affinity')}), "
                 f"{m.get('cpu_model')}, {m.get('ram_gib')} GiB RAM, kernel {m.get('kernel')}"
                 + (f", load avg before {m['loadavg']}" if m.get("loadavg") else ""))
    lines.append(f"- python: {m.get('python')} ({m.get('executable')})")
    lines.append("- versions: " + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items()))
    lines.append(f"- commit: {g['commit']}" + (" (+ uncommitted changes)" if g.get("dirty") else ""))
    n_rounds = len(report.get("rounds") or [None])
    lines.append(f"- {cfg['workers']} workers per system; median of {cfg['reps']} repetition(s)"
                 + (f" in each of {n_rounds} rounds (every system once per round, the order rotating; "
                    "the medians below are the rounds' medians)" if n_rounds > 1 else "")
                 + f"; total wall {report['wall_s']:.1f} s")
    lines.append("")
    lines.append("### Medians")
    lines.append("")
    lines.append("| workload | unit | " + " | ".join(systems) + " |")
    lines.append("|---|---|" + "---|" * len(systems))
    rows = fb.metric_rows(cfg)
    for w, metric, label, unit, _better, _base in rows:
        if w not in report["workloads"]:
            continue
        cells = [fb.cell(res.get(s), w, metric)[0] for s in systems]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    if "farpool" in systems and peers:
        lines.append("")
        lines.append("### Ratios farpool / peer")
        lines.append("")
        if n_rounds > 1:
            lines.append(f"The median of the {n_rounds} rounds' ratios (each round's farpool against "
                         "the same round's peer), their range in brackets.")
            lines.append("")
        lines.append("| workload | better | " + " | ".join(peers) + " |")
        lines.append("|---|---|" + "---|" * len(peers))
        for w, metric, label, unit, better, base in rows:
            if w not in report["workloads"] or metric == "procs" or better is None:
                continue
            cells = [_ratio_cell(report, w, metric, p, base) for p in peers]
            if all(c == "–" for c in cells):
                continue
            lines.append(f"| {label} | {better} | " + " | ".join(cells) + " |")
    wnotes = {}
    for s in systems:
        for w, wr in (res.get(s, {}).get("results") or {}).items():
            if wr.get("note") and w not in wnotes:
                wnotes[w] = wr["note"]
    if wnotes:
        lines.append("")
        lines.append("### Workload notes")
        lines.append("")
        for w in fb.WORKLOADS:
            if w in wnotes:
                lines.append(f"- {w}: {wnotes[w]}")
    itemized = [(s, res[s]["results"]["footprint"]["by_process"]) for s in systems
                if ((res.get(s) or {}).get("results") or {}).get("footprint", {}).get("by_process")]
    if itemized:
        lines.append("")
        lines.append("### Idle footprint by process (the last repetition; MB)")
        lines.append("")
        lines.append("| system | process | count | RSS | PSS |")
        lines.append("|---|---|---|---|---|")
        for s, items in itemized:
            for name, item in items.items():
                lines.append(f"| {s} | {name} | {item['count']} | {item['rss_mb']:.1f} | {item['pss_mb']:.1f} |")
    lines.append("")
    lines.append("### Systems")
    lines.append("")
    for s in systems:
        r = res.get(s, {})
        st = r.get("status")
        head = f"- **{s}** ({LABELS.get(s, s)}): {st}"
        if r.get("wall_s") is not None:
            head += f", {r['wall_s']:.1f} s"
        if r.get("loadavg_before"):
            head += f" (load avg before: {r['loadavg_before']})"
        if st != "ok" and r.get("reason"):
            head += f" — {r['reason']}"
        lines.append(head)
        for k, val in (r.get("notes") or {}).items():
            lines.append(f"  - {k}: {val}")
        if s == "farpool" and (r.get("farpool_file") or r.get("version")):
            lines.append(f"  - version {r.get('version')} from {r.get('farpool_file')}")
        for w, wr in (r.get("results") or {}).items():
            if wr.get("status") != "ok":
                lines.append(f"  - {w}: {wr.get('status')} ({wr.get('reason')})")
            else:
                for mname, why in (wr.get("na") or {}).items():
                    lines.append(f"  - {w}.{mname}: n/a ({why})")
                if wr.get("reps") is not None and wr["reps"] < cfg["reps"]:
                    lines.append(f"  - {w}: {wr['reps']} of {cfg['reps']} repetitions "
                                 f"(one took longer than the {cfg.get('rep_budget_s'):g} s budget)")
        for ln in r.get("stderr_tail", [])[-5:]:
            lines.append(f"  - stderr: `{ln[:200]}`")
    return "\n".join(lines)


def _compile_task_modules() -> None:
    """Byte-compile this directory's modules.  Every system's workers import them to unpickle
    the task functions (``farpool_bench.noop``); without ``.pyc`` files (a run with
    PYTHONDONTWRITEBYTECODE=1, as here, or a read-only checkout) each worker compiles them
    from source, which left about 3 MB in its RSS and cost it ~15 ms of CPU: the footprint
    and start-up rows measured the benchmark's source, not the system."""
    import compileall
    compileall.compile_dir(HERE, maxlevels=0, quiet=1)


def parent_main(args):
    t_start = time.perf_counter()
    _compile_task_modules()
    only = SYSTEMS
    if args.only:
        only = []
        for s in args.only.split(","):
            s = ALIASES.get(s.strip().lower(), s.strip().lower())
            if s not in SYSTEMS + EXTRA_SYSTEMS:
                sys.exit(f"unknown system {s!r}; choose from {','.join(SYSTEMS)}")
            if s not in only:
                only.append(s)
    workloads = fb.WORKLOADS
    if args.workloads:
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        bad = [w for w in workloads if w not in fb.WORKLOADS]
        if bad:
            sys.exit(f"unknown workload(s) {bad}; choose from {','.join(fb.WORKLOADS)}")
        workloads = [w for w in fb.WORKLOADS if w in workloads]
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 420.0
    if args.workload_timeout is None:
        args.workload_timeout = 30.0 if args.quick else 180.0
    cfg = fb.sizes(args.quick, workers=args.workers, reps=args.reps, rep_budget_s=args.rep_budget)
    report = {"started": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": versions(), "git": git_info(),
              "argv": sys.argv, "order": only, "workloads": workloads, "systems": {}}
    if "cpu" in workloads:
        cfg["cpu_iters"], cfg["cpu_measured_s"] = fb.calibrate_spin(cfg["cpu_task_s"])
    report["sizes"] = cfg
    _become_subreaper()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="farpool-bench-") as tmpdir:
        for k in range(args.rounds):
            # each round runs every system once; the order rotates, so that no system always
            # runs in the same part of the run (this machine's speed drifts within minutes)
            order = only[k % len(only):] + only[:k % len(only)]
            workdir = os.path.join(tmpdir, f"round{k + 1}")
            os.makedirs(workdir)
            rounds.append({})
            for s in order:
                tag = f"{s}" + (f" (round {k + 1} of {args.rounds})" if args.rounds > 1 else "")
                print(f"[harness] {tag} ...", file=sys.stderr, flush=True)
                r = run_child(s, workloads, args, cfg, workdir)
                rounds[-1][s] = r
                print(f"[harness] {tag}: {r.get('status')} in {r.get('wall_s', 0):.1f} s"
                      + (f" ({r.get('reason')})" if r.get("status") != "ok" else ""),
                      file=sys.stderr, flush=True)
                if args.keep_logs:
                    import shutil
                    os.makedirs(args.keep_logs, exist_ok=True)
                    for f in os.listdir(workdir):
                        if f.startswith(s + "."):
                            name = f if args.rounds == 1 else f"round{k + 1}.{f}"
                            shutil.copy(os.path.join(workdir, f), os.path.join(args.keep_logs, name))
    report["systems"] = rounds[0] if len(rounds) == 1 else {s: merge_rounds([r[s] for r in rounds]) for s in only}
    if len(rounds) > 1:
        report["rounds"] = rounds
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = render(report)
    report["markdown"] = text
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.strict:
        bad = [s for s in only if report["systems"][s].get("status") in ("error", "partial")
               or any(w.get("status") == "error" for w in (report["systems"][s].get("results") or {}).values())]
        if bad:
            print(f"[harness] --strict: errors in {', '.join(bad)}", file=sys.stderr)
            return 1
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (CI smoke run)")
    ap.add_argument("--only", default=None, help="comma-separated systems: " + ",".join(SYSTEMS))
    ap.add_argument("--workloads", default=None, help="comma-separated: " + ",".join(fb.WORKLOADS))
    ap.add_argument("--json", default=None, help="write the full report (raw numbers) here")
    ap.add_argument("--workers", type=int, default=2, help="workers/CPUs per system (default 2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, the order rotating; ratios are then the "
                         "median of each round's own (default 1)")
    ap.add_argument("--rep-budget", type=float, default=None,
                    help="stop repeating a measurement once one repetition ran past this (default 30 s)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="wall-clock budget per system subprocess (default 420 s, 60 s with --quick)")
    ap.add_argument("--workload-timeout", type=float, default=None,
                    help="budget per workload inside a child (default 180 s, 30 s with --quick)")
    ap.add_argument("--keep-logs", default=None, metavar="DIR", help="copy each child's stderr log here")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a system crashed, timed out or a workload raised")
    # child mode (internal)
    ap.add_argument("--child", default=None, choices=SYSTEMS + EXTRA_SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--progress", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpu-iters", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpu-task-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.child:
        args.workloads = [w for w in (args.workloads or ",".join(fb.WORKLOADS)).split(",") if w]
        if args.workload_timeout is None:
            args.workload_timeout = 30.0 if args.quick else 180.0
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
