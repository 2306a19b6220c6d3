"""A derpquic peer as a separate process, for tests that kill it (python -m tests.faults.peer).

    python -m tests.faults.peer RELAY_URL PUBKEY

Dials PUBKEY through the relay, prints "streaming <our key>" once the stream is open,
then sends random bytes until it is killed.
"""

from __future__ import annotations

import os
import sys

import derpquic


def main() -> None:
    relay, pubkey = sys.argv[1], sys.argv[2]
    dialer = derpquic.Dialer(relay)
    stream = dialer.dial(pubkey, timeout=30)
    print(f"streaming {dialer.addr.b64()}", flush=True)
    chunk = os.urandom(1 << 20)
    while True:
        stream.sendall(chunk)


if __name__ == "__main__":
    main()
