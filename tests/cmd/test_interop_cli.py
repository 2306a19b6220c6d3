"""The CLI against the Go derpconnect, as real processes with real TCP bytes (SHA-256 checked).

- Go `serve` + Go `join` through OUR relay on 127.0.0.1:443 with a test-CA certificate for
  `localhost`, exactly as the Go tool dials (`HOST:443`, fast start, system roots via
  SSL_CERT_FILE; no test-port override): our relay serving Go clients.
- Python `join` -> Go `serve` (with the explicit opt-in for a peer that cannot prove its key,
  and refused without it) and Go `join` -> Python `serve`, through our relay and through the
  Go derper.
- Python `serve`/`join` moving a 50 MiB download through the Go derper.

The Go side is the real derpconnect when the module proxy serves it, else the stand-in
goderpconnect built by interop/build.sh from interop/goderpconnect (same wire behaviour).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request

import pytest

from tests.cmd.procs import CliProcess, HttpFileServer, cli_env, error_lines, run_cli
from tests.interop_peers import (DERPCONNECT_MISSING, DERPER_MISSING, GoDerpconnect, GoDerper, can_bind,
                                 derpconnect_path, derper_path, free_port, make_test_ca)

pytestmark = pytest.mark.interop


class _Relay:
    """What both the Go and the Python CLI need to reach one TLS relay."""

    def __init__(self, kind: str, host: str, port: int, ca_file: str) -> None:
        self.kind, self.host, self.port, self.ca_file = kind, host, port, str(ca_file)

    @property
    def derp_arg(self) -> str:
        """--derp for our CLI: the bare hostname (port 443, like Go), else a URL."""
        return self.host if self.port == 443 else f"https://{self.host}:{self.port}"

    def env_for_clients(self) -> dict:  # GoDerpconnect's interface
        env = {"SSL_CERT_FILE": self.ca_file}
        if self.port != 443:
            env["DERPCONNECT_TEST_PORT"] = str(self.port)  # read only by the stand-in
        return env


@pytest.fixture(scope="module")
def go_binary():
    from tests.conftest import missing_go_peer
    if not derper_path():
        missing_go_peer(DERPER_MISSING)
    binary = derpconnect_path()
    if not binary:
        missing_go_peer(DERPCONNECT_MISSING)
    return binary


@pytest.fixture(scope="module", params=["our-relay-443", "go-derper"])
def relay(request, tmp_path_factory, go_binary):
    tmp = tmp_path_factory.mktemp(request.param)
    ca, make_leaf = make_test_ca(tmp / "pki")
    if request.param == "our-relay-443":
        from tests.conftest import missing_go_peer
        if not can_bind("127.0.0.1", 443):
            missing_go_peer("cannot bind 127.0.0.1:443, which the Go derpconnect always dials (run as root)")
        from tests.relays import OurRelay
        cert, key = make_leaf(["localhost", "127.0.0.1"])
        with OurRelay(tls=True, cert=cert, key=key, hostname="localhost", port=443, workdir=str(tmp / "relay")):
            yield _Relay("ours", "localhost", 443, ca)
    else:
        with GoDerper(tmp / "derper", tls=True, port=free_port(), make_leaf=make_leaf, ca_file=ca) as d:
            yield _Relay("go", "localhost", d.port, ca)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A real `python -m http.server` with a random file; yields (server, name, sha256)."""
    d = tmp_path_factory.mktemp("origin")
    data = os.urandom(6 * 1024 * 1024)
    (d / "blob.bin").write_bytes(data)
    with HttpFileServer(d) as srv:
        yield srv, "blob.bin", hashlib.sha256(data).hexdigest()


def _download_sha(port: int, name: str, timeout: float = 120.0) -> str:
    """SHA-256 of a download through the tunnel; a short body is an error, not a digest
    (http.client's read(n) returns b"" on a premature close instead of raising)."""
    h = hashlib.sha256()
    got = 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=timeout) as r:
        length = int(r.headers["Content-Length"])
        while True:
            chunk = r.read(1 << 16)
            if not chunk:
                break
            got += len(chunk)
            h.update(chunk)
    assert got == length, f"download through the tunnel ended after {got} of {length} bytes"
    return h.hexdigest()


