"""Large objects between nodes: the reader's agent copies them into its own store (pull.py).

A driver joined with address="auto" lives on the head node and stores its large
values in that node's store.  Tasks on the other nodes read them from a copy their
agent pulls once (from every node that holds one), and the owner frees every copy.
Each test checks the agents' own counts (StoreStats), not only the values.
"""

import numpy as np
import psutil
import pytest

import farpool
from farpool._private import pull
from farpool_testing import store_stats_of as store_stats
from farpool_testing import three_nodes, wait_until

MB = 1 << 20
N = 40 * MB // 8  # float64s: ten chunks of pull.CHUNK (and a few bytes of header)
CHUNKS = 11


def client():
    return farpool.api._client()


@farpool.remote
def summed(array):
    """Where it ran, the sum, and whether the array is a view of a mapping (no copy of its own)."""
    return farpool.get_runtime_context().node_id, float(array.sum()), not array.flags.owndata


@farpool.remote
def get_summed(box):
    array = farpool.get(box[0], timeout=60)
    return farpool.get_runtime_context().node_id, float(array.sum()), not array.flags.owndata


def test_readers_on_another_node_share_one_copy_that_the_owner_frees(started):
    head, second, third = three_nodes(started)
    array = np.arange(N, dtype=np.float64)
    ref = farpool.put(array)
    results = farpool.get([summed.options(resources={"second": 1}).remote(ref) for _ in range(4)], timeout=120)
    assert results == [(second, float(array.sum()), True)] * 4
    stats = store_stats(second)
    assert (stats["pulls"], stats["copies"], stats["pull_failures"]) == (1, 1, 0)
    assert array.nbytes <= stats["pulled_bytes"] < array.nbytes + MB
    assert store_stats(head)["chunks_sent"] == CHUNKS == -(-stats["pulled_bytes"] // pull.CHUNK)
    del ref
    wait_until(lambda: store_stats(second)["objects"] == 0, "the copy on the second node was never freed")
    wait_until(lambda: store_stats(head)["objects"] == 0, "the original was never freed")


def test_a_copy_is_pulled_from_every_node_that_holds_one(started):
    head, second, third = three_nodes(started)
    array = np.arange(N, dtype=np.float64)
    ref = farpool.put(array)
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120)[0] == second
    sent_by_head = store_stats(head)["chunks_sent"]
    assert farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120) == \
        (third, float(array.sum()), True)
    # The third node asked both holders for chunks: the head node and the second node's copy.
    assert store_stats(second)["chunks_sent"] > 0
    assert store_stats(head)["chunks_sent"] > sent_by_head
    assert store_stats(second)["chunks_sent"] + store_stats(head)["chunks_sent"] - sent_by_head == CHUNKS
    del ref
    for node in (head, second, third):
        wait_until(lambda: store_stats(node)["objects"] == 0, f"a copy on node {node[:8]} was never freed")


def test_a_borrowed_value_is_copied_to_the_reader_node_and_freed_with_the_original(started):
    head, second, third = three_nodes(started)
    array = np.arange(N, dtype=np.float64)
    box = [farpool.put(array)]  # nested: the task borrows it and asks the owner
    results = farpool.get([get_summed.options(resources={"second": 1}).remote(box) for _ in range(3)],
                          timeout=120)
    assert results == [(second, float(array.sum()), True)] * 3
    stats = store_stats(second)
    assert (stats["pulls"], stats["copies"]) == (1, 1)
    del box
    wait_until(lambda: store_stats(second)["objects"] == 0, "the borrowed copy was never freed")
    wait_until(lambda: store_stats(head)["objects"] == 0, "the original was never freed")


def test_a_large_argument_by_value_is_copied_for_the_call_and_freed_after_it(started):
    head, second, third = three_nodes(started)
    array = np.ones(N)
    assert farpool.get(summed.options(resources={"third": 1}).remote(array), timeout=120) == \
        (third, float(N), True)
    assert store_stats(third)["pulls"] == 1
    wait_until(lambda: store_stats(third)["objects"] == 0, "the copy of the argument was never freed")
    wait_until(lambda: store_stats(head)["objects"] == 0, "the stored argument was never freed")


def test_a_copy_comes_from_the_other_holders_when_one_node_died(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    head, second, third = three_nodes(started)
    array = np.arange(N, dtype=np.float64)
    ref = farpool.put(array)
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120)[0] == second
    started.kill_node(second)
    wait_until(lambda: not next(n for n in farpool.nodes() if n["node_id"] == second)["alive"],
               "the head never declared the killed node dead")
    assert farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120) == \
        (third, float(array.sum()), True)
    assert store_stats(third)["pull_failures"] == 0
    del ref
    wait_until(lambda: store_stats(third)["objects"] == 0, "the copy on the third node was never freed")


def test_an_agent_survives_bad_chunk_requests(started):
    head, second, third = three_nodes(started)
    ref = farpool.put(np.ones(N))
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120)[1] == N
    from farpool._private import transport
    from farpool._private.protocol import encode
    store_id = ref.binary()
    socket = client().agents[head].socket
    for fields in [(1, store_id, 0, 1 << 40), (2, store_id, -5, 10), (3, b"nothing", 0, 10),
                   (4, store_id, "x", 1), (5,), (6, store_id, 0, 10, 7)]:
        client().loop.call_soon(transport.send, socket, encode("ReadChunk", fields))
    client().loop.call_soon(transport.send, socket, encode("Chunk", (1, 0, None), [b"x"]))
    # The head node's agent still serves the copy to the third node.
    assert farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120)[1] == N
    assert store_stats(third)["pulls"] == 1


