#!/usr/bin/env python
"""The CPU each process spends on a map of 100,000 tiny items: farpool's facades against
``multiprocessing.Pool`` and ``ProcessPoolExecutor``, in one run (issue 19).

    python benchmarks/map_cpu.py [--maps 30] [--rounds 3] [--only pool,imap,executor]

Wall time on a shared 2-core machine moves with everyone else's load; the CPU seconds the
caller's process and the pool's processes spend per map move much less, so this prints
both: per API, the median wall time of a map and the CPU milliseconds per map of the
caller and of the pool's other processes (farpool: the workers, the node agent and the
head).  Each API runs ``--maps`` maps per round, the APIs alternating, ``--rounds``
rounds; medians over the rounds.  Pool.map and executor.map use the chunksize the stdlib
would pick for ``Pool.map`` on 2 processes (12,500); imap its default chunksize (1).
Compare two farpool versions by running this with each on PYTHONPATH, back to back.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import time

N = 100_000
CHUNK = N // 8  # what Pool.map picks for 2 processes: len / (4 x processes)


def inc(x):
    return x + 1


def _cpu(proc) -> float:
    import psutil
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def _others(pids_of) -> list:
    import psutil
    return [psutil.Process(pid) for pid in pids_of()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", type=int, default=30, help="maps per API per round (imap: a fifth of it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="pool,imap,executor")
    args = ap.parse_args()
    import psutil

    import farpool
    items = list(range(N))
    me = psutil.Process()
    mp_pool = multiprocessing.Pool(2)
    ppe = concurrent.futures.ProcessPoolExecutor(2)
    ppe.submit(abs, 1).result()
    fp_pool = farpool.Pool(2)
    fp_ex = farpool.DistributedExecutor(max_workers=2)
    apis = {
        "pool": [("farpool.Pool.map", lambda: fp_pool.map(inc, items, CHUNK)),
                 ("multiprocessing.Pool.map", lambda: mp_pool.map(inc, items, CHUNK))],
        "imap": [("farpool.Pool.imap", lambda: list(fp_pool.imap(inc, items))),
                 ("multiprocessing.Pool.imap", lambda: list(mp_pool.imap(inc, items)))],
        "executor": [("DistributedExecutor.map", lambda: list(fp_ex.map(inc, items, chunksize=CHUNK))),
                     ("ProcessPoolExecutor.map", lambda: list(ppe.map(inc, items, chunksize=CHUNK)))],
    }
    runs = [run for name in args.only.split(",") for run in apis[name]]
    others = {  # the processes doing the work besides this one
        "multiprocessing.Pool": lambda: [p.pid for p in mp_pool._pool],
        "ProcessPoolExecutor": lambda: list(ppe._processes),
        "farpool": lambda: [p.pid for p in me.children(recursive=True)
                            if p.pid not in {q.pid for q in mp_pool._pool} | set(ppe._processes)],
    }
    for _, run in runs:  # warm up: workers started, modules imported, fast paths seen
        for _ in range(3 if "imap" not in _ else 1):
            run()
    stats: dict[str, dict[str, list]] = {label: {"wall": [], "mine": [], "theirs": []} for label, _ in runs}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for label, run in runs:
            family = "farpool" if label.startswith(("farpool", "Distributed")) else label.rpartition(".")[0]
            procs = _others(others[family])
            n = max(1, args.maps // 5) if "imap" in label else args.maps
            walls = []
            mine0, theirs0 = _cpu(me), sum(_cpu(p) for p in procs)
            for _ in range(n):
                t0 = time.perf_counter()
                out = run()
                walls.append(time.perf_counter() - t0)
                assert len(out) == N and out[-1] == N
                del out
            stats[label]["wall"].append(statistics.median(walls))
            stats[label]["mine"].append((_cpu(me) - mine0) / n)
            stats[label]["theirs"].append((sum(_cpu(p) for p in procs) - theirs0) / n)
        loads.append(os.getloadavg()[0])
    fp_pool.terminate()
    fp_ex.shutdown()
    mp_pool.terminate()
    ppe.shutdown()
    print(f"{N:,} items, 2 workers each; medians of {args.rounds} rounds; load average "
          f"{min(loads):.1f}-{max(loads):.1f}; farpool from {os.path.dirname(farpool.__file__)}")
    print("| API | wall ms per map | M items/s | caller CPU ms per map | pool processes' CPU ms per map |")
    print("|---|---|---|---|---|")
    for label, _ in runs:
        s = {k: statistics.median(v) for k, v in stats[label].items()}
        print(f"| {label} | {s['wall'] * 1e3:.1f} | {N / s['wall'] / 1e6:.2f} | {s['mine'] * 1e3:.1f} "
              f"| {s['theirs'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
