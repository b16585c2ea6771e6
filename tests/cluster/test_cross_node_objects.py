"""Owner messages between nodes go through the node agents, never through ipc paths.

The loopback cluster shares one filesystem, so an ipc path of another node's
process would work here and hide a bug that hangs a real cluster: each test also
checks that the borrower opened no ipc connection to an owner
(``client.owner_conns``) and keeps what it read in its own memory.
"""

import time

import numpy as np
import psutil
import pytest

import farpool

BIG = 200 * 1024 // 8  # float64s: a value above the node store's inline threshold


def node_ids(cluster):
    return [n["node_id"] for n in cluster.read_state()["nodes"]]


def client():
    return farpool.api._client()


def ipc_owner_conns():
    """In any process: the ipc DEALERs it opened to owners (the same-node fast path)."""
    return len(farpool.api._client().owner_conns)


@farpool.remote(resources={"special": 1})
def read_boxed(box):
    small, big = farpool.get(box, timeout=60)
    return farpool.get_runtime_context().node_id, small, float(big.sum()), ipc_owner_conns()


@farpool.remote(resources={"special": 1})
def make_boxed():
    """A value owned by this worker (on the second node), handed out nested so it is borrowed."""
    return [farpool.put(np.arange(BIG, dtype=np.float64)), farpool.put({"small": 1})]


@farpool.remote(resources={"special": 1})
class Keeper:
    def keep(self, box):
        self.kept = box  # borrowed refs, kept beyond the call
        return farpool.get_runtime_context().node_id

    def read(self):
        small, big = farpool.get(self.kept, timeout=60)
        return small, float(big.sum()), ipc_owner_conns()

    def drop(self):
        self.kept = None
        return True

    def make(self):
        self.mine = farpool.put(np.arange(BIG, dtype=np.float64))
        return [self.mine]

    def forget(self):
        self.mine = None
        return True

    def owns(self, oid):
        return oid in farpool.api._client().objects


def two_nodes(started):
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    return node_ids(started)