def test_a_source_that_stops_answering_is_given_up_on_and_the_others_send_its_chunks(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_PULL_SILENT_S", "2")  # read by the agents this test starts
    head, second, third = three_nodes(started)
    array = np.arange(N, dtype=np.float64)
    ref = farpool.put(array)
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120)[0] == second
    sent_by_head = store_stats(head)["chunks_sent"]
    # Stopped, the second node's agent accepts connections (the kernel does) but sends nothing.
    agent = psutil.Process([n["pid"] for n in started.read_state()["nodes"] if n["node_id"] == second][0])
    agent.suspend()
    try:
        assert farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120) == \
            (third, float(array.sum()), True)
    finally:
        agent.resume()
    assert store_stats(head)["chunks_sent"] - sent_by_head == CHUNKS  # all of them, in the end
    assert store_stats(third)["pull_failures"] == 0


@farpool.remote
class Maker:
    """Owns a large object on the head node and hands it out nested (the taker borrows it)."""

    def make(self, n):
        self.mine = farpool.put(np.arange(n, dtype=np.float64))
        return [self.mine]


def test_copies_go_when_their_owner_is_gone(started):
    head, second, third = three_nodes(started)
    maker = Maker.options(resources={"head": 1}).remote()
    [ref] = farpool.get(maker.make.remote(N), timeout=120)
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120)[0] == second
    assert store_stats(second)["copies"] == 1
    # The owner was never connected to the second node's agent: that agent learns of its
    # end from the head node's agent (WatchPeer), and frees the copy.
    farpool.kill(maker)
    wait_until(lambda: store_stats(second)["objects"] == 0, "the copy of a dead owner's object was never freed")
    wait_until(lambda: store_stats(head)["objects"] == 0, "the dead owner's object was never freed")
    with pytest.raises(farpool.ObjectLostError, match="its owner .* is gone"):
        farpool.get(summed.options(resources={"third": 1}).remote(ref), timeout=120)


def test_a_driver_that_leaves_a_shared_cluster_leaves_no_objects_behind(started):
    head, second, third = three_nodes(started)
    refs = [farpool.put(np.ones(N // 4)) for _ in range(3)]
    assert farpool.get(summed.options(resources={"second": 1}).remote(refs[0]), timeout=120)[0] == second
    assert store_stats(head)["objects"] == 3 and store_stats(second)["copies"] == 1
    farpool.shutdown()  # without freeing its refs one by one
    farpool.init(address="auto")
    assert farpool.get(summed.options(resources={"second": 1}).remote(np.ones(4)), timeout=120)[0] == second
    wait_until(lambda: store_stats(head)["objects"] == 0, "the objects of a driver that left were never freed")
    wait_until(lambda: store_stats(second)["objects"] == 0, "the copy of a driver that left was never freed")


@farpool.remote
def make_array(n):
    return np.arange(n, dtype=np.float64)


def test_a_large_result_stays_on_its_node_until_read_elsewhere(started):
    head, second, third = three_nodes(started)
    ref = make_array.options(resources={"second": 1}).remote(N)
    farpool.wait([ref], timeout=120)
    assert store_stats(second)["objects"] == 1  # stored where it was made, not sent to us
    # A task on that node reads it where it is: no copy.
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120) == \
        (second, float(np.arange(N).sum()), True)
    assert store_stats(second)["pulls"] == 0
    # We read it: our agent copies it once, and our later reads map that copy.
    assert np.array_equal(farpool.get(ref, timeout=120), np.arange(N, dtype=np.float64))
    assert float(farpool.get(ref, timeout=120).sum()) == float(np.arange(N).sum())
    assert (store_stats(head)["pulls"], store_stats(head)["copies"]) == (1, 1)
    del ref
    wait_until(lambda: store_stats(second)["objects"] == 0, "the result was never freed on its node")
    wait_until(lambda: store_stats(head)["objects"] == 0, "our copy of the result was never freed")


def test_wait_with_fetch_local_copies_a_value_from_another_node_before_it_is_ready(started):
    head, second, third = three_nodes(started)
    ref = make_array.options(resources={"second": 1}).remote(N)
    ready, _ = farpool.wait([ref], timeout=120, fetch_local=False)
    assert ready == [ref]
    assert store_stats(head)["pulls"] == 0  # ready where it was made: nothing copied here
    ready, _ = farpool.wait([ref], timeout=120)  # fetch_local=True, the default
    assert ready == [ref]
    assert (store_stats(head)["pulls"], store_stats(head)["copies"]) == (1, 1)
    assert float(farpool.get(ref, timeout=120).sum()) == float(np.arange(N).sum())
    assert store_stats(head)["pulls"] == 1  # get reads the copy wait made
    with pytest.raises(TypeError, match="`fetch_local` must be a bool"):
        farpool.wait([ref], fetch_local="yes")


def test_farpool_memory_lists_the_store_of_every_node_with_its_copies(started):
    import subprocess
    import sys
    head, second, third = three_nodes(started)
    ref = farpool.put(np.ones(N))
    assert farpool.get(summed.options(resources={"second": 1}).remote(ref), timeout=120)[0] == second
    result = subprocess.run([sys.executable, "-m", "farpool", "memory"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"node {head[:8]} object store" in out and f"node {second[:8]} object store" in out
    assert f"node {third[:8]} object store" in out
    rows = [line for line in out.splitlines() if line.startswith(ref.hex()[:32])]
    assert len(rows) == 2 and sorted(row.split()[4] for row in rows) == ["False", "True"]  # original, copy
