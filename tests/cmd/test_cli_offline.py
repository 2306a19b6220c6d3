"""derpconnect commands that need no relay: keygen, pubkey, regions, and every command-line
mistake that must be one line on stderr with exit status 2. Real processes
(`python -m derpnet.cmd`); XDG dirs and HOME under tmp_path."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import time
from pathlib import Path

import pytest

from derpnet.keys import PrivateKey, PublicKey
from tests.cmd.procs import (
    REPO_ROOT,
    HttpFileServer,
    TlsProbeServer,
    cli_argv,
    cli_env,
    error_lines,
    free_port,
    make_self_signed,
    run_cli,
)

B64_RX = r"^[A-Za-z0-9_-]{43}$"


@pytest.fixture
def env(tmp_path):
    return cli_env(tmp_path / "home")


def _config(env) -> Path:
    return Path(env["XDG_CONFIG_HOME"])


def _one_error(r, code: int, *needles: str) -> str:
    """The process failed with `code`, printed exactly one stderr line, nothing on stdout,
    no traceback; the line contains every needle."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    line = lines[0]
    assert line.startswith("derpconnect: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


# ---------------------------------------------------------------- keys


def test_keygen_writes_0600_raw_key_and_prints_both_forms(env):
    r = run_cli(["keygen"], env)
    assert r.returncode == 0, r.stderr
    path = _config(env) / "derpconnect" / "derpconnect"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert len(raw) == 32  # the Go derpconnect's format
    pub = PrivateKey(raw).public_key
    out = r.stdout.splitlines()
    assert out == [pub.b64(), str(pub)]
    assert len(out[0]) == 43 and out[1].startswith("nodekey:")
    assert "Traceback" not in r.stderr

    # never silently replaces an identity
    again = run_cli(["keygen"], env)
    _one_error(again, 1, "already exists", "--force")
    assert path.read_bytes() == raw
    forced = run_cli(["keygen", "--force"], env)
    assert forced.returncode == 0
    assert path.read_bytes() != raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keygen_to_a_path_as_text(env, tmp_path):
    dest = tmp_path / "keys" / "node.key"
    r = run_cli(["keygen", str(dest), "--text"], env)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    key = PrivateKey.load(dest)
    assert dest.read_text().startswith("privkey:")
    assert r.stdout.splitlines() == [key.public_key.b64(), str(key.public_key)]
    # and the key serves as an identity through --key-file
    p = run_cli(["pubkey", "--key-file", str(dest)], env)
    assert p.returncode == 0 and p.stdout.splitlines()[0] == key.public_key.b64()


def test_pubkey_creates_the_go_compatible_identity_once(env):
    r1 = run_cli(["pubkey"], env)
    assert r1.returncode == 0, r1.stderr
    path = _config(env) / "derpconnect" / "derpconnect"
    assert len(path.read_bytes()) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    r2 = run_cli(["pubkey"], env)
    assert r2.stdout == r1.stdout  # persistent identity
    assert PublicKey.parse(r1.stdout.splitlines()[0]) == PrivateKey.load(path).public_key


def test_go_style_flags(env):
    """-key=x, --key=x, -key x, --key x all name the same key file; env DERPNET_KEY is the default."""
    outs = set()
    for args in (["-key=alt", "pubkey"], ["--key=alt", "pubkey"], ["-key", "alt", "pubkey"],
                 ["pubkey", "--key", "alt"]):
        r = run_cli(args, env)
        assert r.returncode == 0, (args, r.stderr)
        outs.add(r.stdout)
    r = run_cli(["pubkey"], dict(env, DERPNET_KEY="alt"))
    outs.add(r.stdout)
    assert len(outs) == 1
    assert (_config(env) / "derpconnect" / "alt").is_file()
    assert not (_config(env) / "derpconnect" / "derpconnect").exists()
    # Go's boolean syntax
    assert run_cli(["-debug=false", "pubkey", "-key=alt"], env).stdout in outs
    assert run_cli(["--debug=true", "pubkey", "-key=alt"], env).returncode == 0


def test_reads_a_key_written_by_the_go_tool(env):
    """The Go derpconnect writes the raw 32 bytes with mode 0400: we read it, never rewrite it."""
    key = PrivateKey.generate()
    d = _config(env) / "derpconnect"
    d.mkdir(parents=True)
    (d / "derpconnect").write_bytes(key.raw)
    os.chmod(d / "derpconnect", 0o400)
    r = run_cli(["pubkey"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == key.public_key.b64()
    assert (d / "derpconnect").read_bytes() == key.raw


def test_malformed_key_file(env):
    d = _config(env) / "derpconnect"
    d.mkdir(parents=True)
    (d / "derpconnect").write_bytes(b"not a key")
    r = run_cli(["--derp=http://127.0.0.1:1", "serve", "8080"], env)
    _one_error(r, 2, "malformed key file")


# ---------------------------------------------------------------- mistakes


@pytest.mark.parametrize("args, needles", [
    (["join", "AAAA", "0"], ["malformed peer public key", "4 hexadecimal characters", "expected"]),
    (["join", "nodekey:1234", "0"], ["malformed peer public key"]),
    (["join", "x" * 42 + "!", "0"], ["malformed peer public key"]),
    (["serve", "8080", "--allow", "garbage"], ["malformed --allow key", "7 base64 characters"]),
    (["serve", "notaport"], ["serve target", "notaport"]),
    (["serve", "0"], ["port 0"]),
    (["join", PrivateKey.generate().public_key.b64(), "99999"], ["listen address", "99999"]),
])
def test_bad_arguments(env, args, needles):
    r = run_cli(["--derp=http://127.0.0.1:1", *args], env)
    _one_error(r, 2, *needles)


def test_missing_derp(env):
    pub = PrivateKey.generate().public_key.b64()
    for args in (["serve", "8080"], ["join", pub, "0"]):
        _one_error(run_cli(args, env), 2, "--derp")
    # the environment supplies the default
    r = run_cli(["serve", "8080"], dict(env, DERPNET_DERP="nosuchregion"))
    _one_error(r, 2, "unknown region code 'nosuchregion'")


@pytest.mark.parametrize("derp, needle", [
    ("xyz", "unknown region code 'xyz'"),
    ("999", "unknown region id '999'"),
    ("ftp://relay.example", "scheme must be https or http"),
    ("https://relay.example/some/path", "path"),
    ("bad_host name", "not a valid host name"),
])
def test_bad_derp_values(env, derp, needle):
    _one_error(run_cli([f"--derp={derp}", "serve", "8080"], env), 2, needle)


def test_unknown_command_and_option(env):
    _one_error(run_cli(["frobnicate"], env), 2, "invalid choice")
    _one_error(run_cli(["--no-such-option", "serve", "80"], env), 2, "--no-such-option")
    _one_error(run_cli([], env), 2, "no command")


def test_bad_derp_ca(env, tmp_path):
    pub = PrivateKey.generate().public_key.b64()
    _one_error(run_cli(["--derp=https://127.0.0.1:1", "--derp-ca", str(tmp_path / "missing.pem"),
                        "join", pub], env), 2, "--derp-ca", "no such file")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    _one_error(run_cli(["--derp=https://127.0.0.1:1", "--derp-ca", str(junk), "join", pub], env),
               2, "--derp-ca", "not a PEM")


def test_help_and_version(env):
    r = run_cli(["--help"], env)
    assert r.returncode == 0 and "serve" in r.stdout and "join" in r.stdout and "--derp" in r.stdout
    for cmd in ("serve", "join", "keygen", "regions", "pubkey", "relay"):
        h = run_cli([cmd, "--help"], env)
        assert h.returncode == 0, (cmd, h.stderr)
    v = run_cli(["--version"], env)
    assert v.returncode == 0 and "derpnet" in v.stdout


# ---------------------------------------------------------------- regions


def test_regions_lists_the_snapshot(env):
    r = run_cli(["regions"], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "CODE", "NAME"]
    assert any(line.split()[:2] == ["1", "nyc"] and "derp1f.tailscale.com" in line for line in lines)
    assert len(lines) >= 20
    assert "built-in snapshot" in r.stderr

    j = run_cli(["regions", "--json"], env)
    doc = json.loads(j.stdout)
    assert doc["Regions"]["1"]["RegionCode"] == "nyc"
    assert doc["Regions"]["1"]["Nodes"][0]["HostName"].endswith(".tailscale.com")

    one = run_cli(["regions", "fra", "1"], env)
    assert [line.split()[1] for line in one.stdout.splitlines()[1:]] == ["fra", "nyc"]
    _one_error(run_cli(["regions", "atlantis"], env), 2, "unknown region 'atlantis'")


def _lab_map(path: Path, nodes: dict) -> Path:
    """A DERP map of private regions 900.. on loopback: {code: port}."""
    regions = {}
    for i, (code, port) in enumerate(nodes.items()):
        rid = 900 + i
        regions[str(rid)] = {"RegionID": rid, "RegionCode": code, "RegionName": f"Lab {code}",
                             "Nodes": [{"Name": f"{rid}a", "RegionID": rid, "HostName": "localhost",
                                        "IPv4": "127.0.0.1", "IPv6": "none", "STUNPort": -1, "DERPPort": port}]}
    path.write_text(json.dumps({"Regions": regions}))
    return path


def test_regions_refresh_from_file_then_used_for_derp(env, tmp_path):
    m = _lab_map(tmp_path / "lab.json", {"lab": 4443})
    r = run_cli(["regions", "--refresh", str(m)], env)
    assert r.returncode == 0, r.stderr
    cached = Path(env["XDG_CACHE_HOME"]) / "derpnet" / "derpmap.json"
    assert json.loads(cached.read_text())["Regions"]["900"]["RegionCode"] == "lab"
    listing = run_cli(["regions"], env)
    assert listing.stdout.splitlines()[1].split()[:2] == ["900", "lab"]
    assert str(cached) in listing.stderr
    # the region code now resolves (nyc no longer does: this map has only the lab)
    _one_error(run_cli(["--derp=nyc", "serve", "8080"], env), 2, "unknown region code 'nyc'")

    bad = tmp_path / "bad.json"
    bad.write_text('{"Regions": {"1": {"RegionID": 2, "Nodes": []}}}')
    _one_error(run_cli(["regions", "--refresh", str(bad)], env), 1, "refresh failed", "does not match")
    # a failed refresh leaves the good copy in place
    assert json.loads(cached.read_text())["Regions"]["900"]["RegionCode"] == "lab"


def test_regions_probe_marks_the_closest(env, tmp_path):
    cert, key = make_self_signed(tmp_path / "pki", ["localhost", "127.0.0.1"])
    dead = free_port()
    with TlsProbeServer(cert, key) as srv:
        m = _lab_map(tmp_path / "lab.json", {"live": srv.port, "dead": dead})
        r = run_cli(["--derp-map", str(m), "--derp-ca", cert, "regions", "--probe", "--timeout", "2"], env,
                    timeout=30)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[-4] if line.startswith("*") else line.split()[1]: line
                for line in r.stdout.splitlines()[1:] if not line.startswith("closest")}
        assert rows["live"].startswith("*") and "ms" in rows["live"]
        assert not rows["dead"].startswith("*") and "refused" in rows["dead"].lower()
        assert r.stdout.splitlines()[-1].startswith("closest: live")
        assert srv.requests >= 3  # --samples default

        # without the CA the probe reports the TLS failure, and nothing answered: exit 1
        r2 = run_cli(["--derp-map", str(m), "regions", "--probe", "--timeout", "2", "live"], env, timeout=30)
        assert r2.returncode == 1
        assert "TLS" in r2.stdout
        assert error_lines(r2.stderr)[-1].startswith("derpconnect: error: no region answered")


def test_regions_probe_is_bounded_by_its_timeout_overall(env, tmp_path, blackhole):
    """Twelve regions that refuse and twelve that accept and never answer (each with two
    nodes, three samples): the whole probe ends within --timeout, not per sample and node."""
    nodes = {f"r{i}": (free_port() if i % 2 else blackhole) for i in range(24)}
    m = _lab_map(tmp_path / "lab.json", nodes)
    data = json.loads(m.read_text())
    for region in data["Regions"].values():  # a second node each, as real regions have
        region["Nodes"].append(dict(region["Nodes"][0], Name=region["Nodes"][0]["Name"] + "b"))
    m.write_text(json.dumps(data))
    t0 = time.monotonic()
    r = run_cli(["--derp-map", str(m), "regions", "--probe", "--timeout", "3"], env, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert error_lines(r.stderr)[-1].startswith("derpconnect: error: no region answered")
    assert "probing" not in r.stderr  # progress only on a terminal
    rows = [line for line in r.stdout.splitlines()[1:]]
    assert len(rows) == 24
    assert sum("timed out" in row for row in rows) == 12, r.stdout
    assert sum("refused" in row.lower() for row in rows) == 12, r.stdout
    # the timeout, plus the interpreter's start-up on a loaded machine (it took 18 s: 3 s a
    # sample, three samples, per node)
    assert took < 3 + 5, took


def test_regions_probe_shows_progress_on_a_terminal(env, tmp_path, blackhole):
    m = _lab_map(tmp_path / "lab.json", {"a": blackhole, "b": free_port()})
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(cli_argv("--derp-map", m, "regions", "--probe", "--timeout", "1"), env=env,
                             stdout=subprocess.PIPE, stderr=follower, cwd=str(REPO_ROOT))
        os.close(follower)
        out, _ = p.communicate(timeout=30)
        err = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(leader)
    assert p.returncode == 1
    assert b"probing 2 regions" in err and b"1 done, 0 answered" in err, err  # the refusing one
    assert b"probing" not in out


def test_regions_refresh_from_url(env, tmp_path):
    """--refresh URL downloads (here from a local HTTP server), validates and saves the map."""
    www = tmp_path / "www"
    www.mkdir()
    _lab_map(www / "derpmap.json", {"web": 8443})
    (www / "nope.json").write_text("<html>not a map</html>")
    with HttpFileServer(www) as http:
        # Plain http only with --insecure (issue 9, item 12): nothing is fetched without it.
        _one_error(run_cli(["regions", "--refresh", f"http://127.0.0.1:{http.port}/derpmap.json"], env),
                   1, "refresh failed", "plain http", "--insecure")
        assert run_cli(["regions"], env).stdout.splitlines()[1].split()[:2] != ["900", "web"]
        r = run_cli(["regions", "--insecure", "--refresh", f"http://127.0.0.1:{http.port}/derpmap.json"], env)
        assert r.returncode == 0, r.stderr
        assert run_cli(["regions"], env).stdout.splitlines()[1].split()[:2] == ["900", "web"]
        _one_error(run_cli(["regions", "--insecure", "--refresh", f"http://127.0.0.1:{http.port}/missing.json"],
                           env), 1, "refresh failed", "404")
        _one_error(run_cli(["regions", "--insecure", "--refresh", f"http://127.0.0.1:{http.port}/nope.json"],
                           env), 1, "refresh failed", "not JSON")


def test_node_key_file_readable_by_others_is_warned_about(env, tmp_path):
    """The relay warns the same way (tests/derpnet/test_server_cli.py)."""
    path = tmp_path / "node.key"
    key = PrivateKey.generate()
    key.save(path)
    path.chmod(0o640)
    r = run_cli(["--key-file", str(path), "pubkey"], env)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == key.public_key.b64()
    assert f"key file {path} is readable by other users (mode 640): chmod 600 it" in r.stderr
