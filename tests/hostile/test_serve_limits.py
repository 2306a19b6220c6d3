"""A listener under hostile dialers (issue 9, derpquic items 6 and 7).

- 3,000 forged QUIC Initials from one key against `derpconnect serve` (a real process, its
  RSS read from /proc), with and without `--allow`: before, each made a full server
  connection (+282 MiB for up to 20 s); now keys outside `allow` are refused before any
  state exists and handshaking connections are bounded per key and in all. An honest dial
  completes while the flood runs.
(The listener's own bounds, in-process: tests/derpquic/test_listener_limits.py.)
"""

from __future__ import annotations

import os
import socket
import threading
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

import derpnet
import derpquic
from derpnet.keys import PrivateKey, PublicKey
from derpquic._quic import ALPN_AUTH
from tests.cmd.procs import CliProcess, CountingServer, cli_env
from tests.derpquic.helpers import recv_all
from tests.hostile.abuse import rss_mib
from tests.relays import OurRelay

FORGED = 3000
#: Growth of serve's RSS while 3,000 forged Initials arrive (measured: < 2 MiB).
SERVE_GROWTH_BOUND_MIB = 16.0


def forged_initials(n: int) -> list[bytes]:
    """`n` QUIC Initial datagrams: one real client Initial with a fresh random destination
    connection ID each (they parse as Initials; nobody but their maker could finish them)."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN_AUTH],
                                                          max_datagram_size=1452))
    quic.connect(("peer", 0), now=time.monotonic())
    first = quic.datagrams_to_send(now=time.monotonic())[0][0]
    assert first[5] == 8, "destination connection ID of 8 bytes expected"
    return [first[:6] + os.urandom(8) + first[14:] for _ in range(n)]


def flood(url: str, target: str, n: int, rate: float = 1000.0) -> PublicKey:
    """Send `n` forged Initials to `target` from one fresh key, at `rate` per second (the
    relay drops what the listener does not read in time, 32 packets deep)."""
    pc = derpnet.listen_packet(url, direct=False)
    try:
        dst = PublicKey.parse(target)
        start = time.monotonic()
        for i, datagram in enumerate(forged_initials(n)):
            pc.write_to(datagram, dst)
            if i % 50 == 49:
                time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))  # the flood's rate
        return pc.local_addr()
    finally:
        pc.close()


def honest_echo(url: str, key: PrivateKey, target: str) -> bytes:
    with derpquic.Dialer(url, key, direct=False) as d, d.dial(target, timeout=20) as s:
        s.settimeout(20)
        s.sendall(b"honest during the flood")
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def _flood_serve(tmp_path, allow: bool) -> None:
    friend = PrivateKey.generate()
    extra = ["--allow", friend.public_key.b64()] if allow else []
    with OurRelay() as relay, CountingServer() as target:
        serve = CliProcess.serve(relay.url, target.port, cli_env(tmp_path / "srv"), extra=extra)
        try:
            pid = serve.proc.pid
            assert honest_echo(relay.url, friend, serve.pubkey) == b"honest during the flood"  # warm
            base = rss_mib(pid)
            result: dict[str, object] = {}
            t = threading.Thread(target=lambda: result.update(key=flood(relay.url, serve.pubkey, FORGED)))
            t.start()
            time.sleep(1.0)  # well into the flood
            got = honest_echo(relay.url, friend, serve.pubkey)
            t.join(30)
            peak = max(rss_mib(pid), base)
            time.sleep(0.5)
            peak = max(peak, rss_mib(pid))
            assert got == b"honest during the flood"
            assert serve.proc.poll() is None
        finally:
            serve.stop()
        print(f"serve {'--allow' if allow else 'without --allow'}: {FORGED} forged Initials from one key: "
              f"RSS {base:.1f} -> {peak:.1f} MiB (+{peak - base:.1f}); the honest dial completed meanwhile")
        assert peak - base <= SERVE_GROWTH_BOUND_MIB, (base, peak)
        assert target.accepted == 2  # the honest dials only


def test_forged_initials_from_a_key_outside_allow_create_no_state(tmp_path):
    _flood_serve(tmp_path, allow=True)


def test_forged_initials_from_one_key_are_bounded_without_allow(tmp_path):
    _flood_serve(tmp_path, allow=False)


def test_serve_names_an_unverified_peer_on_its_connection_lines(tmp_path, monkeypatch):
    """Issue 9, item 9: a dialler that does not prove its key (here: ours without the
    derpnet-auth ALPN, as the Go derpconnect) is marked UNVERIFIED on serve's lines; a
    proven one is not."""
    with OurRelay() as relay, CountingServer() as target:
        serve = CliProcess.serve(relay.url, target.port, cli_env(tmp_path / "srv"), log_path=tmp_path / "serve.log")
        try:
            assert honest_echo(relay.url, PrivateKey.generate(), serve.pubkey) == b"honest during the flood"
            serve.wait_for_line(r"conn #1 from [A-Za-z0-9_-]{43}: closed after", timeout=10)
            monkeypatch.setattr("derpquic.conn.ALPN_AUTH", "not-derpnet-auth")  # a Go-like dialler
            go_like = PrivateKey.generate()
            with derpquic.Dialer(relay.url, go_like, direct=False, allow_unauthenticated=True) as d, \
                    d.dial(serve.pubkey, timeout=20) as s:
                assert s.peer_key is None
                s.settimeout(20)
                s.sendall(b"x")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"x"
            serve.wait_for_line(rf"conn #2 from {go_like.public_key.b64()} \(UNVERIFIED: did not prove this key\)",
                                timeout=10)
        finally:
            serve.stop()
        assert "UNVERIFIED" not in "\n".join(line for line in serve.output().splitlines() if "conn #1" in line)
