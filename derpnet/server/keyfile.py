"""The relay's persistent identity: load the server key from a file, creating it (0600) if missing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._files import write_atomic
from ..keys import PrivateKey, key_file_mode_problem

__all__ = ["load_or_create_key"]

log = logging.getLogger(__name__)


def load_or_create_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read the key at `path` (ours, derper's JSON or 32 raw bytes), or generate and save a new one.
    A key file other users can read is used, with a warning (as the CLI does for node keys)."""
    p = Path(path)
    try:
        key = PrivateKey.load(p)
    except FileNotFoundError:
        pass
    else:
        problem = key_file_mode_problem(p)
        if problem:
            log.warning("relay: %s", problem)
        return key
    key = PrivateKey.generate()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # Never rename over a key another process (a second relay starting on the same
        # file) wrote meanwhile: its clients already know that identity. Use theirs.
        write_atomic(p, (key.to_text() + "\n").encode(), 0o600, exclusive=True)
    except FileExistsError:
        return PrivateKey.load(p)
    return key
