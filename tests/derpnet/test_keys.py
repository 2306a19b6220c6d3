"""Keys: generation, text forms, files (0600), and clear errors for malformed input."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from derpnet.keys import PrivateKey, PublicKey


def test_generate_is_clamped_and_public_matches_nacl():
    import nacl.public
    k = PrivateKey.generate()
    raw = k.raw
    assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64
    assert k.public_key.raw == bytes(nacl.public.PrivateKey(raw).public_key)
    assert PrivateKey.generate() != k


def test_public_key_text_forms_round_trip():
    pub = PrivateKey.generate().public_key
    assert str(pub) == "nodekey:" + pub.raw.hex()
    assert len(pub.b64()) == 43 and "=" not in pub.b64()
    for text in (str(pub), pub.hex(), pub.hex().upper(), pub.b64(), base64.b64encode(pub.raw).decode(),
                 "NODEKEY:" + pub.hex(), "  " + pub.b64() + "\n"):
        assert PublicKey.parse(text) == pub
    assert PublicKey.coerce(pub.raw) == pub and PublicKey.coerce(pub) is pub
    assert pub.network() == "derp"
    assert hash(PublicKey(pub.raw)) == hash(pub) and {pub: 1}[PublicKey(pub.raw)] == 1


@pytest.mark.parametrize("text, fragment", [
    ("nodekey:abcd", "expected 64 hex"),
    ("nodekey:" + "zz" * 32, "not hexadecimal"),
    ("abc", "expected nodekey"),
    ("!" * 43, "invalid base64"),
    ("privkey:" + "00" * 32, "private key"),
])
def test_public_key_parse_errors_say_what_is_wrong(text, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        PublicKey.parse(text)
    body = text.split(":")[-1]
    assert body not in str(e.value)  # never echoed: it may be a secret pasted in the wrong place


def test_public_key_wrong_length_bytes():
    with pytest.raises(ValueError, match="expected 32 bytes, got 31"):
        PublicKey(b"\x01" * 31)
    with pytest.raises(TypeError):
        PublicKey.coerce(1234)


def test_private_key_repr_hides_secret():
    k = PrivateKey.generate()
    assert k.raw.hex() not in repr(k)
    assert str(k.public_key) in repr(k)


def test_private_key_parse_forms_and_errors():
    k = PrivateKey.generate()
    assert PrivateKey.parse(k.to_text()) == k
    assert k.raw.hex() not in str(k) and k.raw.hex() not in f"{k}"
    assert PrivateKey.parse(k.raw.hex()) == k
    assert PrivateKey.coerce(k.raw) == k
    with pytest.raises(ValueError, match="public key"):
        PrivateKey.parse(str(k.public_key))
    with pytest.raises(ValueError, match="expected privkey"):
        PrivateKey.parse("privkey")


@pytest.mark.parametrize("raw", [False, True])
def test_save_is_0600_and_loads_back(tmp_path, raw):
    k = PrivateKey.generate()
    path = tmp_path / "sub" / "node.key"
    k.save(path, raw=raw)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert PrivateKey.load(path) == k
    assert len(path.read_bytes()) == (32 if raw else len(k.to_text()) + 1)
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp file left


def test_load_derper_json_and_garbage(tmp_path):
    k = PrivateKey.generate()
    (tmp_path / "derper.json").write_text(json.dumps({"PrivateKey": k.to_text()}))
    assert PrivateKey.load(tmp_path / "derper.json") == k
    (tmp_path / "bad").write_bytes(b"\xff" * 33)
    with pytest.raises(ValueError, match="not a key file"):
        PrivateKey.load(tmp_path / "bad")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="PrivateKey"):
        PrivateKey.load(tmp_path / "bad.json")


def test_relay_key_file_race_keeps_the_key_already_written(tmp_path, monkeypatch):
    """Two relays start on the same missing --key-file: the second must not rename its
    fresh key over the one the first just wrote (and is already serving with)."""
    from derpnet.server.keyfile import load_or_create_key

    path = tmp_path / "derper.key"
    first = PrivateKey.generate()
    real_load = PrivateKey.load.__func__
    calls = []

    def racing_load(cls, p):
        calls.append(p)
        if len(calls) == 1:  # we find no file; the other relay creates it right after
            first.save(p)
            raise FileNotFoundError(p)
        return real_load(cls, p)

    monkeypatch.setattr(PrivateKey, "load", classmethod(racing_load))
    got = load_or_create_key(path)
    monkeypatch.undo()
    assert PrivateKey.load(path) == first
    assert got == first
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [f.name for f in tmp_path.iterdir()] == ["derper.key"]  # no temporary file left
