"""The relay in a mesh: pure parts (flags, routes, retry policy, key check), then meshes of
our relays on loopback: packets across members, a wrong mesh key refused, logged once and
retried with backoff. Meshes with Tailscale's derper: test_mesh_derper.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from datetime import datetime

import pytest

from derpnet.keys import PrivateKey
from derpnet.server import DerpServer
from derpnet.server.mesh import MeshKeyCheck, MeshRoutes, MeshTarget, parse_mesh_key, parse_mesh_with
from derpnet.server.meshclient import MeshRetry, Outcome
from tests.derpnet.meshnet import Mesh, Peer, deliver, write_mesh_key
from tests.interop_peers import free_port
from tests.relays import REPO_ROOT, OurRelay

# ---------------------------------------------------------------- pure


def test_mesh_key_text():
    assert parse_mesh_key(" " + "ab" * 32 + "\n") == bytes([0xab]) * 32
    for bad in ("", "ab" * 31, "AB" * 32, "zz" * 32, "ab" * 33):
        with pytest.raises(ValueError, match="64 lowercase hexadecimal"):
            parse_mesh_key(bad)


def test_mesh_with_entries():
    a, b, c = parse_mesh_with("derp1.example.com, derp2:8443/10.0.0.2,http://127.0.0.1:3340/derp")
    assert a == MeshTarget("derp1.example.com", "derp1.example.com", "https")
    assert (a.port, a.url) == (443, "https://derp1.example.com/derp")
    assert (b.dial_host, b.port, b.name, b.url) == ("10.0.0.2", 8443, "derp2", "https://derp2:8443/derp")
    assert (c.scheme, c.port, c.url) == ("http", 3340, "http://127.0.0.1:3340/derp")
    (d,) = parse_mesh_with("h:3341", use_http=True)
    assert (d.scheme, d.port) == ("http", 3341)
    (e,) = parse_mesh_with("h", use_http=True)
    assert (e.scheme, e.port, e.url) == ("http", 443, "http://h:443/derp")  # derper's debug HTTP dials :443
    for bad in ("a/b/c", "h:99999", "h:x", ",", "/x"):
        with pytest.raises(ValueError):
            parse_mesh_with(bad)


def test_routes_keep_the_first_link_heard():
    k = PrivateKey.generate().public_key
    r = MeshRoutes()
    first, second = object(), object()
    r.add(k, first)  # type: ignore[arg-type]
    r.add(k, second)  # type: ignore[arg-type]
    r.add(k, first)  # type: ignore[arg-type]
    assert r.lookup(k) is first and k in r and len(r) == 1
    assert r.remove(k, first) is False  # type: ignore[arg-type]
    assert r.lookup(k) is second
    assert r.remove(k, object()) is False  # type: ignore[arg-type]
    assert r.remove(k, second) is True  # type: ignore[arg-type]
    assert r.lookup(k) is None and k not in r


def test_retry_doubles_for_a_refused_key_and_logs_once():
    p = MeshRetry(interval=5, cap=60)
    waits = [p.failed(Outcome.REFUSED) for _ in range(6)]
    assert waits == [(5, True), (10, False), (20, False), (40, False), (60, False), (60, False)]
    assert p.failed(Outcome.UNREACHABLE) == (5, True)  # another failure: news, derper's fixed interval
    assert p.failed(Outcome.UNREACHABLE) == (5, False)
    assert p.failed(Outcome.REFUSED) == (5, True)
    p.accepted()
    assert p.failed(Outcome.BROKEN) == (5, False)  # a link that worked and broke: logged at INFO by the link
    assert p.failed(Outcome.REFUSED) == (5, True)


def test_key_check_logs_a_refused_key_once(caplog):
    ours = bytes(range(32))
    check = MeshKeyCheck(ours)
    k1, k2 = PrivateKey.generate().public_key, PrivateKey.generate().public_key
    assert check.judge(k1, {}, "p") is None
    assert check.judge(k1, {"meshkey": ours.hex()}, "p") is True
    with caplog.at_level(logging.DEBUG, logger="derpnet.server.mesh"):
        for k in (k1, k1, k1, k2):
            assert check.judge(k, {"meshkey": "00" * 32}, "p") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and check.refused == 4
    assert ours.hex() not in caplog.text  # the key itself is never logged
    assert MeshKeyCheck(None).judge(k1, {"meshkey": ours.hex()}, "p") is None  # no mesh: a regular client


# ---------------------------------------------------------------- our relays


def test_two_of_our_relays_forward_both_ways(tmp_path):
    with Mesh(tmp_path, ["ours", "ours"], our_args=["--mesh-retry", "0.2"]) as mesh:
        a, b = Peer(mesh.url(0)), Peer(mesh.url(1))
        try:
            deliver(a, b, "a->b", timeout=20)
            deliver(b, a, "b->a", timeout=20)
            for i in range(20):  # once the routes are there, nothing is lost on loopback
                a.client.send_packet(b.public_key, b"n%d" % i)
            for i in range(20):
                assert b.wait_for(a.public_key, b"n%d" % i, 10)
        finally:
            a.close()
            b.close()


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_wrong_mesh_key_refused_logged_once_and_backed_off(tmp_path):
    """A member with another key: refused at its hello, one WARNING on each side, retries
    spaced by a doubling wait (0.2, 0.4, 0.8 s ...), never a tight loop."""
    good, bad = write_mesh_key(tmp_path / "good.key"), write_mesh_key(tmp_path / "bad.key")
    with OurRelay(workdir=str(tmp_path / "r1"), extra_args=["--mesh-psk-file", str(good), "-v"]) as r1:
        args = ["--mesh-psk-file", str(bad), "--mesh-with", f"http://127.0.0.1:{r1.port}", "--mesh-retry", "0.2"]
        with OurRelay(workdir=str(tmp_path / "r2"), extra_args=args) as r2:
            refusals = [r1.logged.wait_for_line(r"refusing .*wrong mesh key", timeout=20)]
            for _ in range(3):
                refusals.append(r1.logged.wait_for_line(r"refusing .*wrong mesh key", timeout=20,
                                                        start=_line_after(r1, refusals[-1])))
            times = [_stamp(m.string) for m in refusals]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert all(g >= 0.2 * 2 ** i * 0.9 for i, g in enumerate(gaps)), gaps
            out2 = r2.output()
            assert len(re.findall(r"WARNING mesh\(.*refused our mesh key", out2)) == 1, out2
            assert len(re.findall(r"WARNING relay: refusing .*wrong mesh key", r1.output())) == 1
            assert good.read_text().strip() not in r1.output() + out2
            assert bad.read_text().strip() not in r1.output() + out2


def _line_after(relay: OurRelay, m: re.Match) -> int:
    assert relay.logged is not None
    return relay.logged.lines().index(m.string) + 1


@pytest.mark.parametrize("args, message, code", [
    (["--mesh-with", "127.0.0.1:1"], "--mesh-with requires --mesh-psk-file", 2),
    (["--mesh-psk-file", "KEYFILE"], "64 lowercase hexadecimal characters", 1),
    (["--mesh-psk-file", "MISSING"], "cannot read mesh key file", 1),
    (["--mesh-psk-file", "GOOD", "--mesh-with", "a/b/c"], "bad --mesh-with entry", 2),
])
def test_bad_mesh_flags_one_line(tmp_path, args, message, code):
    (tmp_path / "k").write_text("not a key SECRET\n")
    good = write_mesh_key(tmp_path / "good")
    subst = {"KEYFILE": str(tmp_path / "k"), "MISSING": str(tmp_path / "nope"), "GOOD": str(good)}
    argv = [sys.executable, "-m", "derpnet.server", "--listen", "127.0.0.1:0", "--stun-port", "0",
            *[subst.get(a, a) for a in args]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert r.returncode == code
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "SECRET" not in r.stderr and "Traceback" not in r.stderr


def test_in_process_relays_mesh():
    """DerpServer(mesh_key=, mesh_with=): the library's relay joins a mesh too."""
    key = os.urandom(32)
    p1, p2 = free_port(), free_port()
    members = f"http://127.0.0.1:{p1},http://127.0.0.1:{p2}"
    with DerpServer(port=p1, mesh_key=key, mesh_with=members, mesh_retry=0.2) as s1, \
            DerpServer(port=p2, mesh_key=key.hex(), mesh_with=members, mesh_retry=0.2) as s2:
        a, b = Peer(s1.url), Peer(s2.url)
        try:
            deliver(a, b, "a->b", timeout=20)
            deliver(b, a, "b->a", timeout=20)
            mesh1 = s1.stats()["mesh"]
            assert mesh1["forwarded_out"] >= 1 and mesh1["forwarded_in"] >= 1
            assert mesh1["links"][f"127.0.0.1:{p2}"]["accepted"] is True
        finally:
            a.close()
            b.close()
    with pytest.raises(ValueError, match="mesh_with requires mesh_key"):
        DerpServer(mesh_with=members)
