"""Streaming generators, farpool against Ray, in one run.

Each system runs in a process of its own on a private one-node cluster of 2 logical CPUs
(farpool: ``init(num_cpus=2)``; Ray: ``ray.init(num_cpus=2)``).  Two workloads:

- small: a generator task yields 1,000 small ints; the driver takes each ref as it comes
  and reads it (``get``).  Items per second from ``.remote()`` to the last item read,
  median of ``--reps`` runs after one to warm up (a worker started).
- large: 20 items of 50 MB with back-pressure 2 (farpool ``max_pending_items=2``, Ray
  ``_generator_backpressure_num_objects=2``); the driver reads each item and drops it.
  Peak object store use (the store's capacity minus ``available_resources()
  ["object_store_memory"]``, sampled as each item is taken, above what it was before),
  and MB/s.

    python benchmarks/generators.py [--reps 5] [--only farpool,ray] [--ray-python PATH]

``--ray-python``: the interpreter that has Ray (default: this one; ``pip install -e '.[bench]'``
puts both in one environment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SMALL_ITEMS = 1000
LARGE_ITEMS, LARGE_MB, PENDING = 20, 50, 2
MB = 1 << 20


def small_items(n):
    for i in range(n):
        yield i


def large_items(n, mb):
    import numpy as np
    for i in range(n):
        yield np.full(mb * MB, i % 256, dtype=np.uint8)


def _measure(small, large, get, store_used, reps: int) -> dict:
    def one_small():
        t = time.perf_counter()
        got = 0
        for ref in small.remote(SMALL_ITEMS):
            got += get(ref) >= 0
        assert got == SMALL_ITEMS
        return SMALL_ITEMS / (time.perf_counter() - t)

    one_small()  # warm: a worker up
    rates = [one_small() for _ in range(reps)]
    before = store_used()
    peak = 0
    t = time.perf_counter()
    seen = 0
    for ref in large.remote(LARGE_ITEMS, LARGE_MB):
        peak = max(peak, store_used() - before)
        assert int(get(ref)[0]) == seen % 256
        seen += 1
        del ref
    elapsed = time.perf_counter() - t
    assert seen == LARGE_ITEMS
    return {"small_items_per_s": statistics.median(rates), "large_peak_mb": peak / MB,
            "large_mb_per_s": LARGE_ITEMS * LARGE_MB / elapsed}


def run_farpool(reps: int) -> dict:
    import farpool
    farpool.init(num_cpus=2)
    try:
        capacity = farpool.cluster_resources()["object_store_memory"]
        return dict(_measure(
            farpool.remote(small_items),
            farpool.remote(max_pending_items=PENDING)(large_items),
            lambda ref: farpool.get(ref, timeout=120),
            lambda: capacity - farpool.available_resources()["object_store_memory"],
            reps), version=farpool.__version__)
    finally:
        farpool.shutdown()


def run_ray(reps: int) -> dict:
    import ray
    ray.init(num_cpus=2, logging_level="ERROR", include_dashboard=False)
    try:
        capacity = ray.cluster_resources()["object_store_memory"]
        return dict(_measure(
            ray.remote(small_items),
            ray.remote(_generator_backpressure_num_objects=PENDING)(large_items),
            lambda ref: ray.get(ref, timeout=120),
            lambda: capacity - ray.available_resources().get("object_store_memory", capacity),
            reps), version=ray.__version__)
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="farpool,ray")
    parser.add_argument("--ray-python", default=sys.executable)
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one system in a process of its own
        print(json.dumps({"farpool": run_farpool, "ray": run_ray}[args.child](args.reps)))
        return 0
    rows = {}
    for system in args.only.split(","):
        python = args.ray_python if system == "ray" else sys.executable
        proc = subprocess.run([python, os.path.abspath(__file__), "--child", system, "--reps", str(args.reps)],
                              capture_output=True, text=True, timeout=1800)
        try:
            rows[system] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            rows[system] = None
            print(f"{system}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
    versions = ", ".join(f"{s} {r['version']}" for s, r in rows.items() if r)
    print(f"streaming generators, one node of 2 logical CPUs ({platform.python_version()}, {os.cpu_count()} "
          f"cores, load {os.getloadavg()[0]:.1f}; {versions})\n")
    print(f"| system | {SMALL_ITEMS} small items (median of {args.reps}) | {LARGE_ITEMS} x {LARGE_MB} MB, "
          f"back-pressure {PENDING}: peak store use | its MB/s |")
    print("|---|---|---|---|")
    for system, r in rows.items():
        if r is None:
            print(f"| {system} | failed | | |")
        else:
            print(f"| {system} | {r['small_items_per_s']:,.0f} items/s | {r['large_peak_mb']:.0f} MB "
                  f"| {r['large_mb_per_s']:,.0f} |")
    if rows.get("farpool") and rows.get("ray"):
        f, r = rows["farpool"], rows["ray"]
        print(f"\nfarpool/ray: small items/s {f['small_items_per_s'] / r['small_items_per_s']:.2f}x (above 1: "
              f"farpool faster), large MB/s {f['large_mb_per_s'] / r['large_mb_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
