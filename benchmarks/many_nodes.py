"""How many nodes one head serves: a real head against 100 and 500 fake node agents.

The head is the real one (``python -m farpool._private.head``, CURVE over TCP on
loopback).  The fakes are cheap: one process holds all of them, each with the two
connections a real agent opens (``node:<id>`` and its liveness thread's
``pulse:<id>:<pid>``), speaking the real protocol at the real rates:

    RegisterNode (once), Heartbeat every node.HEARTBEAT_S with its resources available and
    its stats (object store use, workers, leases), NodeAlive every pulse.BEAT_S; and
    leases the head asks for (RequestLease -> LeaseGranted, then the relayed
    CreateActor -> ActorCreated), as an agent that starts an actor does.

Measured per N: the head's CPU (its /proc utime+stime over a window) and resident
memory, with the fakes idle (resources unchanged, so nothing to send them) and busy
(every heartbeat reports other resources available, as when tasks come and go: the
head sends every node the change, batched: node_table.py); heartbeats answered per
second; the bytes of node tables and their changes all nodes receive per second; and
the head's scheduling throughput: actors a driver creates (CreateActor) placed on fake
nodes and alive, per second.  ``--before-src DIR`` measures a head of another checkout
right after ours, size by size, for a before/after in one run.

    python benchmarks/many_nodes.py [--nodes 100,500] [--busy 20,50] [--window 10] [--actors 1000]
                                    [--before-src DIR] [--json OUT]

Busy clusters are measured small: all the fakes share one process on this machine, which
must decrypt every table the head broadcasts (N nodes x N changes/s x a table of N
records); past ~50 nodes the fakes, not the head, are what falls behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

FAKES = r'''
import json, os, sys, time, zmq
from farpool._private import node, protocol, pulse, scheduling, transport, versions
from farpool._private.protocol import encode

address, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
token = os.environ["FARPOOL_TOKEN"]
ctl = sys.stdin
total = scheduling.make_totals(4, 0, {}, memory=16e9, object_store_memory=4e9)
busy = dict(total, CPU=total["CPU"] // 2)
fakes = []
poller = zmq.Poller()
for i in range(n):
    node_id = os.urandom(8).hex()
    info = {"node_id": node_id, "total": total, "ipc": f"ipc:///nonexistent/{i}", "tcp": f"10.9.{i // 250}.{i % 250}:1",
            "session_dir": "/nonexistent", "hostname": f"fake{i}", "pid": os.getpid(), "is_head_node": False,
            "store_dir": "/dev/shm", "store_in_shm": True, "versions": versions.ours()}
    sock = transport.dealer(f"node:{node_id}".encode())
    transport.start_tcp(sock, address, token, encode("RegisterNode", (info,)))
    beat = transport.dealer(f"pulse:{node_id}:{os.getpid()}".encode())
    transport.start_tcp(beat, address, token, encode("NodeAlive", (node_id, 0)))
    poller.register(sock, zmq.POLLIN)
    poller.register(beat, zmq.POLLIN)
    fakes.append({"id": node_id, "sock": sock, "beat": beat, "registered": False, "flip": False,
                  "leases": 0})
by_sock = {f["sock"]: f for f in fakes}
by_beat = {f["beat"]: f for f in fakes}
counts = {"acks": 0, "alive_acks": 0, "tables": 0, "leases": 0, "errors": 0, "table_bytes": 0, "sent": 0}
stats = {"workers": 4, "leased": 0, "pending_leases": 0,
         "object_store": {"used": 0, "capacity": 4e9, "objects": 0, "spilled": 0, "pulls": 0,
                          "pulled_bytes": 0, "pull_failures": 0, "chunks_sent": 0}}
start = time.monotonic()
next_hb = start + node.HEARTBEAT_S
next_pulse = start + pulse.BEAT_S
beats = 0
reported = False
poller.register(0, zmq.POLLIN)
while True:
    now = time.monotonic()
    if now >= next_pulse:
        beats += 1
        for f in fakes:
            transport.send(f["beat"], encode("NodeAlive", (f["id"], beats)))
        next_pulse = now + pulse.BEAT_S
    if now >= next_hb:
        for k, f in enumerate(fakes):
            f["flip"] = not f["flip"]
            available = busy if mode == "busy" and f["flip"] else total
            stats["object_store"]["used"] = (beats * 4096 + k) % 4_000_000_000  # store use moves
            transport.send(f["sock"], encode("Heartbeat", (f["id"], available, {"stats": stats})))
            counts["sent"] += 1
        next_hb = now + node.HEARTBEAT_S
    events = dict(poller.poll(max(0.0, min(next_pulse, next_hb) - time.monotonic()) * 1000))
    if 0 in events:
        line = ctl.readline()
        if not line or line.strip() == "stop":
            break
        if line.strip() == "counts":
            print(json.dumps(counts), flush=True)
        elif line.strip() in ("idle", "busy"):
            mode = line.strip()
            print("ok", flush=True)
        continue
    for sock in events:
        if sock in by_beat:
            for frames in transport.recv_all(sock):
                counts["alive_acks"] += 1
            continue
        f = by_sock[sock]
        for frames in transport.recv_all(sock):
            if frames[0] == b"Relay":  # the head creating an actor in the worker we leased it
                tag, fields, _ = protocol.decode(frames[2:])
                transport.send(sock, encode("ActorCreated", (fields[0], True, None)))
                continue
            tag = bytes(frames[0])
            if tag == b"HeartbeatAck":
                counts["acks"] += 1
            elif tag in (b"NodeTable", b"NodeTableDelta"):  # the whole table, or its changes
                counts["tables"] += 1
                counts["table_bytes"] += sum(len(x) for x in frames)
            elif tag == b"NodeRegistered":
                f["registered"] = True
            elif tag == b"RequestLease":
                _, fields, _ = protocol.decode(frames)
                request_id = fields[0]
                f["leases"] += 1
                counts["leases"] += 1
                lease_id = f"{f['id'][:8]}-{f['leases']}"
                transport.send(sock, encode("LeaseGranted", (request_id, lease_id, f"w{f['leases']}",
                                                             "ipc:///nonexistent/w", f["id"], [])))
            elif tag == b"Error":
                counts["errors"] += 1
    if not reported and all(f["registered"] for f in fakes):
        reported = True
        print(f"registered {n} {time.monotonic() - start:.2f}", flush=True)
for f in fakes:
    f["sock"].close(0)
    f["beat"].close(0)
transport.term_context()
'''


def head_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(pid: int, seconds: float) -> float:
    """The head's CPU use over ``seconds``, as a fraction of one core."""
    c0, t0 = head_cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (head_cpu_s(pid) - c0) / (time.monotonic() - t0)


