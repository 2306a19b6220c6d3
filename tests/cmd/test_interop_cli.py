"""The CLI against the original Go derpconnect (github.com/ntnj/derpnet, built unmodified by
interop/build.sh), as real processes moving real TCP bytes, SHA-256 and length checked,
through Tailscale's `derper` and through our relay. Each relay runs with TLS on port 443 of
a loopback address of its own, with a test-CA certificate for that address: the original
only ever dials HOST:443 (fast start, system roots via SSL_CERT_FILE), so it reaches them
exactly as it reaches a relay in the wild.

- Go `serve` + Go `join`: our relay serving Go clients as derper does.
- Python `join` -> Go `serve` (with the explicit opt-in for a peer that cannot prove its
  key, refused without it) and Go `join` -> Python `serve`: downloads and uploads, so the
  half-close travels both ways.
- A killed Go `serve` resets the TCP client behind a Python `join` (never a clean FIN).
- Python `serve`/`join` moving 50 MiB through derper; one key file serves both tools.

Transfers through a Go process stay at a few MiB and run under `original_race_xfails`: the
original's own reader deadlock (interop/README.md) is reported as its expected failure,
with the stuck goroutine, never as a pass and never blamed on us.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.cmd.procs import CliProcess, TransferService, cli_env, error_lines, run_cli
from tests.interop_peers import (
    DERPCONNECT_MISSING,
    DERPER_MISSING,
    GoDerpconnect,
    Relay443,
    derpconnect_path,
    derper_path,
    original_race_xfails,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 3 * MiB  # small enough that the original's reader race rarely bites (see the docstring)


@pytest.fixture(scope="module")
def go_binary():
    from tests.conftest import missing_go_peer
    if not derper_path():
        missing_go_peer(DERPER_MISSING)
    binary = derpconnect_path()
    if not binary:
        missing_go_peer(DERPCONNECT_MISSING)
    return binary


@pytest.fixture(scope="module", params=["ours", "derper"])
def relay(request, tmp_path_factory, go_binary):
    from tests.conftest import missing_go_peer
    try:
        with Relay443(request.param, tmp_path_factory.mktemp(f"relay-{request.param}")) as r:
            yield r
    except PermissionError as e:
        missing_go_peer(str(e))


@pytest.fixture(scope="module")
def service():
    with TransferService() as s:
        yield s


def _py_extra(relay) -> list[str]:
    return ["--derp-ca", relay.ca_file, "--no-direct"]


def test_go_serve_and_go_join_through_relay(relay, service, go_binary, tmp_path):
    with GoDerpconnect.serve(relay, service.port, tmp_path / "serve", binary=go_binary) as serve, \
            GoDerpconnect.join(relay, serve.pubkey, 0, tmp_path / "join", binary=go_binary) as join, \
            original_race_xfails(serve, join):
        TransferService.download(join.listen_port, SIZE)
        TransferService.download(join.listen_port, SIZE)  # a second connection, a new QUIC dial
        TransferService.upload(join.listen_port, SIZE)


def test_python_join_to_go_serve(relay, service, go_binary, tmp_path):
    with GoDerpconnect.serve(relay, service.port, tmp_path / "serve", binary=go_binary) as serve, \
            CliProcess.join(relay.derp_arg, serve.pubkey, cli_env(tmp_path / "py"),
                            extra=[*_py_extra(relay), "--insecure-allow-unauthenticated"],
                            log_path=tmp_path / "join.log") as join, \
            original_race_xfails(serve):
        TransferService.download(join.listen_port, SIZE)
        TransferService.upload(join.listen_port, SIZE)
        join.wait_for_line(r"conn #1 .*\(unverified\)")
    assert "Traceback" not in join.output()


def test_go_join_to_python_serve(relay, service, go_binary, tmp_path):
    with CliProcess.serve(relay.derp_arg, service.port, cli_env(tmp_path / "py"), extra=_py_extra(relay),
                          log_path=tmp_path / "serve.log") as serve, \
            GoDerpconnect.join(relay, serve.pubkey, 0, tmp_path / "join", binary=go_binary) as join, \
            original_race_xfails(join):
        TransferService.download(join.listen_port, SIZE)
        TransferService.upload(join.listen_port, SIZE)
    assert "Traceback" not in serve.output()


def test_python_join_refuses_go_serve_without_opt_in(relay, service, go_binary, tmp_path):
    with GoDerpconnect.serve(relay, service.port, tmp_path / "serve", binary=go_binary) as serve, \
            CliProcess.join(relay.derp_arg, serve.pubkey, cli_env(tmp_path / "py"),
                            extra=_py_extra(relay)) as join:
        with pytest.raises(OSError):
            TransferService.download(join.listen_port, MiB, inactivity=30)
        join.wait_eof(timeout=30)
        assert join.wait(timeout=5) == 1
        lines = error_lines(join.output())
        assert "Traceback" not in join.output()
        assert any("prove" in line or "authenticat" in line for line in lines), lines


def test_killed_go_serve_resets_the_client_behind_python_join(relay, service, go_binary, tmp_path):
    """The Go serve dies (SIGKILL); the relay tells the join that its peer left, and a Go
    derpconnect never comes back: the client gets a reset within seconds, not a FIN."""
    with GoDerpconnect.serve(relay, service.port, tmp_path / "serve", binary=go_binary) as serve, \
            CliProcess.join(relay.derp_arg, serve.pubkey, cli_env(tmp_path / "py"),
                            extra=[*_py_extra(relay), "--insecure-allow-unauthenticated"],
                            log_path=tmp_path / "join.log") as join:
        with socket.create_connection(("127.0.0.1", join.listen_port), timeout=20) as c:
            c.sendall(b"S\n")  # an endless stream from the service
            c.settimeout(20)
            got = 0
            while got < MiB:
                got += len(c.recv(1 << 16))
            serve.proc.kill()
            t0 = time.monotonic()
            c.settimeout(40)
            with pytest.raises(ConnectionResetError):
                while c.recv(1 << 16):
                    pass
            elapsed = time.monotonic() - t0
        assert elapsed < 10, f"the reset took {elapsed:.1f} s"
        join.wait_for_line(r"conn #1 .*failed", timeout=10)
        assert join.proc.poll() is None


def test_python_pair_50mib_through_go_derper(relay, service, tmp_path, go_binary):
    if relay.kind != "derper":
        pytest.skip("the Python pair through our relay is covered by tests/cmd/test_forward.py")
    with CliProcess.serve(relay.derp_arg, service.port, cli_env(tmp_path / "s"), extra=_py_extra(relay)) as serve, \
            CliProcess.join(relay.derp_arg, serve.pubkey, cli_env(tmp_path / "j"), extra=_py_extra(relay)) as join:
        TransferService.download(join.listen_port, 50 * MiB)


def test_one_identity_serves_both_tools(relay, go_binary, tmp_path):
    """The Go tool's key file (raw 32 bytes under the config dir) is our default identity too."""
    with GoDerpconnect.serve(relay, 9, tmp_path / "home", binary=go_binary) as serve:
        go_pub = serve.pubkey
    r = run_cli(["pubkey"], cli_env(tmp_path / "home"))  # same XDG_CONFIG_HOME as the Go process
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == go_pub
