"""Draining a node (#13): ``farpool stop --node ID`` (and ``farpool stop`` on a machine whose
node agents joined a head elsewhere) drains the node: it takes no new tasks, the task running
there finishes (once: no retry), the tasks queued behind it run elsewhere without spending an
attempt, the owners of results stored only there copy them away, and then it leaves; a result
stored only there that was not copied is rebuilt on demand afterwards. A task
that outlives the drain timeout is retried elsewhere once the node has stopped.

The layout is farpool_testing.three_nodes (a head node, a second node with 2 CPUs, a third);
the driver joined on the head node.
"""

import os
import shutil
import tempfile
import threading

import numpy as np
import pytest

import farpool
from farpool_testing import TIMEOUT, Gate, farpool_cli, three_nodes, wait_at_gate, wait_until


def runs_logged(path, value):
    """Appends a line per run to ``path``; returns ``value`` and where it ran."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value, farpool.get_runtime_context().node_id


def gated(gate_path, log_path, value):
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return wait_at_gate(gate_path, value), farpool.get_runtime_context().node_id


def made_on(n, value):
    return farpool.get_runtime_context().node_id, np.full(n, value)


@pytest.fixture
def gate():
    directory = tempfile.mkdtemp(prefix="g-", dir="/tmp")  # a short path: Unix sockets allow 107 bytes
    g = Gate(os.path.join(directory, "gate"))
    yield g
    g.close()
    shutil.rmtree(directory, ignore_errors=True)


def on(node_id):
    return {"scheduling_strategy": farpool.NodeAffinity(node_id, soft=True)}


def stop_in_background(node_id, *args):
    """``farpool stop --node node_id`` in a thread (it blocks while the node drains)."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=farpool_cli("stop", "--node", node_id, *args,
                                                                           timeout=TIMEOUT)))
    thread.start()
    return thread, out


def line_count(path):
    with open(path) as f:
        return len(f.read().splitlines())


def test_a_stopped_node_drains_its_running_task_finishes_once_and_its_queue_moves(started, gate, tmp_path):
    head, second, third = three_nodes(started)
    made = farpool.remote(made_on).options(max_retries=2, **on(second)).remote(1 << 20, 2.0)
    assert farpool.wait([made], timeout=TIMEOUT, fetch_local=False)[0]  # stored on the second node only
    running_log, queued_log = tmp_path / "running", tmp_path / "queued"
    # Both CPUs of the second node busy until the gate opens.
    running = [farpool.remote(gated).options(max_retries=0, **on(second)).remote(gate.path, str(running_log), r)
               for r in "ab"]
    gate.wait_arrivals(2)
    # Queued behind them for the second node (soft affinity: they may run elsewhere once it is gone).
    queued = [farpool.remote(runs_logged).options(max_retries=0, **on(second)).remote(str(queued_log), i)
              for i in range(6)]
    thread, out = stop_in_background(second)
    wait_until(lambda: next(n for n in farpool.nodes() if n["node_id"] == second).get("alive") is False
               or _draining(second), "the head to hear that the second node drains")
    gate.open()
    assert farpool.get(running, timeout=TIMEOUT) == [("a", second), ("b", second)]  # finished where they ran
    assert line_count(running_log) == 2                           # once each: not retried
    results = farpool.get(queued, timeout=TIMEOUT)                 # max_retries=0: none was lost
    assert [value for value, _ in results] == list(range(6)) and line_count(queued_log) == 6
    thread.join(timeout=TIMEOUT)
    assert not thread.is_alive()
    assert f"farpool node {second[:8]} drained and stopped" in out["result"].stdout
    wait_until(lambda: not next(n for n in farpool.nodes() if n["node_id"] == second)["alive"],
               "the head to mark the drained node gone")
    node, value = farpool.get(made, timeout=TIMEOUT)  # its only copy was copied away first: not rebuilt
    assert node == second and float(value.sum()) == 2.0 * (1 << 20)
    # New work goes to the nodes left.
    assert farpool.get(farpool.remote(runs_logged).remote(str(queued_log), "new"), timeout=TIMEOUT)[1] != second


def made_logged(path, n, value):
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return farpool.get_runtime_context().node_id, np.full(n, value)


