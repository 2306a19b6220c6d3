"""Go-to-Go baseline: Tailscale's derper + the original Go derpconnect on loopback, no
Python code of ours in the path. This is what our Python relay/client are compared against.
The original only dials HOST:443, so derper runs with TLS on port 443 of a loopback address
of its own (tests.interop_peers.Relay443; needs root).

Build the Go peers with interop/build.sh. Without them these tests skip (or
fail under DERPNET_REQUIRE_INTEROP=1).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading

import pytest

from tests.conftest import missing_go_peer  # skip locally, fail when CI requires interop
from tests.interop_peers import (
    DERPCONNECT_MISSING,
    DERPER_MISSING,
    GoDerpconnect,
    GoDerper,
    Relay443,
    can_bind,
    derpconnect_path,
    derper_path,
    free_port,
    make_test_ca,
    original_race_xfails,
)

pytestmark = pytest.mark.interop


def _need_derper() -> None:
    if not derper_path():
        missing_go_peer(DERPER_MISSING)


def _need_derpconnect() -> None:
    _need_derper()
    if not derpconnect_path():
        missing_go_peer(DERPCONNECT_MISSING)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    return make_test_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_derper(tmp_path_factory):
    """derper with TLS on port 443 of a loopback address of its own, a test-CA certificate
    for that address: what the original derpconnect dials."""
    _need_derpconnect()
    try:
        with Relay443("derper", tmp_path_factory.mktemp("derper")) as d:
            yield d
    except PermissionError as e:
        missing_go_peer(str(e))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_origin(tmp_path):
    """An http.server on 127.0.0.1 (random port) serving a 4 MiB random file."""
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(4 << 20)
    (root / "blob.bin").write_bytes(blob)
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1], hashlib.sha256(blob).hexdigest()
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


class _ReplyAfterEOF(socketserver.BaseRequestHandler):
    """Reads until the client half-closes, then answers sha256(data) + data and closes."""

    def handle(self):
        chunks = []
        while True:
            b = self.request.recv(65536)
            if not b:
                break
            chunks.append(b)
        data = b"".join(chunks)
        self.request.sendall(hashlib.sha256(data).digest() + data)


@pytest.fixture
def half_close_origin():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ReplyAfterEOF)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def _tunnel(relay, target_port, tmp_path):
    """serve in front of target_port, join to it; returns the (serve, join) pair."""
    srv = GoDerpconnect.serve(relay, target_port, tmp_path / "serve")
    try:
        cli = GoDerpconnect.join(relay, srv.pubkey, 0, tmp_path / "join")
    except BaseException:
        srv.stop()
        raise
    return srv, cli


def _dump(*procs) -> str:
    return "\n".join(f"--- {p.argv[0]} {' '.join(p.argv[2:])}\n{p.output()}" for p in procs)


# ---------------------------------------------------------------- tests


def test_plain_derper_honours_fast_start(tmp_path):
    """Plain-HTTP derper (the mode our Python client can use on any port)
    answers `Derp-Fast-Start: 1` with the 40-byte ServerKey frame first."""
    _need_derper()
    with GoDerper(tmp_path, tls=False) as d:
        assert d.url == f"http://127.0.0.1:{d.port}"
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n"
                      b"Connection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n")
            f = s.makefile("rb")
            hdr = f.read(5)
            assert hdr == b"\x01\x00\x00\x00\x28", hdr
            body = f.read(40)
            assert body[:8] == "DERP🔑".encode() == bytes.fromhex("44455250f09f9491")


def test_tls_derper_verifies_against_test_ca(tmp_path, test_ca):
    _need_derper()
    ca_file, make_leaf = test_ca
    with GoDerper(tmp_path, tls=True, port=free_port(), make_leaf=make_leaf, ca_file=ca_file) as d:
        assert d.url == f"https://localhost:{d.port}"
        assert d.check_tls() == "TLSv1.3"
        # derper's manual cert mode refuses an SNI other than its hostname.
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="other.example")
        if shutil.which("openssl"):
            r = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{d.port}", "-servername", "localhost",
                 "-CAfile", ca_file, "-verify_return_error", "-verify_hostname", "localhost"],
                input=b"", capture_output=True, timeout=20,
            )
            assert r.returncode == 0, r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
            assert b"Verify return code: 0 (ok)" in r.stdout


def test_go_derpconnect_http_fetch(tls_derper, http_origin, tmp_path):
    """curl -> join -> QUIC over DERP (derper) -> serve -> http.server; twice
    (each TCP connection is a new QUIC connection); sha256 must match."""
    _need_derpconnect()
    port, want = http_origin
    srv, cli = _tunnel(tls_derper, port, tmp_path)
    with srv, cli, original_race_xfails(srv, cli):
        for i in range(2):
            out = tmp_path / f"fetched{i}.bin"
            r = subprocess.run(  # a stall (no byte for 10 s) fails: it may be the original's race
                ["curl", "-sS", "--fail", "--max-time", "60", "--speed-limit", "1", "--speed-time", "10",
                 "-o", str(out), f"http://127.0.0.1:{cli.listen_port}/blob.bin"],
                capture_output=True, timeout=90,
            )
            assert r.returncode == 0, r.stderr.decode() + _dump(srv, cli, tls_derper.relay.proc)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == want
        assert srv.proc.poll() is None and cli.proc.poll() is None


def test_go_derpconnect_half_close(tls_derper, half_close_origin, tmp_path):
    """The client's FIN must reach the origin (which answers only after EOF),
    and the answer must come back followed by EOF."""
    _need_derpconnect()
    srv, cli = _tunnel(tls_derper, half_close_origin, tmp_path)
    payload = os.urandom(300_000)
    with srv, cli, original_race_xfails(srv, cli):
        with socket.create_connection(("127.0.0.1", cli.listen_port), timeout=15) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
        assert bytes(got[:32]) == hashlib.sha256(payload).digest(), _dump(srv, cli)
        assert bytes(got[32:]) == payload


def test_original_upgrade_request_on_the_wire(tmp_path, test_ca):
    """Pin the original's first bytes: TLS to HOST:443 (SNI = HOST) verified against
    SSL_CERT_FILE, the Go http.Request.Write upgrade request, and after a ServerKey frame a
    103-byte ClientInfo frame starting with its public key. HOST is `localhost` (the one
    name that needs no /etc/hosts), so this needs 127.0.0.1:443."""
    _need_derpconnect()
    if not can_bind("127.0.0.1", 443):
        missing_go_peer("cannot bind 127.0.0.1:443, which `--derp=localhost` dials (run as root, or it is in use)")
    port = 443
    ca_file, make_leaf = test_ca
    cert, key = make_leaf(["localhost", "127.0.0.1"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    seen_sni = []
    ctx.sni_callback = lambda sock, name, c: seen_sni.append(name)
    ls = socket.create_server(("127.0.0.1", port))
    ls.settimeout(20)
    env = {"SSL_CERT_FILE": ca_file}
    with ls, GoDerpconnect("localhost", ["serve", "1"], tmp_path, env={**os.environ, **env}) as p:
        raw, _ = ls.accept()
        raw.settimeout(20)
        with ctx.wrap_socket(raw, server_side=True) as c:
            req = b""
            while b"\r\n\r\n" not in req:
                b = c.recv(4096)
                assert b, req
                req += b
            assert req == (b"GET /derp HTTP/1.1\r\nHost: \r\nUser-Agent: ntnj/derpnet\r\n"
                           b"Connection: Upgrade\r\nDerp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n"), req
            c.sendall(b"\x01\x00\x00\x00\x28" + "DERP🔑".encode() + os.urandom(32))
            hdr = b""
            while len(hdr) < 5 + 32:
                b = c.recv(5 + 32 - len(hdr))
                assert b
                hdr += b
        assert seen_sni == ["localhost"]
        # type 2, len = pub(32) + nonce(24) + box overhead(16) + the 32-byte JSON below
        assert len(b'{"CanAckPings":true,"version":2}') == 32
        assert hdr[:5] == b"\x02\x00\x00\x00\x68"
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        priv = p.key_path.read_bytes()
        assert len(priv) == 32 and (p.key_path.stat().st_mode & 0o777) == 0o400
        pub = X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert hdr[5:37] == pub
        # The relay went away mid-handshake: fatal, exit 1.
        p.wait_for_line(r"unable to connect to DERP server", timeout=20)
        assert p.proc.wait(timeout=20) == 1
