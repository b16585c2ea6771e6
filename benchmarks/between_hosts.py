"""A large array copied between two separate hosts (network namespaces), encrypted,
against a bare CURVE ZeroMQ socket pair moving the same bytes between the same hosts,
in the same run.  Needs root (tests/netns.py builds the hosts).

- farpool: head on h1 (`farpool start --head --host`), a node on h2 joined with the
  printed command; a driver on h1 puts the array, a task pinned to h2 reads it (the
  h2 agent pulls it over CURVE from h1's store).  Time from submit to the result, and
  the put's own time beside it.  Two drivers: `init(address="auto")` writes the array
  into h1's store through shared memory; `init(address="h1:port")` (a driver joined by
  address, as from a machine with no node) sends it to h1's store over CURVE first.
- bare CURVE: a ROUTER on h2 with the same CURVE setup as farpool's sockets, a DEALER
  on h1 sending the bytes as 4 MB messages; time on the receiver, first to last byte
  plus the connection (the sender starts after the receiver is bound).

    sudo python benchmarks/between_hosts.py [--mb 1024] [--reps 3] [--modes local,tcp] [--before-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import netns  # noqa: E402

DRIVER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import farpool

    @farpool.remote(resources={"on_h2": 1})
    def nbytes(a):
        return a.nbytes

    mb, reps = int(sys.argv[1]), int(sys.argv[2])
    farpool.init()
    farpool.get(nbytes.remote(np.ones(8)), timeout=120)  # a worker up on h2
    times, puts = [], []
    for _ in range(reps):
        a = np.ones(mb * 2**20 // 8)
        t = time.perf_counter()
        ref = farpool.put(a)
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert farpool.get(nbytes.remote(ref), timeout=600) == mb * 2**20
        times.append(time.perf_counter() - t)
        del ref
    print(json.dumps([times, puts]))
    farpool.shutdown()
""")

RECEIVER = textwrap.dedent("""
    import sys, time, zmq
    from farpool._private import transport
    mb, host = int(sys.argv[1]), sys.argv[2]
    sock = transport.router()
    transport.make_curve_server(sock, "bench-token")
    zap = transport.ZapHandler("bench-token")
    port = transport.bind_tcp(sock, host, 0)
    print(port, flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(zap.socket, zmq.POLLIN)
    got, start = 0, None
    while got < mb * 2**20:
        for s, _ in poller.poll():
            if s is zap.socket:
                zap.handle()
                start = start or time.perf_counter()
            else:
                for frames in transport.recv_all(sock, copy=False):
                    got += len(frames[-1].buffer)
    print(time.perf_counter() - start, flush=True)
""")

SENDER = textwrap.dedent("""
    import sys, zmq
    from farpool._private import transport
    mb, address = int(sys.argv[1]), sys.argv[2]
    sock = transport.dealer(b"sender")
    transport.make_curve_client(sock, "bench-token")
    sock.connect("tcp://" + address)
    chunk = bytes(4 * 2**20)
    for _ in range(mb // 4):
        sock.send(chunk, copy=False)
    sock.setsockopt(zmq.LINGER, -1)
    sock.close()
    transport.term_context()
""")


def bare_curve(bed, mb: int) -> float:
    h1, h2 = bed[0], bed[1]
    receiver = h2.popen([sys.executable, "-c", RECEIVER, str(mb), h2.address], stdout=-1, text=True)
    port = int(receiver.stdout.readline())
    h1.run([sys.executable, "-c", SENDER, str(mb), f"{h2.address}:{port}"], timeout=600)
    seconds = float(receiver.stdout.readline())
    receiver.wait(timeout=60)
    receiver.stdout.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default="local,tcp", help="local: the driver init('auto') on h1; "
                        "tcp: init('h1:port') on h1 (the driver holds the put itself)")
    parser.add_argument("--before-src", help="also run the tcp driver with the client code of this src "
                        "directory (e.g. a checkout before a change), against the same cluster: mode tcp-before")
    args = parser.parse_args()
    with netns.HostBed(2) as bed:
        h1, h2 = bed[0], bed[1]
        out = h1.run([sys.executable, "-m", "farpool", "start", "--head", "--host", h1.address,
                      "--num-cpus", "1", "--object-store-memory", str(3 * args.mb * 2**20)]).stdout
        join = re.search(r"(FARPOOL_TOKEN=\$\(cat (\S+)\) farpool start --address (\S+))", out)
        token_path = join.group(2)
        token = open(h1.path(token_path)).read()
        os.makedirs(os.path.dirname(h2.path(token_path)), exist_ok=True)
        with open(h2.path(token_path), "w") as f:
            f.write(token)
        h2.run(["sh", "-c", join.group(1) + " --num-cpus 1 --resources '{\"on_h2\": 1}' "
                f"--object-store-memory {3 * args.mb * 2**20}"])
        modes = {"local": {"FARPOOL_ADDRESS": "auto"},  # the driver's put goes into h1's store
                 "tcp": {"FARPOOL_ADDRESS": join.group(3), "FARPOOL_TOKEN": token}}  # joined by address
        if args.before_src:
            modes["tcp-before"] = dict(modes["tcp"], PYTHONPATH=os.path.abspath(args.before_src))
        modes = {m: modes[m] for m in args.modes.split(",") + (["tcp-before"] if args.before_src else [])}
        farpool_s, put_s, curve_s = {m: [] for m in modes}, {m: [] for m in modes}, []
        for _ in range(args.reps):  # interleaved: the same load for both
            curve_s.append(bare_curve(bed, args.mb))
            for mode, env in modes.items():
                out = h1.run([sys.executable, "-c", DRIVER, str(args.mb), "1"], timeout=900, env=env)
                times, puts = json.loads(out.stdout.splitlines()[-1])
                farpool_s[mode] += times
                put_s[mode] += puts
        for host in (h2, h1):
            host.run([sys.executable, "-m", "farpool", "stop"], check=False)
    gb = args.mb * 2**20 / 1e9
    c = statistics.median(curve_s)
    print(f"{args.mb} MB between two namespace hosts, median of {args.reps}:")
    print(f"  bare CURVE zmq pair h1 -> h2: {c:.2f} s, {gb / c:.2f} GB/s   runs {[round(t, 2) for t in curve_s]}")
    for mode, times in farpool_s.items():
        f = statistics.median(times)
        what = {"local": "driver init('auto') on h1", "tcp": "driver init('h1:port') on h1",
                "tcp-before": f"the same, client from {args.before_src}"}[mode]
        print(f"  farpool, {what}, task on h2: {f:.2f} s, {gb / f:.2f} GB/s ({c / f:.2f}x the bare pair)"
              f"   runs {[round(t, 2) for t in times]}")
        p = statistics.median(put_s[mode])
        print(f"    its put() took {p:.2f} s; put and task together {c / (p + f):.2f}x the bare pair")


if __name__ == "__main__":
    main()
