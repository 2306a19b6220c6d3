"""The event contract (derpnet.events, frames as events, `frames.encode`), the error taxonomy
and the package's public surface. Pure: no sockets, no threads."""

from __future__ import annotations

import dataclasses
import pydoc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import derpnet
from derpnet import errors as E
from derpnet import events as ev
from derpnet import frames as F
from derpnet.http11 import Request
from derpnet.keys import PrivateKey

K1 = PrivateKey.generate().public_key
K2 = PrivateKey.generate().public_key


# ---------------------------------------------------------------- Event

def test_every_event_kind_derives_from_event():
    kinds = [F.RecvPacket(K1, b"x"), F.Ping(b"12345678"), F.UnknownFrame(0x7F, 3),
             ev.Connected(K1, {}), ev.UpgradeRequest(Request(), False), ev.HttpRequest(Request()),
             ev.ClientHello(K1), ev.Upgrade(), ev.Hello(), ev.AcceptUpgrade(), ev.Reject(400), ev.AcceptClient()]
    assert all(isinstance(k, ev.Event) for k in kinds)
    assert all(isinstance(k, F.Frame) for k in kinds[:3])
    assert not any(isinstance(k, F.Frame) for k in kinds[3:])


def test_event_base_has_no_fields_and_suits_frozen_dataclasses():
    assert ev.Event.__slots__ == () and not dataclasses.is_dataclass(ev.Event)

    @dataclasses.dataclass(frozen=True)
    class LinkSomething(ev.Event):  # the way link events (LinkUp, PathChanged) are declared
        generation: int
        note: str = ""

    e = LinkSomething(3)
    assert isinstance(e, ev.Event) and e == LinkSomething(3, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.generation = 4  # type: ignore[misc]
    assert isinstance(ev.Event(), ev.Event)  # the bare base is constructible with no arguments


def test_events_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.ClientHello(K1).key = K2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        F.Ping(b"12345678").data = b""  # type: ignore[misc]


def dispatch(e: ev.Event) -> str:
    match e:
        case F.RecvPacket(src=src, data=data):
            return f"packet {len(data)} from {src == K1}"
        case F.Ping(data=data):
            return f"ping {data!r}"
        case F.Frame():
            return type(e).__name__
        case ev.Connected(server_key=key):
            return f"connected {key == K2}"
        case ev.ClientHello(key=key, info=info):
            return f"hello {sorted(info)}"
        case _:
            return "other"


@pytest.mark.parametrize("event, expected", [
    (F.RecvPacket(K1, b"abc"), "packet 3 from True"),
    (F.Ping(b"pingping"), "ping b'pingping'"),
    (F.KeepAlive(), "KeepAlive"),
    (F.PeerGone(K1, 1), "PeerGone"),
    (ev.Connected(K2, {"version": 2}), "connected True"),
    (ev.ClientHello(K1, {"version": 2, "b": 1}), "hello ['b', 'version']"),
    (ev.Upgrade(), "other"),
])
def test_match_dispatch(event, expected):
    assert dispatch(event) == expected


def test_ping_response_is_the_matching_pong():
    assert F.Ping(b"abcdefgh").response() == F.Pong(b"abcdefgh")


# ---------------------------------------------------------------- frames.encode

_KEYS = st.sampled_from([K1, K2])
_MILLIS = st.integers(0, 10**6).map(lambda ms: ms / 1000)  # Restarting carries milliseconds
_CLIENT_FRAMES = st.one_of(  # what a relay sends (a client decodes)
    st.builds(F.RecvPacket, _KEYS, st.binary(max_size=300)),
    st.just(F.KeepAlive()),
    st.builds(F.PeerGone, _KEYS, st.sampled_from(list(F.PeerGoneReason))),
    st.builds(F.PeerPresent, _KEYS, st.binary(min_size=16, max_size=16), st.integers(0, 65535), st.integers(0, 255)),
    st.builds(F.PeerPresent, _KEYS),
    st.builds(F.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(F.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(F.Health, st.text(max_size=50)),
    st.builds(F.Restarting, _MILLIS, _MILLIS),
    st.builds(F.ServerKey, _KEYS),
    st.builds(F.ServerInfo, st.binary(min_size=24, max_size=100)),
)
_SERVER_FRAMES = st.one_of(  # what a client sends (a relay decodes)
    st.builds(F.SendPacket, _KEYS, st.binary(max_size=300)),
    st.builds(F.NotePreferred, st.booleans()),
    st.builds(F.ForwardPacket, _KEYS, _KEYS, st.binary(max_size=300)),
    st.just(F.WatchConns()),
    st.builds(F.ClosePeer, _KEYS),
    st.builds(F.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(F.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(F.ClientInfo, _KEYS, st.binary(min_size=24, max_size=100)),
)


def _decode(role: F.Role, data: bytes) -> list:
    d = F.FrameDecoder(role)
    d.feed(data)
    return list(d.events())


@settings(max_examples=300, deadline=None)
@given(st.lists(_CLIENT_FRAMES, max_size=10))
def test_encode_then_decode_is_identity_client_side(frames):
    assert _decode(F.Role.CLIENT, b"".join(map(F.encode, frames))) == frames


@settings(max_examples=300, deadline=None)
@given(st.lists(_SERVER_FRAMES, max_size=10))
def test_encode_then_decode_is_identity_server_side(frames):
    assert _decode(F.Role.SERVER, b"".join(map(F.encode, frames))) == frames


def test_encode_matches_the_specific_encoders():
    assert F.encode(F.SendPacket(K1, b"\x00abc")) == F.encode_send_packet(K1, b"\x00", b"abc")
    assert F.encode(F.KeepAlive()) == bytes.fromhex("0600000000")
    assert F.encode(F.NotePreferred(True)) == bytes.fromhex("070000000101")


def test_encode_refuses_what_has_no_wire_form():
    with pytest.raises(E.LocalProtocolError):
        F.encode(F.UnknownFrame(0x7F, 0))
    with pytest.raises(E.LocalProtocolError):
        F.encode(F.Ping(b"short"))  # pings are 8 bytes
    with pytest.raises(E.LocalProtocolError):
        F.encode(F.SendPacket(K1, bytes(F.MAX_PACKET_SIZE + 1)))


# ---------------------------------------------------------------- roles and limits

def test_roles_are_an_enum_and_strings_are_coerced():
    assert F.FrameDecoder(F.Role.SERVER).role is F.Role.SERVER
    assert F.FrameDecoder("client").role is F.Role.CLIENT  # type: ignore[arg-type]
    assert F.FrameDecoder().role is F.Role.CLIENT
    with pytest.raises(ValueError):
        F.FrameDecoder("relay")  # type: ignore[arg-type]


def test_limits_have_a_separate_default():
    assert F.CLIENT_LIMITS.limit(F.FrameType.RECV_PACKET) == 32 + F.MAX_PACKET_SIZE
    assert F.CLIENT_LIMITS.limit(F.FrameType.HEALTH) == F.CLIENT_LIMITS.default == 1 << 20
    assert F.SERVER_LIMITS.limit(F.FrameType.PING) == 1000
    assert all(isinstance(k, int) for k in F.CLIENT_LIMITS.per_type)


def test_custom_limits_are_enforced_on_the_header():
    d = F.FrameDecoder(F.Role.CLIENT, F.FrameLimits({F.FrameType.HEALTH: 4}, default=100))
    d.feed(F.encode_health("okay"))
    assert list(d.events()) == [F.Health("okay")]
    d.feed(F.encode_frame(F.FrameType.HEALTH, b"12345")[:5])  # the header alone is enough
    with pytest.raises(E.RemoteProtocolError, match="exceeds limit 4"):
        list(d.events())
    d = F.FrameDecoder(F.Role.CLIENT, F.FrameLimits({}, default=10))
    d.feed(F.encode_frame(0x7F, bytes(11))[:5])
    with pytest.raises(E.RemoteProtocolError, match="exceeds limit 10"):
        list(d.events())


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("cls, parents", [
    (E.ProtocolError, [E.DerpError]),
    (E.RemoteProtocolError, [E.ProtocolError, E.DerpError]),
    (E.LocalProtocolError, [E.ProtocolError, E.DerpError]),
    (E.HandshakeError, [E.RemoteProtocolError, E.ProtocolError, E.DerpError]),
    (E.UpgradeError, [E.HandshakeError, E.RemoteProtocolError, E.DerpError]),
    (E.AuthenticationError, [E.DerpError]),
])
def test_error_taxonomy(cls, parents):
    assert all(issubclass(cls, p) for p in parents)
    assert not issubclass(E.HandshakeError, E.LocalProtocolError)


def test_upgrade_error_keeps_its_status():
    e = E.UpgradeError("no", status=404)
    assert e.status == 404 and str(e) == "no" and E.UpgradeError("x").status is None


# ---------------------------------------------------------------- the package's surface

def test_dir_lists_the_lazy_names():
    names = dir(derpnet)
    assert "listen_packet" in names and "PacketConn" in names and "PrivateKey" in names
    assert set(derpnet.__all__) <= set(names)


def test_pydoc_shows_listen_packet_and_packetconn():
    text = pydoc.render_doc(derpnet, renderer=pydoc.plaintext)
    assert "listen_packet(" in text and "class PacketConn" in text


def test_lazy_names_resolve_and_unknown_names_raise():
    from derpnet import packetconn
    assert derpnet.listen_packet is packetconn.listen_packet and derpnet.PacketConn is packetconn.PacketConn
    with pytest.raises(AttributeError):
        derpnet.no_such_thing  # noqa: B018
