"""Process-wide tuning for a relay process (the CLI only, never a library's host process).

Layer: relay server (startup). glibc's malloc gives the top of the heap back to the kernel
when more than M_TRIM_THRESHOLD is free there (128 KiB to start with), and serves requests
above M_MMAP_THRESHOLD with mmap. A relay frees and allocates payloads of up to 64 KiB and
batches of 128 KiB all the time, so with the defaults the heap shrinks and grows (brk) and
fresh pages are faulted in and zeroed for packet after packet: measured, a quarter of the
relay's CPU time in a 64 KiB single flow over TLS went to copying into fresh pages. Fixed
thresholds (16 MiB trim, 1 MiB mmap) keep that memory in the process; peak RSS does not
change. And the objects of the startup are frozen out of the garbage collector's scans.
README, "Relay performance".
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys

__all__ = ["tune_malloc", "freeze_startup_objects", "TRIM_THRESHOLD", "MMAP_THRESHOLD"]

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 16 << 20
MMAP_THRESHOLD = 1 << 20


def tune_malloc() -> bool:
    """Set glibc's trim and mmap thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("relay: malloc thresholds %s (trim %d, mmap %d)", "set" if ok else "NOT set",
              TRIM_THRESHOLD, MMAP_THRESHOLD)
    return ok


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, classes, the server) out of the garbage
    collector's way: its full collections then only scan what the connections created
    (profiled: up to 6 % of a busy relay's time was the collector)."""
    gc.collect()
    gc.freeze()
