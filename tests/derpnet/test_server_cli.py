"""`python -m derpnet.server` as a real subprocess (through tests.relays.OurRelay): the ready
line, restarts on the same port and key, key files, signals, and clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from derpnet import frames as F
from derpnet.keys import PrivateKey
from derpnet.server.cli import main, parse_listen
from tests.rawderp import RawDerpClient, wait_closed
from tests.relays import REPO_ROOT, OurRelay


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "derpnet.server", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)


def test_ready_line_and_forwarding():
    with OurRelay() as relay:
        assert relay.url == f"http://127.0.0.1:{relay.port}"
        with RawDerpClient(relay.url) as a, RawDerpClient(relay.url) as b:
            assert a.connected.server_key == relay.public_key
            a.send(b.public_key, b"through a subprocess")
            assert b.recv_packet().data == b"through a subprocess"


def test_tls_subprocess_with_test_ca():
    with OurRelay(tls=True) as relay:
        assert relay.url == f"https://localhost:{relay.port}"
        with RawDerpClient(relay.url, ssl_context=relay.ssl_context(), fast_start=True) as a:
            a.send(a.public_key, b"tls")
            assert a.recv_packet().data == b"tls"


def test_restart_keeps_port_and_key():
    with OurRelay() as relay:
        port, key = relay.port, relay.public_key
        a = RawDerpClient(relay.url)
        relay.restart()
        assert wait_closed(a.sock)  # the crash ended the old connection
        a.close()
        assert (relay.port, relay.public_key) == (port, key)
        with RawDerpClient(relay.url) as b:
            assert b.connected.server_key == key


def test_sigterm_and_sigint_exit_cleanly():
    for sig in (signal.SIGTERM, signal.SIGINT):
        with OurRelay() as relay:
            with RawDerpClient(relay.url) as a:
                relay.proc.send_signal(sig)
                assert relay.proc.wait(timeout=10) == 0
                assert wait_closed(a.sock)
            assert "Traceback" not in relay.output()


def test_port_in_use_is_one_line_and_exit_1():
    with OurRelay() as relay:
        r = run_cli("--listen", f"127.0.0.1:{relay.port}")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip() == (f"derpnet relay: cannot listen on 127.0.0.1:{relay.port}: address already in use "
                                "(choose another address with --listen HOST:PORT)")


def test_key_file_created_0600_and_reused(tmp_path):
    path = tmp_path / "sub" / "relay.key"
    with OurRelay(extra_args=["--key-file", str(path)]) as relay:  # the later --key-file wins
        first = relay.public_key
    assert path.stat().st_mode & 0o777 == 0o600
    assert PrivateKey.load(path).public_key == first
    with OurRelay(extra_args=["--key-file", str(path)]) as relay:
        assert relay.public_key == first


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_key_file_readable_by_others_is_warned_about(tmp_path):
    """Issue 9, item 5: the same warning the CLI gives for node keys (used anyway, as derper)."""
    path = tmp_path / "relay.key"
    key = PrivateKey.generate()
    key.save(path)
    path.chmod(0o644)
    with OurRelay(extra_args=["--key-file", str(path)]) as relay:
        assert relay.public_key == key.public_key
    out = relay.output()
    assert f"key file {path} is readable by other users (mode 644): chmod 600 it" in out
    assert key.raw.hex() not in out
    path.chmod(0o600)
    with OurRelay(extra_args=["--key-file", str(path)]) as relay:
        pass
    assert "readable by other users" not in relay.output()


def test_derper_json_key_file(tmp_path):
    key = PrivateKey.generate()
    path = tmp_path / "derper.json"
    path.write_text(json.dumps({"PrivateKey": key.to_text()}))
    with OurRelay(extra_args=["--key-file", str(path)]) as relay:
        assert relay.public_key == key.public_key


@pytest.mark.parametrize("args, message, code", [
    (["--listen", "nonsense"], "bad listen address", 2),  # a command-line mistake, as everywhere
    (["--listen", "127.0.0.1:99999"], "port out of range", 2),
    (["--listen", "127.0.0.1:0", "--cert", "/nonexistent.pem"], "cannot set up TLS", 1),
])
def test_bad_arguments_exit_status(args, message, code, capsys):
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_key_file_exit_1(tmp_path, capsys):
    path = tmp_path / "bad.key"
    path.write_text("not a key")
    assert main(["--listen", "127.0.0.1:0", "--key-file", str(path)]) == 1
    assert "cannot use key file" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:3340", ("127.0.0.1", 3340)),
    (":443", (None, 443)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_never_reading_client_does_not_grow_relay_memory_even_without_write_timeout():
    with OurRelay(extra_args=["--write-timeout", "0"]) as relay:
        slow = RawDerpClient(relay.url, rcvbuf=4096)  # never reads; never dropped (timeout 0)
        with RawDerpClient(relay.url) as a:
            chunk = b"".join(F.encode_send_packet(slow.public_key, bytes(60000)) for _ in range(16))
            a.send_raw(chunk * 4)  # warm up: fill the socket buffers and the queues
            assert a.sync(timeout=20) == []
            before = _rss_mib(relay.proc.pid)
            for _ in range(60):  # ~58 MB more at a client that reads nothing
                a.send_raw(chunk)
            assert a.sync(timeout=30) == []
            after = _rss_mib(relay.proc.pid)
            assert after - before < 16, f"relay RSS grew from {before:.1f} to {after:.1f} MiB"
            with RawDerpClient(relay.url) as b:  # and it still serves everyone else
                a.send(b.public_key, b"alive")
                assert b.recv_packet().data == b"alive"
        slow.close()