def create_actors(address: str, token: str, count: int) -> float:
    """A driver's CreateActor x count, each watched until the head says ALIVE: actors/s."""
    from farpool._private import protocol, scheduling, transport, versions
    from farpool._private.protocol import encode
    import zmq
    sock = transport.dealer(b"c:bench-" + os.urandom(4).hex().encode())
    reply = transport.connect_tcp(sock, address, token, encode("Hello", ("driver", {
        "pid": os.getpid(), "versions": versions.ours()})), deadline_s=30)
    job_id = protocol.decode(reply)[1][0]["job_id"]
    hold = scheduling.make_request(0.01, 0, None, None)
    spec = {"class_name": "Fake", "cls_bytes": b"", "args_payload": b"", "arg_bufs": [], "ref_values": [],
            "ref_bufs": [], "job_setup": {}, "options": {"max_concurrency": 1, "is_async": False,
                                                         "class_name": "Fake", "resources": hold, "num_cpus": 0.01},
            "hold_shape": hold, "place_shape": hold, "max_restarts": 0, "name": None, "namespace": "bench",
            "get_if_exists": False, "detached": False, "job_id": job_id, "meta": {}, "node_affinity": None}
    t0 = time.perf_counter()
    for i in range(count):
        actor_id = os.urandom(16).hex()
        transport.send(sock, encode("CreateActor", (i, actor_id, spec)))
        transport.send(sock, encode("WaitActor", (actor_id,)))
    alive = set()
    deadline = time.monotonic() + 600
    while len(alive) < count and time.monotonic() < deadline:
        if sock.poll(1000):
            for frames in transport.recv_all(sock):
                tag, fields, _ = protocol.decode(frames)
                if tag == "ActorInfo" and fields[1]["state"] == "ALIVE":
                    alive.add(fields[0])
    seconds = time.perf_counter() - t0
    transport.send(sock, encode("Goodbye", ("driver", "bench")))
    sock.close(0)
    if len(alive) < count:
        raise RuntimeError(f"only {len(alive)} of {count} actors became alive")
    del zmq
    return count / seconds


