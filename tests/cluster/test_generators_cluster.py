"""Streaming generators across node agents: a producer on another node streams items that
live in its node's store; the driver reads them on its own node (copied between stores),
passes them to tasks on a third node; a stream item lost with its node is not rebuilt and
says so (#13: streams are not rebuilt).

Layout: farpool_testing.three_nodes (the driver joined on the head node).
"""

import numpy as np
import pytest

import farpool
from farpool_testing import TIMEOUT, three_nodes, wait_until
from test_lineage import node_dead

MB = 1 << 20


@farpool.remote
def produce(n, mb):
    here = farpool.get_runtime_context().node_id
    for i in range(n):
        yield here, np.full(mb * MB, i, dtype=np.uint8)


@farpool.remote
def where_and_sum(item):
    node, array = item
    return farpool.get_runtime_context().node_id, node, int(array[:10].sum())


def test_items_made_on_another_node_are_read_here_and_used_on_a_third(started):
    head, second, third = three_nodes(started)
    gen = produce.options(scheduling_strategy=farpool.NodeAffinity(second), max_pending_items=2).remote(5, 4)
    refs = []
    for i, ref in enumerate(gen):
        node, array = farpool.get(ref, timeout=TIMEOUT)  # copied into this node's store
        assert node == second and array.shape == (4 * MB,) and int(array[0]) == i
        refs.append(ref)
    assert len(refs) == 5
    used = farpool.get([where_and_sum.options(scheduling_strategy=farpool.NodeAffinity(third)).remote(r)
                        for r in refs], timeout=TIMEOUT)
    assert used == [(third, second, 10 * i) for i in range(5)]


def test_a_stream_item_lost_with_its_node_is_an_object_lost_error_saying_streams_are_not_rebuilt(
        started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "5")
    head, second, third = three_nodes(started)
    gen = produce.options(scheduling_strategy=farpool.NodeAffinity(second, soft=True)).remote(2, 4)
    refs = list(gen)
    ready, _ = farpool.wait(refs, num_returns=2, timeout=TIMEOUT, fetch_local=False)
    assert len(ready) == 2
    started.kill_node(second)
    wait_until(lambda: node_dead(second), "the head to declare the killed node dead")
    with pytest.raises(farpool.ObjectLostError) as error:
        farpool.get(refs[1], timeout=TIMEOUT)
    text = str(error.value)
    assert refs[1].hex() in text and second[:8] in text
    assert "item 1 of the streaming generator task produce" in text and "streams are not rebuilt" in text
