#!/usr/bin/env python
"""What task event recording costs the task path, measured A/B inside one cluster.

    python benchmarks/task_events_ab.py [--rounds 20] [--tasks 2000] [--trips 200]

One driver alternates blocks with recording on and off (the client's hooks swapped
between the recording ones and no-ops, as ``FARPOOL_TASK_EVENTS=0`` does), so both
see the same machine load; the head folds the batches of the "on" blocks as usual.
Prints the median no-op throughput and sync round trip of each setting and their
ratio, and the CPU each kind of process spent per task in each setting: after every
block the driver flushes its events and waits for the head to have folded them (a head
query behind them on the same socket), so a block's CPU is its own.
``benchmarks/harness.py --only farpool,farpool_noevents`` measures the same two
settings in separate processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil

import farpool
from farpool._private import task_events


@farpool.remote
def noop():
    return None


def _set_recording(client, on: bool) -> None:
    buf = client.events
    for name in ("submitted", "sent", "ran", "failed", "waiting"):
        if on:
            buf.__dict__.pop(name, None)  # the class's recording hooks
        else:
            setattr(buf, name, task_events._nothing)


def _kind(proc: psutil.Process) -> str:
    """head, node (the agent) or worker (forked from the agent's launcher: same command line)."""
    try:
        line = " ".join(proc.cmdline())
        parent = " ".join(proc.parent().cmdline()) if proc.parent() is not None else ""
    except psutil.Error:
        return "gone"
    if "node_main" in line:
        return "worker" if "node_main" in parent else "node"
    return "head" if "head" in line else "other"


class CpuMeter:
    """CPU seconds (user + system) of this driver and of the cluster's processes, by kind."""

    def __init__(self):
        self.me = psutil.Process()
        self.kinds: dict[int, str] = {}

    def snap(self) -> dict:
        out: dict = {}
        for proc in [self.me] + self.me.children(recursive=True):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            kind = "driver" if proc.pid == self.me.pid else self.kinds.setdefault(proc.pid, _kind(proc))
            out[kind] = out.get(kind, 0.0) + times.user + times.system
        return out


def _settled(client) -> None:
    """Flush this driver's events now and return once the head has folded them."""
    client.loop.call_soon(client.reporter.flush)
    farpool.status()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--trips", type=int, default=200)
    args = ap.parse_args()
    farpool.init(num_cpus=2)
    client = farpool.api._client()
    farpool.get([noop.remote() for _ in range(200)])  # warm: workers and leases
    results = {True: {"tps": [], "rt": []}, False: {"tps": [], "rt": []}}
    cpu = {True: [], False: []}  # per block: {kind: us per task}
    meter = CpuMeter()
    _settled(client)
    for i in range(args.rounds):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            _set_recording(client, on)
            before = meter.snap()
            t = time.perf_counter()
            farpool.get([noop.remote() for _ in range(args.tasks)])
            results[on]["tps"].append(args.tasks / (time.perf_counter() - t))
            _settled(client)
            after = meter.snap()
            cpu[on].append({k: (after[k] - before.get(k, 0.0)) * 1e6 / args.tasks for k in after})
            trips = []
            for _ in range(args.trips):
                t = time.perf_counter()
                farpool.get(noop.remote())
                trips.append(time.perf_counter() - t)
            results[on]["rt"].append(statistics.median(trips) * 1e6)
    _set_recording(client, True)
    status = farpool.status()
    farpool.shutdown()
    on, off = results[True], results[False]
    tps_on, tps_off = statistics.median(on["tps"]), statistics.median(off["tps"])
    rt_on, rt_off = statistics.median(on["rt"]), statistics.median(off["rt"])
    print(f"no-op tasks/s: on {tps_on:,.0f}, off {tps_off:,.0f}: on/off {tps_on / tps_off:.3f}")
    print(f"sync round trip, median us: on {rt_on:,.0f}, off {rt_off:,.0f}: on/off {rt_on / rt_off:.3f}")
    pairs = [a / b for a, b in zip(on["tps"], off["tps"])]
    print(f"per-round on/off throughput ratios: {', '.join(f'{r:.2f}' for r in pairs)}")
    # (summed over the blocks: psutil counts in clock ticks, 10 ms, too coarse for one block)
    kinds = sorted({k for block in cpu[True] + cpu[False] for k in block})
    for kind in kinds + ["all"]:
        def per_task(blocks):
            return sum(sum(b.values()) if kind == "all" else b.get(kind, 0.0) for b in blocks) / len(blocks)
        c_on, c_off = per_task(cpu[True]), per_task(cpu[False])
        print(f"CPU per no-op task, {kind:6s}: on {c_on:6.1f} us, off {c_off:6.1f} us"
              + (f": on/off {c_on / c_off:.3f}" if c_off > 0.5 else ""))
    print(f"(the head heard of {status['tasks']['totals']['FINISHED']:,} finished tasks; "
          f"{status['tasks']['events_dropped']} events dropped)")


if __name__ == "__main__":
    main()
