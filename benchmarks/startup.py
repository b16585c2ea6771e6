"""Start to first result, and what a start costs in CPU: ``farpool.init()`` plus one task, in
fresh driver processes, alternating between source trees when given several.

Each run is a new interpreter that starts and stops one embedded cluster first (so that the
driver's own imports are done, as in the harness's repetitions after the first), then times
``init()``, the first task after it, and reads the CPU of every process the start used
(``RUSAGE_CHILDREN`` once they have all exited: the head, the agent, the launcher, the workers).
The task is the harness's own (``farpool_bench.inc``), so a worker imports the same modules.

Runs rotate among the trees (``--tree DIR``, a checkout whose ``src`` goes first on the path;
none: the installed farpool), so a machine that speeds up or slows down meanwhile moves them
alike; medians and quartiles per tree.  Timing lives here, not in tests.

usage: python benchmarks/startup.py [--runs 12] [--tree OLD --tree NEW]
"""

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

_ONE_RUN = r"""
import gc, resource, sys, time
sys.path.insert(0, {here!r})
import farpool_bench as fb
warm = fb.FarpoolAdapter(2)
warm.start(); warm.call(fb.inc, 1); warm.stop()
gc.collect()
cpu = lambda r: r.ru_utime + r.ru_stime
before = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = time.perf_counter()
a = fb.FarpoolAdapter(2)
a.start()
t1 = time.perf_counter()
assert a.call(fb.inc, 1) == 2
t2 = time.perf_counter()
a.stop()
after = resource.getrusage(resource.RUSAGE_CHILDREN)
print(1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t2 - t0), 1e3 * (cpu(after) - cpu(before)))
"""

FIELDS = ("init", "first task", "start to first result", "CPU, all processes")


def one_run(tree):
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.path.join(os.path.abspath(tree), "src") + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _ONE_RUN.format(here=HERE)], env=env, capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"a run with tree {tree or '(installed)'} failed:\n{out.stderr}")
    return [float(x) for x in out.stdout.split()]


def quartiles(values):
    values = sorted(values)
    return values[len(values) // 4], values[(3 * len(values)) // 4]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12, help="runs per tree (default 12)")
    parser.add_argument("--tree", action="append", default=[],
                        help="a checkout to measure (its src/ first on the path); repeat to compare")
    args = parser.parse_args(argv)
    trees = args.tree or [None]
    results = {tree: [] for tree in trees}
    for i in range(args.runs):
        for j in range(len(trees)):
            tree = trees[(i + j) % len(trees)]  # rotating order
            results[tree].append(one_run(tree))
    print(f"{args.runs} runs per tree, rotating; medians (quartiles), ms")
    print("| tree | " + " | ".join(FIELDS) + " |")
    print("|---|" + "---|" * len(FIELDS))
    for tree, rows in results.items():
        cells = []
        for k in range(len(FIELDS)):
            column = [row[k] for row in rows]
            q1, q3 = quartiles(column)
            cells.append(f"{statistics.median(column):.1f} ({q1:.0f}-{q3:.0f})")
        print(f"| {tree or '(installed)'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
