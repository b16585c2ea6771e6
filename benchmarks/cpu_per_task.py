"""CPU time per no-op task of the driver and of its workers (psutil), and the same for a sync
round trip: steadier than wall-clock throughput on a shared, loaded machine, so two commits
can be compared by alternating them.

usage: PYTHONPATH=<tree>/src python benchmarks/cpu_per_task.py [rounds]
(the median of ``rounds`` measurements of 10,000 no-op tasks and 2,000 round trips)"""
import os, sys, time, psutil, farpool

def procs():
    me = psutil.Process()
    out = []
    desc = me.children(recursive=True)
    inner = {q.pid for q in desc if q.ppid() != me.pid}  # the launcher and workers (below the agent)
    out = [p for p in desc if p.ppid() in inner]  # forked by the launcher: the workers
    return out

def cpu(ps):
    t = 0.0
    for p in ps:
        try:
            c = p.cpu_times(); t += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return t

@farpool.remote
def noop(*a):
    return None

def measure(kind, n):
    me = psutil.Process()
    ws = procs()
    d0, w0, t0 = cpu([me]), cpu(ws), time.perf_counter()
    if kind == "noop":
        farpool.get([noop.remote() for _ in range(n)])
    else:
        for _ in range(n):
            farpool.get(noop.remote())
    t1 = time.perf_counter()
    return (cpu([me]) - d0) / n * 1e6, (cpu(ws) - w0) / n * 1e6, n / (t1 - t0)

farpool.init(num_cpus=2)
farpool.get([noop.remote() for _ in range(2000)])
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for kind, n in (("noop", 10000), ("roundtrip", 2000)):
    rs = [measure(kind, n) for _ in range(rounds)]
    rs.sort(key=lambda r: r[0])
    d, w, rate = rs[len(rs) // 2]
    print(f"{kind:10s} driver {d:6.1f} us/task  workers {w:6.1f} us/task  {rate:8.0f} tasks/s")
farpool.shutdown()
