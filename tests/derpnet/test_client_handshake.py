"""The relay link's DERP handshake (derpnet.client.derp_handshake) against a relay in memory.
Pure: the handshake's I/O is an object with send() and read(); no sockets, no threads."""

from __future__ import annotations

from collections import deque

import pytest

from derpnet import frames as F
from derpnet.client import derp_handshake
from derpnet.connection import (
    AcceptClient,
    AcceptUpgrade,
    ClientConnection,
    ClientHello,
    Connected,
    ServerConnection,
    UpgradeRequest,
)
from derpnet.errors import HandshakeError, UpgradeError
from derpnet.keys import PrivateKey

SERVER = PrivateKey.generate()
CLIENT = PrivateKey.generate()


class MemoryRelay:
    """Plays the relay with a ServerConnection; `read()` hands out what it answered, in
    pieces of `chunk` bytes; `after_hello` is sent right behind the ServerInfo."""

    def __init__(self, *, chunk: int = 1 << 20, after_hello: bytes = b"", stop_after: str = "") -> None:
        self.conn = ServerConnection(SERVER)
        self.chunk = chunk
        self.after_hello = after_hello
        self.stop_after = stop_after
        self.out = bytearray()
        self.hello: ClientHello | None = None
        self.stopped = False

    def send(self, data: bytes) -> None:
        if self.stopped:
            return
        events = self.conn.receive_data(data)
        for ev in events:
            if isinstance(ev, UpgradeRequest):
                self.out += self.conn.send(AcceptUpgrade())
                if self.stop_after == "server-key":
                    self.stopped = True
                    return
                events.extend(self.conn.receive_data(b""))
            elif isinstance(ev, ClientHello):
                self.hello = ev
                if self.stop_after == "client-info":
                    return
                self.out += self.conn.send(AcceptClient()) + self.after_hello

    def read(self) -> bytes:
        piece = bytes(self.out[:self.chunk])
        del self.out[:self.chunk]
        return piece


@pytest.mark.parametrize("chunk", [1, 7, 45, 1 << 20])
def test_handshake_in_any_pieces(chunk):
    relay = MemoryRelay(chunk=chunk)
    connected, early = derp_handshake(ClientConnection(CLIENT, "relay.example"), relay)
    assert connected == Connected(SERVER.public_key, {"version": 2})
    assert early == [] and relay.hello is not None and relay.hello.key == CLIENT.public_key


def test_frames_behind_the_server_info_are_returned():
    behind = F.encode_recv_packet(SERVER.public_key, b"early") + F.encode_health("hi")
    _, early = derp_handshake(ClientConnection(CLIENT, "h"), MemoryRelay(after_hello=behind))
    assert early == [F.RecvPacket(SERVER.public_key, b"early"), F.Health("hi")]


@pytest.mark.parametrize("stop_after", ["server-key", "client-info"])
def test_relay_hanging_up_midway_is_a_handshake_error(stop_after):
    with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
        derp_handshake(ClientConnection(CLIENT, "h"), MemoryRelay(stop_after=stop_after))


class Scripted:
    """Answers with fixed bytes, whatever the client sends."""

    def __init__(self, *replies: bytes) -> None:
        self.replies = deque(replies)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def read(self) -> bytes:
        return self.replies.popleft() if self.replies else b""


def test_an_http_error_page_is_an_upgrade_error_with_its_status():
    io = Scripted(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")
    with pytest.raises(UpgradeError) as ei:
        derp_handshake(ClientConnection(CLIENT, "h"), io)
    assert ei.value.status == 404 and io.sent[0].startswith(b"GET /derp HTTP/1.1\r\n")


def test_a_server_info_that_does_not_open_is_a_handshake_error():
    head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + F.encode_server_key(SERVER.public_key)
    bogus = F.encode_server_info(bytes(24 + 16 + 10))
    with pytest.raises(HandshakeError, match="does not open"):
        derp_handshake(ClientConnection(CLIENT, "h"), Scripted(head, bogus))


def test_the_client_sends_exactly_upgrade_then_client_info():
    io = Scripted(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + F.encode_server_key(SERVER.public_key))
    with pytest.raises(HandshakeError):
        derp_handshake(ClientConnection(CLIENT, "h"), io)
    assert len(io.sent) == 2 and io.sent[1][0] == F.FrameType.CLIENT_INFO
    d = F.FrameDecoder(F.Role.SERVER)
    d.feed(io.sent[1])
    [ci] = list(d.events())
    assert ci.key == CLIENT.public_key
