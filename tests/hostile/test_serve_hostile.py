"""`derpconnect serve/join` (real processes) against hostile peers and a lying relay.

Already covered elsewhere, and not repeated here:
- tests/cmd/test_forward.py::test_allow_refuses_a_stranger: a stranger's `join` to
  `serve --allow FRIEND` is refused, no connection reaches the port, the friend gets in;
- tests/derpquic/test_auth.py: a relay routing our dial to an impostor, a lenient
  impostor, a relaying MITM reusing a proof, and an impostor given an allowed
  address, at the library level; tests/derpquic/test_interop_go.py: the Go
  derpconnect refused by require_auth;
- tests/derpnet/test_server.py and tests/hostile/test_relay_abuse.py: an honest relay
  refuses a ClientInfo that claims another key, and stamps every packet with its
  sender's real key, so with an honest relay a source key cannot be forged at all.

Added here, at the CLI level:
- a relay that lies (tests.hostile.rogue): `join` to a key whose packets are answered
  by someone else refuses; a stranger passed off as the allowed friend still never
  reaches `serve --allow`'s port;
- junk datagrams and half-open QUIC handshakes from a stranger do not disturb serve;
- 100 concurrent connections through one serve/join pair, SHA-256 checked.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

import pytest

import derpnet
from derpnet.keys import PublicKey
from tests.cmd.procs import CliProcess, CountingServer, cli_env, run_cli
from tests.hostile.rogue import RogueRelay
from tests.relays import OurRelay


@pytest.fixture
def envs(tmp_path):
    return cli_env(tmp_path / "srv"), cli_env(tmp_path / "cli")


def _exchange(port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send `payload`, half-close, read to EOF (in parallel, so big payloads cannot deadlock)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)), daemon=True)
        t.start()
        out = bytearray()
        while True:
            try:
                b = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not b:
                break
            out += b
        t.join(timeout)
        return bytes(out)


def _refused_exit(p: CliProcess, port: int) -> str:
    """Connect to join's port, expect the tunnel to be refused and join to exit 1; its last line."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"let me in")
        assert _read_until_closed(s, 30) == b""
    rc = p.wait(timeout=30)
    out = p.output()
    assert rc == 1, out
    assert "Traceback" not in out
    return out.splitlines()[-1]


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            b = s.recv(100)
        except ConnectionResetError:
            return out
        if not b:
            return out
        out += b


# ---------------------------------------------------------------- a relay that lies

def test_join_refuses_a_peer_answered_by_someone_else(envs, tmp_path):
    """The relay hands everything for the serving key to an impostor's `serve` and stamps the
    impostor's answers with that key: join cannot be fooled (the impostor cannot prove the
    key), nothing reaches the impostor's port, and join says why."""
    srv_env, cli_env_ = envs
    victim = derpnet.PrivateKey.generate().public_key  # whom the user means to reach
    with RogueRelay() as rogue, CountingServer() as trap, \
            CliProcess.serve(rogue.url, trap.port, srv_env, log_path=tmp_path / "impostor.log") as impostor:
        rogue.pass_off(PublicKey.parse(impostor.pubkey), as_key=victim)
        join = CliProcess.join(rogue.url, victim.b64(), cli_env_, log_path=tmp_path / "join.log")
        try:
            last = _refused_exit(join, join.listen_port)
        finally:
            join.stop()
        assert last.startswith("derpconnect: error: ") and "authentication" in last, last
        assert victim.b64() in last
        assert rogue.redirected > 0 and rogue.forged > 0  # the relay really did lie, both ways
        assert trap.accepted == 0
        assert impostor.proc.poll() is None  # the impostor's serve is unharmed, just useless


def test_stranger_passed_off_as_the_friend_never_reaches_the_port(envs, tmp_path):
    """`serve --allow FRIEND` behind a relay that stamps a stranger's packets with FRIEND's key:
    the stranger cannot prove FRIEND's key, so not one connection reaches the port."""
    srv_env, stranger_env = envs
    friend_env = cli_env(tmp_path / "friend")
    friend = run_cli(["pubkey"], friend_env).stdout.split()[0]
    stranger = run_cli(["pubkey"], stranger_env).stdout.split()[0]
    with RogueRelay() as rogue, CountingServer() as target, \
            CliProcess.serve(rogue.url, target.port, srv_env, extra=["--allow", friend],
                             log_path=tmp_path / "serve.log") as srv:
        rogue.pass_off(PublicKey.parse(stranger), as_key=PublicKey.parse(friend))
        join = CliProcess.join(rogue.url, srv.pubkey, stranger_env, log_path=tmp_path / "stranger.log")
        try:
            last = _refused_exit(join, join.listen_port)
        finally:
            join.stop()
        assert "authentication" in last, last
        assert rogue.forged > 0
        assert target.accepted == 0
        srv.wait_for_line(rf"peer could not prove it holds the key {friend}: a relay or another node may be "
                          r"impersonating it", timeout=10)
        assert srv.proc.poll() is None


