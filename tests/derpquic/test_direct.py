"""derpquic with direct paths on (the library default), through a real relay on loopback:
streams survive the path switch, and a known peer that left fails a dial fast."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

import derpnet
import derpquic
from derpnet.paths import PathChanged
from tests.relays import OurRelay


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


def test_a_stream_moves_to_the_direct_path_intact(relay):
    direct = threading.Event()
    pc_b = derpnet.listen_packet(relay.url, on_event=lambda e: isinstance(e, PathChanged) and e.direct
                                 and direct.set())
    with derpquic.listen(pc_b) as ln, derpquic.Dialer(relay.url) as d:
        try:
            payload = os.urandom(24 << 20)
            got = hashlib.sha256()

            def serve():
                with ln.accept() as s:
                    while True:
                        b = s.recv(1 << 16)
                        if not b:
                            break
                        got.update(b)

            t = threading.Thread(target=serve, name="test-serve")
            t.start()
            with d.dial(pc_b.local_addr(), timeout=10) as s:
                s.sendall(payload[:1 << 20])      # over the relay; the key proofs start discovery
                assert direct.wait(10), "no direct path on loopback"
                s.sendall(payload[1 << 20:])      # the rest mostly over UDP
            t.join(30)
            assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
            info = pc_b.paths()[d.packet_conn.local_addr()]
            assert info["path"].startswith("127.0.0.1:") and info["bytes_received"]["direct"] > 8 << 20
        finally:
            pc_b.close()


def test_dialling_a_known_peer_that_left_fails_fast(relay):
    pc_b = derpnet.listen_packet(relay.url)
    b = pc_b.local_addr()
    with derpquic.Dialer(relay.url, reuse_connections=False) as d:
        with derpquic.listen(pc_b) as ln:
            s = d.dial(b, timeout=10)  # B proves it is ours: A may now send it disco
            ln.accept(timeout=10).close()
            s.close()
        pc_b.close()
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError, match="not connected to the relay"):
            d.dial(b, timeout=15)
        assert time.monotonic() - start < 5  # not the 15 s dial timeout


def test_dialling_a_key_nobody_holds_fails_in_a_round_trip(relay):
    """Our relay answers a packet to an unknown key with PeerGone(NotHere) (derper does so
    for disco packets only): the dial fails at once, not at its timeout."""
    nobody = derpnet.PrivateKey.generate().public_key
    with derpquic.Dialer(relay.url, direct=False) as d:
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError, match="not connected to the relay"):
            d.dial(nobody, timeout=15)
        assert time.monotonic() - start < 2  # one relay round trip, not the 15 s dial timeout
