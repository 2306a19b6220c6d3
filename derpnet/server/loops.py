"""Which asyncio event loop runs the relay: uvloop when it is installed, else the standard one.

Layer: relay server (startup only). uvloop (libuv, MagicStack) is an optional dependency
(`pip install derpnet[fast]`): its transports read, write and dispatch in C, which is most
of what the relay's loop does per packet (README, "Relay performance"). Without it, or with
`--event-loop asyncio`, the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

__all__ = ["CHOICES", "loop_factory", "resolve", "bind_error"]

CHOICES = ("auto", "uvloop", "asyncio")


def resolve(kind: str) -> str:
    """"auto" → "uvloop" when importable, else "asyncio"; "uvloop" raises ImportError when missing."""
    if kind not in CHOICES:
        raise ValueError(f"event loop must be one of {', '.join(CHOICES)}, not {kind!r}")
    if kind == "asyncio":
        return kind
    try:
        importlib.import_module("uvloop")
    except ImportError:
        if kind == "uvloop":
            raise ImportError("uvloop is not installed (pip install uvloop, or derpnet[fast])") from None
        return "asyncio"
    return "uvloop"


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new event loop of `kind` (see resolve)."""
    if resolve(kind) == "uvloop":
        new_loop: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module("uvloop").new_event_loop
        return new_loop
    return asyncio.new_event_loop


def bind_error(e: OSError) -> OSError:
    """The OSError that says why a bind failed: uvloop raises one without an errno
    ("could not bind to local_addr") from the one with it."""
    cause = e.__cause__ or e.__context__
    if e.errno is None and isinstance(cause, OSError) and cause.errno is not None:
        return cause
    return e
