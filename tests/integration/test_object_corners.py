"""Corners of objects and refs where bugs were found (each test failed before its fix):
refs kept by a call that raises, refs and large arrays inside exceptions, spilled
arguments, restores without room, wait() on nothing.

Each test runs on a 2-CPU embedded cluster of its own (a failure leaves nothing
behind for the next); a hang fails by a get timeout, a leak by a deadline on the
node store's listing.
"""

import gc

import numpy as np
import pytest

import farpool
from farpool_testing import TIMEOUT, wait_until

MB = 1 << 20
BIG = MB // 8  # float64 elements: 1 MiB, lives in the node store


@pytest.fixture
def cluster():
    farpool.shutdown()
    info = farpool.init(num_cpus=2, object_store_memory=64 * MB)
    yield info
    farpool.shutdown()


def store_objects():
    """The node store's listing after this driver's released refs reached the agent."""
    gc.collect()
    client = farpool.api._client()
    client.loop.call_soon(client._drain_released)
    _, listing = client.agent_request(client.home, "StoreStats", ())
    return listing


def store_empties(what):
    wait_until(lambda: not store_objects(), f"the store to be empty: {what}")


# ---------------------------------------------------------------------------- an actor that keeps refs
@farpool.remote
class Keeper:
    def keep_then_raise(self, refs):
        self.refs = list(refs)  # kept: the caller must count this actor as a borrower
        raise RuntimeError("failed after keeping the refs")

    def sums(self):
        return [float(farpool.get(r, timeout=TIMEOUT).sum()) for r in self.refs]


@pytest.mark.parametrize("n", [10, BIG])  # inline, and in the store
def test_an_actor_call_that_raises_after_keeping_a_borrowed_ref_keeps_it_alive(cluster, n):
    keeper = Keeper.remote()
    ref = farpool.put(np.ones(n))
    with pytest.raises(RuntimeError, match="after keeping"):
        farpool.get(keeper.keep_then_raise.remote([ref]), timeout=TIMEOUT)
    del ref
    gc.collect()
    # The actor still holds the ref: the value must still be there.
    assert farpool.get(keeper.sums.remote(), timeout=TIMEOUT) == [float(n)]


# ---------------------------------------------------------------------------- refs and arrays in exceptions
@farpool.remote
def raise_a_ref_it_made(n):
    raise ValueError(farpool.put(np.ones(n)))


def test_a_ref_inside_a_raised_exception_is_freed_when_nobody_holds_it(cluster):
    with pytest.raises(ValueError) as info:
        farpool.get(raise_a_ref_it_made.remote(BIG), timeout=TIMEOUT)
    inner = info.value.args[0]
    assert isinstance(inner, farpool.ObjectRef)
    assert float(farpool.get(inner, timeout=TIMEOUT).sum()) == BIG
    del inner, info
    store_empties("the only ref to the value, inside an exception, was dropped")


@farpool.remote
def raise_with_an_array(n):
    raise ValueError(np.ones(n))


def test_an_exception_carrying_a_large_array_is_still_its_own_type(cluster):
    with pytest.raises(ValueError) as info:
        farpool.get(raise_with_an_array.remote(BIG), timeout=TIMEOUT)
    assert float(info.value.args[0].sum()) == BIG


# ---------------------------------------------------------------------------- spilled objects
@farpool.remote
def summed(array):
    return float(array.sum())


def spilled_puts(count, mb=20):
    """``count`` stored arrays of ``mb`` MiB of ones: more than the 64 MiB store, the first ones spill."""
    refs = [farpool.put(np.ones(mb * MB // 8)) for _ in range(count)]
    listing = {entry["object_id"]: entry for entry in store_objects()}
    assert listing[refs[0].hex()]["spilled"], "the test needs the first one spilled"
    return refs


def test_a_spilled_object_passed_to_a_task_is_restored_for_it(cluster):
    refs = spilled_puts(4)
    assert farpool.get(summed.remote(refs[0]), timeout=TIMEOUT) == 20 * MB // 8


def test_a_spilled_object_is_restored_even_when_readers_pin_the_whole_store(cluster):
    # Issue #18: where pinned objects leave no room, the restored object is mapped from a
    # disk-backed segment in the spill directory (it was ObjectStoreFullError before).
    refs = spilled_puts(4)
    views = farpool.get(refs[1:], timeout=TIMEOUT)  # 60 MiB of the 64 MiB store pinned by our views
    assert len(views) == 3
    value = farpool.get(refs[0], timeout=TIMEOUT)
    assert value.shape == (20 * MB // 8,) and float(value.sum()) == 20 * MB // 8
    listing = {entry["object_id"]: entry for entry in store_objects()}
    assert listing[refs[0].hex()]["state"] == "on disk"  # restored into the spill directory


# ---------------------------------------------------------------------------- wait

def test_wait_on_an_empty_list_returns_two_empty_lists(cluster):
    assert farpool.wait([], timeout=TIMEOUT) == ([], [])
