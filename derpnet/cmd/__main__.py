"""`python -m derpnet.cmd ...` and the `derpconnect` console script."""

from __future__ import annotations

import sys

from derpnet.cmd.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
