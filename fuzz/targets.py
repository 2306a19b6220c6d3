"""Fuzz targets for the DERP codec and both handshakes, shared by the atheris fuzzer
(fuzz/derp_fuzz.py) and the corpus replay test (tests/test_fuzz_corpus.py).

The property: whatever bytes arrive, the sans-IO layer raises nothing but derpnet's own
ProtocolError/HandshakeError, and never buffers more than it was given.
"""

from __future__ import annotations

from derpnet import frames as F
from derpnet.connection import AcceptClient, AcceptUpgrade, ClientConnection, Hello, ServerConnection, State
from derpnet.errors import ProtocolError
from derpnet.keys import PrivateKey

# Fixed keys so that checked-in seeds (which contain sealed boxes) stay valid.
SERVER = PrivateKey(bytes(range(1, 33)))
CLIENT = PrivateKey(bytes(range(101, 133)))

TARGETS = ("frames-client", "frames-server", "client-handshake", "server-handshake")


def _chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def run(data: bytes) -> None:
    """One input: byte 0 picks the target, byte 1 the chunk size, the rest is the stream."""
    if len(data) < 2:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    size = 1 + data[1] % 64
    stream = data[2:]
    try:
        if target.startswith("frames-"):
            d = F.FrameDecoder(F.Role(target.split("-")[1]))
            for part in _chunks(stream, size):
                d.feed(part)
                for ev in d.events():
                    assert isinstance(ev, F.Frame), ev
                assert d.buffered <= len(stream)
        elif target == "client-handshake":
            c = ClientConnection(CLIENT, "fuzz")
            for part in _chunks(stream, size):
                evs = c.receive_data(part)
                while c.state is State.SEND_HELLO:
                    c.send(Hello())
                    evs = c.receive_data(b"")
                for ev in evs:
                    if isinstance(ev, F.Ping):
                        c.send(ev.response())
            c.receive_eof()
        else:
            s = ServerConnection(SERVER)
            for part in _chunks(stream, size):
                s.receive_data(part)
                if s.state is State.AWAIT_ACCEPT:
                    s.send(AcceptUpgrade())
                    s.receive_data(b"")
                if s.state is State.AWAIT_SERVER_INFO:
                    s.send(AcceptClient())
                    s.receive_data(b"")
                if s.state is State.CLOSED:
                    break
    except ProtocolError:  # HandshakeError included
        pass


def seeds() -> dict:
    """Valid and near-valid inputs to start from, one per target and shape."""
    from derpnet.handshake import seal_client_info, seal_server_info
    k = CLIENT.public_key
    server_stream = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                     + F.encode_server_key(SERVER.public_key)
                     + F.encode_server_info(seal_server_info(SERVER, k))
                     + F.encode_recv_packet(k, b"\x00hello") + F.encode_ping(b"12345678")
                     + F.encode_peer_gone(k, 1) + F.encode_health("x") + F.encode_restarting(1, 2)
                     + F.encode_frame(0x0C, b"unknown"))
    client_stream = (b"GET /derp HTTP/1.1\r\nHost: fuzz\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                     b"Derp-Fast-Start: 1\r\n\r\n"
                     + F.encode_client_info(k, seal_client_info(CLIENT, SERVER.public_key))
                     + F.encode_send_packet(k, b"\x00hi") + F.encode_note_preferred(True)
                     + F.encode_ping(b"abcdefgh") + F.encode_frame(0x13, b"pongpong"))
    return {
        "frames-client": bytes([0, 7]) + server_stream.split(b"\r\n\r\n", 1)[1],
        "frames-server": bytes([1, 3]) + client_stream.split(b"\r\n\r\n", 1)[1],
        "client-handshake": bytes([2, 63]) + server_stream,
        "client-fast-start": bytes([2, 1]) + server_stream.split(b"\r\n\r\n", 1)[1],
        "client-404": bytes([2, 10]) + b"HTTP/1.1 404 Not Found\r\n\r\n<html>",
        "server-handshake": bytes([3, 63]) + client_stream,
        "server-probe": bytes([3, 5]) + b"HEAD /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n",
        "server-huge-length": bytes([1, 63]) + b"\x04\xff\xff\xff\xff",
    }
