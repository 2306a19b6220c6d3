"""derpconnect: the command line of derpnet (`python -m derpnet.cmd`, or `derpconnect`).

Commands: serve, join, relay, keygen, pubkey, regions. Flag-compatible with the Go
`derpconnect` (`--derp`, `--key`, `--debug`, in Go's `-flag=value` style too).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import main as _main
    return _main(argv)


__all__ = ["main"]
