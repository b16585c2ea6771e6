import pytest

import farpool


@pytest.fixture(scope="module")
def cluster():
    """One embedded cluster per test module (2 logical CPUs)."""
    farpool.shutdown()
    info = farpool.init(num_cpus=2)
    yield info
    farpool.shutdown()


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
