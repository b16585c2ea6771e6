"""A driver joined by address (over TCP, as from a machine with no node) puts large values
into its node's store, in chunks, instead of keeping them in its own process.

Readers then use the store as they do for any stored value: a task on that node maps
it, a task on another node has its agent copy it (pull.py), and the driver's own
``get`` reads it back in chunks, as it does for a borrower with no store (another driver
joined by address).  Freed with the ref, like any put.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np

import farpool
import farpool_testing
from farpool_testing import TIMEOUT, node_ids, store_stats_of, wait_until

# Over one 4 MB chunk and not a multiple of it: several chunks, the last one short.
N = (9 << 20) // 8 + 12345


Mailbox = farpool.remote(farpool_testing.Mailbox)


@farpool.remote
def checksum(a):
    return float(a.sum()), a.nbytes, farpool.get_runtime_context().node_id


def test_a_large_put_goes_to_the_node_store_and_every_reader_finds_it(started):
    started.start_head("--resources", '{"head": 1}')
    started.add_node("--num-cpus", "1", "--resources", '{"second": 1}')
    head_node, second = node_ids(started)
    farpool.init(address=started.address, token=started.token)
    client = farpool.api._client()
    assert not client.home.local, "expected a driver joined over TCP"
    before = store_stats_of(head_node)["uploaded_bytes"]
    data = np.arange(N, dtype=np.float64)
    ref = farpool.put(data)
    entry = client.objects[ref.binary()]
    assert entry.location is not None and entry.location.node_id == head_node and entry.payload is None
    assert store_stats_of(head_node)["uploaded_bytes"] - before >= data.nbytes
    data[:] = -1  # put copied it: changing the array afterwards changes nothing stored

    expected = float(np.arange(N, dtype=np.float64).sum())
    here = farpool.get(checksum.options(resources={"head": 1}).remote(ref), timeout=TIMEOUT)
    there = farpool.get(checksum.options(resources={"second": 1}).remote(ref), timeout=TIMEOUT)
    assert here == (expected, N * 8, head_node)
    assert there == (expected, N * 8, second)
    back = farpool.get(ref, timeout=TIMEOUT)  # read back from the node's store
    assert np.array_equal(back, np.arange(N, dtype=np.float64)) and not back.flags.writeable
    # A large argument passed by value takes the same way.
    by_value = farpool.get(checksum.options(resources={"second": 1}).remote(np.ones(N)), timeout=TIMEOUT)
    assert by_value == (float(N), N * 8, second)

    objects = lambda: store_stats_of(head_node)["objects"]  # noqa: E731
    assert objects() >= 1
    del ref, entry
    wait_until(lambda: objects() == 0, "the head node's store freeing the put once its ref is gone")


BORROWER = textwrap.dedent("""
    import sys
    import farpool
    farpool.init(address=sys.argv[1])
    [ref] = farpool.get(farpool.get_actor("mailbox").give.remote(), timeout=60)
    value = farpool.get(ref, timeout=60)
    print(float(value.sum()), value.nbytes)
    farpool.shutdown()
""")


def test_another_driver_joined_by_address_borrows_the_put(started, tmp_path):
    """A borrower with no store either: the owner reads its value back from its node and
    sends the bytes."""
    started.start_head()
    farpool.init(address=started.address, token=started.token)
    ref = farpool.put(np.arange(N, dtype=np.float64))
    assert farpool.api._client().objects[ref.binary()].location is not None
    mailbox = Mailbox.options(name="mailbox").remote()
    assert farpool.get(mailbox.hold.remote([ref]), timeout=TIMEOUT)
    out = subprocess.run([sys.executable, "-c", BORROWER, started.address], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=tmp_path, env=dict(os.environ, FARPOOL_TOKEN=started.token))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(float(np.arange(N, dtype=np.float64).sum())), str(N * 8)]
