"""A peer process dies mid-transfer (SIGKILL: no CONNECTION_CLOSE ever comes).

The survivor's stream must fail with a clear error -- ConnectionAbortedError ("timed out:
nothing heard for N s") -- within the QUIC idle timeout, never hang; and a listener must
keep serving new peers. The idle timeout is derpquic's `idle_timeout` option (default
30 s; the effective value is the smaller of both peers'); these tests set 2 s on the
surviving side, so the bound is 2 s plus up to 3 probe timeouts (aioquic never times
out sooner than 3 PTO).
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time

import pytest

import derpquic
from tests.cmd.procs import CliProcess, CountingServer, Proc, cli_env
from tests.derpquic.helpers import Background
from tests.faults.harness import MiB, Sink, random_bytes

IDLE = 2.0
BOUND = IDLE + 3.0
QUIC_OPTS = {"idle_timeout": IDLE, "keepalive_interval": 0.5, "direct": False}  # the relay path


class Pump:
    """Sends random bytes on a stream until it fails; counts what it handed over."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.sent = 0
        self._bg = Background(self._run, name="faults-send")

    def _run(self) -> None:
        chunk = random_bytes(256 << 10)
        while True:
            self.stream.sendall(chunk)
            self.sent += len(chunk)

    def wait_sent(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < n:  # a poll with a deadline: the counter has no condition
            assert not self._bg.done, self._bg.result()
            assert time.monotonic() < deadline, f"only {self.sent} bytes sent"
            time.sleep(0.01)

    def result(self, timeout: float):
        return self._bg.result(timeout)


def test_killed_serving_peer_fails_the_dialers_stream_within_the_idle_timeout(our_relay, tmp_path, figures):
    env = cli_env(tmp_path / "home")
    with CountingServer(echo=False) as target, \
            CliProcess.serve(our_relay.url, target.port, env, log_path=tmp_path / "serve.log") as srv:
        with derpquic.Dialer(our_relay.url, **QUIC_OPTS) as dialer:
            s = dialer.dial(srv.pubkey, timeout=20)
            s.settimeout(60)
            pump = Pump(s)
            pump.wait_sent(8 * MiB, 30)  # well beyond the windows: the serve process is forwarding
            assert target.accepted == 1
            srv.proc.kill()
            t0 = time.monotonic()
            with pytest.raises(ConnectionAbortedError, match="timed out: nothing heard") as err:
                pump.result(30)
            elapsed = time.monotonic() - t0
            with pytest.raises(ConnectionAbortedError):
                s.recv(1)
            s.close()
        srv.wait(10)
    figures(f"serve process killed after {pump.sent / MiB:.0f} MiB: dialer's stream failed after {elapsed:.2f}s "
            f"({err.value}), idle timeout {IDLE:g}s", seconds=elapsed)
    assert elapsed <= BOUND


def test_killed_dialing_peer_fails_the_accepted_stream_and_the_listener_serves_on(our_relay, tmp_path, figures):
    env = cli_env(tmp_path / "home")
    with derpquic.listen(our_relay.url, **QUIC_OPTS) as ln:
        peer = Proc([sys.executable, "-m", "tests.faults.peer", our_relay.url, ln.addr.b64()], env=env,
                    log_path=tmp_path / "peer.log")
        try:
            peer_key = peer.wait_for_line(r"streaming (\S+)", timeout=30).group(1)
            r = ln.accept(timeout=20)
            r.settimeout(60)
            assert r.remote_addr().b64() == peer_key and r.authenticated
            sink = Sink(r)
            sink.wait_bytes(8 * MiB, 30)
            peer.proc.kill()
            t0 = time.monotonic()
            with pytest.raises(ConnectionAbortedError, match="timed out: nothing heard") as err:
                sink.result(30)
            elapsed = time.monotonic() - t0
            r.close()
        finally:
            peer.stop()
        figures(f"dialing process killed after {sink.received / MiB:.0f} MiB: accepted stream failed after "
                f"{elapsed:.2f}s ({err.value}), idle timeout {IDLE:g}s", seconds=elapsed)
        assert elapsed <= BOUND

        # The listener is unharmed: a new peer connects and transfers intact.
        data = random_bytes(8 * MiB)
        with derpquic.Dialer(our_relay.url, **QUIC_OPTS) as dialer:
            accepted = Background(lambda: ln.accept(timeout=20), name="faults-accept")
            s = dialer.dial(ln.addr, timeout=20)
            r2 = accepted.result(30)
            assert r2.remote_addr() == dialer.addr
            r2.settimeout(60)
            sink2 = Sink(r2)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            n, digest = sink2.result(60)
            assert n == len(data) and digest == hashlib.sha256(data).digest()
            s.close()
            r2.close()
