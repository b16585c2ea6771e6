"""Recovery after a head kill: kill -9 the head of a started cluster N times while a driver
keeps tasks flowing, and time each recovery (#13).

For each kill it prints three times, from the kill:
- the supervisor started the next head (its ``started the head`` line in head.log);
- the driver registered again (its head link's Welcome: ``outages`` of head_link);
- the first ``farpool.nodes()`` answered by the new head.
Tasks keep being submitted and checked all along (the direct path does not need the head).

    FARPOOL_TMPDIR=/tmp/fp-bench python benchmarks/head_restart.py [--kills 4]

It starts its own cluster with ``farpool start --head`` in FARPOOL_TMPDIR and stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time


def square(x):
    return x * x


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=4, help="heads to kill (the supervisor allows 5 quick ones)")
    parser.add_argument("--between", type=float, default=11.0,
                        help="seconds between kills (a head that ran 10 s resets the supervisor's count)")
    args = parser.parse_args()
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "farpool", "start", "--head", "--num-cpus", "2"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    import farpool
    try:
        farpool.init(address="auto")
        client = farpool.api._client()
        with open(os.path.join(os.environ.get("FARPOOL_TMPDIR", f"/tmp/farpool-{os.getuid()}"),
                               "cluster.json")) as f:
            session_dir = json.load(f)["session_dir"]
        remote_square = farpool.remote(square)
        stop = threading.Event()
        done = [0]

        def load():  # tasks all along; every result checked
            i = 0
            while not stop.is_set():
                refs = [remote_square.remote(i + k) for k in range(50)]
                assert farpool.get(refs, timeout=60) == [(i + k) ** 2 for k in range(50)]
                done[0] += 50
                i += 50
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        rows = []
        for n in range(args.kills):
            time.sleep(args.between if n else 2.0)  # let the head run (see --between)
            with open(os.path.join(session_dir, "head.pid")) as f:
                pid = int(f.read())
            before = len(client.head_link.state.outages)
            tasks_before = done[0]
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while len(client.head_link.state.outages) == before:
                time.sleep(0.001)
            registered = time.monotonic() - killed
            farpool.nodes()
            answered = time.monotonic() - killed
            rows.append((registered, answered, done[0] - tasks_before))
            print(f"kill {n + 1}: driver registered again after {registered:.2f} s, nodes() answered after "
                  f"{answered:.2f} s, {done[0] - tasks_before} tasks finished meanwhile", flush=True)
        stop.set()
        worker.join(timeout=60)
        print(f"median over {len(rows)} kills: driver registered again {statistics.median(r[0] for r in rows):.2f} s,"
              f" nodes() {statistics.median(r[1] for r in rows):.2f} s; {done[0]} tasks, all correct")
        with open(os.path.join(session_dir, "head.log")) as f:
            print("".join(line for line in f if "head_supervisor" in line), end="")
    finally:
        farpool.shutdown()
        subprocess.run([sys.executable, "-m", "farpool", "stop"], env=env, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
