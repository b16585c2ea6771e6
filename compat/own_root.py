"""Run a compat suite's ``main`` with a tmp root of its own when run by hand (no FARPOOL_TMPDIR),
so its sessions never meet a cluster the user started; the root goes afterwards."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile


def run(main) -> None:
    if "FARPOOL_TMPDIR" in os.environ:
        sys.exit(main())
    root = os.environ["FARPOOL_TMPDIR"] = tempfile.mkdtemp(prefix="fpc-", dir="/tmp")
    try:
        code = main()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(code)
