import pytest

import farpool
from farpool_testing import Cluster


def pytest_collection_modifyitems(items):
    for item in items:
        if "/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)


@pytest.fixture
def started(tmp_root):
    """A head and its node agent started with the CLI, on loopback TCP (see farpool_testing.Cluster)."""
    farpool.shutdown()
    cluster = Cluster(tmp_root)
    yield cluster
    try:
        farpool.shutdown()
    finally:  # a failing shutdown must not leave the cluster to the next test
        alive = cluster.stop()
    assert not alive, f"farpool stop left {alive} running"
