"""Large data under memory pressure (#18): spilling that never stalls a node.

Each test starts its own embedded cluster with a small store (and, where it matters,
its own spill directory) and checks every value it reads back.
"""

import os
import re
import shutil
import signal
import subprocess
import threading

import numpy as np
import pytest

import farpool
from farpool_testing import wait_until

MiB = 1 << 20
GiB = 1 << 30


def store_stats():
    client = farpool.api._client()
    stats, _listing = client.agent_request(client.home, "StoreStats", ())
    return stats


@pytest.fixture
def fresh():
    farpool.shutdown()
    yield
    farpool.shutdown()


@farpool.remote
def doubled(a):
    return a * 2


@farpool.remote
def ends(a):
    return float(a[0]), float(a[-1]), float(a[len(a) // 2])


kept = None


@farpool.remote
def doubled_keeping_the_argument(a):
    global kept
    kept = a  # still mapped when the result is stored: nothing else can spill
    return a * 2


@pytest.mark.timeout(300)
def test_soak_3_gib_through_a_1_gib_store_and_the_agent_keeps_its_heartbeat(fresh, tmp_path):
    """3 GiB of arrays put, read by tasks, 3 GiB of results, all read again: most of it
    spills and comes back while the agent keeps answering (largest heartbeat gap < 1 s)."""
    spill_dir = tmp_path / "spill"
    farpool.init(num_cpus=2, object_store_memory=GiB, spill_dir=str(spill_dir))
    n, size = 12, 256 * MiB
    inputs = [farpool.put(np.full(size // 8, i, dtype=np.float64)) for i in range(n)]
    results = [doubled.remote(ref) for ref in inputs]
    for i, ref in enumerate(results):
        value = farpool.get(ref, timeout=120)
        assert (value[0], value[-1], value[len(value) // 2]) == (2 * i, 2 * i, 2 * i)
        del value
    assert farpool.get([ends.remote(ref) for ref in inputs], timeout=120) == [(i, i, i) for i in range(n)]
    stats = store_stats()
    assert stats["spills"] >= n and stats["restores"] >= n, stats
    assert stats["heartbeat_gap_max_s"] < 1.0, stats  # the bound: a busy node beats on time
    store_dir = stats["directory"]
    del inputs, results, ref
    wait_until(lambda: store_stats()["objects"] == 0, "every object to be freed")
    ours = os.listdir(spill_dir)
    assert len(ours) == 1
    # Freed objects leave no file (unlinked on the agent's I/O threads, so: soon).
    wait_until(lambda: os.listdir(spill_dir / ours[0]) == [], "the spill files of freed objects to go")
    farpool.shutdown()
    assert os.listdir(spill_dir) == [] and not os.path.exists(store_dir)


def test_readers_of_a_spilled_object_all_get_it_whole(fresh):
    farpool.init(num_cpus=2, object_store_memory=64 * MiB)
    first = farpool.put(np.arange(5 * MiB, dtype=np.float64))  # 40 MiB
    second = farpool.put(np.full(5 * MiB, 7.0))                # the first spills to make room
    wait_until(lambda: store_stats()["spilled"] > 0, "the first object to spill")
    assert farpool.get(second, timeout=60)[0] == 7.0
    # Room for the restore: with the second object still in memory (and just handed to a
    # reader, so not spillable for a moment) the store would serve the first from its spill
    # file instead (the on-disk path: tests/unit/test_store_spill.py), and no reader would wait.
    del second
    wait_until(lambda: store_stats()["objects"] == 1, "the second object to be freed")
    # Tasks and driver threads read it at once: one restore, everyone waits for it whole.
    refs = [ends.remote(first) for _ in range(3)]
    got = []
    threads = [threading.Thread(target=lambda: got.append(farpool.get(first, timeout=60)[-1]))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert got == [5 * MiB - 1] * 2
    assert farpool.get(refs, timeout=60) == [(0.0, 5 * MiB - 1, 5 * MiB / 2)] * 3
    assert store_stats()["restores"] == 1


def test_a_task_whose_argument_pins_the_store_returns_its_result_on_disk(fresh):
    """Issue #18: a 512 MiB argument mapped and a 512 MiB result in a 1 GiB store failed
    with ObjectStoreFullError; here at a sixteenth of the scale."""
    farpool.init(num_cpus=1, object_store_memory=64 * MiB)
    arg = farpool.put(np.full(5 * MiB, 3.0))  # 40 MiB; the task maps (pins) it
    ref = doubled_keeping_the_argument.remote(arg)
    result = farpool.get(ref, timeout=60)
    assert result[0] == result[-1] == 6.0 and len(result) == 5 * MiB
    stats = store_stats()
    assert stats["on_disk_allocations"] >= 1 and stats["on_disk"] >= 40 * MiB, stats


def test_an_object_larger_than_the_store_fails_at_put_saying_how_to_raise_it(fresh):
    farpool.init(num_cpus=1, object_store_memory=32 * MiB)
    with pytest.raises(farpool.ObjectStoreFullError,
                       match=r"is larger than the whole object store \(33.6 MB\); raise object_store_memory "
                             r"above it \(farpool.init\(object_store_memory=...\)"):
        farpool.put(np.zeros(5 * MiB))
    assert farpool.get(farpool.put(np.ones(MiB)))[0] == 1.0  # the node serves on


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as the full disk needs root")
def test_a_full_spill_disk_fails_the_put_naming_the_directory_and_loses_nothing(fresh, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(disk)], check=True)
    try:
        farpool.init(num_cpus=1, object_store_memory=64 * MiB, spill_dir=str(disk))
        refs = []
        with pytest.raises(farpool.ObjectStoreFullError) as failure:
            for i in range(6):  # 40 MiB each: two spill, then the disk is (nearly) full
                refs.append(farpool.put(np.full(5 * MiB, float(i))))
        message = str(failure.value)
        assert f"the spill directory {disk}/farpool-" in message, message
        assert re.search(r"has \d+\.\d MB free", message) and "Nothing was lost" in message, message
        assert len(refs) >= 2
        for i, ref in enumerate(refs):  # the spilled ones come back (from disk if memory is short)
            value = farpool.get(ref, timeout=60)
            assert value[0] == value[-1] == float(i)
            del value
        farpool.shutdown()
        assert os.listdir(disk) == []
    finally:
        farpool.shutdown()
        subprocess.run(["umount", str(disk)], check=True)


def test_a_cluster_that_dies_names_logs_that_still_exist(fresh):
    info = farpool.init(num_cpus=1)
    client = farpool.api._client()
    with open(os.path.join(info["session_dir"], "node.pid")) as f:
        node_pid = int(f.read())
    node_log = os.path.join(info["session_dir"], "node.log")
    ready = f"farpool-node ready pid={node_pid}"
    # The agent may print its ready line just after init() returns: a log to keep must hold it.
    wait_until(lambda: ready in open(node_log).read(), "the node agent's ready line in its log")
    os.kill(node_pid, signal.SIGKILL)
    wait_until(lambda: client.broken is not None, "the driver to notice its agent died")
    with pytest.raises(farpool.FarpoolError, match="exited unexpectedly") as failure:
        farpool.put(np.ones(MiB))
    kept = re.search(r"Its logs are kept in (\S+);", str(failure.value)).group(1)
    farpool.shutdown()
    assert not os.path.exists(info["session_dir"])
    try:
        with open(os.path.join(kept, "node.log")) as f:
            assert ready in f.read()
        assert os.path.isfile(os.path.join(kept, "head.log"))
    finally:
        shutil.rmtree(kept)