def test_go_serve_and_go_join_through_relay(relay, origin, go_binary, tmp_path):
    srv, name, digest = origin
    with GoDerpconnect.serve(relay, srv.port, tmp_path / "serve", binary=go_binary) as serve, \
            GoDerpconnect.join(relay, serve.pubkey, 0, tmp_path / "join", binary=go_binary) as join:
        assert _download_sha(join.listen_port, name) == digest
        assert _download_sha(join.listen_port, name) == digest  # a second connection, new QUIC dial


def test_python_join_to_go_serve(relay, origin, go_binary, tmp_path):
    srv, name, digest = origin
    env = cli_env(tmp_path / "py", DERPNET_DERP=relay.derp_arg)
    with GoDerpconnect.serve(relay, srv.port, tmp_path / "serve", binary=go_binary) as serve:
        with CliProcess.join(relay.derp_arg, serve.pubkey, env,
                             extra=["--derp-ca", relay.ca_file, "--insecure-allow-unauthenticated"]) as join:
            assert _download_sha(join.listen_port, name) == digest
            join.wait_for_line(r"conn #1 .*\(unverified\)")


def test_python_join_refuses_go_serve_without_opt_in(relay, origin, go_binary, tmp_path):
    srv, name, _ = origin
    env = cli_env(tmp_path / "py")
    with GoDerpconnect.serve(relay, srv.port, tmp_path / "serve", binary=go_binary) as serve:
        with CliProcess.join(relay.derp_arg, serve.pubkey, env, extra=["--derp-ca", relay.ca_file]) as join:
            with pytest.raises(OSError):
                _download_sha(join.listen_port, name, timeout=30)
            join.wait_eof(timeout=30)
            assert join.wait(timeout=5) == 1
            lines = error_lines(join.output())
            assert "Traceback" not in join.output()
            assert any("prove" in line or "authenticat" in line for line in lines), lines


def test_go_join_to_python_serve(relay, origin, go_binary, tmp_path):
    srv, name, digest = origin
    env = cli_env(tmp_path / "py")
    with CliProcess.serve(relay.derp_arg, srv.port, env, extra=["--derp-ca", relay.ca_file]) as serve:
        with GoDerpconnect.join(relay, serve.pubkey, 0, tmp_path / "join", binary=go_binary) as join:
            assert _download_sha(join.listen_port, name) == digest
    assert "Traceback" not in serve.output()


def test_python_pair_50mib_through_go_derper(relay, tmp_path, go_binary):
    if relay.kind != "go":
        pytest.skip("the Python pair through our relay is covered by tests/cmd/test_forward.py")
    d = tmp_path / "big"
    d.mkdir()
    data = os.urandom(50 * 1024 * 1024)
    (d / "big.bin").write_bytes(data)
    env_s, env_j = cli_env(tmp_path / "s"), cli_env(tmp_path / "j")
    with HttpFileServer(d) as srv, \
            CliProcess.serve(relay.derp_arg, srv.port, env_s, extra=["--derp-ca", relay.ca_file]) as serve, \
            CliProcess.join(relay.derp_arg, serve.pubkey, env_j, extra=["--derp-ca", relay.ca_file]) as join:
        assert _download_sha(join.listen_port, "big.bin") == hashlib.sha256(data).hexdigest()


def test_one_identity_serves_both_tools(relay, go_binary, tmp_path):
    """The Go tool's key file (raw 32 bytes under the config dir) is our default identity too."""
    with GoDerpconnect.serve(relay, 9, tmp_path / "home", binary=go_binary) as serve:
        go_pub = serve.pubkey
    r = run_cli(["pubkey"], cli_env(tmp_path / "home"))  # same XDG_CONFIG_HOME as the Go process
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == go_pub
