import json
import os
import subprocess
import sys

import psutil
import pytest

import farpool


def pytest_collection_modifyitems(items):
    for item in items:
        if "/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


def farpool_cli(*args, env=None, check=True, timeout=60):
    result = subprocess.run([sys.executable, "-m", "farpool", *args], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"farpool {' '.join(args)} failed: {result.stdout}\n{result.stderr}")
    return result


class Cluster:
    """A head (with its node) and extra node agents started with the CLI, on loopback."""

    def __init__(self, root):
        self.root = root
        self.state_path = os.path.join(root, "cluster.json")

    def start_head(self, *args):
        out = farpool_cli("start", "--head", "--num-cpus", "1", *args)
        self.state = self.read_state()
        self.address = self.state["address"]
        with open(self.state["token_file"]) as f:
            self.token = f.read().strip()
        return out

    def add_node(self, *args, token=None):
        return farpool_cli("start", "--address", self.address, *args, env={"FARPOOL_TOKEN": token or self.token},
                           check=token is None)

    def read_state(self):
        with open(self.state_path) as f:
            return json.load(f)

    def pids(self):
        state = self.read_state()
        return [state["head_pid"]] + [n["pid"] for n in state["nodes"]]

    def stop(self):
        procs = []
        if os.path.exists(self.state_path):
            for pid in self.pids():
                try:
                    procs.append(psutil.Process(pid))
                    procs.extend(psutil.Process(pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
            farpool_cli("stop")
        gone, alive = psutil.wait_procs(procs, timeout=15)
        return alive


@pytest.fixture
def started(tmp_root):
    farpool.shutdown()
    cluster = Cluster(tmp_root)
    yield cluster
    try:
        farpool.shutdown()
    finally:  # a failing shutdown must not leave the cluster to the next test
        alive = cluster.stop()
    assert not alive, f"farpool stop left {alive} running"
