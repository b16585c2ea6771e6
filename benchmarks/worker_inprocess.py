"""A worker's per-task code without a cluster: one bare Worker and one owner stream in this
process, on one thread, and N round trips of an ExecuteTask of one no-op task each (the
owner sends, the worker's loop runs once, the owner reads the TaskFinished).  What it times
is the code both ends run per message (framing, decoding, the call's set-up, the result's
packing, the reply), with no wake-up and no other process: steady under
``valgrind --tool=callgrind`` (instructions per task: run it with two values of N and divide
the difference), and a profile with ``--profile``.

usage: python benchmarks/worker_inprocess.py [--n 20000] [--profile]
"""

import argparse
import cProfile
import os
import pstats
import select
import shutil
import tempfile
import time

from farpool._private import protocol, unix_streams, worker


def noop(*args):
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="round trips measured (after 2,000 to warm up)")
    ap.add_argument("--profile", action="store_true", help="cProfile the measured round trips (top 30 by own time)")
    opts = ap.parse_args()
    worker.Worker._watch_doorbell = lambda self: None  # (no take-backs here: the main loop answers the doorbell)
    session_dir = tempfile.mkdtemp(prefix="farpool-wbench-")
    lifeline, lifeline_w = os.pipe()
    w = worker.Worker({"worker_id": "7", "node_id": "n" * 16, "session_dir": session_dir,
                       "agent_address": f"ipc://{session_dir}/no-agent", "lifeline_fd": lifeline})
    owner = unix_streams.StreamChannel.connect(os.path.join(session_dir, "w-7"))
    caller = (b"c:bench-owner", "node-bench", None, os.getpid())
    fn_bytes = protocol.dumps_function(noop)
    args, bufs = protocol.dumps(((1,), {}))
    lease = tuple(protocol.TaskLease([], 1, {"CPU": 1}))
    readable = select.poll()
    readable.register(owner.fd, select.POLLIN)

    def round_trip(i: int, first: bool = False) -> list:
        spec = protocol.TaskSpec(i.to_bytes(8, "little") + bytes(8), b"h" * 20, fn_bytes if first else None,
                                 "noop", args, 0, [], 1, {"job_id": "bench"} if first else None, lease)
        owner.send(protocol.encode("ExecuteTask", tuple(protocol.ExecuteTask([tuple(spec)], caller))))
        replies = []
        while not replies:
            w.loop.run_once(max_wait_s=5)
            if readable.poll(0):
                replies = owner.read()
        return replies

    try:
        tag, fields, _ = protocol.decode(round_trip(0, first=True)[0])
        if tag != "TaskFinished" or fields[0][0][1] is not True:
            raise SystemExit(f"the worker did not run the task: {tag} {fields!r:.300}")
        for i in range(1, 2000):
            round_trip(i)
        profile = cProfile.Profile() if opts.profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profile:
            profile.enable()
        for i in range(opts.n):
            round_trip(2000 + i)
        if profile:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"{wall / opts.n * 1e6:.1f} us per task (wall), {cpu / opts.n * 1e6:.1f} us CPU: owner and worker "
              f"on one thread, {opts.n} tasks")
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    finally:
        owner.close()
        w.close()
        os.close(lifeline)
        os.close(lifeline_w)
        shutil.rmtree(session_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
