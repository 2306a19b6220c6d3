"""`serve --udp` / `join --udp` end to end, as real processes through a real relay, to a
real UDP echo service: two client flows, every echoed datagram checked (SHA-256 of its
payload, its flow, its exact bytes: lost is allowed, corrupted, crossed or altered never),
large datagrams, and the clear refusals (a TCP serve, a TCP stream to a UDP serve)."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import pytest

from tests.cmd.procs import CliProcess, cli_env, error_lines, run_cli
from tests.relays import OurRelay

UDP_JOIN_RX = r'Join with "derpconnect --derp=\S+ join --udp ([A-Za-z0-9_-]{43}) PORT"'
UDP_LISTEN_RX = r"Listening on udp \S+:(\d+)"


class UdpEcho:
    """A UDP echo service on 127.0.0.1 in this process."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sources: set = set()
        threading.Thread(target=self._loop, name="udp-echo", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sources.add(addr)
                self.sock.sendto(data, addr)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def relay():
    with OurRelay() as r:
        yield r


@pytest.fixture(scope="module")
def echo():
    e = UdpEcho()
    yield e
    e.close()


@pytest.fixture(scope="module")
def udp_pair(relay, echo, tmp_path_factory):
    home = tmp_path_factory.mktemp("udp")
    srv = CliProcess([f"--derp={relay.url}", "serve", "--udp", echo.port, "--no-direct"], cli_env(home / "srv"),
                     home / "serve.log")
    try:
        key = srv.wait_for_line(UDP_JOIN_RX, timeout=30).group(1)
        cli = CliProcess([f"--derp={relay.url}", "join", "--udp", key, "0", "--no-direct"], cli_env(home / "cli"),
                         home / "join.log")
        try:
            port = int(cli.wait_for_line(UDP_LISTEN_RX, timeout=30).group(1))
            yield srv, cli, port, key
        finally:
            cli.stop()
    finally:
        srv.stop()


def _datagram(flow: int, seq: int, size: int) -> bytes:
    body = os.urandom(max(0, size - 8 - 32))
    head = struct.pack("!II", flow, seq)
    return head + hashlib.sha256(head + body).digest() + body


def _check(data: bytes) -> tuple[int, int]:
    head, digest, body = data[:8], data[8:40], data[40:]
    assert hashlib.sha256(head + body).digest() == digest, "a corrupted datagram came back"
    flow, seq = struct.unpack("!II", head)
    return flow, seq


def _exchange(port: int, flow: int, sizes: list[int], window: int = 16) -> dict[int, bytes]:
    """Send datagrams of `sizes` from a client socket of its own, `window` at a time, and
    collect the echoes (each checked); returns seq -> datagram for those that came back."""
    sent: dict[int, bytes] = {}
    got: dict[int, bytes] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(2.0)
        for start in range(0, len(sizes), window):
            batch = range(start, min(start + window, len(sizes)))
            for seq in batch:
                sent[seq] = _datagram(flow, seq, sizes[seq])
                c.sendto(sent[seq], ("127.0.0.1", port))
            waiting = set(batch)
            while waiting:
                try:
                    data, _ = c.recvfrom(65535)
                except TimeoutError:
                    break  # lost ones stay lost
                f, seq = _check(data)
                assert f == flow, f"flow {flow} received a datagram of flow {f}"
                assert data == sent[seq], "a datagram came back altered"
                assert seq not in got or got[seq] == data
                got[seq] = data
                waiting.discard(seq)
    return got


def test_two_flows_echo_intact(udp_pair, echo):
    srv, cli, port, _ = udp_pair
    sizes = [40 + (i * 37) % 1400 for i in range(300)]
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda f=f: results.__setitem__(f, _exchange(port, f, sizes)),
                                name=f"test-udp-flow-{f}") for f in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for flow in (1, 2):
        assert len(results[flow]) >= 0.9 * len(sizes), f"flow {flow}: {len(results[flow])} of {len(sizes)} came back"
    assert len(echo.sources) >= 2  # one socket at serve per client flow


def test_large_datagrams(udp_pair):
    _, _, port, _ = udp_pair
    got = _exchange(port, 3, [8000, 16000, 30000] * 4, window=3)
    assert len(got) >= 9


def test_join_udp_to_a_tcp_serve_is_one_clear_error(relay, tmp_path):
    with CliProcess.serve(relay.url, 9, cli_env(tmp_path / "srv"), extra=["--no-direct"]) as srv:
        r = run_cli([f"--derp={relay.url}", "join", "--udp", srv.pubkey, "0", "--no-direct"], cli_env(tmp_path / "c"))
    assert r.returncode == 1, r
    lines = error_lines(r.stderr)
    assert "Traceback" not in r.stderr
    assert lines[-1].startswith("derpconnect: error: peer ") and "serves TCP, not UDP" in lines[-1], lines


def test_a_tcp_join_to_a_udp_serve_is_refused_with_a_warning(udp_pair, relay, tmp_path):
    srv, _, _, key = udp_pair
    with CliProcess.join(relay.url, key, cli_env(tmp_path / "tcp"), extra=["--no-direct"]) as tcp:
        with socket.create_connection(("127.0.0.1", tcp.listen_port), timeout=30) as s:
            s.sendall(b"hello")
            s.settimeout(30)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass  # refused: the tunnel is reset
    srv.wait_for_line(r"refused a TCP stream from \S+: this serve forwards UDP \(--udp\)", timeout=10)


def test_udp_with_stdio_is_a_usage_error(tmp_path):
    r = run_cli(["--derp=http://127.0.0.1:9", "join", "--udp", "nodekey:" + "ab" * 32, "-"], cli_env(tmp_path))
    assert r.returncode == 2, r
    assert "--udp" in r.stderr
