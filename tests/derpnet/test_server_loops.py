"""The relay process: its malloc tuning, and the relay on both event loops (`--event-loop
asyncio` and `uvloop`) over TLS, where the hot path (shared receive buffer, TLS records split
across reads, frames split across records, many frames per read) must forward every byte,
in order."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from derpnet import frames as F
from derpnet.server import loops
from tests.rawderp import RawDerpClient
from tests.relays import REPO_ROOT, OurRelay

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
KINDS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    not HAVE_UVLOOP, reason="uvloop is not installed (pip install '.[test]' installs it)"))]


@pytest.mark.parametrize("kind", KINDS)
def test_forwards_every_byte_in_order(kind):
    with OurRelay(tls=True, extra_args=["--event-loop", kind]) as relay:
        ctx = relay.ssl_context()
        with RawDerpClient(relay.url, ssl_context=ctx) as a, RawDerpClient(relay.url, ssl_context=ctx) as b:
            # Sizes from 1 byte to the 64 KiB limit, written in one go: TLS records and
            # frames straddle the relay's reads; a window of 16 stays within its queue.
            sizes = [1, 100, 1200, 16 << 10, (16 << 10) + 1, 40_000, 64 << 10] * 6
            sent = [os.urandom(n) for n in sizes]
            got: list[bytes] = []
            for i in range(0, len(sent), 16):
                window = sent[i:i + 16]
                a.send_raw(b"".join(F.encode_send_packet(b.public_key, p) for p in window))
                got += [b.recv_packet(timeout=10).data for _ in window]
            assert got == sent
            b.send(a.public_key, b"back")
            assert a.recv_packet(timeout=10).data == b"back"
    assert "Traceback" not in relay.output()


def test_event_loop_choice():
    assert loops.resolve("asyncio") == "asyncio"
    assert loops.resolve("auto") == ("uvloop" if HAVE_UVLOOP else "asyncio")
    with pytest.raises(ValueError, match="event loop must be one of"):
        loops.resolve("trio")
    if not HAVE_UVLOOP:
        with pytest.raises(ImportError, match="uvloop is not installed"):
            loops.resolve("uvloop")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is for glibc only")
def test_malloc_tuning_takes_on_glibc():
    code = "from derpnet.server.tuning import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    assert out.stdout.strip() == "True", out.stderr
