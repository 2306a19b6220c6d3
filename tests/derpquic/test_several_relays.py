"""derpquic over two relays at once (derpnet.relayset): the relay carrying a stream is
killed mid-transfer, and the transfer completes through the other one, SHA-256 intact; so
do QUIC datagrams; a key that no relay holds fails the dial fast."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

import derpquic
from derpnet.errors import PeerNotConnected
from derpnet.keys import PrivateKey
from tests.relays import OurRelay

SIZE = 24 << 20
KILL_AT = 6 << 20


def test_killing_the_relay_in_use_mid_transfer_keeps_the_stream(tmp_path):
    blob = os.urandom(SIZE)
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    with OurRelay(workdir=str(tmp_path / "a")) as a, OurRelay(workdir=str(tmp_path / "b")) as b, \
            derpquic.listen([a.url, b.url], ka, direct=False) as ln, \
            derpquic.Dialer([b.url, a.url], kb, direct=False) as dialer:
        halfway = threading.Event()
        result: dict = {}

        def receive() -> None:
            s = ln.accept(timeout=20)
            h, got = hashlib.sha256(), 0
            s.settimeout(60)
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                h.update(data)
                got += len(data)
                if got >= KILL_AT:
                    halfway.set()
            result.update(digest=h.hexdigest(), got=got)
            s.close()

        receiver = threading.Thread(target=receive, name="test-receiver", daemon=True)
        receiver.start()
        s = dialer.dial(ka.public_key, timeout=20)
        sender = threading.Thread(target=lambda: (s.sendall(blob), s.shutdown(1)), name="test-sender", daemon=True)
        sender.start()
        assert halfway.wait(60), "no progress before the kill"
        used = dialer.packet_conn.relay_for(ka.public_key)
        assert used in (a.url, b.url)
        (a if used == a.url else b).kill()
        receiver.join(90)
        sender.join(10)
        assert result.get("got") == SIZE, result
        assert result["digest"] == hashlib.sha256(blob).hexdigest()
        assert dialer.packet_conn.relay_for(ka.public_key) in ((b.url if used == a.url else a.url), None)
        s.close()


def test_a_key_on_no_relay_fails_fast_once_every_relay_said_so(tmp_path):
    """Each of our relays answers PeerGone(NotHere) for a key it does not hold; once both
    have, the dial fails at once rather than at its timeout (one relay's word is not
    enough: the peer could be on the other)."""
    with OurRelay(workdir=str(tmp_path / "a")) as a, OurRelay(workdir=str(tmp_path / "b")) as b, \
            derpquic.Dialer([a.url, b.url], direct=False) as dialer:
        t0 = time.monotonic()
        with pytest.raises(PeerNotConnected):
            dialer.dial(PrivateKey.generate().public_key, timeout=20)
        assert time.monotonic() - t0 < 10


def test_datagrams_go_on_through_the_other_relay(tmp_path):
    """QUIC datagrams over two relays: the relay in use is killed, and datagrams sent after
    that arrive through the other one, intact."""
    ka = PrivateKey.generate()
    with OurRelay(workdir=str(tmp_path / "a")) as a, OurRelay(workdir=str(tmp_path / "b")) as b, \
            derpquic.listen([a.url, b.url], ka, datagrams=True, direct=False) as ln, \
            derpquic.Dialer([a.url, b.url], datagrams=True, direct=False) as dialer:
        channel = dialer.datagram_channel(ka.public_key, timeout=20)

        channel.send(b"before")
        assert ln.recv_datagram(timeout=10)[0] == b"before"
        used = dialer.packet_conn.relay_for(ka.public_key)
        (a if used == a.url else b).kill()
        deadline = time.monotonic() + 30
        streak = i = 0
        while streak < 5:  # until five in a row came back: the other relay carries them
            assert time.monotonic() < deadline, "no datagrams through the other relay"
            payload = b"after-%d" % i
            i += 1
            channel.send(payload)  # (lost while our link notices the kill)
            try:
                data, _ = ln.recv_datagram(timeout=1)
            except TimeoutError:
                streak = 0
                continue
            assert data.startswith(b"after-") and int(data[6:]) < i, data  # never altered or invented
            streak = streak + 1 if data == payload else 0
