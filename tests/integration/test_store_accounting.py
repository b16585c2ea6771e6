"""object_store_memory in cluster_resources()/available_resources(): total and free bytes."""

import numpy as np

import farpool
from farpool_testing import store_stats_of, wait_until

MB = 1024 * 1024


def test_object_store_memory_tracks_puts(cluster):
    total = farpool.cluster_resources()["object_store_memory"]
    assert total == float(store_stats_of(cluster["node_id"])["capacity"]) and total > 64 * MB
    before = farpool.available_resources()["object_store_memory"]
    assert 0 < before <= total
    ref = farpool.put(np.ones(64 * MB, dtype=np.uint8))
    during = farpool.available_resources()["object_store_memory"]  # at once: no waiting
    assert during <= before - 64 * MB
    assert farpool.cluster_resources()["object_store_memory"] == total
    del ref
    wait_until(lambda: farpool.available_resources()["object_store_memory"] >= during + 64 * MB,
               "the freed 64 MB to show in available_resources()")
