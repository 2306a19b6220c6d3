"""A broken stream must not look like a finished one: `serve` and `join` pass a clean end of
data on as a FIN, and anything else (the peer killed, the peer gone from the relay, no peer
at all) as a reset (RST), so that a client without length framing never takes a truncated
transfer for a complete one. Real processes, our relay, real TCP clients.
"""

from __future__ import annotations

import errno
import socket
import time

import pytest

from tests.cmd.procs import CliProcess, TransferService, cli_env, start_relay

MiB = 1 << 20
IDLE = 3.0  # --idle-timeout of the surviving side: a killed peer is given up after this


def _receive_until_it_breaks(sock: socket.socket, timeout: float) -> tuple[str, int, float]:
    """Read until the connection ends: ("rst", bytes, seconds) for a reset, ("fin", ...) for
    a clean end of data."""
    sock.settimeout(timeout)
    got = 0
    t0 = time.monotonic()
    try:
        while True:
            b = sock.recv(1 << 16)
            if not b:
                return "fin", got, time.monotonic() - t0
            got += len(b)
    except ConnectionResetError:
        return "rst", got, time.monotonic() - t0


@pytest.fixture
def relay(tmp_path):
    with start_relay(tmp_path / "relay", cli_env(tmp_path / "relay-home")) as r:
        yield r


@pytest.fixture
def service():
    with TransferService() as s:
        yield s


def _pair(relay, service, tmp_path, *, join_extra=()):
    serve = CliProcess.serve(relay.url, service.port, cli_env(tmp_path / "s"), extra=["--no-direct"],
                             log_path=tmp_path / "serve.log")
    try:
        join = CliProcess.join(relay.url, serve.pubkey, cli_env(tmp_path / "j"),
                               extra=["--no-direct", *join_extra], log_path=tmp_path / "join.log")
    except BaseException:
        serve.stop()
        raise
    return serve, join


def test_killed_serve_resets_the_client_behind_join(relay, service, tmp_path):
    serve, join = _pair(relay, service, tmp_path, join_extra=["--idle-timeout", str(IDLE)])
    with serve, join:
        with socket.create_connection(("127.0.0.1", join.listen_port), timeout=20) as c:
            c.sendall(b"S\n")  # an endless stream from the service, through the tunnel
            c.settimeout(20)
            got = 0
            while got < MiB:
                got += len(c.recv(1 << 16))
            serve.proc.kill()  # SIGKILL: no CONNECTION_CLOSE, no RESET_STREAM, nothing
            how, _, after = _receive_until_it_breaks(c, timeout=IDLE + 20)
        assert how == "rst", "a killed serve looked like a clean end of data (FIN) to the client"
        assert after < IDLE + 10, after
        join.wait_for_line(r"conn #1 .*failed", timeout=10)


def test_clean_half_close_delivers_every_byte_and_a_fin(relay, service, tmp_path):
    serve, join = _pair(relay, service, tmp_path)
    with serve, join:
        # The client's FIN reaches the service (it answers only after EOF), the answer comes
        # back followed by the service's FIN; and a download ends with every byte, then FIN.
        assert TransferService.upload(join.listen_port, 3 * MiB) > 0
        assert TransferService.download(join.listen_port, 3 * MiB) > 0
        with socket.create_connection(("127.0.0.1", join.listen_port), timeout=20) as c:
            c.sendall(b"D %d\n" % MiB)
            how, got, _ = _receive_until_it_breaks(c, timeout=20)
            assert (how, got) == ("fin", MiB)
            c.sendall(b"still open for writing after the FIN")  # half-close, not a reset
    assert "failed" not in join.output() and "failed" not in serve.output()


def test_absent_peer_resets_the_client(relay, tmp_path):
    """A key nobody holds: our relay says so (PeerGone NotHere) and the client is reset at
    once, not after the 15 s dial timeout."""
    nobody = "A" * 42 + "E"  # a valid key nobody holds
    with CliProcess.join(relay.url, nobody, cli_env(tmp_path / "j"), extra=["--no-direct"]) as join:
        with socket.create_connection(("127.0.0.1", join.listen_port), timeout=20) as c:
            c.sendall(b"hello?")
            how, _, after = _receive_until_it_breaks(c, timeout=30)
        assert how == "rst", "the client of a join whose peer never answered saw a clean end (FIN)"
        assert after < 3, "waited for the dial timeout although the relay said the key is not there"
        join.wait_for_line(r"not connected to the relay", timeout=5)
        assert join.proc.poll() is None  # one failed connection does not end the join


def test_a_peer_that_left_the_relay_fails_fast(relay, service, tmp_path):
    """The relay tells the join that its peer left (PeerGone): the next connection is reset
    after a short grace, not after the 15 s dial timeout, and the join keeps serving."""
    serve, join = _pair(relay, service, tmp_path)
    with join:
        with serve:
            assert TransferService.download(join.listen_port, MiB) > 0
            serve.proc.kill()
        # Whether the relay's PeerGone(Disconnected) reaches the join before the next dial or
        # the dial's first packet meets PeerGone(NotHere), the dial fails within a round trip.
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", join.listen_port), timeout=20) as c:
            c.sendall(b"D 100\n")
            how, _, _ = _receive_until_it_breaks(c, timeout=30)
        assert how == "rst"
        assert time.monotonic() - t0 < 8, "waited for the dial timeout although the relay said the peer left"
        join.wait_for_line(r"not connected to the relay", timeout=5)
        assert join.proc.poll() is None


def test_a_reset_socket_error_is_econnreset():
    """What the tests above rely on: SO_LINGER 0 then close() is an RST the other side reads
    as ECONNRESET, with no FIN before it (derpnet.cmd.forward.abort)."""
    from derpnet.cmd.forward import abort

    with socket.create_server(("127.0.0.1", 0)) as ls:
        c = socket.create_connection(ls.getsockname(), timeout=5)
        s, _ = ls.accept()
        s.sendall(b"partial")
        abort(s)
        assert c.recv(7) == b"partial"
        with pytest.raises(ConnectionResetError) as e:
            c.recv(10)
        assert e.value.errno == errno.ECONNRESET
        c.close()
