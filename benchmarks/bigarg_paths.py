#!/usr/bin/env python
"""One large array passed by value to 8 tasks, through every farpool path, against joblib's
automatic memory-mapping (loky), in one run (issue 19).

    python benchmarks/bigarg_paths.py [--mb 200] [--tasks 8] [--reps 5]

Each repetition makes a fresh (touched) array, then times each path on it in turn, the
order rotating between repetitions; medians and the ratio to joblib+loky are printed.
Paths: farpool's native API (``f.remote(arr)`` per task), ``DistributedExecutor.submit``
per task, ``DistributedExecutor.map``, ``farpool.Pool.map``, joblib with the farpool
backend, and joblib with loky (``max_nbytes`` default: arrays above 1 MB memory-mapped).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from farpool_bench import first  # noqa: E402 - a module-level task function every system can import


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import joblib
    import numpy as np

    import farpool
    import farpool.joblib
    farpool.init(num_cpus=2)
    farpool.joblib.register()
    k = args.tasks
    remote_first = farpool.remote(first)
    ex = farpool.DistributedExecutor(2)
    pool = farpool.Pool(2)

    def native(a):
        return farpool.get([remote_first.remote(a) for _ in range(k)])

    def submit(a):
        return [f.result() for f in [ex.submit(first, a) for _ in range(k)]]

    def ex_map(a):
        return list(ex.map(first, [a] * k))

    def pool_map(a):
        return pool.map(first, [a] * k)

    def joblib_farpool(a):
        with joblib.parallel_config(backend="farpool", n_jobs=2):
            return joblib.Parallel()(joblib.delayed(first)(a) for _ in range(k))

    def joblib_loky(a):
        return joblib.Parallel(n_jobs=2)(joblib.delayed(first)(a) for _ in range(k))  # loky reuses its workers

    paths = {"native f.remote(arr)": native, "executor.submit": submit, "executor.map": ex_map,
             "Pool.map": pool_map, "joblib, farpool backend": joblib_farpool, "joblib, loky (memmap)": joblib_loky}
    n = args.mb * 1_000_000 // 8
    warm = np.ones(250_000)
    for fn in paths.values():  # start every pool, import every worker's modules
        assert list(fn(warm)) == [1.0] * k
    times: dict[str, list] = {name: [] for name in paths}
    names = list(paths)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            arr = np.ones(n)
            arr[-1] = rep * len(names) + names.index(name) + 2  # new bytes: no earlier copy is reused
            gc.collect()
            t0 = time.perf_counter()
            out = paths[name](arr)
            times[name].append(time.perf_counter() - t0)
            assert list(out) == [1.0] * k, (name, out)
            del arr, out
            gc.collect()
    ex.shutdown()
    pool.close()
    pool.join()
    farpool.shutdown()
    ref = statistics.median(times["joblib, loky (memmap)"])
    print(f"{args.mb} MB float64 by value to {k} tasks, medians of {args.reps} (load {os.getloadavg()[0]:.1f})")
    print("| path | s | / joblib+loky |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
