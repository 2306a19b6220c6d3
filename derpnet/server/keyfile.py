"""The relay's persistent identity: load the server key from a file, creating it (0600) if missing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..keys import PrivateKey

__all__ = ["load_or_create_key"]


def load_or_create_key(path: Union[str, "os.PathLike[str]"]) -> PrivateKey:
    """Read the key at `path` (ours, derper's JSON or 32 raw bytes), or generate and save a new one."""
    p = Path(path)
    try:
        return PrivateKey.load(p)
    except FileNotFoundError:
        key = PrivateKey.generate()
        key.save(p)
        return key
