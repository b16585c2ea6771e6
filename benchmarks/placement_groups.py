"""Placement groups: the create -> ready -> remove round trip, farpool against Ray, in one run.

Each system runs in a process of its own on a private one-node cluster of 4 logical CPUs
(farpool: ``init(num_cpus=4)``, a head and a node agent; Ray: ``ray.init(num_cpus=4)``).
One round trip is ``placement_group(bundles)``, ``get(pg.ready())`` and
``remove_placement_group(pg)``; then a task runs in a bundle (to show the group is
usable: one round trip of "create, ready, a task in bundle 0, remove").  Shapes: one
bundle of 1 CPU, and four bundles of 1 CPU (SPREAD, on the one node).  Medians over
``--reps`` round trips after one to warm up (workers started).

    python benchmarks/placement_groups.py [--reps 50] [--only farpool,ray] [--ray-python PATH]

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

SHAPES = {"1 bundle": ([{"CPU": 1}], "PACK"), "4 bundles": ([{"CPU": 1}] * 4, "SPREAD")}


def _one():
    return 1


def _measure(create, ready, remove, run_in, reps: int) -> dict:
    out = {}
    for label, (bundles, strategy) in SHAPES.items():
        pg = create(bundles, strategy)
        ready(pg)
        run_in(pg)
        remove(pg)  # warm: workers up
        trips, with_task = [], []
        for _ in range(reps):
            t = time.perf_counter()
            pg = create(bundles, strategy)
            ready(pg)
            remove(pg)
            trips.append(time.perf_counter() - t)
        for _ in range(max(3, reps // 5)):
            t = time.perf_counter()
            pg = create(bundles, strategy)
            ready(pg)
            run_in(pg)
            remove(pg)
            with_task.append(time.perf_counter() - t)
        out[label] = {"round_trip_ms": statistics.median(trips) * 1000,
                      "with_task_ms": statistics.median(with_task) * 1000}
    return out


def run_farpool(reps: int) -> dict:
    import farpool
    from farpool.util import placement_group, remove_placement_group
    farpool.init(num_cpus=4)
    try:
        one = farpool.remote(num_cpus=1)(_one)
        return dict(_measure(
            lambda b, s: placement_group(b, strategy=s),
            lambda pg: farpool.get(pg.ready(), timeout=60),
            remove_placement_group,
            lambda pg: farpool.get(one.options(scheduling_strategy=farpool.PlacementGroupScheduling(pg, 0))
                                   .remote(), timeout=60),
            reps), version=farpool.__version__)
    finally:
        farpool.shutdown()


def run_ray(reps: int) -> dict:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    ray.init(num_cpus=4, logging_level="ERROR", include_dashboard=False)
    try:
        one = ray.remote(num_cpus=1)(_one)
        return dict(_measure(
            lambda b, s: placement_group(b, strategy=s),
            lambda pg: ray.get(pg.ready(), timeout=60),
            remove_placement_group,
            lambda pg: ray.get(one.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote(),
                               timeout=60),
            reps), version=ray.__version__)
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
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
    print(f"placement group create -> ready -> remove, one node of 4 logical CPUs, median of {args.reps} "
          f"({platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {versions})\n")
    print("| system | group | round trip | with a task in bundle 0 |")
    print("|---|---|---|---|")
    for system, r in rows.items():
        for label in SHAPES:
            if r is None:
                print(f"| {system} | {label} | failed | |")
            else:
                trip, task = r[label]["round_trip_ms"], r[label]["with_task_ms"]
                print(f"| {system} | {label} | {trip:.1f} ms | {task:.1f} ms |")
    if rows.get("farpool") and rows.get("ray"):
        ratios = ", ".join(
            f"{label} {rows['farpool'][label]['round_trip_ms'] / rows['ray'][label]['round_trip_ms']:.2f}x"
            for label in SHAPES)
        print(f"\nfarpool/ray round trip: {ratios} (below 1: farpool faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
