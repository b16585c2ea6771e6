"""``python -m farpool`` is the ``farpool`` command."""

import sys

from farpool.cli import main

sys.exit(main())
