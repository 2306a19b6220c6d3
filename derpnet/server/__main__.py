"""`python -m derpnet.server --listen 127.0.0.1:3340`: run the relay."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
