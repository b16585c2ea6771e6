"""What a head killed and started again by its supervisor still knows (#13), beside
test_head_restart.py:

- placement groups: the head keeps them in its database (head_store "placement_groups"):
  where each bundle is (the nodes keep holding them), which one still waits for a node; tasks
  and actors placed in them run as before; a group waiting for a node is placed when one that
  fits joins after the restart; a group removed after the restart frees its resources;
- a kill the head got but never acted on (it died first) is not lost: the driver sends it
  again to the next head.
"""

import os
import signal

import psutil

import farpool
from farpool import util
from farpool_testing import TIMEOUT, node_ids, wait_until


def where():
    return farpool.get_runtime_context().node_id


class Keeper:
    def node(self):
        return farpool.get_runtime_context().node_id

    def pid(self):
        return os.getpid()


def head_pid(cluster) -> int:
    with open(os.path.join(cluster.read_state()["session_dir"], "head.pid")) as f:
        return int(f.read())


def in_bundle(group, index):
    return {"scheduling_strategy": farpool.PlacementGroupScheduling(group, bundle_index=index)}


def test_a_restarted_head_knows_its_placement_groups(started):
    started.start_head("--num-cpus", "2")
    started.add_node("--num-cpus", "2")
    farpool.init(address=started.address, token=started.token)
    client = farpool.api._client()
    spread = util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", name="spread")
    assert farpool.get(spread.ready(), timeout=TIMEOUT) is True
    waiting = util.placement_group([{"CPU": 1, "later": 1}], name="waiting")  # no node has "later" yet
    before = util.placement_group_table()
    placed = before[spread.id]["bundles_to_node_id"]
    assert sorted(placed.values()) == sorted(node_ids(started))
    keeper = farpool.remote(Keeper).options(**in_bundle(spread, 1)).remote()
    assert farpool.get(keeper.node.remote(), timeout=TIMEOUT) == placed[1]

    old = head_pid(started)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: client.head_link.state.outages, "the driver to register again with the new head",
               timeout=TIMEOUT)
    assert head_pid(started) != old

    after = util.placement_group_table()
    assert after[spread.id]["state"] == "CREATED" and after[spread.id]["bundles_to_node_id"] == placed
    assert after[spread.id]["name"] == "spread" and after[waiting.id]["state"] == "PENDING"
    # Its tasks and its actor run where its bundles are, as before.
    for index in (0, 1):
        ref = farpool.remote(where).options(**in_bundle(spread, index)).remote()
        assert farpool.get(ref, timeout=TIMEOUT) == placed[index]
    assert farpool.get(keeper.node.remote(), timeout=TIMEOUT) == placed[1]
    fresh = farpool.remote(Keeper).options(**in_bundle(spread, 0)).remote()  # placed by the new head
    assert farpool.get(fresh.node.remote(), timeout=TIMEOUT) == placed[0]
    # A node with what the waiting one needs joins: it is placed there.
    started.add_node("--num-cpus", "1", "--resources", '{"later": 1}')
    assert farpool.get(waiting.ready(), timeout=TIMEOUT) is True
    third = node_ids(started)[2]
    assert util.placement_group_table(waiting)["bundles_to_node_id"] == {0: third}
    # Removed after the restart: its CPUs come back.
    farpool.kill(keeper)
    farpool.kill(fresh)
    util.remove_placement_group(spread)
    wait_until(lambda: farpool.available_resources().get("CPU") == 4.0,
               "the removed group's CPUs to be free again")
    assert util.placement_group_table(spread)["state"] == "REMOVED"


def test_a_kill_the_head_got_but_never_acted_on_reaches_the_next_head(started):
    started.start_head("--num-cpus", "2")
    farpool.init(address=started.address, token=started.token)
    client = farpool.api._client()
    keeper = farpool.remote(Keeper).options(name="keeper", namespace="ns", lifetime="detached").remote()
    worker = psutil.Process(farpool.get(keeper.pid.remote(), timeout=TIMEOUT))
    head = psutil.Process(head_pid(started))
    head.suspend()  # it gets the kill (the socket takes it) but never acts on it ...
    farpool.kill(keeper)
    os.kill(head.pid, signal.SIGKILL)  # ... and dies with it unread
    wait_until(lambda: client.head_link.state.outages, "the driver to register again with the new head",
               timeout=TIMEOUT)
    wait_until(lambda: _gone("keeper"), "the next head to end the killed actor", timeout=TIMEOUT)
    worker.wait(timeout=TIMEOUT)  # its process ended too


def _gone(name) -> bool:
    try:
        farpool.get_actor(name, namespace="ns")
    except ValueError:
        return True
    return False
