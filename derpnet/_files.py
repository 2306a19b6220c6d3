"""Atomic file writes with an explicit mode (private keys 0600, public documents 0644)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write `data` to `path` via a temporary file in the same directory, created with
    `mode` from the start (a secret is never readable by others, even briefly), then
    renamed over the target so readers see the old or the new file, never half of one.

    `exclusive`: never replace an existing file (FileExistsError), even one another
    process creates at the same moment: the file is linked into place, not renamed."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".tmp-{p.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, p)
            os.unlink(tmp)
        else:
            os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
