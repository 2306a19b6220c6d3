"""A relay's side of the mesh, the same checks against ours and Tailscale's derper: what a
client with the mesh key may do (WatchConns, ForwardPacket, ClosePeer) and what it is told."""

from __future__ import annotations

import contextlib
import socket

import pytest

from derpnet import frames as F
from derpnet.keys import PrivateKey
from tests.conftest import missing_go_peer
from tests.derpnet.meshnet import write_mesh_key
from tests.interop_peers import GoDerper, derper_path, skip_reason
from tests.rawderp import RawDerpClient
from tests.relays import OurRelay

KINDS = ["ours", pytest.param("go", marks=pytest.mark.interop)]


@pytest.fixture(params=KINDS)
def relay(request, tmp_path):
    """(url, mesh key hex) of a relay of that kind with a mesh key and no mesh members."""
    key_file = write_mesh_key(tmp_path / "mesh.key")
    if request.param == "ours":
        with OurRelay(workdir=str(tmp_path / "r"), extra_args=["--mesh-psk-file", str(key_file)]) as r:
            yield r.url, key_file.read_text().strip()
        return
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    with GoDerper(tmp_path / "d", extra_args=["-mesh-psk-file", str(key_file)]) as d:
        yield d.url, key_file.read_text().strip()


def mesh_client(url: str, mesh_key: str) -> RawDerpClient:
    return RawDerpClient(url, client_info={"version": 2, "CanAckPings": True, "meshKey": mesh_key})


def _port(c: RawDerpClient) -> int:
    return c.sock.getsockname()[1]


def test_watcher_is_told_who_comes_and_goes(relay):
    url, key = relay
    with contextlib.ExitStack() as stack:
        x = stack.enter_context(RawDerpClient(url))
        w = stack.enter_context(mesh_client(url, key))
        w.send_raw(F.encode_watch_conns())
        flood = _presents(w, {x.public_key, w.public_key})
        px = flood[x.public_key]
        assert px.ip == b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1") and px.port == _port(x)
        assert px.flags == F.PeerPresentFlags.IS_REGULAR
        assert flood[w.public_key].flags == F.PeerPresentFlags.IS_MESH_PEER
        with RawDerpClient(url) as y:
            came = w.recv(F.PeerPresent)
            assert came.key == y.public_key and came.port == _port(y)
        gone = w.recv(F.PeerGone)
        assert (gone.key, gone.reason) == (y.public_key, F.PeerGoneReason.DISCONNECTED)


def _presents(w: RawDerpClient, want: set) -> dict:
    """PeerPresent frames until every key in `want` was seen (derper writes the flood from
    another goroutine: it may come after frames sent later); any other frame is an error."""
    seen: dict = {}
    while not want <= set(seen):
        ev = w.recv(F.PeerPresent, timeout=5)
        seen[ev.key] = ev
    assert set(seen) == want
    return seen


def test_forward_packet_and_close_peer(relay):
    url, key = relay
    src = PrivateKey.generate().public_key  # a client of another member
    with RawDerpClient(url) as x, mesh_client(url, key) as w:
        w.send_raw(F.encode_forward_packet(src, x.public_key, b"via the mesh"))
        got = x.recv_packet()
        assert (got.src, got.data) == (src, b"via the mesh")
        w.send_raw(F.encode_close_peer(x.public_key))
        assert x.wait_closed(5)
        w.sync()  # the mesh peer itself stays


@pytest.mark.parametrize("frame", [F.encode_watch_conns(), F.encode_close_peer(PrivateKey.generate().public_key),
                                   F.encode_forward_packet(PrivateKey.generate().public_key,
                                                           PrivateKey.generate().public_key, b"x")])
def test_mesh_frames_from_a_regular_client_close_it(relay, frame):
    url, _ = relay
    with RawDerpClient(url) as c:
        c.send_raw(frame)
        assert c.wait_closed(5)


def test_wrong_mesh_key_never_watches(relay):
    """derper admits it as a regular client and closes it at WatchConns; ours refuses it at its hello."""
    url, _ = relay
    try:
        c = mesh_client(url, "00" * 32)
    except ConnectionError:
        return  # ours
    with c:
        c.send_raw(F.encode_watch_conns())
        assert c.wait_closed(5)
