"""A node the head declared dead while it was alive (stopped, starved) joins again
instead of exiting (#18): a busy node is not a dead one, and if the head ever takes
it for one, the node and what it can still run are not lost."""

import os
import signal

import farpool
from farpool_testing import node_ids, wait_until


def test_a_node_declared_dead_while_alive_joins_again_and_runs_tasks(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    _, second = node_ids(started)
    node_pid = [n["pid"] for n in started.read_state()["nodes"] if n["node_id"] == second][0]

    def alive():
        return [n for n in farpool.nodes() if n["node_id"] == second][0]["alive"]
    os.kill(node_pid, signal.SIGSTOP)  # the agent and its liveness thread stand still: late, not gone
    try:
        wait_until(lambda: not alive(), "the head to declare the stopped node dead")
    finally:
        os.kill(node_pid, signal.SIGCONT)
    wait_until(alive, "the node to join the cluster again")

    @farpool.remote(resources={"special": 1})
    def where():
        return farpool.get_runtime_context().node_id
    assert farpool.get(where.remote(), timeout=60) == second
    assert os.path.exists(f"/proc/{node_pid}")  # the same agent: it did not exit
