"""`python -m derpnet ...`: the derpconnect command line (the same as `python -m derpnet.cmd`)."""

from __future__ import annotations

import sys

from derpnet.cmd.cli import main

if __name__ == "__main__":
    sys.exit(main())
