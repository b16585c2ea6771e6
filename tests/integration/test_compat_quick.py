"""The peers' own contracts, in the bounded form CI runs: every suite must pass.

The full runs are `python compat/run.py` (counts in the README).
"""

import os
import re
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(__file__), "..", "..", "compat", "run.py")


@pytest.mark.timeout(900)
def test_compat_suites_quick():
    result = subprocess.run([sys.executable, RUN, "--quick"], capture_output=True, text=True, timeout=850)
    out = result.stdout + result.stderr
    counts = re.findall(r"^COMPAT ([\w-]+): (\d+) passed, (\d+) failed", out, re.M)
    print(out[-4000:])
    assert counts, out[-3000:]
    assert result.returncode == 0, out[-3000:]
    assert all(int(failed) == 0 for _, _, failed in counts), counts
    assert sum(int(passed) for _, passed, _ in counts) > 100, counts
