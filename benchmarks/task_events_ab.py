#!/usr/bin/env python
"""What task event recording costs the task path, measured A/B inside one cluster.

    python benchmarks/task_events_ab.py [--rounds 20] [--tasks 2000] [--trips 200]

One driver alternates blocks with recording on and off (the client's hooks swapped
between the recording ones and no-ops, as ``FARPOOL_TASK_EVENTS=0`` does), so both
see the same machine load; the head folds the batches of the "on" blocks as usual.
Prints the median no-op throughput and sync round trip of each setting and their
ratio.  ``benchmarks/harness.py --only farpool,farpool_noevents`` measures the same
two settings in separate processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    for i in range(args.rounds):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            _set_recording(client, on)
            t = time.perf_counter()
            farpool.get([noop.remote() for _ in range(args.tasks)])
            results[on]["tps"].append(args.tasks / (time.perf_counter() - t))
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
    print(f"(the head heard of {status['tasks']['totals']['FINISHED']:,} finished tasks; "
          f"{status['tasks']['events_dropped']} events dropped)")


if __name__ == "__main__":
    main()
