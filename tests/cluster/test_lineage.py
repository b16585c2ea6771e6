"""Lineage reconstruction (#13): a task result stored on a node that dies is made again by
re-running the task that made it (on a node that fits), recursively for lost arguments;
what cannot be rebuilt fails with ObjectLostError naming the object, the node and why.

The layout is farpool_testing.three_nodes: a head node, a second and a third node on
loopback, the driver joined on the head node; results are placed on the second node with
a soft NodeAffinity, so that once it is gone their tasks may run again elsewhere.
"""

import numpy as np
import pytest

import farpool
from farpool_testing import store_stats_of as store_stats
from farpool_testing import three_nodes, wait_until

MB = 1 << 20
N = 8 * MB // 8  # 8 MB arrays: stored in the node store of the worker that made them


@farpool.remote(max_retries=2)
def full(n, value):
    return farpool.get_runtime_context().node_id, np.full(n, value)


@farpool.remote(max_retries=2)
def plus(made, x):
    return farpool.get_runtime_context().node_id, made[1] + x


@farpool.remote(max_retries=0)
def full_once(n, value):
    return np.full(n, value)


def on(node_id):
    return {"scheduling_strategy": farpool.NodeAffinity(node_id, soft=True)}


def node_dead(node_id):
    return not next(node for node in farpool.nodes() if node["node_id"] == node_id)["alive"]


def test_results_lost_with_their_node_are_rebuilt_with_their_lost_arguments(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "5")
    head, second, third = three_nodes(started)
    first = full.options(**on(second)).remote(N, 1.0)
    then = plus.options(**on(second)).remote(first, 1.0)  # its argument is lost with it
    ready, _ = farpool.wait([first, then], num_returns=2, timeout=120, fetch_local=False)
    assert len(ready) == 2
    del ready
    assert store_stats(second)["objects"] == 2  # both results live only on the second node
    started.kill_node(second)
    wait_until(lambda: node_dead(second), "the head never declared the killed node dead")
    node, value = farpool.get(then, timeout=120)
    assert node != second and value.shape == (N,) and float(value.sum()) == 2.0 * N
    node, value = farpool.get(first, timeout=120)
    assert node != second and float(value.sum()) == 1.0 * N


def test_a_lost_result_is_rebuilt_when_get_finds_it_gone_first(started):
    # The head takes its node timeout (10 s) to declare the node dead; get finds out sooner.
    head, second, third = three_nodes(started)
    ref = full.options(**on(second)).remote(N, 3.0)
    farpool.wait([ref], timeout=120, fetch_local=False)
    started.kill_node(second)
    node, value = farpool.get(ref, timeout=120)
    assert node != second and float(value.sum()) == 3.0 * N


def test_a_lost_result_whose_task_has_no_retries_is_an_object_lost_error_saying_why(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "5")
    head, second, third = three_nodes(started)
    ref = full_once.options(**on(second)).remote(N, 1.0)
    farpool.wait([ref], timeout=120, fetch_local=False)
    started.kill_node(second)
    wait_until(lambda: node_dead(second), "the head never declared the killed node dead")
    with pytest.raises(farpool.ObjectLostError) as error:
        farpool.get(ref, timeout=60)
    text = str(error.value)
    assert ref.hex() in text and second[:8] in text and "max_retries=0" in text
    # The cluster still runs tasks.
    assert float(farpool.get(full.remote(10, 1.0), timeout=60)[1].sum()) == 10.0


@farpool.remote(max_retries=1)
def total_of(made):
    return farpool.get_runtime_context().node_id, float(made[1].sum())


def test_a_task_whose_argument_is_lost_as_it_reads_it_runs_again_once_it_is_rebuilt(started):
    # The head takes its node timeout (10 s) to declare the node dead: the task is sent before
    # it does, and its worker finds the argument's only copy gone.
    head, second, third = three_nodes(started)
    ref = full.options(**on(second)).remote(N, 2.0)
    farpool.wait([ref], timeout=120, fetch_local=False)
    started.kill_node(second)
    node, value = farpool.get(total_of.options(**on(third)).remote(ref), timeout=120)
    assert value == 2.0 * N and node != second
