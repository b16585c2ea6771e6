"""A /dev/shm smaller than the object store: the store falls back to disk, with a warning."""

import os
import shutil

import numpy as np
import pytest

import farpool
from farpool._private import session


def test_a_store_larger_than_dev_shm_falls_back_to_disk_with_a_warning():
    farpool.shutdown()
    shm_free = shutil.disk_usage(session.shm_root()).free
    # Bigger than /dev/shm can hold (the store only accounts for it; nothing is allocated up front).
    with pytest.warns(RuntimeWarning, match="lives on disk.*larger /dev/shm"):
        info = farpool.init(num_cpus=1, object_store_memory=shm_free + (1 << 30))
    try:
        client = farpool.api._client()
        stats, _ = client.agent_request(client.home, "StoreStats", ())
        assert stats["directory"].startswith(info["session_dir"])
        assert not stats["directory"].startswith(session.shm_root())
        arr = np.arange(1 << 18, dtype=np.float64)  # 2 MB: goes to the store
        ref = farpool.put(arr)
        np.testing.assert_array_equal(farpool.get(ref), arr)
        assert os.listdir(stats["directory"])  # its segment is a file on disk

        @farpool.remote
        def total(a):
            return float(a.sum())
        assert farpool.get(total.remote(ref), timeout=60) == float(arr.sum())
    finally:
        farpool.shutdown()
