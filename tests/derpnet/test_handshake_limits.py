"""ClientInfo/ServerInfo parsing under hostile input (issue 9, items 1 and 2), pure: a relay
keeps only the typed fields it uses, refuses JSON bombs and deep nesting as HandshakeErrors
(never RecursionError), and logs what clients can provoke at a bounded rate."""

from __future__ import annotations

import json
import logging

import pytest

from derpnet.connection import ClientConnection, ServerConnection
from derpnet.errors import HandshakeError
from derpnet.events import AcceptUpgrade, Hello, Upgrade
from derpnet.handshake import (
    MAX_APP_NAME,
    MAX_JSON_CONTAINERS,
    open_client_info,
    open_server_info,
    seal,
    seal_server_info,
)
from derpnet.keys import PrivateKey
from derpnet.server.ratelog import RateLimitedLog

SERVER = PrivateKey.generate()
CLIENT = PrivateKey.generate()


def _open(obj_or_bytes) -> dict:
    data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
    return open_client_info(SERVER, CLIENT.public_key, seal(CLIENT, SERVER.public_key, data))


def test_only_the_typed_fields_are_kept():
    info = _open({"Version": 2, "CanAckPings": True, "IsProber": False, "AppName": "x" * 1000,
                  "meshKey": "ab" * 32, "extra": {"a": [1, 2, 3]}, "pad": "y" * 100_000})
    assert info == {"version": 2, "canackpings": True, "isprober": False, "appname": "x" * MAX_APP_NAME,
                    "meshkey": "ab" * 32}


def test_many_scalar_keys_are_dropped():
    """A box full of scalars (no containers) parses, and none of it is kept."""
    info = _open({f"k{i}": i for i in range(15_000)} | {"version": 2})
    assert info == {"version": 2}


def test_null_leaves_a_field_unset():
    assert _open({"version": None, "meshKey": None}) == {}


@pytest.mark.parametrize("obj, field", [
    ({"version": "2"}, "version"), ({"version": 2.5}, "version"), ({"version": True}, "version"),
    ({"version": 1 << 63}, "version"), ({"CanAckPings": 1}, "canackpings"), ({"IsProber": "yes"}, "isprober"),
    ({"AppName": 5}, "appname"), ({"meshKey": ["x"]}, "meshkey"),
])
def test_wrong_types_are_handshake_errors(obj, field):
    with pytest.raises(HandshakeError, match=field):
        _open(obj)


@pytest.mark.parametrize("payload", [
    b"[" + b"{}," * 85_000 + b"{}]",                      # the 249 KiB bomb of the report: 85,000 dicts
    b"[" * 100_000 + b"]" * 100_000,                     # RecursionError before the fix
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    json.dumps({"version": 2, "x": [[]] * (MAX_JSON_CONTAINERS)}).encode(),
])
def test_bombs_and_deep_nesting_are_handshake_errors(payload):
    with pytest.raises(HandshakeError, match="objects and arrays"):
        _open(payload)


def test_a_few_containers_are_fine():
    assert _open({"version": 2, "x": [[]] * (MAX_JSON_CONTAINERS - 2)}) == {"version": 2}


def test_server_info_deep_nesting_is_a_handshake_error():
    """A rogue relay's ServerInfo: the client gets a HandshakeError, not a RecursionError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(HandshakeError):
        open_server_info(CLIENT, SERVER.public_key, seal(SERVER, CLIENT.public_key, deep))
    assert open_server_info(CLIENT, SERVER.public_key, seal_server_info(SERVER, CLIENT.public_key)) == {"version": 2}


def test_through_the_sans_io_connections():
    """Deep nesting in ClientInfo, fed to ServerConnection: HandshakeError, state closed."""
    c = ClientConnection(CLIENT, "relay", client_info={"version": 2, "x": json.loads("[" * 500 + "]" * 500)})
    s = ServerConnection(SERVER)
    s.receive_data(c.send(Upgrade()))
    c.receive_data(s.send(AcceptUpgrade()))
    with pytest.raises(HandshakeError):
        s.receive_data(c.send(Hello()))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log(caplog):
    logger = logging.getLogger("test.ratelog")
    clock = Clock()
    rl = RateLimitedLog(logger, rate=1.0, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        logged = [rl.log(logging.INFO, "failure %d", i) for i in range(1000)]
        assert sum(logged) == 3 and rl.suppressed == 997
        clock.now += 2.0  # two more tokens
        assert rl.log(logging.INFO, "failure %d", 1000) and rl.log(logging.INFO, "again")
        assert not rl.log(logging.INFO, "no token")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[3] == "failure 1000 (997 similar lines left out)" and lines[4] == "again"
    assert rl.suppressed_total == 998


def test_rate_limited_log_skips_disabled_levels(caplog):
    rl = RateLimitedLog(logging.getLogger("test.ratelog2"), rate=1.0, burst=1)
    with caplog.at_level(logging.WARNING, logger="test.ratelog2"):
        for _ in range(10):
            rl.log(logging.DEBUG, "chatter")  # does not use up the bucket
        assert rl.log(logging.WARNING, "real")
    assert rl.suppressed_total == 0


@pytest.mark.parametrize("ftype", [0x04, 0x06, 0x0b, 0x10, 0x7f])  # SendPacket, Pong, WatchConns, ClosePeer...
def test_frames_before_client_info_are_refused_on_their_header(ftype):
    """Issue 9, item 3: a 1 MiB frame that is not ClientInfo is refused on its 5 header bytes,
    before any of its payload is buffered (derper does the same)."""
    c = ClientConnection(CLIENT, "relay")
    s = ServerConnection(SERVER)
    s.receive_data(c.send(Upgrade()))
    s.send(AcceptUpgrade())
    with pytest.raises(HandshakeError, match=r"\(1048576 bytes\), not ClientInfo"):
        s.receive_data(bytes([ftype]) + (1 << 20).to_bytes(4, "big") + bytes(100))
    assert s.buffered <= 105