def test_serve_shrugs_off_junk_datagrams_from_a_stranger(envs, tmp_path):
    """A stranger sprays serve's key with random datagrams, fake QUIC Initials and half-open
    handshakes; serve keeps serving its friend, and the stranger never reaches the port."""
    srv_env, friend_env = envs
    friend = run_cli(["pubkey"], friend_env).stdout.split()[0]
    rng = __import__("random").Random(1234)
    with OurRelay() as relay, CountingServer() as target, \
            CliProcess.serve(relay.url, target.port, srv_env, extra=["--allow", friend],
                             log_path=tmp_path / "serve.log") as srv:
        dst = PublicKey.parse(srv.pubkey)
        with derpnet.listen_packet(relay.url) as junk:
            batch = []
            for i in range(3000):
                kind = i % 4
                if kind == 0:    # noise of any size
                    data = rng.randbytes(rng.randint(0, 2000))
                elif kind == 1:  # a long-header QUIC Initial (version 1) full of noise
                    data = bytes([0xC3]) + struct.pack(">I", 1) + bytes([8]) + rng.randbytes(8) + bytes([8]) \
                        + rng.randbytes(8) + rng.randbytes(1200)
                elif kind == 2:  # an unknown QUIC version (asks for version negotiation)
                    data = bytes([0xC0]) + rng.randbytes(4) + bytes([8]) + rng.randbytes(8) + bytes([8]) \
                        + rng.randbytes(1250)
                else:            # short-header packets for connections that do not exist
                    data = bytes([0x40 | rng.randrange(64)]) + rng.randbytes(rng.randint(20, 1400))
                batch.append((data, dst))
                if len(batch) == 100:
                    junk.write_batch(batch)
                    batch.clear()
            # A real handshake that is then abandoned (a stranger dialling, refused by --allow).
            import derpquic
            d = derpquic.Dialer(junk)
            with pytest.raises(ConnectionRefusedError):
                d.dial(dst, timeout=15)
            d.close()
        with CliProcess.join(relay.url, srv.pubkey, friend_env, log_path=tmp_path / "friend.log") as ok:
            payload = os.urandom(200_000)
            assert _exchange(ok.listen_port, payload) == payload
        assert target.accepted == 1  # only the friend
        assert srv.proc.poll() is None
        assert "Traceback" not in srv.output()


# ---------------------------------------------------------------- 100 connections through one serve

def _hundred_connections(relay_url: str, envs, tmp_path, n: int, size: int) -> dict:
    srv_env, cli_env_ = envs
    with CountingServer() as target, \
            CliProcess.serve(relay_url, target.port, srv_env, log_path=tmp_path / "serve.log") as srv, \
            CliProcess.join(relay_url, srv.pubkey, cli_env_, log_path=tmp_path / "join.log") as cli:
        barrier = threading.Barrier(n + 1, timeout=120)
        ok: dict = {}
        errors: list = []

        def one(i: int) -> None:
            payload = os.urandom(size)
            want = hashlib.sha256(payload).digest()
            try:
                with socket.create_connection(("127.0.0.1", cli.listen_port), timeout=120) as s:
                    s.sendall(payload[:16])
                    first = b""
                    while len(first) < 16:
                        chunk = s.recv(16 - len(first))
                        assert chunk, "closed early"
                        first += chunk
                    barrier.wait()  # all n tunnels are open end to end before the bulk starts
                    w = threading.Thread(target=lambda: (s.sendall(payload[16:]), s.shutdown(socket.SHUT_WR)),
                                         daemon=True)
                    w.start()
                    h = hashlib.sha256(first)
                    got = len(first)
                    while True:
                        chunk = s.recv(1 << 16)
                        if not chunk:
                            break
                        h.update(chunk)
                        got += len(chunk)
                    w.join(600)
                ok[i] = (got == size and h.digest() == want)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=one, args=(i,), name=f"conn-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        assert not errors, errors[:3]
        assert len(ok) == n and all(ok.values()), [i for i, v in ok.items() if not v]
        assert target.accepted == n
        assert "Traceback" not in srv.output() + cli.output()
        return {"elapsed": elapsed, "bytes_each_way": n * size}


def test_hundred_concurrent_connections_through_one_serve(envs, tmp_path):
    with OurRelay() as relay:
        r = _hundred_connections(relay.url, envs, tmp_path, n=100, size=1 << 20)
    mb = r["bytes_each_way"] / 1e6
    print(f"\n100 connections x 1 MiB each way: {r['elapsed']:.1f} s, {mb / r['elapsed']:.1f} MB/s each way")


@pytest.mark.slow
def test_hundred_concurrent_connections_8mib_each(envs, tmp_path):
    with OurRelay() as relay:
        r = _hundred_connections(relay.url, envs, tmp_path, n=100, size=8 << 20)
    mb = r["bytes_each_way"] / 1e6
    print(f"\n100 connections x 8 MiB each way: {r['elapsed']:.1f} s, {mb / r['elapsed']:.1f} MB/s each way")
