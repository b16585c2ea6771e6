"""Where a sync round trip's time goes: farpool against multiprocessing.Pool, the wall time
per round trip (median and mean) and the CPU each process spends on it (means) (the kernel's per-thread run time,
/proc/<pid>/task/*/schedstat, so nothing of the other processes on the machine counts).

With ``--cpus 0`` every process of both systems runs on CPU 0: no wake-up crosses to
another CPU (on a virtual machine such a wake-up costs an inter-processor interrupt and
the idle CPU's exit, tens of microseconds), and the round trip is the CPU it costs.
Unpinned, the scheduler decides; multiprocessing.Pool's result thread and worker often
land on the caller's CPU, farpool's worker rarely does.

usage: python benchmarks/round_trip_cpu.py [--cpus 0] [--n 5000] [--rounds 3]
"""

import argparse
import glob
import multiprocessing
import os
import statistics
import time

import psutil


def echo(x):
    return x


def _cpu_s(pid: int) -> float:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # (a thread that ended meanwhile)
    return total / 1e9


def _snapshot() -> dict:
    me = psutil.Process()
    out = {me.pid: ("caller", _cpu_s(me.pid))}
    for p in me.children(recursive=True):
        try:
            name = p.name()
        except psutil.Error:
            continue
        out[p.pid] = ("worker" if "worker" in name or name.startswith("python") else name, _cpu_s(p.pid))
    return out


def _measure(call, n: int) -> dict:
    for i in range(300):
        call(i)
    before = _snapshot()
    lat = []
    pc = time.perf_counter
    for i in range(n):
        t0 = pc()
        call(i)
        lat.append(pc() - t0)
    after = _snapshot()
    cpu: dict = {}
    for pid, (kind, s) in after.items():
        if pid in before:
            cpu[kind] = cpu.get(kind, 0.0) + (s - before[pid][1]) / n * 1e6
    return {"median_us": statistics.median(lat) * 1e6, "mean_us": statistics.fmean(lat) * 1e6, "caller_cpu_us": cpu.get("caller", 0.0),
            "worker_cpu_us": cpu.get("worker", 0.0),
            "other_cpu_us": sum(v for k, v in cpu.items() if k not in ("caller", "worker"))}


def run_mp(n: int) -> dict:
    with multiprocessing.Pool(1) as pool:
        return _measure(lambda i: pool.apply(echo, (i,)), n)


def run_farpool(n: int) -> dict:
    import farpool
    remote_echo = farpool.remote(echo)
    farpool.init(num_cpus=1)
    try:
        return _measure(lambda i: farpool.get(remote_echo.remote(i)), n)
    finally:
        farpool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", default=None, help="comma-separated CPUs every process runs on (e.g. 0)")
    ap.add_argument("--n", type=int, default=5000, help="round trips per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each system, alternating")
    args = ap.parse_args()
    if args.cpus is not None:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})  # (children inherit it)
    rows: dict = {"farpool": [], "multiprocessing.Pool": []}
    for _ in range(args.rounds):
        rows["farpool"].append(run_farpool(args.n))
        rows["multiprocessing.Pool"].append(run_mp(args.n))
    where = f"CPUs {sorted(os.sched_getaffinity(0))}"
    print(f"{args.n} sync round trips of echo(i), {args.rounds} alternating rounds, {where}; medians of the rounds")
    print(f"{'system':22} {'median':>9} {'mean':>9} {'caller CPU':>11} {'worker CPU':>11} {'other CPU':>10}")
    med = {}
    for system, results in rows.items():
        med[system] = {k: statistics.median(r[k] for r in results) for k in results[0]}
        m = med[system]
        print(f"{system:22} {m['median_us']:7.1f}us {m['mean_us']:7.1f}us {m['caller_cpu_us']:9.1f}us {m['worker_cpu_us']:9.1f}us "
              f"{m['other_cpu_us']:8.1f}us")
    fp, mp = med["farpool"], med["multiprocessing.Pool"]
    print(f"farpool / multiprocessing.Pool: round trip {fp['median_us'] / mp['median_us']:.2f}x (median), "
          f"{fp['mean_us'] / mp['mean_us']:.2f}x (mean), "
          f"caller CPU {fp['caller_cpu_us'] / mp['caller_cpu_us']:.2f}x, "
          f"worker CPU {fp['worker_cpu_us'] / mp['worker_cpu_us']:.2f}x")


if __name__ == "__main__":
    main()
