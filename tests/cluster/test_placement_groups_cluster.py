"""Placement groups over several node agents started with the CLI: STRICT_SPREAD over the
nodes, a node joining makes a waiting group fit, and two competing groups that a naive
reservation (each group takes what it can, bundle by bundle) would deadlock."""

import os
import signal

import psutil
import pytest

import farpool
from farpool import PlacementGroupScheduling
from farpool.util import placement_group, placement_group_table, remove_placement_group
from farpool_testing import node_ids, wait_until

TIMEOUT = 60


@farpool.remote(num_cpus=1)
def where():
    return farpool.get_runtime_context().node_id


def test_strict_spread_puts_each_bundle_on_a_node_of_its_own(started):
    started.start_head("--num-cpus", "1")
    started.add_node("--num-cpus", "1")
    started.add_node("--num-cpus", "2")
    farpool.init(address=started.address, token=started.token)
    nodes = node_ids(started)
    pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert farpool.get(pg.ready(), timeout=TIMEOUT) is True
    placed = placement_group_table(pg)["bundles_to_node_id"]
    assert sorted(placed.values()) == sorted(nodes)
    ran = farpool.get([where.options(scheduling_strategy=PlacementGroupScheduling(pg, i)).remote()
                       for i in range(3)], timeout=TIMEOUT)
    assert ran == [placed[i] for i in range(3)]  # each task on its bundle's node
    # Actors too, holding their bundle's CPU (bundle 0's node has one CPU: a second one waits).
    Where = farpool.remote(num_cpus=1)(_Where)
    actor = Where.options(scheduling_strategy=PlacementGroupScheduling(pg, 2)).remote()
    assert farpool.get(actor.node.remote(), timeout=TIMEOUT) == placed[2]
    remove_placement_group(pg)


class _Where:
    def node(self):
        return farpool.get_runtime_context().node_id


def test_a_node_joining_makes_a_waiting_group_fit(started):
    started.start_head("--num-cpus", "1")
    farpool.init(address=started.address, token=started.token)
    with pytest.warns(RuntimeWarning, match="cannot be placed.*waits until nodes that fit join"):
        pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    queued = where.options(scheduling_strategy=PlacementGroupScheduling(pg, 1)).remote()
    assert pg.wait(0.5) is False and placement_group_table(pg)["state"] == "PENDING"
    started.add_node("--num-cpus", "1")
    assert pg.wait(TIMEOUT) is True
    placed = placement_group_table(pg)["bundles_to_node_id"]
    assert len(set(placed.values())) == 2
    assert farpool.get(queued, timeout=TIMEOUT) == placed[1]  # the task waited for its bundle, then ran there


def test_two_competing_groups_are_placed_one_after_the_other(started):
    """Two nodes of one CPU; groups A and B of two one-CPU bundles each, one per node.  A naive
    reservation could give A one node and B the other, and both would wait for ever; the head
    reserves one group at a time, all or nothing, so A (first) is placed and B waits for it."""
    started.start_head("--num-cpus", "1")
    started.add_node("--num-cpus", "1")
    farpool.init(address=started.address, token=started.token)
    a = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", name="a")
    b = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", name="b")
    assert a.wait(TIMEOUT) is True
    assert b.wait(0.5) is False
    table = placement_group_table()
    assert table[a.id]["state"] == "CREATED" and table[b.id]["state"] == "PENDING"
    assert farpool.available_resources().get("CPU", 0) == 0
    remove_placement_group(a)
    assert b.wait(TIMEOUT) is True
    assert farpool.get(where.options(scheduling_strategy=PlacementGroupScheduling(b, 0)).remote(),
                       timeout=TIMEOUT) == placement_group_table(b)["bundles_to_node_id"][0]


def test_bundles_on_a_node_that_dies_are_placed_again_when_a_node_fits(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    started.start_head("--num-cpus", "1")
    started.add_node("--num-cpus", "1")
    farpool.init(address=started.address, token=started.token)
    head_node, second = node_ids(started)
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    assert pg.wait(TIMEOUT)
    before = placement_group_table(pg)["bundles_to_node_id"]
    lost = next(i for i, n in before.items() if n == second)
    node_pid = next(n["pid"] for n in started.read_state()["nodes"] if n["node_id"] == second)
    victims = [psutil.Process(node_pid)] + psutil.Process(node_pid).children(recursive=True)
    os.kill(node_pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=20)
    wait_until(lambda: placement_group_table(pg)["state"] == "PENDING", "the group to lose its bundle")
    queued = where.options(scheduling_strategy=PlacementGroupScheduling(pg, lost)).remote()
    started.add_node("--num-cpus", "1")
    third = node_ids(started)[2]
    wait_until(lambda: placement_group_table(pg)["state"] == "CREATED", "the lost bundle to be placed again")
    after = placement_group_table(pg)["bundles_to_node_id"]
    assert after == {lost: third, 1 - lost: head_node}  # the kept bundle stayed where it was
    assert farpool.get(queued, timeout=TIMEOUT) == third
