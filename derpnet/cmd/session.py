"""Starting and ending a long-running command: connecting to the relay within a bounded time,
and making sure the process really ends once the command is done."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..derpmap import RelayTarget
from ..errors import DerpError
from .common import EXIT_FAILURE, Stopper, UserError, describe_error, run_bounded

log = logging.getLogger("derpnet.cmd")

T = TypeVar("T")


def connect_relay(target: RelayTarget, connect: Callable[[str], T], timeout: float,
                  stop: Stopper) -> tuple[T, str]:
    """connect(host) for each candidate relay host in turn (the nodes of a region), within
    `timeout` seconds overall. Returns (result, host). One UserError line when none works."""
    deadline = time.monotonic() + timeout
    errors = []
    for i, host in enumerate(target.hosts):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if len(target.hosts) > 1:
            left = max(min(left, timeout / 2), 1.0) if i < len(target.hosts) - 1 else left
        log.debug("connecting to relay %s", host)
        try:
            return run_bounded(functools.partial(connect, host), left, f"relay {host}", stop), host
        except UserError as e:  # timed out
            errors.append(str(e))
        except (OSError, DerpError, ValueError) as e:
            errors.append(describe_error(e, host))
        if len(target.hosts) > 1 and i < len(target.hosts) - 1:
            log.warning("%s; trying the next node of %s", errors[-1], target.describe())
    if not errors:
        errors.append(f"{target.describe()}: no answer within {timeout:g} s")
    raise UserError(f"cannot connect: {errors[-1]}", EXIT_FAILURE)


def hard_exit_if_stuck(code: int, grace: float = 0.3) -> None:
    """Called by the command-line entry point when a long-running command is done (its
    error line already printed): if non-daemon threads (a library's that did not stop in
    time) would keep the interpreter alive, end the process now with `code` rather than
    hang. The command has already closed what it owns."""
    deadline = time.monotonic() + grace
    while True:
        stuck = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and not t.daemon and t.is_alive()]
        if not stuck:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    log.debug("threads still running at exit: %s", ", ".join(t.name for t in stuck))
    _exit_now(code)


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    logging.shutdown()
    os._exit(code)
