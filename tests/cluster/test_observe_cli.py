"""`farpool stack` and `farpool logs` against a cluster started with `farpool start`."""

import os
import time

import pytest

import farpool
from farpool_testing import TIMEOUT, Gate

from farpool_testing import farpool_cli


@farpool.remote
def hung_in_named_function(gate_path):
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(gate_path)
    while True:
        time.sleep(600)


@farpool.remote
def pid_of():
    return os.getpid()


@pytest.fixture
def gate(tmp_path):
    g = Gate(str(tmp_path / "gate.sock"))
    yield g
    g.close()


def test_stack_cli_shows_the_hung_task_and_filters_by_pid_and_node(started, gate):
    started.start_head("--num-cpus", "2")
    farpool.init(address="auto")
    node_id = started.read_state()["nodes"][0]["node_id"]
    ref = hung_in_named_function.remote(gate.path)
    gate.wait_arrivals(1)
    other_pid = farpool.get(pid_of.remote(), timeout=TIMEOUT)
    try:
        out = farpool_cli("stack").stdout
        assert f"node {node_id[:8]}: " in out, out
        assert "running hung_in_named_function (task " in out and "in hung_in_named_function" in out, out
        hung_pid = next(int(line.split(" pid ")[1].split(":")[0]) for line in out.splitlines()
                        if "running hung_in_named_function" in line)
        assert hung_pid != other_pid

        only = farpool_cli("stack", "--pid", str(hung_pid), "--node", node_id[:8]).stdout
        assert f"pid {hung_pid}: running hung_in_named_function" in only
        assert f"pid {other_pid}:" not in only, only

        idle = farpool_cli("stack", "--pid", str(other_pid)).stdout
        assert f"pid {other_pid}: idle" in idle and "hung_in_named_function" not in idle, idle

        missing = farpool_cli("stack", "--pid", "1", check=False)
        assert missing.returncode == 1
        assert "no worker has pid 1 on any live node; `farpool stack` without --pid lists" in missing.stderr
        wrong_node = farpool_cli("stack", "--node", "zzzz", check=False)
        assert wrong_node.returncode == 1 and "no live node has an id starting with 'zzzz'" in wrong_node.stderr
    finally:
        farpool.cancel(ref, force=True)
        with pytest.raises(farpool.exceptions.TaskCancelledError):
            farpool.get(ref, timeout=TIMEOUT)


@farpool.remote
def say(text):
    print(text)
    return os.getpid()


def test_logs_cli_prints_kept_worker_output_by_pid_and_follows_new_lines(started):
    import signal
    import subprocess
    import sys
    started.start_head("--num-cpus", "2")
    farpool.init(address="auto")
    node_id = started.read_state()["nodes"][0]["node_id"]
    pid = farpool.get(say.remote("first line from a task"), timeout=TIMEOUT)

    out = farpool_cli("logs").stdout
    assert f"[node {node_id[:8]} pid {pid}] (say pid={pid}, node={node_id[:8]}) first line from a task" in out, out
    other = farpool_cli("logs", "--pid", str(pid + 100000), check=False)
    assert other.returncode == 1 and f"no worker with pid {pid + 100000} left output" in other.stderr
    assert "first line from a task" in farpool_cli("logs", "--pid", str(pid), "--node", node_id[:8]).stdout

    follower = subprocess.Popen([sys.executable, "-m", "farpool", "logs", "--follow"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        for line in follower.stdout:  # what was kept comes first
            if "first line from a task" in line:
                break
        farpool.get(say.remote("a later line"), timeout=TIMEOUT)
        for line in follower.stdout:  # then what workers print after
            if "a later line" in line:
                break
        else:
            pytest.fail(f"farpool logs --follow ended without the new line: {follower.stderr.read()}")
    finally:
        follower.send_signal(signal.SIGINT)  # Ctrl-C: it leaves the cluster and ends
        assert follower.wait(timeout=TIMEOUT) == 0, follower.stderr.read()
        follower.stdout.close()
        follower.stderr.close()
