"""A chaos run by hand (#13): ``python -m tests.chaos.run --seed S --minutes M`` from the
repository root (``PYTHONPATH=src`` for a checkout). It starts its own cluster in a fresh tmp
root and /dev/shm directory, runs chaos_harness.Chaos, prints the report and exits 1 on any
wrong result, other error, hang or leftover. The same seed replays the same fault plan.
"""

import argparse
import os
import random
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _print(text: str) -> None:
    print(text, flush=True)  # (a long run's log is followed as it grows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="the fault plan's seed (default: a new one, printed)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the workload runs")
    parser.add_argument("--quiet", action="store_true", help="print only the report")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    root = tempfile.mkdtemp(prefix="fpchaos-", dir="/tmp")
    shm = tempfile.mkdtemp(prefix="fpchaos-", dir="/dev/shm")
    os.environ["FARPOOL_TMPDIR"] = root   # before farpool is imported: its tmp root
    os.environ["FARPOOL_SHM_PATH"] = shm
    sys.path[:0] = [HERE, os.path.dirname(HERE)]  # chaos_harness, farpool_testing (workers inherit it)
    import chaos_harness
    from farpool_testing import Cluster
    try:
        cluster = Cluster(root)
        chaos = chaos_harness.Chaos(cluster, seed, args.minutes * 60, log=(lambda *_: None) if args.quiet else _print)
        report = chaos.run()
        report.leftovers += cluster.leftovers(shm)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    print(report.text())
    print(f"replay: python -m tests.chaos.run --seed {seed} --minutes {args.minutes:g}")
    return 1 if report.failures or report.leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
