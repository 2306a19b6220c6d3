"""The embedded DERP relay server (a Python derper): plain HTTP or TLS, fast start, derper's limits.

    from derpnet.server import DerpServer
    with DerpServer() as relay:          # a fresh key, http://127.0.0.1:<free port>
        ... relay.url, relay.public_key, relay.stats() ...

`python -m derpnet.server --listen 127.0.0.1:3340` runs it from the command line.
"""

from __future__ import annotations

from .cli import StartError, add_arguments, main, run
from .keyfile import load_or_create_key
from .server import DerpServer, RelayOptions, RelayServer, relay_url, serve

__all__ = ["StartError", "DerpServer", "RelayServer", "RelayOptions", "serve", "relay_url", "load_or_create_key",
           "add_arguments", "run", "main"]
