"""Bugs found by the second hunt that one node shows (each xfail until fixed)."""

import pytest

import farpool


@farpool.remote
def raises_memory_error():
    raise MemoryError("no room for the scratch buffer")


@pytest.mark.xfail(strict=True, reason="a remote MemoryError (or ObjectStoreFullError) reaches get as a TypeError "
                                       "from TaskError.wrap: MemoryError.__new__(dual) is not safe")
def test_a_remote_memory_error_is_raised_as_itself(cluster):
    with pytest.raises(MemoryError, match="no room for the scratch buffer") as info:
        farpool.get(raises_memory_error.remote(), timeout=60)
    assert isinstance(info.value, farpool.TaskError)
