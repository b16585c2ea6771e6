"""pytest set-up for the compat suites: an isolated farpool tmp root, nothing left running.

The tests' shared helpers (tests/farpool_testing.py) are importable here too.
"""

import os
import shutil
import sys
import tempfile

_TESTS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
if _TESTS not in sys.path:
    sys.path.append(_TESTS)  # last: it only adds farpool_testing, and shadows nothing

_ROOT = tempfile.mkdtemp(prefix="fpc-", dir="/tmp")
os.environ.setdefault("FARPOOL_TMPDIR", _ROOT)


def pytest_sessionfinish(session, exitstatus):
    try:
        import farpool
        farpool.shutdown()
    finally:
        shutil.rmtree(_ROOT, ignore_errors=True)
