"""TLSSession (derpnet.tlsbio), both ends in memory: two SSLObjects, bytes moved by hand.
No sockets, no threads."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpnet.server.certs import self_signed_cert, server_ssl_context
from derpnet.tlsbio import READ_CHUNK, TLSSession

CERT, KEY = self_signed_cert(["relay.test"])
SERVER_CTX = server_ssl_context(CERT, KEY)


def client_ctx(alpn=None, cadata=CERT):
    ctx = ssl.create_default_context(cadata=cadata.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def pair(ctx=None, hostname="relay.test"):
    return (TLSSession(ctx or client_ctx(), server_side=False, server_hostname=hostname),
            TLSSession(SERVER_CTX, server_side=True))


def handshake(client: TLSSession, server: TLSSession) -> int:
    """Shuttle records until both sides are done; returns the number of flights."""
    flights = 0
    client.start()
    while not (client.handshake_done and server.handshake_done):
        flights += 1
        assert flights < 10, "handshake does not converge"
        server.receive(client.pending())
        client.receive(server.pending())
    server.receive(client.pending())  # the client's Finished, if still pending
    client.receive(server.pending())  # session tickets (TLS 1.3)
    return flights


def test_handshake_then_data_both_ways():
    c, s = pair()
    assert not c.handshake_done and not s.handshake_done
    handshake(c, s)
    assert c.version == s.version and c.version in ("TLSv1.2", "TLSv1.3")
    assert s.receive(c.encrypt(b"GET /derp HTTP/1.1\r\n\r\n")) == b"GET /derp HTTP/1.1\r\n\r\n"
    assert c.receive(s.encrypt(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")).startswith(b"HTTP/1.1 101")


def test_client_start_produces_a_client_hello_and_waits():
    c, _ = pair()
    assert c.start() is False and c.has_pending
    hello = c.pending()
    assert hello[:1] == b"\x16" and not c.has_pending  # a TLS handshake record


def test_receive_returns_nothing_until_a_record_is_complete():
    c, s = pair()
    handshake(c, s)
    record = c.encrypt(b"x" * 1000)
    assert s.receive(record[:10]) == b""
    assert s.receive(record[10:]) == b"x" * 1000


def test_several_records_in_one_receive_are_joined():
    c, s = pair()
    handshake(c, s)
    data = b"".join(c.encrypt(bytes([i]) * 100) for i in range(5))
    assert s.receive(data) == b"".join(bytes([i]) * 100 for i in range(5))


def test_more_than_one_read_chunk():
    c, s = pair()
    handshake(c, s)
    big = bytes(range(256)) * (3 * READ_CHUNK // 256 + 7)
    assert s.receive(c.encrypt(big)) == big


def test_close_notify_is_seen_by_the_peer():
    c, s = pair()
    handshake(c, s)
    alert = c.close_notify()
    assert alert and not s.closed_by_peer
    assert s.receive(alert) == b"" and s.closed_by_peer


def test_data_before_close_notify_is_delivered():
    c, s = pair()
    handshake(c, s)
    assert s.receive(c.encrypt(b"last words") + c.close_notify()) == b"last words"
    assert s.closed_by_peer


def test_close_notify_before_the_handshake_is_empty():
    _, s = pair()
    assert s.close_notify() == b""


def test_garbage_is_an_ssl_error():
    _, s = pair()
    with pytest.raises(ssl.SSLError):
        s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on the TLS port


def test_untrusted_certificate_fails_the_client():
    other_cert, _ = self_signed_cert(["relay.test"])
    c, s = pair(client_ctx(cadata=other_cert))
    c.start()
    s.receive(c.pending())
    with pytest.raises(ssl.SSLCertVerificationError):
        c.receive(s.pending())


def test_wrong_hostname_fails_the_client():
    c, s = pair(hostname="other.test")
    c.start()
    s.receive(c.pending())
    with pytest.raises(ssl.SSLCertVerificationError):
        c.receive(s.pending())


def test_alpn_is_reported():
    c, s = pair(client_ctx(alpn=["http/1.1"]))
    handshake(c, s)
    assert c.alpn_protocol == "http/1.1"
    c, s = pair()
    handshake(c, s)
    assert c.alpn_protocol is None


def test_version_is_none_before_the_handshake():
    c, _ = pair()
    assert c.version is None


def test_tls12_works_too():
    ctx = client_ctx()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c, s = pair(ctx)
    handshake(c, s)
    assert c.version == "TLSv1.2"
    assert s.receive(c.encrypt(b"ok")) == b"ok"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=8), st.integers(1, 700))
def test_any_split_of_the_ciphertext_gives_the_same_plaintext(messages, cut):
    c, s = pair()
    handshake(c, s)
    wire = b"".join(c.encrypt(m) for m in messages)
    got = b"".join(s.receive(wire[i:i + cut]) for i in range(0, len(wire), cut))
    assert got == b"".join(messages)
