"""serve + join end to end, as real processes, through a real relay on loopback:
a 50 MiB HTTP download (SHA-256 compared), half-close, 60 simultaneous connections,
--allow refusing a stranger, Ctrl-C/SIGTERM, and the start-up failures (relay unreachable,
TLS not trusted, port in use) that must be one line on stderr."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from derpnet.keys import PrivateKey
from tests.cmd.procs import CliProcess, CountingServer, HttpFileServer, cli_env, error_lines, free_port, run_cli
from tests.relays import OurRelay

FILE_SIZE = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


@pytest.fixture
def envs(tmp_path):
    """Separate homes (so separate identities) for the serving and the joining side."""
    return cli_env(tmp_path / "srv"), cli_env(tmp_path / "cli")


def _one_error(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in error_lines(r.stderr) if "error" in line]
    assert len(errors) == 1, r.stderr
    assert error_lines(r.stderr)[-1] == errors[0]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _exchange(port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send payload, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)), daemon=True)
        t.start()
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        t.join(timeout)
        return b"".join(chunks)


class DigestAfterEofServer(CountingServer):
    """Reads until the client half-closes, then answers with the SHA-256 of what it got:
    only works if the tunnel carries the FIN in one direction and keeps the other open."""

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            h = hashlib.sha256()
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    h.update(data)
                conn.sendall(h.digest())
            except OSError:
                pass


# ---------------------------------------------------------------- data


def test_http_download_50mib(relay, envs, tmp_path):
    srv_env, cli_env_ = envs
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(FILE_SIZE)
    (www / "blob.bin").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    del blob
    with HttpFileServer(www, log_path=tmp_path / "http.log") as http, \
            CliProcess.serve(relay.url, http.port, srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, log_path=tmp_path / "join.log") as cli:
        assert srv.join_derp == relay.url
        t0 = time.monotonic()
        h = hashlib.sha256()
        n = 0
        with urllib.request.urlopen(f"http://127.0.0.1:{cli.listen_port}/blob.bin", timeout=120) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
        elapsed = time.monotonic() - t0
        assert n == FILE_SIZE
        assert h.hexdigest() == want
        # connection lifecycle at info level on both sides: peer, bytes each way, duration
        srv.wait_for_line(r"conn #1 from \S+: closed after [\d.]+ s; sent 50\.0 MiB, received \S+ \S+", timeout=20)
        cli.wait_for_line(r"conn #1 from 127\.0\.0\.1:\d+ to \S+: closed after [\d.]+ s; sent \S+ \S+, "
                          r"received 50\.0 MiB", timeout=20)
        print(f"50 MiB through serve/join in {elapsed:.1f} s ({FILE_SIZE / elapsed / 1e6:.1f} MB/s)")


def test_half_close_both_ways(relay, envs, tmp_path):
    srv_env, cli_env_ = envs
    with DigestAfterEofServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, log_path=tmp_path / "join.log") as cli:
        payload = os.urandom(3 * 1024 * 1024 + 17)
        assert _exchange(cli.listen_port, payload) == hashlib.sha256(payload).digest()
        assert _exchange(cli.listen_port, b"") == hashlib.sha256(b"").digest()


def test_sixty_simultaneous_connections(relay, envs, tmp_path):
    srv_env, cli_env_ = envs
    n = 60
    with CountingServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, log_path=tmp_path / "join.log") as cli:
        # every connection is opened (and has sent its first bytes) before any is finished
        barrier = threading.Barrier(n, timeout=60)
        results: dict[int, bool] = {}
        errors: list[BaseException] = []

        def one(i: int) -> None:
            payload = os.urandom(64 * 1024 + i)
            try:
                with socket.create_connection(("127.0.0.1", cli.listen_port), timeout=90) as s:
                    s.sendall(payload[:1000])
                    first = b""
                    while len(first) < 1000:
                        chunk = s.recv(1000 - len(first))
                        assert chunk, "closed early"
                        first += chunk
                    barrier.wait()  # all n tunnels are open and carrying data now
                    s.sendall(payload[1000:])
                    s.shutdown(socket.SHUT_WR)
                    rest = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        rest += chunk
                results[i] = first + rest == payload
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=one, args=(i,), name=f"client-{i}") for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert len(results) == n and all(results.values())
        assert target.accepted == n


# ---------------------------------------------------------------- --allow


def test_allow_refuses_a_stranger(relay, envs, tmp_path):
    srv_env, cli_env_ = envs
    friend_env = cli_env(tmp_path / "friend")
    friend = run_cli(["pubkey"], friend_env).stdout.split()[0]
    with CountingServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, extra=["--allow", friend],
                             log_path=tmp_path / "serve.log") as srv:
        stranger = CliProcess.join(relay.url, srv.pubkey, cli_env_, log_path=tmp_path / "stranger.log")
        try:
            with socket.create_connection(("127.0.0.1", stranger.listen_port), timeout=30) as s:
                s.sendall(b"hello?")
                s.settimeout(30)
                try:
                    got = s.recv(100)
                except ConnectionResetError:
                    got = b""
                assert got == b""
            rc = stranger.wait(timeout=30)
            out = stranger.output()
            assert rc == 1, out
            assert "Traceback" not in out
            last = out.splitlines()[-1]
            assert last.startswith("derpconnect: error: ") and "refused" in last, last
        finally:
            stranger.stop()
        assert target.accepted == 0  # not one byte, not even a connection, reached the port

        with CliProcess.join(relay.url, srv.pubkey, friend_env, log_path=tmp_path / "friend.log") as ok:
            assert _exchange(ok.listen_port, b"friend") == b"friend"
        assert target.accepted == 1


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_within_a_second(relay, envs, tmp_path, sig):
    srv_env, cli_env_ = envs
    with CountingServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, log_path=tmp_path / "join.log") as cli:
        # an open, active tunnel at the moment of the signal
        s = socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30)
        try:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            for p in (cli, srv):
                t0 = time.monotonic()
                p.send_signal(sig)
                rc = p.wait(timeout=5)
                took = time.monotonic() - t0
                assert rc == 0, p.output()
                assert took < 1.0, f"{p.argv[3:5]} took {took:.2f} s to exit"
                assert "Traceback" not in p.output()
            # the tunnel was closed, not left hanging
            s.settimeout(10)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        finally:
            s.close()


# ---------------------------------------------------------------- start-up failures


def test_relay_refuses_connection(envs):
    srv_env, cli_env_ = envs
    port = free_port()
    t0 = time.monotonic()
    r = run_cli([f"--derp=http://127.0.0.1:{port}", "serve", "8080"], srv_env, timeout=40)
    assert time.monotonic() - t0 < 30
    _one_error(r, 1, f"127.0.0.1:{port}", "refused")
    r = run_cli([f"--derp=http://127.0.0.1:{port}", "join", PrivateKey.generate().public_key.b64()], cli_env_,
                timeout=40)
    _one_error(r, 1, "refused")


def test_relay_silent_exits_within_connect_timeout(envs, blackhole):
    srv_env, _ = envs
    t0 = time.monotonic()
    r = run_cli([f"--derp=http://127.0.0.1:{blackhole}", "--connect-timeout", "3", "serve", "8080"], srv_env,
                timeout=40)
    took = time.monotonic() - t0
    _one_error(r, 1, "cannot connect")
    assert took < 10, took


def test_relay_silent_default_bound_is_under_30s(envs, blackhole):
    _, cli_env_ = envs
    t0 = time.monotonic()
    r = run_cli([f"--derp=http://127.0.0.1:{blackhole}", "join", PrivateKey.generate().public_key.b64()],
                cli_env_, timeout=60)
    took = time.monotonic() - t0
    _one_error(r, 1, "cannot connect")
    assert took < 30, took


def test_tls_relay_needs_its_ca(envs, tmp_path):
    srv_env, cli_env_ = envs
    with OurRelay(tls=True) as tls_relay, CountingServer() as target:
        r = run_cli([f"--derp={tls_relay.url}", "serve", str(target.port)], srv_env, timeout=40)
        _one_error(r, 1, "TLS certificate", "not trusted", "--derp-ca")
        with CliProcess.serve(tls_relay.url, target.port, srv_env, extra=["--derp-ca", tls_relay.ca_file],
                              log_path=tmp_path / "serve.log") as srv, \
                CliProcess.join(tls_relay.url, srv.pubkey, cli_env_, extra=["--derp-ca", tls_relay.ca_file],
                                log_path=tmp_path / "join.log") as cli:
            assert _exchange(cli.listen_port, b"over tls") == b"over tls"


def test_join_port_in_use(envs):
    _, cli_env_ = envs
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli(["--derp=http://127.0.0.1:1", "join", PrivateKey.generate().public_key.b64(),
                     f"127.0.0.1:{port}"], cli_env_, timeout=40)
        _one_error(r, 1, f"127.0.0.1:{port}", "address already in use")
        r = run_cli(["--derp=http://127.0.0.1:1", "join", PrivateKey.generate().public_key.b64(), str(port)],
                    cli_env_, timeout=40)
        _one_error(r, 1, "address already in use")


def test_join_listens_on_loopback_by_default(relay, envs, tmp_path):
    srv_env, cli_env_ = envs
    with CountingServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, log_path=tmp_path / "join.log") as cli:
        assert cli.listen_addr.startswith("127.0.0.1:")
    with CountingServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, log_path=tmp_path / "serve2.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, listen="0.0.0.0:0", log_path=tmp_path / "j2.log") as cli:
        assert cli.listen_addr.startswith("0.0.0.0:")
        assert _exchange(cli.listen_port, b"any") == b"any"


# ---------------------------------------------------------------- relay command, regions


def test_relay_command_with_self_signed_tls_and_region_code(tmp_path, envs):
    """`derpconnect relay --tls` (a self-signed certificate, kept for clients' --derp-ca),
    and peers that name it by a region code of a private DERP map."""
    srv_env, cli_env_ = envs
    relay_env = cli_env(tmp_path / "relayhome")
    port = free_port()
    with CliProcess(["relay", "--listen", f"127.0.0.1:{port}", "--tls", "--stun-port", "0"], relay_env,
                    log_path=tmp_path / "relay.log") as rp:
        m = rp.wait_for_line(r"derpnet relay listening on (https://\S+)", timeout=30)
        ca = rp.wait_for_line(r"clients need --derp-ca (\S+)", timeout=5).group(1)
        assert Path(ca).is_file()
        lab = tmp_path / "lab.json"
        lab.write_text('{"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab", '
                       '"Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "localhost", '
                       f'"DERPPort": {port}}}]}}}}}}')
        common = ["--derp-map", str(lab), "--derp-ca", ca]
        with CountingServer() as target, \
                CliProcess(["--derp=lab", *common, "serve", str(target.port)], srv_env,
                           log_path=tmp_path / "serve.log") as srv:
            # the join line carries the --derp-ca the other side needs (issue 11, item 11)
            j = srv.wait_for_line(r'Join with "derpconnect --derp=(\S+) --derp-ca (\S+) join (\S+)"', timeout=30)
            assert j.group(1) == f"https://localhost:{port}" == m.group(1)
            assert j.group(2) == str(Path(ca).resolve())
            with CliProcess.join("900", j.group(3), cli_env_, extra=common, log_path=tmp_path / "join.log") as cli:
                assert _exchange(cli.listen_port, b"via region") == b"via region"


def test_max_conns_bounds_open_tunnels(relay, envs, tmp_path):
    """join --max-conns 2: a third connection waits (not accepted) until one of the two ends;
    the serve target is given as HOST:PORT."""
    srv_env, cli_env_ = envs
    with CountingServer() as target, \
            CliProcess.serve(relay.url, f"127.0.0.1:{target.port}", srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay.url, srv.pubkey, cli_env_, extra=["--max-conns", "2"],
                            log_path=tmp_path / "join.log") as cli:
        first = socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30)
        second = socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30)
        for s in (first, second):
            s.sendall(b"hi")
            assert s.recv(2) == b"hi"
        cli.wait_for_line(r"2 connections open \(the --max-conns limit\)", timeout=10)
        third = socket.create_connection(("127.0.0.1", cli.listen_port), timeout=30)
        try:
            third.sendall(b"3rd")
            third.setblocking(False)
            with pytest.raises(BlockingIOError):
                third.recv(3)  # join has not even accepted it: nothing can have come back
            third.setblocking(True)
            third.settimeout(30)
            first.close()
            assert third.recv(3) == b"3rd"
            assert target.accepted == 3
        finally:
            for s in (first, second, third):
                s.close()
