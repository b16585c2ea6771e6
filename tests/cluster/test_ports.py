"""Ports: random by default and printed; two clusters on one machine never collide; a port in
use is refused with advice."""

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import psutil

from farpool_testing import TIMEOUT

TASK = textwrap.dedent("""
    import json, os
    import farpool

    @farpool.remote
    def where():
        return farpool.get_runtime_context().node_id, os.environ["FARPOOL_TMPDIR"]

    farpool.init(address="auto")
    nodes = [n["node_id"] for n in farpool.nodes()]
    print(json.dumps({"nodes": nodes, "ran": farpool.get([where.remote() for _ in range(4)], timeout=60)}))
    farpool.shutdown()
""")


def cli(root, *args, check=True, code=None):
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "farpool", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                         env=dict(os.environ, FARPOOL_TMPDIR=root))
    assert not check or out.returncode == 0, out.stdout + out.stderr
    return out


def test_two_clusters_on_one_machine_get_their_own_ports_and_run_their_own_tasks(tmp_root):
    roots = [tempfile.mkdtemp(prefix="ports-", dir=tmp_root) for _ in range(2)]
    started = []
    try:
        ports = []
        for root in roots:
            out = cli(root, "start", "--head", "--num-cpus", "1")
            started.append(root)
            head, node = map(int, re.search(r"Ports to open in a firewall: (\d+) \(head\), (\d+) \(this node "
                                            r"agent\)", out.stdout).groups())
            assert f"started at 127.0.0.1:{head} " in out.stdout
            address = json.load(open(os.path.join(root, "cluster.json")))["address"]
            token = open(json.load(open(os.path.join(root, "cluster.json")))["token_file"]).read()
            joined = subprocess.run([sys.executable, "-m", "farpool", "start", "--address", address,
                                     "--num-cpus", "1"], capture_output=True, text=True, timeout=TIMEOUT,
                                    env=dict(os.environ, FARPOOL_TMPDIR=root, FARPOOL_TOKEN=token))
            assert joined.returncode == 0, joined.stderr
            extra = int(re.search(r"reach it at 127\.0\.0\.1:(\d+) ", joined.stdout).group(1))
            ports += [head, node, extra]
        assert len(set(ports)) == 6, ports
        reports = [json.loads(cli(root, code=TASK).stdout.splitlines()[-1]) for root in roots]
        for root, report, other in zip(roots, reports, reversed(reports)):
            assert len(report["nodes"]) == 2 and not set(report["nodes"]) & set(other["nodes"])
            assert {node for node, _ in report["ran"]} <= set(report["nodes"])
            assert {r for _, r in report["ran"]} == {root}
    finally:
        for root in started:
            cli(root, "stop", check=False)


def test_a_port_in_use_is_refused_with_advice_and_nothing_is_left(tmp_root):
    roots = [tempfile.mkdtemp(prefix="ports-", dir=tmp_root) for _ in range(2)]
    try:
        out = cli(roots[0], "start", "--head", "--num-cpus", "1")
        head, node = re.search(r"Ports to open in a firewall: (\d+) \(head\), (\d+)", out.stdout).groups()
        for flag, port in (("--port", head), ("--node-port", node)):
            refused = cli(roots[1], "start", "--head", "--num-cpus", "1", flag, port, check=False)
            assert refused.returncode == 1
            assert f"port {port} on 127.0.0.1 is already in use (by another farpool cluster or another " \
                   "program); choose another port, or leave the port out" in refused.stderr
            assert not [d for d in os.listdir(roots[1]) if d.startswith("s-")]
            assert not [p for p in psutil.process_iter(["environ"])
                        if (p.info["environ"] or {}).get("FARPOOL_TMPDIR") == roots[1]]
    finally:
        cli(roots[0], "stop", check=False)