def run(n: int, window: float, actors: int, busy: bool, src: str) -> dict:
    from farpool._private import session
    tmp = tempfile.mkdtemp(prefix="fp-many-")
    token = session.new_token()
    env = dict(os.environ, FARPOOL_TOKEN=token, PYTHONPATH=src)
    log = open(os.path.join(tmp, "head.log"), "w")  # (a pipe nobody reads would stall the head's logging)
    head = subprocess.Popen([sys.executable, "-m", "farpool._private.head", "--session-dir", tmp, "--host",
                             "127.0.0.1", "--port", "0", "--lifeline"], env=env, stdin=subprocess.PIPE, stdout=log,
                            stderr=subprocess.STDOUT)  # (--lifeline: it ends if this script dies)
    log.close()
    fakes = None
    try:
        while not os.path.exists(os.path.join(tmp, "head.port")) and head.poll() is None:
            time.sleep(0.05)
        with open(os.path.join(tmp, "head.port")) as f:
            address = f"127.0.0.1:{f.read().strip()}"
        time.sleep(1.0)
        rss0, cpu0 = rss_mb(head.pid), measure(head.pid, 2.0)
        fakes = subprocess.Popen([sys.executable, "-c", FAKES, address, str(n), "idle"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = fakes.stdout.readline()
        if not line.startswith("registered"):
            raise RuntimeError(f"the fakes did not register: {line!r}")
        joined_s = float(line.split()[2])
        time.sleep(2.0)  # past the join's broadcasts

        def counts():
            fakes.stdin.write("counts\n")
            fakes.stdin.flush()
            return json.loads(fakes.stdout.readline())
        c0 = counts()
        idle_cpu = measure(head.pid, window)
        c1 = counts()
        idle_rss = rss_mb(head.pid)
        rate = create_actors(address, token, actors) if actors else 0.0
        after_rss = rss_mb(head.pid)
        c2 = c3 = c4 = counts()
        table_mb_idle = (c1["table_bytes"] - c0["table_bytes"]) / window / 1e6
        busy_cpu = busy_rss = 0.0
        if busy:  # (last: the broadcasts it causes queue up in the fakes' process when it lags)
            fakes.stdin.write("busy\n")
            fakes.stdin.flush()
            fakes.stdout.readline()
            time.sleep(2.0)
            c2 = counts()
            busy_cpu = measure(head.pid, window)
            c3 = counts()
            busy_rss = rss_mb(head.pid)
            c4 = counts()
        return {"nodes": n, "join_s": joined_s, "head_rss_mb_empty": rss0, "head_cpu_empty": cpu0,
                "head_rss_mb": idle_rss, "rss_kb_per_node": (idle_rss - rss0) * 1024 / n,
                "idle_head_cpu": idle_cpu, "idle_cpu_per_node_pct": 100 * idle_cpu / n,
                "idle_acks_per_s": (c1["acks"] - c0["acks"]) / window,
                "idle_alive_acks_per_s": (c1["alive_acks"] - c0["alive_acks"]) / window,
                "busy_head_cpu": busy_cpu, "busy_rss_mb": busy_rss, "busy_acks_per_s": (c3["acks"] - c2["acks"]) / window,
                "busy_tables_per_s": (c3["tables"] - c2["tables"]) / window,
                "actors_per_s": rate, "actors": actors, "head_rss_mb_with_actors": after_rss,
                "errors": c4["errors"], "idle_table_mb_per_s": table_mb_idle,
                "busy_table_mb_per_s": (c3["table_bytes"] - c2["table_bytes"]) / window / 1e6,
                "idle_sent_per_s": (c1["sent"] - c0["sent"]) / window, "busy_sent_per_s": (c3["sent"] - c2["sent"]) / window}
    finally:
        if fakes is not None:
            try:
                fakes.stdin.write("stop\n")
                fakes.stdin.flush()
                fakes.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                fakes.kill()
                fakes.wait()
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:  # still working through the busy phase's backlog
            head.kill()
            head.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="100,500")
    parser.add_argument("--window", type=float, default=10.0, help="seconds each CPU measurement lasts")
    parser.add_argument("--actors", type=int, default=1000)
    parser.add_argument("--busy", default="20,50", help="node counts measured busy (the fakes' own process must "
                                                        "keep up with the broadcasts it receives: small ones)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--before-src", default=None, help="also measure the head of this src directory "
                        "(a checkout before a change), each size right after ours")
    args = parser.parse_args()
    srcs = {"this": os.path.join(HERE, "..", "src")}
    if args.before_src:
        srcs["before"] = os.path.abspath(args.before_src)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the fakes hold 2 sockets per node
    results = []
    for n, (which, src) in [(n, s) for n in args.nodes.split(",") for s in srcs.items()]:
        results.append(dict(run(int(n), args.window, args.actors, busy=False, src=src), head=which))
        r = results[-1]
        print(f"[{which}] {r['nodes']} fake nodes: joined in {r['join_s']:.1f} s; head RSS {r['head_rss_mb']:.0f} MB "
              f"({r['rss_kb_per_node']:.0f} kB per node); idle: head CPU {100 * r['idle_head_cpu']:.1f}% of a core "
              f"({r['idle_cpu_per_node_pct']:.3f}% per node), {r['idle_acks_per_s']:.0f} heartbeats + "
              f"{r['idle_alive_acks_per_s']:.0f} liveness beats answered/s (sent: {r['idle_sent_per_s']:.0f} "
              f"heartbeats/s); {r['actors_per_s']:.0f} actors placed/s ({r['actors']}), "
              f"head RSS after {r['head_rss_mb_with_actors']:.0f} MB; errors {r['errors']}", flush=True)
    for n, (which, src) in [(n, s) for n in args.busy.split(",") for s in srcs.items()]:
        results.append(dict(run(int(n), args.window, 0, busy=True, src=src), head=which))
        r = results[-1]
        print(f"[{which}] {r['nodes']} busy fake nodes (each heartbeat reports other resources available): head CPU "
              f"{100 * r['busy_head_cpu']:.0f}% of a core, RSS {r['busy_rss_mb']:.0f} MB, {r['busy_acks_per_s']:.0f} "
              f"of {r['busy_sent_per_s']:.0f} heartbeats/s answered, {r['busy_tables_per_s']:.0f} node tables "
              f"or changes of it ({r['busy_table_mb_per_s']:.2f} MB/s) received/s by all nodes; errors {r['errors']}",
              flush=True)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
