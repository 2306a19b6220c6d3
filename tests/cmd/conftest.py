"""Fixtures the CLI tests share."""

from __future__ import annotations

import socket
import threading

import pytest


@pytest.fixture
def blackhole():
    """A TCP port that accepts connections and never says a word (a relay that hangs)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def loop() -> None:
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=loop, name="blackhole", daemon=True)
    t.start()
    yield s.getsockname()[1]
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    s.close()
