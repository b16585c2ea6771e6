"""Bugs found by the second hunt that one node shows (each failed before its fix)."""

import numpy as np
import pytest

import farpool
from farpool_testing import wait_until


@farpool.remote
def raises_memory_error():
    raise MemoryError("no room for the scratch buffer")


def test_a_remote_memory_error_is_raised_as_itself(cluster):
    with pytest.raises(MemoryError, match="no room for the scratch buffer") as info:
        farpool.get(raises_memory_error.remote(), timeout=60)
    assert isinstance(info.value, farpool.TaskError)


@farpool.remote
class Maker:
    """Owns a large object and hands it out nested (the caller borrows it)."""

    def make(self, n):
        self.mine = farpool.put(np.ones(n))
        return [self.mine]


def _home_store_objects():
    client = farpool.api._client()
    stats, _listing = client.agent_request(client.home, "StoreStats", ())
    return stats["objects"]


def test_a_borrowed_value_whose_owner_died_is_lost_not_another_objects_bytes(cluster):
    n = 40 * (1 << 20) // 8
    maker = Maker.remote()
    [ref] = farpool.get(maker.make.remote(n), timeout=60)
    assert float(farpool.get(ref, timeout=60).sum()) == n
    farpool.kill(maker)
    wait_until(lambda: _home_store_objects() == 0, "the dead owner's object was never freed")
    other = farpool.put(np.full(n, 7.0))  # takes the freed segment
    try:
        with pytest.raises(farpool.ObjectLostError):
            value = farpool.get(ref, timeout=60)
            pytest.fail(f"read a value summing to {float(value.sum())} (the other object sums to {7.0 * n})")
    finally:
        del other, ref
        wait_until(lambda: _home_store_objects() == 0, "objects were left in the store")
