"""QUIC DATAGRAM frames between derpnet peers (derpquic.datagrams), through a real relay:
echoed both ways intact, a channel per connection, size and queue bounds, and a clear
refusal when the peer's listener does not take datagrams."""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import pytest

import derpquic
from derpnet.keys import PrivateKey
from tests.relays import OurRelay


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


def _echo(listener, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            data, channel = listener.recv_datagram(timeout=0.2)
        except TimeoutError:
            continue
        except OSError:
            return
        channel.send(data)


def test_datagrams_echo_intact(relay):
    ka = PrivateKey.generate()
    with derpquic.listen(relay.url, ka, datagrams=True, direct=False) as ln, \
            derpquic.Dialer(relay.url, datagrams=True, direct=False) as d:
        stop = threading.Event()
        t = threading.Thread(target=_echo, args=(ln, stop), name="test-echo", daemon=True)
        t.start()
        try:
            ch = d.datagram_channel(ka.public_key, timeout=20)
            assert ch is d.datagram_channel(ka.public_key)  # one per connection
            assert ch.remote_addr() == ka.public_key and ch.peer_key == ka.public_key
            assert ch.max_size > 1200
            sent = {}
            for i in range(200):
                payload = os.urandom(16 + i * 5)
                sent[hashlib.sha256(payload).digest()] = payload
                assert ch.send(payload)
            got = 0
            while got < 200:
                try:
                    data, back = d.recv_datagram(timeout=5)
                except TimeoutError:
                    break  # loss is allowed; corruption is not
                assert back is ch
                assert hashlib.sha256(data).digest() in sent, "a datagram that was never sent"
                got += 1
            assert got >= 150, f"only {got} of 200 echoed on loopback"
            with pytest.raises(ValueError, match="exceeds"):
                ch.send(b"x" * (ch.max_size + 1))
            assert ch.send(b"y" * ch.max_size)
        finally:
            stop.set()
            t.join(5)


def test_a_listener_without_datagrams_is_refused_clearly(relay):
    ka = PrivateKey.generate()
    with derpquic.listen(relay.url, ka, direct=False), \
            derpquic.Dialer(relay.url, datagrams=True, direct=False) as d:
        with pytest.raises(OSError, match="takes no datagrams") as e:
            d.datagram_channel(ka.public_key, timeout=20)
        assert e.value.errno == errno.EPROTONOSUPPORT


def test_datagrams_need_the_option(relay):
    with derpquic.Dialer(relay.url, direct=False) as d:
        with pytest.raises(ValueError):
            d.datagram_channel(PrivateKey.generate().public_key)
        with pytest.raises(ValueError):
            d.recv_datagram(timeout=0)
