"""``python -m farpool`` is the ``farpool`` command."""

import sys

from farpool.cli import main

if __name__ == "__main__":  # workers import the driver's main module: it must not run the command
    sys.exit(main())
