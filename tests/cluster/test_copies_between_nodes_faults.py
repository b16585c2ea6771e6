"""Bugs found by the second hunt with several nodes and large objects (each failed before its fix).

The layout is the one of test_copies_between_nodes.py: a head node, a second node and a
third node started with the CLI on loopback, and a driver joined with address="auto"
(it lives on the head node).
"""

import numpy as np
import pytest

import farpool
from farpool_testing import store_stats_of as store_stats
from farpool_testing import three_nodes, wait_until

MB = 1 << 20


def client():
    return farpool.api._client()


@farpool.remote
def where():
    return farpool.get_runtime_context().node_id


@farpool.remote
def summed(array):
    return farpool.get_runtime_context().node_id, float(array.sum())


@farpool.remote
def ones(n):
    return np.ones(n)


def test_a_copy_into_a_store_too_small_for_it_is_an_object_store_full_error(started):
    head, second, third = three_nodes(started, "--object-store-memory", str(32 * MB))
    ref = farpool.put(np.ones(40 * MB // 8))
    with pytest.raises(farpool.ObjectStoreFullError, match="object store"):
        farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120)
    # Nothing was left on the third node, and the object is still readable where there is room.
    assert store_stats(third)["objects"] == 0
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120) == (second, 40 * MB / 8)


def test_a_large_result_of_a_task_on_another_node_is_kept_in_that_nodes_store(started):
    head, second, third = three_nodes(started)
    n = 40 * MB // 8
    assert farpool.get(where.options(resources={"second": 1}).remote(), timeout=60) == second
    ref = ones.options(resources={"second": 1}).remote(n)
    ready, _ = farpool.wait([ref], timeout=120)
    assert ready == [ref]
    del ready
    # The DESIGN: "large results go into the worker's node store and the owner is told where";
    # readers on other nodes copy it (pull.py).  Sent inline, the whole value goes through
    # the agents' event loops in one message (a few hundred MB stall their heartbeats).
    assert store_stats(second)["objects"] == 1
    assert farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120) == (third, float(n))
    del ref
    wait_until(lambda: store_stats(second)["objects"] == 0, "the result on the second node was never freed")


@farpool.remote
def put_nested(n):
    """Owned by the worker that runs it: a large object in its node's store, returned nested."""
    return [farpool.put(np.ones(n))]


def test_a_borrowed_value_whose_owner_died_with_its_node_is_lost_not_another_objects_bytes(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "5")
    head, second, third = three_nodes(started)
    n = 40 * MB // 8
    assert farpool.get(where.options(resources={"head": 1}).remote(), timeout=60) == head
    [ref] = farpool.get(put_nested.options(resources={"second": 1}).remote(n), timeout=120)
    assert float(farpool.get(ref, timeout=120).sum()) == n  # copied to the driver's node (the head node)
    started.kill_node(second)
    wait_until(lambda: not next(node for node in farpool.nodes() if node["node_id"] == second)["alive"],
               "the head never declared the killed node dead")
    # The owner is gone: its objects are freed, the copy on the head node too.
    wait_until(lambda: store_stats(head)["objects"] == 0, "the copy of a dead owner's object was never freed")
    other = farpool.put(np.full(n, 7.0))  # takes the freed segment
    with pytest.raises(farpool.ObjectLostError):
        value = farpool.get(ref, timeout=60)
        pytest.fail(f"read a value summing to {float(value.sum())} (the other object sums to {7.0 * n})")
    del other