def wait_until(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_task_on_another_node_reads_borrowed_refs_through_the_agents(started):
    head_node, second = two_nodes(started)
    small = farpool.put("hello")
    big = farpool.put(np.arange(BIG, dtype=np.float64))
    node, value, total, conns = farpool.get(read_boxed.remote([small, big]), timeout=60)
    assert node == second
    assert value == "hello"
    assert total == float(np.arange(BIG, dtype=np.float64).sum())
    assert conns == 0


def test_an_actor_on_another_node_reads_a_kept_ref_later(started):
    head_node, second = two_nodes(started)
    keeper = Keeper.remote()
    box = [farpool.put({"k": 1}), farpool.put(np.ones(BIG))]
    assert farpool.get(keeper.keep.remote(box), timeout=60) == second
    del box
    value, total, conns = farpool.get(keeper.read.remote(), timeout=60)
    assert value == {"k": 1} and total == BIG
    assert conns == 0


def test_the_driver_reads_a_value_owned_by_a_worker_on_another_node(started):
    head_node, second = two_nodes(started)
    big_ref, small_ref = farpool.get(make_boxed.remote(), timeout=60)
    big, small = farpool.get([big_ref, small_ref], timeout=60)
    assert small == {"small": 1}
    assert np.array_equal(big, np.arange(BIG, dtype=np.float64))
    entry = client().objects[big_ref.binary()]
    assert entry.location is None and entry.buffers  # the bytes came over, not a path on node 2
    assert client().owner_conns == {}


def test_releases_reach_owners_on_other_nodes(started):
    head_node, second = two_nodes(started)
    keeper = Keeper.remote()
    # A borrower on the second node lets go of the driver's object ...
    ref = farpool.put(np.ones(BIG))
    oid = ref.binary()
    assert farpool.get(keeper.keep.remote([ref]), timeout=60) == second
    del ref
    farpool.nodes()  # a round trip through the I/O thread: our own release has been handled
    assert oid in client().objects  # the actor still borrows it
    assert farpool.get(keeper.drop.remote(), timeout=60)
    wait_until(lambda: oid not in client().objects, "the owner never heard the remote borrower let go")
    # ... and the driver lets go of an object an actor on the second node owns.
    [mine] = farpool.get(keeper.make.remote(), timeout=60)
    mine_id = mine.binary()
    assert farpool.get(mine, timeout=60).sum() == float(np.arange(BIG).sum())
    assert farpool.get(keeper.forget.remote(), timeout=60)
    assert farpool.get(keeper.owns.remote(mine_id), timeout=60)  # we borrow it still
    del mine
    wait_until(lambda: not farpool.get(keeper.owns.remote(mine_id), timeout=60),
               "the remote owner never heard the driver let go")
    assert client().owner_conns == {}


def test_a_borrowed_value_of_a_killed_node_fails_clearly(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    head_node, second = two_nodes(started)
    keeper = Keeper.remote()
    [ref] = farpool.get(keeper.make.remote(), timeout=60)  # owned by the actor; not fetched yet
    started.kill_node(second)
    with pytest.raises(farpool.OwnerDiedError, match=f"node {second[:8]}") as info:
        farpool.get(ref, timeout=60)
    assert ref.hex() in str(info.value)


def test_a_borrowed_value_whose_owner_exited_fails_clearly(started):
    head_node, second = two_nodes(started)
    keeper = Keeper.remote()
    [ref] = farpool.get(keeper.make.remote(), timeout=60)
    farpool.kill(keeper)
    with pytest.raises(farpool.OwnerDiedError, match="its process has exited") as info:
        farpool.get(ref, timeout=60)
    assert ref.hex() in str(info.value) and second[:8] in str(info.value)


def test_an_agent_survives_garbage_and_messages_for_nobody(started):
    head_node, second = two_nodes(started)
    assert farpool.get(read_boxed.remote([farpool.put(1), farpool.put(np.ones(4))]), timeout=60)[0] == second
    conn = client().agents[second]
    from farpool._private import transport
    from farpool._private.protocol import encode
    me = client().identity  # the agent routes these back to us: we must survive them too
    for frames in ([b"ToPeer"], [b"ToPeer", b"c:nobody"], [b"ToPeer", b"w:1", b"x", b"y"],
                   [b"ToPeer", b"c:nobody", b"GetObject", b"garbage"],
                   [b"ToPeer", me, b"GetObject", b"garbage"], [b"ToPeer", me, *encode("ObjectValue", ("bad",))],
                   [b"ToPeer", me, *encode("ObjectValue", ([], 1, None, None))],
                   [b"ToPeer", me, *encode("GetObject", ())], [b"ToPeer", me, *encode("Pong", ())]):
        client().loop.call_soon(transport.send, conn.socket, frames)
    node, value, _, conns = farpool.get(read_boxed.remote([farpool.put(2), farpool.put(np.ones(4))]), timeout=60)
    assert (node, value, conns) == (second, 2, 0)


@farpool.remote(resources={"home": 1})
def read_boxed_at_home(box):
    small, big = farpool.get(box, timeout=60)
    return farpool.get_runtime_context().node_id, small, float(big.sum()), ipc_owner_conns()


def test_a_driver_joined_over_tcp_is_asked_through_its_agent_even_from_that_node(started):
    """Its home agent is the head node's, but the driver may run on another machine:
    a worker of that node must not open an ipc path of the driver's."""
    started.start_head("--resources", '{"home": 1}')
    farpool.init(address=started.address, token=started.token)
    assert client().owner_address[2] is None
    node, value, total, conns = farpool.get(
        read_boxed_at_home.remote([farpool.put("hi"), farpool.put(np.ones(BIG))]), timeout=60)
    assert (node, value, total, conns) == (node_ids(started)[0], "hi", BIG, 0)


@farpool.remote(resources={"home": 1})
def try_get_at_home(box):
    try:
        farpool.get(box[0], timeout=60)
    except farpool.OwnerDiedError as error:
        return str(error)
    return "got it"


def test_a_borrowed_value_on_a_node_whose_agent_does_not_answer_fails_clearly(started):
    started.start_head("--resources", '{"home": 1}')
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    head_node, second = node_ids(started)
    keeper = Keeper.remote()
    [ref] = farpool.get(keeper.make.remote(), timeout=60)
    # Stopped, its agent still accepts TCP connections (the kernel does) but answers nothing:
    # a borrower that was never connected to it gives up after the hello deadline.
    agent = psutil.Process([n["pid"] for n in started.read_state()["nodes"] if n["node_id"] == second][0])
    agent.suspend()
    try:
        message = farpool.get(try_get_at_home.remote([ref]), timeout=60)
    finally:
        agent.resume()
    assert f"node {second[:8]}" in message and "did not answer" in message and ref.hex() in message
