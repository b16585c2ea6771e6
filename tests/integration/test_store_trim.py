"""Freed segments are reused while the program is busy, then go back to the system."""

import gc
import os
import time

import numpy as np

import farpool
from farpool._private import session

MB = 1 << 20


def store_stats():
    gc.collect()
    client = farpool.api._client()
    client.loop.call_soon(client._drain_released)
    return client.agent_request(client.home, "StoreStats", ())[0]


def test_freed_memory_is_kept_for_reuse(monkeypatch):
    farpool.shutdown()
    monkeypatch.setenv("FARPOOL_STORE_FREE_IDLE_S", "3600")  # read by the node agent at start
    farpool.init(num_cpus=1)
    try:
        refs = [farpool.put(np.ones(MB // 8)) for _ in range(3)]
        stats = store_stats()
        assert stats["objects"] == 3 and stats["shm_bytes"] >= 3 * MB
        del refs
        stats = store_stats()
        assert stats["objects"] == 0 and stats["free_segments"] == 3
        ref = farpool.put(np.ones(MB // 8))  # reuses one: nothing new is mapped
        after = store_stats()
        assert after["free_segments"] == 2 and after["shm_bytes"] == stats["shm_bytes"]
        del ref
    finally:
        farpool.shutdown()


def test_freed_memory_unused_for_a_while_is_given_back(monkeypatch):
    farpool.shutdown()
    monkeypatch.setenv("FARPOOL_STORE_FREE_IDLE_S", "0.5")
    farpool.init(num_cpus=1)
    try:
        refs = [farpool.put(np.ones(MB // 8)) for _ in range(3)]
        directory = store_stats()["directory"]
        del refs
        deadline = time.monotonic() + 30
        while store_stats()["shm_bytes"] > 0:  # idle for 0.5 s: unlinked
            assert time.monotonic() < deadline, "freed segments were never given back"
            time.sleep(0.1)
        # Every segment was unlinked; the file naming the directory's session stays while it lives.
        assert os.listdir(directory) == [session.SEGMENTS_OWNER_FILE]
    finally:
        farpool.shutdown()
