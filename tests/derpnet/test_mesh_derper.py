"""Our relay in one mesh with two of Tailscale's derpers on loopback (derper's --mesh-with,
--mesh-psk-file): Python clients on different members exchange packets and run a QUIC
stream; killing a member moves its clients to another without breaking the others; a
derper with another mesh key is refused by ours, and ours by the derpers."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

import derpnet
import derpquic
from derpnet.keys import PrivateKey
from tests.conftest import missing_go_peer
from tests.derpnet.meshnet import Mesh, Peer, deliver, write_mesh_key
from tests.derpquic.helpers import recv_all
from tests.interop_peers import GoDerper, derper_path, free_port, make_test_ca, skip_reason
from tests.relays import OurRelay

pytestmark = pytest.mark.interop

DERPER, OURS = 0, 2  # member indexes in ("derper", "derper", "ours")


@pytest.fixture
def mesh(tmp_path):
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    with Mesh(tmp_path, ["derper", "derper", "ours"]) as m:
        yield m


def test_clients_on_different_members_reach_each_other(mesh):
    peers = [Peer(mesh.url(i)) for i in range(3)]
    try:
        # derper→derper, derper→ours, ours→derper, both ways: every pair of members
        for i, a in enumerate(peers):
            for j, b in enumerate(peers):
                if i != j:
                    deliver(a, b, f"{i}->{j}", timeout=40)
    finally:
        for p in peers:
            p.close()


def test_quic_stream_across_the_mesh(mesh):
    """A 2 MiB QUIC stream between a client of a derper and a client of our relay (relay path only)."""
    a, b = Peer(mesh.url(DERPER)), Peer(mesh.url(OURS))
    try:  # the routes are in place before QUIC starts (its handshake would retry anyway)
        deliver(a, b, "warm a->b", timeout=40)
        deliver(b, a, "warm b->a", timeout=40)
    finally:
        a.close()
        b.close()
    payload = os.urandom(2 << 20)
    ln = derpquic.listen(mesh.url(DERPER), PrivateKey.generate(), direct=False)
    d = derpquic.Dialer(mesh.url(OURS), PrivateKey.generate(), direct=False)
    try:
        warm_l, warm_d = Peer(mesh.url(DERPER)), Peer(mesh.url(OURS))
        try:  # the listener's and dialler's keys are new: wait until each member knows the other's
            deliver(warm_d, warm_l, "routes", timeout=40)
        finally:
            warm_l.close()
            warm_d.close()
        with d.dial(ln.addr, timeout=30) as s:
            srv = ln.accept(timeout=30)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            srv.settimeout(30)
            got = recv_all(srv)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            srv.close()
    finally:
        d.close()
        ln.close()


def test_killing_a_member_moves_its_clients(mesh):
    a, b, c = Peer(mesh.url(0)), Peer(mesh.url(1)), Peer(mesh.url(OURS))
    try:
        deliver(a, b, "a->b", timeout=40)
        deliver(c, b, "c->b", timeout=40)
        deliver(a, c, "a->c", timeout=40)
        mesh.members[1].kill()  # b's derper
        assert b.closed.wait(15), "b's link did not notice its member died"
        b.close()
        moved = Peer(mesh.url(OURS), b.key)  # b reconnects to another member (ours), same key
        try:
            deliver(a, moved, "a->b again", timeout=40)  # derper 0 learns b is on ours now
            deliver(moved, a, "b->a again", timeout=40)
            deliver(a, c, "a->c still", timeout=10)  # the others were never broken
            deliver(c, a, "c->a still", timeout=10)
        finally:
            moved.close()
    finally:
        for p in (a, b, c):
            p.close()


def test_wrong_mesh_key_between_ours_and_derper(tmp_path, monkeypatch):
    """A derper with another key names ours in --mesh-with: ours refuses it (one WARNING),
    and ours, meshing with that derper, is refused and says so once."""
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    ours_key, derper_key = write_mesh_key(tmp_path / "ours.key"), write_mesh_key(tmp_path / "derper.key")
    port, d_port = free_port(), free_port()
    monkeypatch.setenv("TS_DEBUG_USE_DERP_HTTP", "1")
    with GoDerper(tmp_path / "d", port=d_port, extra_args=[
            "-mesh-psk-file", str(derper_key), "-mesh-with", f"127.0.0.1:{port}"]) as d:
        args = ["--mesh-psk-file", str(ours_key), "--mesh-with", f"127.0.0.1:{d_port}", "--mesh-retry", "0.3"]
        with OurRelay(port=port, workdir=str(tmp_path / "o"), extra_args=args) as ours:
            ours.logged.wait_for_line(r"WARNING relay: refusing .*wrong mesh key", timeout=30)
            ours.logged.wait_for_line(r"WARNING mesh\(.*refused our mesh key", timeout=30)
            # derper retries every 5 s, ours backs off: wait for derper's report of a failed try
            assert d.proc is not None
            d.proc.wait_for_line(r"mesh\(.*\).*(EOF|closed|reset)", timeout=30)
            out = ours.output()
            assert out.count("refused our mesh key") == 1, out
            assert out.count("WARNING relay: refusing") == 1, out


def test_tls_mesh_as_deployed(tmp_path, monkeypatch):
    """derper's default: members dial each other at https://HOST/derp and verify certificates
    (here from a test CA trusted through SSL_CERT_FILE, by Go and by Python alike)."""
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    ca, make_leaf = make_test_ca(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    monkeypatch.delenv("TS_DEBUG_USE_DERP_HTTP", raising=False)
    key_file = write_mesh_key(tmp_path / "mesh.key")
    p_d, p_o = free_port(), free_port()
    mesh_with = f"localhost:{p_d},localhost:{p_o}"
    cert, key = make_leaf(["localhost", "127.0.0.1"])
    with GoDerper(tmp_path / "d", tls=True, port=p_d, hostname="localhost", make_leaf=make_leaf, ca_file=ca,
                  extra_args=["-mesh-psk-file", str(key_file), "-mesh-with", mesh_with]) as d, \
            OurRelay(cert=cert, key=key, hostname="localhost", port=p_o, workdir=str(tmp_path / "o"),
                     extra_args=["--mesh-psk-file", str(key_file), "--mesh-with", mesh_with,
                                 "--mesh-retry", "0.5"]) as ours:
        a, b = Peer(d.url), Peer(ours.url)
        try:
            assert a.url.startswith("https://") and b.url.startswith("https://")
            deliver(a, b, "derper->ours over TLS", timeout=40)
            deliver(b, a, "ours->derper over TLS", timeout=40)
        finally:
            a.close()
            b.close()
        assert "refused" not in ours.output()


def test_a_packet_conn_moves_to_another_member_by_itself(mesh):
    """A PacketConn given the other members as `alternates` reconnects to one of them when its
    member dies; a peer on a surviving member reaches it again through the mesh."""
    a = derpnet.listen_packet(mesh.url(0), direct=False)
    b = derpnet.listen_packet(mesh.url(1), alternates=[mesh.url(OURS), mesh.url(0)], direct=False)
    try:
        _pc_exchange(a, b, "before", timeout=40)
        mesh.members[1].kill()
        _pc_exchange(a, b, "after", timeout=40)
        assert b.relay_url == mesh.url(OURS)
    finally:
        b.close()
        a.close()


def _pc_exchange(a, b, tag: str, timeout: float) -> None:
    """a → b until it arrives, then b → a until it arrives (datagrams: resent until one does)."""
    deadline = time.monotonic() + timeout
    for src, dst, data in ((a, b, tag.encode()), (b, a, f"{tag} back".encode())):
        dst.settimeout(0.25)
        while True:
            assert time.monotonic() < deadline, f"{data!r} never arrived"
            try:
                src.write_to(data, dst.local_addr())
            except OSError:
                pass  # the link is between members
            try:
                if dst.read_from() == (data, src.local_addr()):
                    break
            except TimeoutError:
                pass


def test_mesh_links_skip_our_access_control_and_rate_limit(tmp_path):
    """As in derper: a member presenting the mesh key is neither judged by --allow-clients
    nor rate limited, so an operator's allow list (which names clients, not relays) and a
    tight per-client rate do not cut the mesh; ordinary clients still are judged."""
    if derper_path() is None:
        missing_go_peer(skip_reason("derper"))
    ours_client = PrivateKey.generate()
    allow = tmp_path / "allowed"
    allow.write_text(f"# only this client\n{ours_client.public_key}\n")
    rates = tmp_path / "rates.json"
    rates.write_text('{"PerClientRateLimitBytesPerSec": 2000, "PerClientRateBurstBytes": 2000}')
    args = ["--mesh-retry", "0.5", "--allow-clients", str(allow), "--rate-config", str(rates)]
    with Mesh(tmp_path, ["derper", "ours"], our_args=args) as mesh:
        a, b = Peer(mesh.url(0)), Peer(mesh.url(1), ours_client)
        try:
            deliver(a, b, "derper->ours", timeout=40)
            deliver(b, a, "ours->derper", timeout=40)
            # 800 KiB through derper towards our client, one packet at a time: at 2,000 B/s a
            # rate-limited mesh link would stall after its first read for minutes
            t0 = time.monotonic()
            for i in range(100):
                packet = i.to_bytes(2, "big") * 4096
                a.client.send_packet(b.public_key, packet)
                assert b.wait_for(a.public_key, packet, timeout=10), f"packet {i} stalled on the mesh link"
            assert time.monotonic() - t0 < 20
        finally:
            a.close()
            b.close()
        with pytest.raises(Exception, match="access denied|refused"):
            derpnet.listen_packet(mesh.url(1), PrivateKey.generate(), direct=False, reconnect=False).close()
