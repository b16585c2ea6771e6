"""pytest set-up for the compat suites: an isolated farpool tmp root, nothing left running."""

import os
import shutil
import tempfile

_ROOT = tempfile.mkdtemp(prefix="fpc-", dir="/tmp")
os.environ.setdefault("FARPOOL_TMPDIR", _ROOT)


def pytest_sessionfinish(session, exitstatus):
    try:
        import farpool
        farpool.shutdown()
    finally:
        shutil.rmtree(_ROOT, ignore_errors=True)
