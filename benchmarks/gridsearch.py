#!/usr/bin/env python
"""scikit-learn's GridSearchCV (100 SVC fits on the digits data) through joblib: serial,
loky and farpool's backend, cold and warm, side by side in one run (issue 19).

    python benchmarks/gridsearch.py [--reps 3] [--jobs -1] [--only serial,loky,farpool] [--modes ...]

Each measurement runs in a fresh Python process (``--child MODE``), so "cold" is what a
program sees the first time: loky starts its workers inside the first ``Parallel`` call;
farpool's backend starts its embedded cluster there (``parallel_config(backend="farpool",
n_jobs=-1)``, nothing initialized before).  "warm" fits once, then times a second fit in
the same process (loky's workers, farpool's cluster already up).  The modes run in turn,
the order rotating between repetitions; medians, ranges and the ratio to loky (cold to
cold, warm to warm: of the medians, and the median of each repetition's own ratio, both
measured back to back) are printed with the load average, and the CPU time of each child
and every process it started, from its start to the end of the timed fit (steadier than
wall time on a shared machine; it includes the imports and the warm-up fit of the "warm"
modes).  Needs scikit-learn (the ``bench``
extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = ["serial", "loky-cold", "loky-warm", "farpool-cold", "farpool-warm"]
# 20 candidates x 5 folds = 100 fits of SVC on digits (0.15-0.25 s each on one core here:
# about 18 s serial, as in the measurement)
PARAM_GRID = {"C": [0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000], "gamma": [3e-3, 1e-2]}
FOLDS = 5


def _search(jobs: int | None):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    X, y = load_digits(return_X_y=True)
    return GridSearchCV(SVC(), PARAM_GRID, cv=FOLDS, n_jobs=jobs), X, y


def child(mode: str, jobs: int) -> dict:
    """One measurement in this (fresh) process; returns seconds and the best score (a check)."""
    import joblib
    system, _, when = mode.partition("-")
    search, X, y = _search(None if system == "serial" else jobs)
    if system == "farpool":
        import farpool.joblib
        farpool.joblib.register()
        config = joblib.parallel_config(backend="farpool", n_jobs=jobs)
    elif system == "loky":
        config = joblib.parallel_config(backend="loky", n_jobs=jobs)
    else:
        config = joblib.parallel_config(backend="sequential")
    with config:
        if when == "warm":
            search.fit(X, y)
            search, X, y = _search(jobs)
        t0 = time.perf_counter()
        search.fit(X, y)
        seconds = time.perf_counter() - t0
    fits = len(search.cv_results_["params"]) * FOLDS
    return {"mode": mode, "seconds": seconds, "fits": fits, "best_score": float(search.best_score_),
            "cpu": _tree_cpu()}


def _tree_cpu() -> float:
    """CPU seconds of this process, of the children it reaped, and of every live descendant
    (loky's workers, farpool's cluster), since each started."""
    import psutil
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=-1, help="n_jobs of the parallel runs (default -1: all CPUs)")
    ap.add_argument("--only", default="", help="comma-separated systems: serial,loky,farpool (default all)")
    ap.add_argument("--modes", default="", help=f"comma-separated modes instead: {','.join(MODES)}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.jobs)), flush=True)
        return
    systems = set(args.only.split(",")) if args.only else {"serial", "loky", "farpool"}
    modes = [m for m in MODES if m.partition("-")[0] in systems]
    if args.modes:
        modes = [m for m in MODES if m in args.modes.split(",")]
    times: dict[str, list] = {m: [] for m in modes}  # per mode, in repetition order
    cpu: dict[str, list] = {m: [] for m in modes}  # CPU seconds of the child and all it started (_tree_cpu)
    scores = set()
    loads = [os.getloadavg()[0]]
    for rep in range(args.reps):
        k = rep % len(modes)
        for mode in modes[k:] + modes[:k]:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--jobs", str(args.jobs)],
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                sys.exit(f"{mode} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            times[mode].append(result["seconds"])
            cpu[mode].append(result["cpu"])
            scores.add(round(result["best_score"], 6))
            loads.append(os.getloadavg()[0])
            print(f"  rep {rep + 1} {mode:13s} {result['seconds']:6.2f} s, CPU {cpu[mode][-1]:6.2f} s",
                  file=sys.stderr, flush=True)
    import joblib
    import sklearn
    print(f"GridSearchCV(SVC(), {len(PARAM_GRID['C']) * len(PARAM_GRID['gamma'])} candidates, cv={FOLDS}): "
          f"{len(PARAM_GRID['C']) * len(PARAM_GRID['gamma']) * FOLDS} fits on digits, n_jobs={args.jobs}, "
          f"{os.cpu_count()} CPUs; medians of {args.reps}; scikit-learn {sklearn.__version__}, "
          f"joblib {joblib.__version__}; load average {min(loads):.1f}-{max(loads):.1f}")
    print("| mode | median s | range s | / loky (same warmth): medians | / loky: each repetition's | "
          "CPU s, whole process tree |")
    print("|---|---|---|---|---|---|")
    med = {m: statistics.median(v) for m, v in times.items()}
    for mode in modes:
        peer = "loky-" + mode.partition("-")[2]
        ratio = paired = "-"
        if mode.startswith("farpool") and peer in med:
            ratio = f"{med[mode] / med[peer]:.2f}x"
            # both ran in the same repetition, back to back: the machine's drift between
            # repetitions (tens of percent here) cancels out of each repetition's ratio
            each = [a / b for a, b in zip(times[mode], times[peer])]
            paired = f"{statistics.median(each):.2f}x ({', '.join(f'{r:.2f}' for r in each)})"
        print(f"| {mode} | {med[mode]:.2f} | {min(times[mode]):.2f}-{max(times[mode]):.2f} | {ratio} "
              f"| {paired} | {statistics.median(cpu[mode]):.1f} |")
    if len(scores) > 1:
        sys.exit(f"the modes found different best scores: {sorted(scores)}")


if __name__ == "__main__":
    main()