def test_results_stored_only_on_a_drained_node_are_copied_before_it_leaves(started, tmp_path):
    """Before it leaves, the drained node has the owner copy what it alone holds: the values
    read afterwards without running their tasks again (one of them could not: max_retries=0)."""
    head, second, third = three_nodes(started)
    log_path = tmp_path / "runs"
    made = [farpool.remote(made_logged).options(max_retries=retries, **on(second)).remote(str(log_path), 1 << 20, v)
            for retries, v in ((0, 2.0), (2, 3.0))]
    assert len(farpool.wait(made, num_returns=2, timeout=TIMEOUT, fetch_local=False)[0]) == 2  # stored on second only
    thread, out = stop_in_background(second)
    thread.join(timeout=TIMEOUT)
    assert not thread.is_alive() and f"farpool node {second[:8]} drained and stopped" in out["result"].stdout
    wait_until(lambda: not next(n for n in farpool.nodes() if n["node_id"] == second)["alive"],
               "the head to mark the drained node gone")
    for ref, value in zip(made, (2.0, 3.0)):
        node, array = farpool.get(ref, timeout=TIMEOUT)
        assert node == second and float(array.sum()) == value * (1 << 20)  # made there, and not made again
    assert sorted(line_count_values(log_path)) == ["2.0", "3.0"]  # each task ran once


def line_count_values(path):
    with open(path) as f:
        return f.read().split()


def test_a_task_that_outlives_the_drain_timeout_is_retried_elsewhere(started, gate, tmp_path):
    head, second, third = three_nodes(started)
    log_path = tmp_path / "runs"
    ref = farpool.remote(gated).options(max_retries=1, **on(second)).remote(gate.path, str(log_path), "late")
    gate.wait_arrivals(1)
    thread, out = stop_in_background(second, "--drain-timeout", "1")
    thread.join(timeout=TIMEOUT)
    assert not thread.is_alive() and out["result"].returncode == 0
    gate.wait_arrivals(1)  # run again, on another node
    gate.open()
    value, node = farpool.get(ref, timeout=TIMEOUT)
    assert value == "late" and node != second and line_count(log_path) == 2
    # farpool stop says, in the node's words, what it stopped without: the first run's lease.
    first_pid = int(line_count_values(log_path)[0])
    said = out["result"].stdout
    assert "drained and stopped; it said: draining: stopping at the drain timeout with 1 lease(s) still held" in said
    assert f"on worker {first_pid})" in said, said


def test_soft_affinity_to_a_draining_node_runs_elsewhere_without_waiting_for_it(started, gate, tmp_path):
    """NodeAffinity(soft=True) to a node that drains runs elsewhere while the node still drains:
    a task whose lease request waited there already (no room) and one submitted afterwards."""
    head, second, third = three_nodes(started)
    log_path = tmp_path / "runs"
    running = [farpool.remote(gated).options(max_retries=0, **on(second)).remote(gate.path, str(log_path), value)
               for value in "ab"]
    gate.wait_arrivals(2)  # both CPUs of the second node busy until the gate opens: it drains until then
    elsewhere = farpool.remote(runs_logged).options(num_cpus=0.5, **on(second))
    waited = elsewhere.remote(str(tmp_path / "waited"), "waited")  # (its lease request waits there: no room)
    thread, out = stop_in_background(second, "--drain-timeout", str(4 * TIMEOUT))
    wait_until(lambda: any(n["node_id"] == second and n.get("draining") for n in farpool.nodes()), "the node drains")
    later = elsewhere.remote(str(tmp_path / "later"), "later")
    results = farpool.get([waited, later], timeout=TIMEOUT)
    assert [value for value, _ in results] == ["waited", "later"]
    assert all(node not in (second, None) for _, node in results), results
    assert thread.is_alive()  # the node drains still: they did not wait for it to stop
    gate.open()
    assert [value for value, _ in farpool.get(running, timeout=TIMEOUT)] == ["a", "b"]
    thread.join(timeout=TIMEOUT)
    assert not thread.is_alive() and out["result"].returncode == 0


def test_stop_node_refuses_the_head_node_and_an_unknown_id(started):
    head, second, third = three_nodes(started)
    out = farpool_cli("stop", "--node", head, check=False)
    assert out.returncode == 1 and "is the head's own node: it stops with the head" in out.stderr
    out = farpool_cli("stop", "--node", "zz", check=False)
    assert out.returncode == 1 and "no node agent started here has an id starting with 'zz'" in out.stderr


def _draining(node_id):
    client = farpool.api._client()
    return any(n["node_id"] == node_id and n.get("draining") for n in client.request_nodes())
