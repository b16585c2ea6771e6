"""A node the head declared dead while it was alive (stopped, starved, cut off) joins again
instead of exiting (#18), as a NEW node (#13): a busy node is not a dead one, and if the head
ever takes it for one, the node and what it can still run are not lost; the old id stays
dead in the node table, so nothing of the old incarnation is taken for the new one."""

import os
import signal

import farpool
from farpool_testing import node_ids, wait_until


def test_a_node_declared_dead_while_alive_joins_again_as_a_new_node_and_runs_tasks(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    _, second = node_ids(started)
    node_pid = [n["pid"] for n in started.read_state()["nodes"] if n["node_id"] == second][0]

    def rows():
        return {n["node_id"]: n for n in farpool.nodes()}
    os.kill(node_pid, signal.SIGSTOP)  # the agent and its liveness thread stand still: late, not gone
    try:
        wait_until(lambda: not rows()[second]["alive"], "the head to declare the stopped node dead")
    finally:
        os.kill(node_pid, signal.SIGCONT)
    wait_until(lambda: len(rows()) == 3 and all(n["alive"] for i, n in rows().items() if i != second),
               "the node to join the cluster again as a new node")
    table = rows()
    (new,) = set(table) - {second, node_ids(started)[0]}
    assert not table[second]["alive"] and table[new]["address"] == table[second]["address"]
    assert os.path.exists(f"/proc/{node_pid}")  # the same agent: it did not exit
    assert table[new]["resources_total"]["special"] == 1

    @farpool.remote(resources={"special": 1})
    def where():
        return farpool.get_runtime_context().node_id
    assert farpool.get(where.remote(), timeout=60) == new  # a fresh worker: it knows the new id
    with open(os.path.join([n for n in started.read_state()["nodes"] if n["node_id"] == second][0]["session_dir"],
                           "node.id")) as f:
        assert f.read() == new  # what `farpool stop --node` finds it by
