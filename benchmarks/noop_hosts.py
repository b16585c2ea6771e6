"""No-op task throughput with 1, 2 and 4 node agents, each on its own host (network
namespaces, tests/netns.py; needs root).

h1 runs the head and its node agent (`farpool start --head --host`), and the driver
(`init(address="auto")`); h2..h4 join with the printed command, one more agent per
step.  Every agent offers --num-cpus 1 (hosts share this machine's cores).  Per step:
a fresh driver warms up (a task on every node), then submits --tasks no-op tasks and
gathers them; tasks/s over --reps runs, the median.

    sudo python benchmarks/noop_hosts.py [--tasks 5000] [--reps 3] [--agents 1,2,4]
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
    import farpool

    @farpool.remote
    def noop():
        return None

    @farpool.remote
    def where():
        return farpool.get_runtime_context().node_id

    n, reps, agents = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    farpool.init()
    nodes = [x["node_id"] for x in farpool.nodes() if x["alive"]]
    assert len(nodes) == agents, nodes
    farpool.get([where.options(scheduling_strategy=farpool.NodeAffinity(x)).remote() for x in nodes], timeout=120)
    farpool.get([noop.remote() for _ in range(200)], timeout=120)
    rates, spread = [], {}
    for _ in range(reps):
        t = time.perf_counter()
        farpool.get([noop.remote() for _ in range(n)], timeout=600)
        rates.append(n / (time.perf_counter() - t))
    on = farpool.get([where.remote() for _ in range(400)], timeout=120)
    print(json.dumps({"rates": rates, "nodes_used": len(set(on))}))
    farpool.shutdown()
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--agents", default="1,2,4")
    args = parser.parse_args()
    steps = [int(a) for a in args.agents.split(",")]
    results = {}
    with netns.HostBed(max(steps)) as bed:
        h1 = bed[0]
        out = h1.run([sys.executable, "-m", "farpool", "start", "--head", "--host", h1.address,
                      "--num-cpus", "1"]).stdout
        join = re.search(r"(FARPOOL_TOKEN=\$\(cat (\S+)\) farpool start --address (\S+))", out)
        token_path = join.group(2)
        with open(h1.path(token_path)) as f:
            token = f.read()
        joined = 1
        try:
            for agents in steps:
                while joined < agents:
                    host = bed[joined]
                    os.makedirs(os.path.dirname(host.path(token_path)), exist_ok=True)
                    with open(host.path(token_path), "w") as f:
                        f.write(token)
                    host.run(["sh", "-c", join.group(1) + " --num-cpus 1"])
                    joined += 1
                run = h1.run([sys.executable, "-c", DRIVER, str(args.tasks), str(args.reps), str(agents)],
                             timeout=1800, env={"FARPOOL_ADDRESS": "auto"})
                results[agents] = json.loads(run.stdout.splitlines()[-1])
                print(f"{agents} agent(s): {statistics.median(results[agents]['rates']):.0f} tasks/s "
                      f"(runs {[round(r) for r in results[agents]['rates']]}; 400 tasks ran on "
                      f"{results[agents]['nodes_used']} node(s))", flush=True)
        finally:
            for i in range(joined - 1, -1, -1):
                bed[i].run([sys.executable, "-m", "farpool", "stop"], check=False)
    print(f"{args.tasks} no-op tasks, median of {args.reps}, {os.cpu_count()} cores shared by the hosts, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
