"""The relay's persistent identity: load the server key from a file, creating it (0600) if missing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .._files import write_atomic
from ..keys import PrivateKey

__all__ = ["load_or_create_key"]


def load_or_create_key(path: Union[str, "os.PathLike[str]"]) -> PrivateKey:
    """Read the key at `path` (ours, derper's JSON or 32 raw bytes), or generate and save a new one."""
    p = Path(path)
    try:
        return PrivateKey.load(p)
    except FileNotFoundError:
        pass
    key = PrivateKey.generate()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # Never rename over a key another process (a second relay starting on the same
        # file) wrote meanwhile: its clients already know that identity. Use theirs.
        write_atomic(p, (key.to_text() + "\n").encode(), 0o600, exclusive=True)
    except FileExistsError:
        return PrivateKey.load(p)
    return key
