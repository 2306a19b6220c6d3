"""The rough edges a newcomer hit (issue 11, items 6-10 and 13), each as it was seen: real
`derpconnect` processes, our relay on loopback, a TCP port that never answers."""

from __future__ import annotations

import base64
import socket
import time

import pytest

from derpnet.keys import PrivateKey
from tests.cmd.procs import CliProcess, CountingServer, cli_env, error_lines, free_port, run_cli
from tests.relays import OurRelay


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path / "home")


def _error(r, code: int, *needles: str) -> str:
    """Exit status `code`, no traceback, the last stderr line is the one error line and
    holds every needle."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = error_lines(r.stderr)
    errors = [line for line in lines if line.startswith("derpconnect: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


# ---------------------------------------------------------------- 6: one key, one process


def test_join_to_own_key_stops_at_once_with_a_hint(env):
    own = run_cli(["pubkey"], env).stdout.split()[0]
    t0 = time.monotonic()
    r = run_cli(["--derp=http://127.0.0.1:1", "join", own, "0"], env, timeout=30)
    assert time.monotonic() - t0 < 10  # refused before any relay is dialled (port 1 refuses anyway)
    _error(r, 2, "own public key", "--key NAME")


def test_second_serve_on_one_key_refuses_to_start(relay, tmp_path):
    env = cli_env(tmp_path / "home")
    with CountingServer() as target:
        first = CliProcess.serve(relay.url, target.port, env, log_path=tmp_path / "serve1.log")
        with first:
            r = run_cli([f"--derp={relay.url}", "serve", str(target.port)], env, timeout=40)
            _error(r, 1, "in use", "--key NAME")
            # a join with the same identity would take serve's traffic just the same
            other = PrivateKey.generate().public_key.b64()
            r = run_cli([f"--derp={relay.url}", "join", other, "0"], env, timeout=40)
            _error(r, 1, "in use by a derpconnect serve", "--key NAME")
            # ... while the first serve still works for a peer with its own identity
            peer_env = cli_env(tmp_path / "peer")
            with CliProcess.join(relay.url, first.pubkey, peer_env, log_path=tmp_path / "join.log") as cli, \
                    socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30) as c:
                c.sendall(b"still mine")
                assert c.recv(100) == b"still mine"
            first.proc.kill()  # a crash releases the lock too
            first.proc.wait(10)
        with CliProcess.serve(relay.url, target.port, env, log_path=tmp_path / "serve2.log") as again:
            assert again.pubkey == first.pubkey


# ---------------------------------------------------------------- 7: --connect-timeout


def test_connect_timeout_is_honoured_above_the_library_default(env, blackhole):
    """--connect-timeout 13 against a relay that never answers gives up after about 13 s
    (it gave up at the library's 10 s)."""
    t0 = time.monotonic()
    r = run_cli([f"--derp=http://127.0.0.1:{blackhole}", "--connect-timeout", "13", "serve", "8080"], env,
                timeout=60)
    took = time.monotonic() - t0
    _error(r, 1, "cannot connect")
    assert 12.5 <= took < 17, took


def test_help_states_the_connect_timeout_default_in_use(env):
    from derpnet.cmd.cli import build_parser

    out = run_cli(["--help"], env).stdout
    assert "default 20" in " ".join(out.split())
    assert build_parser().parse_args(["join", "x"]).connect_timeout == 20.0


# ---------------------------------------------------------------- 8: error lines


def test_https_to_a_plain_relay_names_it_once_and_suggests_http(relay, env):
    hostport = relay.url.split("://", 1)[1]
    r = run_cli([f"--derp=https://{hostport}", "serve", "8080"], env, timeout=40)
    line = _error(r, 1, "TLS", f"--derp=http://{hostport}")
    assert line.count(f"https://{hostport}") == 1, line

    r = run_cli([f"--derp={hostport}", "serve", "8080"], env, timeout=40)  # bare HOST:PORT
    line = _error(r, 1, f"--derp=http://{hostport}")
    notes = [x for x in error_lines(r.stderr) if "taken as" in x]
    assert len(notes) == 1 and f"https://{hostport}" in notes[0], r.stderr
    assert line.count(f"https://{hostport}") == 1, line


def test_refused_relay_is_named_once(env):
    port = free_port()
    r = run_cli([f"--derp=http://127.0.0.1:{port}", "serve", "8080"], env, timeout=40)
    line = _error(r, 1, "refused")
    assert line.count(f"127.0.0.1:{port}") == 1, line


# ---------------------------------------------------------------- 10: the relay command


def test_relay_bad_listen_is_a_usage_error(env):
    r = run_cli(["relay", "--listen", "nonsense", "--stun-port", "0"], env, timeout=30)
    _error(r, 2, "--listen")
    r = run_cli(["relay", "--listen", "127.0.0.1:70000", "--stun-port", "0"], env, timeout=30)
    _error(r, 2, "--listen")


def test_relay_busy_port_mentions_listen(env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli(["relay", "--listen", f"127.0.0.1:{port}", "--stun-port", "0"], env, timeout=30)
    assert r.stdout == ""
    _error(r, 1, "address already in use", "--listen")


@pytest.mark.parametrize("spelling", ["--tls-key", "--key"])
def test_relay_tls_key_and_its_old_spelling_ready_line_once(env, tmp_path, spelling):
    from tests.cmd.procs import make_self_signed

    cert, key = make_self_signed(tmp_path, ["localhost", "127.0.0.1"])
    port = free_port()
    with CliProcess(["relay", "--listen", f"127.0.0.1:{port}", "--stun-port", "0", "--cert", cert, spelling, key],
                    env, log_path=tmp_path / "relay.log") as rp:
        rp.wait_for_line(r"derpnet relay listening on https://", timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # up; every start-up line is out before the ready line
        lines = rp.lines()
    ready = [x for x in lines if "listening on" in x]
    assert len(ready) == 1, lines  # stdout and stderr share a terminal: once
    deprecated = [x for x in lines if "deprecated" in x]
    if spelling == "--key":
        assert len(deprecated) == 1 and "--tls-key" in deprecated[0], lines
    else:
        assert not deprecated, lines


# ---------------------------------------------------------------- 13: key parse errors


@pytest.mark.parametrize("text", [
    base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # 44 characters: base64url with its padding
    "A" * 43 + "B",  # 44: a stray character
    base64.urlsafe_b64encode(PrivateKey.generate().raw).decode()[:40],
    "nodekey:" + PrivateKey.generate().raw.hex()[:50],
    "laptopkey",
])
def test_key_parse_errors_say_the_forms_and_length_never_the_key(env, text):
    r = run_cli(["--derp=http://127.0.0.1:1", "join", text, "0"], env, timeout=30)
    line = _error(r, 2, "expected", "43-character base64url", "nodekey:<64 hex>", "64 hex")
    body = text.split(":")[-1]
    n = len(body) + (len("nodekey:") if text.startswith("nodekey:") else 0)
    assert str(len(body)) in line or str(n) in line, line
    for i in range(len(body) - 5):
        assert body[i:i + 6] not in line, line  # not even a piece of it


# ---------------------------------------------------------------- 9: a relay outage


def test_relay_outage_says_one_line_each_way_and_blames_the_relay(tmp_path):
    """The relay is killed for 12 s under a running serve/join pair (relay only: no direct
    path): join says once that the relay went and once that it is back (it said so on every
    retry, 23 lines in 35 s); a connection made meanwhile is told the relay is unreachable,
    not the peer."""
    with OurRelay() as rel, CountingServer() as target, \
            CliProcess.serve(rel.url, target.port, cli_env(tmp_path / "srv"), extra=["--no-direct"],
                             log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(rel.url, srv.pubkey, cli_env(tmp_path / "cli"),
                            extra=["--dial-timeout", "3", "--no-direct"], log_path=tmp_path / "join.log") as cli:
        with socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30) as c:
            c.sendall(b"before")
            assert c.recv(100) == b"before"
        mark = len(cli.lines())
        rel.kill()
        cli.wait_for_line(r"relay link to \S+ lost", timeout=15, start=mark)
        t_down = time.monotonic()
        with socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30) as c:
            c.settimeout(30)
            try:
                assert c.recv(100) == b""  # closed (reset) once the dial gives up
            except ConnectionResetError:
                pass
        blamed = cli.wait_for_line(r"error: connection from \S+: (.*)", timeout=15, start=mark).group(1)
        assert "relay" in blamed and "unreachable" in blamed, blamed
        # the outage itself (not a wait for something): 12 s of retries at the backoff's pace
        time.sleep(max(0.0, 12 - (time.monotonic() - t_down)))
        rel.start()  # the same port and key
        cli.wait_for_line(r"reconnected to relay \S+ after", timeout=30, start=mark)
        srv.wait_for_line(r"reconnected to relay \S+ after", timeout=30)  # the peer too, at its own pace
        with socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30) as c:
            c.sendall(b"after")
            assert c.recv(100) == b"after"
        during = [x for x in cli.lines()[mark:] if "relay" in x]
    assert len([x for x in during if "lost" in x]) == 1, during
    assert len([x for x in during if "reconnected" in x]) == 1, during
    assert not [x for x in during if "failed" in x or "still unreachable" in x or "next try" in x], during
