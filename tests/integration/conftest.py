import pytest

import farpool
from farpool_testing import Gate


@pytest.fixture(scope="module")
def cluster():
    """One embedded cluster per test module (2 logical CPUs)."""
    farpool.shutdown()
    info = farpool.init(num_cpus=2)
    yield info
    farpool.shutdown()


@pytest.fixture
def gate(tmp_path):
    """A gate tasks wait at until the test opens it (see farpool_testing.Gate)."""
    g = Gate(str(tmp_path / "gate.sock"))
    yield g
    g.close()


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
