"""A large object read on another node: farpool against Ray, two nodes on this machine.

Each system runs a head node and a second node (farpool: `farpool start` twice on
loopback, each agent with its own store; Ray: ray.cluster_utils.Cluster, two raylets
with their own plasma stores).  The driver puts an array on the head node; a task
pinned to the second node reads it:

- first read: the second node copies the object (farpool: its agent pulls 4 MB chunks
  over CURVE-encrypted TCP; Ray: its object manager, unencrypted);
- cached read: a second task on that node maps the copy already there;
- CURVE ceiling (farpool only): one zmq CURVE stream of 4 MB messages between two
  sockets of one process, the most an encrypted connection carries on this machine.

    python benchmarks/between_nodes.py [--mb 400] [--reps 3] [--only farpool,ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def _timed_reads(remote_fn, put, get, size_mb: int, reps: int) -> dict:
    import numpy as np
    array = np.ones(size_mb * 2**20 // 8)
    get(remote_fn(np.ones(8)))  # a worker up on the second node
    first, cached = [], []
    for _ in range(reps):
        ref = put(array)
        t = time.perf_counter()
        get(remote_fn(ref))
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        get(remote_fn(ref))
        cached.append(time.perf_counter() - t)
        del ref
    return {"first_s": statistics.median(first), "cached_s": statistics.median(cached)}


def _touch(array):
    return float(array[::4096].sum())


def run_farpool(size_mb: int, reps: int) -> dict:
    root = tempfile.mkdtemp(prefix="fpbench-")
    env = dict(os.environ, FARPOOL_TMPDIR=root)

    def cli(*args, extra=None):
        subprocess.run([sys.executable, "-m", "farpool", *args], check=True, capture_output=True,
                       env=dict(env, **(extra or {})), timeout=120)
    try:
        cli("start", "--head", "--num-cpus", "1")
        with open(os.path.join(root, "cluster.json")) as f:
            state = json.load(f)
        with open(state["token_file"]) as f:
            token = f.read().strip()
        cli("start", "--address", state["address"], "--num-cpus", "1", "--resources", '{"second": 1}',
            extra={"FARPOOL_TOKEN": token})
        os.environ["FARPOOL_TMPDIR"] = root
        import farpool
        farpool.init(address="auto")
        try:
            touch = farpool.remote(resources={"second": 1})(_touch)
            return _timed_reads(lambda a: touch.remote(a), farpool.put,
                                lambda r: farpool.get(r, timeout=600), size_mb, reps)
        finally:
            farpool.shutdown()
    finally:
        cli("stop")
        shutil.rmtree(root, ignore_errors=True)


def run_ray(size_mb: int, reps: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"second": 1})
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        touch = ray.remote(resources={"second": 1})(_touch)
        return _timed_reads(lambda a: touch.remote(a), ray.put, lambda r: ray.get(r, timeout=600), size_mb, reps)
    finally:
        ray.shutdown()
        cluster.shutdown()


def curve_ceiling(mb: int = 400) -> float:
    """GB/s of one CURVE-encrypted zmq stream of 4 MB messages over loopback."""
    import zmq
    ctx = zmq.Context()
    public, secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    server = ctx.socket(zmq.ROUTER)
    server.curve_server = True
    server.curve_secretkey = secret
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.curve_serverkey, client.curve_publickey, client.curve_secretkey = public, client_public, client_secret
    client.connect(f"tcp://127.0.0.1:{port}")
    client.send(b"hello")
    identity, _ = server.recv_multipart()
    chunk = os.urandom(4 << 20)
    n = mb // 4
    sender = threading.Thread(target=lambda: [server.send_multipart([identity, chunk], copy=False)
                                              for _ in range(n)])
    t = time.perf_counter()
    sender.start()
    for _ in range(n):
        client.recv_multipart()
    elapsed = time.perf_counter() - t
    sender.join()
    server.close(0)
    client.close(0)
    ctx.term()
    return n * 4 / 1024 / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="farpool,ray")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one system in a process of its own
        result = {"farpool": run_farpool, "ray": run_ray}[args.child](args.mb, args.reps)
        print(json.dumps(result))
        return 0
    gb = args.mb / 1024
    rows = {}
    for system in args.only.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", system, "--mb", str(args.mb),
                               "--reps", str(args.reps)], capture_output=True, text=True, timeout=1800)
        try:
            rows[system] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            rows[system] = None
            print(f"{system}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
    print(f"{args.mb} MB array read by a task on a second node (two nodes on this machine; median of {args.reps})\n")
    print("| system | first read (copy) | GB/s | cached read |")
    print("|---|---|---|---|")
    for system, r in rows.items():
        if r is None:
            print(f"| {system} | failed | | |")
        else:
            print(f"| {system} | {r['first_s'] * 1000:.0f} ms | {gb / r['first_s']:.2f} | {r['cached_s'] * 1000:.1f} ms |")
    if rows.get("farpool") and rows.get("ray"):
        f, r = rows["farpool"], rows["ray"]
        print(f"\nfarpool/ray: first read {f['first_s'] / r['first_s']:.2f}x, cached {f['cached_s'] / r['cached_s']:.2f}x "
              "(below 1: farpool faster)")
    if "farpool" in rows:
        print(f"one CURVE stream on this machine carries {curve_ceiling():.2f} GB/s (farpool encrypts; Ray does not)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
