import pytest

import farpool
from farpool_testing import Cluster


def pytest_collection_modifyitems(items):
    for item in items:
        if "/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture
def started(tmp_root):
    farpool.shutdown()
    cluster = Cluster(tmp_root)
    yield cluster
    try:
        farpool.shutdown()
    finally:  # a failing shutdown must not leave the cluster to the next test
        alive = cluster.stop()
    assert not alive, f"farpool stop left {alive} running"
