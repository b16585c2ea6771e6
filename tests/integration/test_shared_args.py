"""A large by-value argument is stored once while it lives (shared_args.py), and results are
what copying gives: a change between calls is seen, a task's change is its own."""

import gc

import numpy as np

import farpool
from farpool._private import object_ref
from farpool_testing import wait_at_gate, wait_until

BIG = 4 << 20  # bytes: above shared_args.SHARE_MIN_BYTES


@farpool.remote
def first(a, gate_path=None):
    if gate_path is not None:
        wait_at_gate(gate_path)
    return float(a[0])


@farpool.remote
def set_first(a, value):
    a[0] = value
    return float(a[0])


@farpool.remote
def same_object(x, y):
    return x is y, float(x[0])


def big_copies(node_id, nbytes):
    """Objects in the node's store at least ``nbytes`` large."""
    client = farpool.api._client()
    _stats, listing = client.agent_request(client.agents[node_id], "StoreStats", ())
    return len([r for r in listing if r["size"] >= nbytes])


def shared_entries():
    return len(object_ref.current().refs.by_content)


def test_the_same_array_to_eight_tasks_is_stored_once(cluster, gate):
    arr = np.full(BIG // 8, 3.0)
    before = big_copies(cluster["node_id"], arr.nbytes)
    refs = [first.remote(arr, gate.path) for _ in range(8)]
    gate.wait_arrivals(2)  # two run, six wait: all eight hold their argument
    assert big_copies(cluster["node_id"], arr.nbytes) == before + 1
    assert shared_entries() == 1
    gate.open()
    assert farpool.get(refs, timeout=60) == [3.0] * 8


def test_the_entry_goes_with_the_object(cluster):
    arr = np.full(BIG // 8, 2.0)
    refs = [first.remote(arr) for _ in range(3)]
    assert farpool.get(refs, timeout=60) == [2.0] * 3
    del refs
    gc.collect()
    wait_until(lambda: shared_entries() == 0, "the stored argument's digest to go with its object")
    wait_until(lambda: big_copies(cluster["node_id"], arr.nbytes) == 0, "the stored argument to be freed")
    object_ref.current().refs.validate_state()
    # passed again, it is stored again
    assert farpool.get(first.remote(arr), timeout=60) == 2.0


def test_a_change_between_calls_is_seen(cluster, gate):
    arr = np.zeros(BIG // 8)
    r1 = first.remote(arr, gate.path)
    arr[0] = 5.0
    r2 = first.remote(arr, gate.path)
    r3 = first.remote(a=arr, gate_path=gate.path)  # a keyword argument too
    gate.open()
    assert farpool.get([r1, r2, r3], timeout=60) == [0.0, 5.0, 5.0]


def test_a_tasks_change_is_its_own(cluster):
    arr = np.zeros(BIG // 8)
    refs = [set_first.remote(arr, 7.0), first.remote(arr), set_first.remote(arr, 8.0), first.remote(arr)]
    assert farpool.get(refs, timeout=60) == [7.0, 0.0, 8.0, 0.0]
    assert arr[0] == 0.0


def test_one_object_given_twice_stays_one_object(cluster):
    arr = np.ones(BIG // 8)
    assert farpool.get(same_object.remote(arr, arr), timeout=60) == (True, 1.0)


def test_the_executor_stores_an_array_once(cluster, gate):
    arr = np.full(BIG // 8, 4.0)
    before = big_copies(cluster["node_id"], arr.nbytes)
    with farpool.DistributedExecutor(max_workers=8) as ex:
        futures = [ex.submit(_first_at_gate, arr, gate.path) for _ in range(8)]
        gate.wait_arrivals(2)
        assert big_copies(cluster["node_id"], arr.nbytes) == before + 1
        gate.open()
        assert [f.result(timeout=60) for f in futures] == [4.0] * 8


def test_pool_apply_async_calls_share_one_copy(cluster, gate):
    arr = np.full(BIG // 8, 6.0)
    before = big_copies(cluster["node_id"], arr.nbytes)
    with farpool.Pool(2) as pool:
        results = [pool.apply_async(_first_at_gate, (arr, gate.path)) for _ in range(4)]
        gate.wait_arrivals(2)
        assert big_copies(cluster["node_id"], arr.nbytes) == before + 1
        gate.open()
        assert [r.get(timeout=60) for r in results] == [6.0] * 4


def _first_at_gate(a, gate_path):
    wait_at_gate(gate_path)
    return float(a[0])


def test_calls_one_after_another_reuse_the_copy_while_it_lingers(cluster, monkeypatch):
    from farpool._private import shared_args
    monkeypatch.setattr(shared_args, "SHARED_LINGER_S", 3600.0)  # (no clock in the test: it lingers)
    arr = np.full(BIG // 8, 9.0)
    table = object_ref.current().refs
    earlier = set(table.by_content)  # (other tests' arguments may still linger)
    assert farpool.get(first.remote(arr), timeout=60) == 9.0  # its task has ended here
    ours = set(table.by_content) - earlier
    assert len(ours) == 1
    digest = ours.pop()
    oid = table.by_content[digest]
    assert farpool.get(first.remote(arr), timeout=60) == 9.0
    assert table.by_content[digest] == oid
    arr[0] = 1.0  # changed: stored anew
    assert farpool.get(first.remote(arr), timeout=60) == 1.0
    assert len(set(table.by_content) - earlier) == 2


def test_the_copy_goes_when_its_source_value_goes(cluster, monkeypatch):
    from farpool._private import shared_args
    monkeypatch.setattr(shared_args, "SHARED_LINGER_S", 3600.0)
    table = object_ref.current().refs
    earlier = set(table.by_content)
    arr = np.full(BIG // 8, 5.0)
    assert farpool.get(first.remote(arr), timeout=60) == 5.0
    ours = set(table.by_content) - earlier
    assert len(ours) == 1
    del arr
    gc.collect()
    wait_until(lambda: not (ours & set(table.by_content)), "the copy of a dropped array to be freed")
    table.validate_state()
