"""No key material in any CLI output: a private key typed where a public key, an address, a
path, a command or a flag value goes is refused by saying what kind of key it was, never by
echoing it (issue 9, item 10). Real processes, every mistake at once."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from derpnet.keys import PrivateKey, describe_key_text, redact_key_material
from tests.cmd.procs import cli_env, error_lines, run_cli

SECRET = PrivateKey.generate()
HEX = SECRET.raw.hex()
PUB = PrivateKey.generate().public_key.b64()
RELAY = "--derp=http://127.0.0.1:1"


def _fragments(key: PrivateKey) -> list[str]:
    """Every 12-character piece of the key in each text form (48 bits: a leak)."""
    forms = [key.raw.hex(), base64.b64encode(key.raw).decode(), base64.urlsafe_b64encode(key.raw).decode()]
    return [f[i:i + 12].lower() for f in forms for i in range(len(f) - 11)]


CASES = {
    "join privkey:": ["join", "privkey:" + HEX, "0"],
    "join PRIVKEY: upper case": ["join", "PRIVKEY:" + HEX.upper(), "0"],
    "join derper JSON": ["join", json.dumps({"PrivateKey": "privkey:" + HEX}), "0"],
    "join 63 hex": ["join", HEX[:-1], "0"],
    "join 65 hex": ["join", HEX + "a", "0"],
    "--allow privkey:": ["serve", "8080", "--allow", "privkey:" + HEX],
    "join listen address": ["join", PUB, "privkey:" + HEX],
    "serve target": ["serve", "privkey:" + HEX],
    "--derp": ["--derp", "privkey:" + HEX, "join", PUB],
    "as the command": ["privkey:" + HEX],
    "extra argument": ["join", PUB, "0", HEX],
    "--key": ["--key", "privkey:" + HEX, "pubkey"],
    "--key bare hex": ["--key", HEX, "pubkey"],
    "--key-file": ["--key-file", "privkey:" + HEX, "pubkey"],
    "keygen PATH": ["keygen", "privkey:" + HEX],
    "-debug=": ["-debug=privkey:" + HEX, "pubkey"],
    "--connect-timeout": ["join", PUB, "--connect-timeout", HEX],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case run once, concurrently (each is a short-lived process)."""
    home = tmp_path_factory.mktemp("home")
    env = cli_env(home)
    own = home / "own.key"
    SECRET.save(own)  # the node's own key: typed in as a "public key" in bare hex
    cases = dict(CASES)
    cases["join own private key as hex"] = ["--key-file", str(own), "join", HEX, "0"]
    cases["--allow own private key as hex"] = ["--key-file", str(own), "serve", "8080", "--allow", HEX]
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(run_cli, [RELAY, *args], env, 60) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", [*CASES, "join own private key as hex", "--allow own private key as hex"])
def test_private_key_never_echoed(runs, name):
    r = runs[name]
    out = (r.stdout + r.stderr).lower()
    leaked = [f for f in _fragments(SECRET) if f in out]
    assert not leaked, (name, r.stderr)
    assert r.returncode == 2, (name, r.returncode, r.stderr)  # a command-line mistake, one line
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("derpconnect: error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_the_message_says_what_kind_of_key(runs):
    assert "private key" in runs["join privkey:"].stderr
    assert "private key" in runs["--allow privkey:"].stderr
    assert "private key" in runs["join own private key as hex"].stderr
    assert "private key" in runs["join derper JSON"].stderr
    assert "63 hexadecimal characters" in runs["join 63 hex"].stderr


def test_only_port_numbers_are_shown():
    assert describe_key_text("8080") == "'8080'"
    assert describe_key_text("AAAA") == "4 hexadecimal characters"  # may be a piece of a key
    assert describe_key_text("laptop") == "6 base64 characters"
    assert describe_key_text("privkey:00") == "a private key (privkey:...)"
    assert "x" not in describe_key_text("x" * 40)


def test_redaction_keeps_the_rest_of_the_message():
    msg = f"invalid choice: 'privkey:{HEX}' (choose from serve, join)"
    assert redact_key_material(msg) == "invalid choice: '<a private key, not shown>' (choose from serve, join)"
    assert redact_key_material(f"x {HEX} y") == "x <64 hexadecimal characters, not shown> y"
    assert redact_key_material("port 8080 and host example.com") == "port 8080 and host example.com"
