"""UDP forwarding (`--udp`) next to the original Go derpconnect, which has no UDP mode:
our `join --udp` to a Go `serve` stops with one clear error line (with and without
--insecure-allow-unauthenticated), and a Go `join` to our `serve --udp` has its stream
refused with a warning that says why. Real processes through our relay on port 443."""

from __future__ import annotations

import socket

import pytest

from tests.cmd.procs import CliProcess, cli_env, error_lines, run_cli
from tests.interop_peers import DERPCONNECT_MISSING, GoDerpconnect, Relay443, derpconnect_path

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def go_binary():
    from tests.conftest import missing_go_peer
    binary = derpconnect_path()
    if not binary:
        missing_go_peer(DERPCONNECT_MISSING)
    return binary


@pytest.fixture(scope="module")
def relay(tmp_path_factory, go_binary):
    from tests.conftest import missing_go_peer
    try:
        with Relay443("ours", tmp_path_factory.mktemp("relay-ours")) as r:
            yield r
    except PermissionError as e:
        missing_go_peer(str(e))


@pytest.mark.parametrize("opt_in", [False, True])
def test_join_udp_to_a_go_serve_is_one_clear_error(relay, go_binary, tmp_path, opt_in):
    with GoDerpconnect.serve(relay, 9, tmp_path / "serve", binary=go_binary) as serve:
        extra = ["--derp-ca", relay.ca_file, "--no-direct"] + (["--insecure-allow-unauthenticated"] if opt_in else [])
        r = run_cli([f"--derp={relay.derp_arg}", "join", "--udp", serve.pubkey, "0", *extra],
                    cli_env(tmp_path / "py"), timeout=90)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    line = error_lines(r.stderr)[-1]
    assert line.startswith("derpconnect: error: peer "), line
    assert "Go derpconnect, which has no UDP mode" in line, line


def test_go_join_to_a_udp_serve_is_refused_with_a_warning(relay, go_binary, tmp_path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        srv = CliProcess([f"--derp={relay.derp_arg}", "serve", "--udp", udp.getsockname()[1], "--derp-ca",
                          relay.ca_file, "--no-direct"], cli_env(tmp_path / "py"), tmp_path / "serve.log")
        with srv:
            key = srv.wait_for_line(r'join --udp ([A-Za-z0-9_-]{43}) PORT"', timeout=30).group(1)
            with GoDerpconnect.join(relay, key, 0, tmp_path / "join", binary=go_binary) as join:
                with socket.create_connection(("127.0.0.1", join.listen_port), timeout=30) as c:
                    c.sendall(b"hello")
                    c.settimeout(30)
                    try:
                        assert c.recv(10) == b""
                    except ConnectionResetError:
                        pass
            srv.wait_for_line(r"refused a TCP stream from \S+ \(unverified\): this serve forwards UDP \(--udp\); "
                              r"it is probably the Go derpconnect", timeout=20)
    finally:
        udp.close()
