"""The relay over TLS: self-signed and CA-issued certificates, the derper meta certificate
(server key in the TLS 1.3 handshake, serial 2) and both upgrade paths over TLS."""

from __future__ import annotations

import socket
import ssl
import time
import warnings

import pytest
from cryptography import x509

from derpnet import frames as F
from derpnet.server import DerpServer
from derpnet.server.certs import META_CERT_CN_PREFIX, meta_key_from_chain
from tests.interop_peers import make_test_ca
from tests.rawderp import RawDerpClient, dial, http_get, wait_closed


def peer_chain_der(sock: ssl.SSLSocket) -> list:
    """The certificates the server sent, unverified, in order (Python 3.11: via the _ssl object)."""
    chain = sock._sslobj.get_unverified_chain()  # public as SSLSocket.get_unverified_chain() in 3.13
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]


@pytest.fixture(scope="module")
def relay():
    with DerpServer(tls=True, keepalive_interval=0) as srv:
        yield srv


def test_url_and_verified_tls13(relay):
    assert relay.url == f"https://localhost:{relay.port}"
    with dial(relay.url, ssl_context=relay.client_ssl_context()) as s:
        assert s.version() == "TLSv1.3"


@pytest.mark.parametrize("fast_start", [False, True], ids=["101", "fast-start"])
def test_forwarding_over_tls(relay, fast_start):
    ctx = relay.client_ssl_context()
    with RawDerpClient(relay.url, ssl_context=ctx, fast_start=fast_start) as a, \
            RawDerpClient(relay.url, ssl_context=ctx) as b:
        assert a.connected.server_key == relay.public_key
        a.send(b.public_key, b"over tls")
        assert b.recv_packet().data == b"over tls"


def test_meta_cert_is_last_in_chain(relay):
    with dial(relay.url, ssl_context=relay.client_ssl_context()) as s:
        ders = peer_chain_der(s)
    assert len(ders) == 2
    leaf, meta = (x509.load_der_x509_certificate(d) for d in ders)
    assert leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "localhost"
    assert meta.serial_number == 2
    assert meta_key_from_chain(ders) == (relay.public_key, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 71-character CN is over X.509's bound, as in derper
        assert meta.issuer == meta.subject
        cn = meta.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == META_CERT_CN_PREFIX + relay.public_key.hex()


def test_meta_cert_can_be_left_out():
    with DerpServer(tls=True, meta_cert=False) as srv:
        with dial(srv.url, ssl_context=srv.client_ssl_context()) as s:
            ders = peer_chain_der(s)
        assert len(ders) == 1 and meta_key_from_chain(ders) is None


def test_only_http11_alpn(relay):
    ctx = relay.client_ssl_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with dial(relay.url, ssl_context=ctx) as s:
        assert s.selected_alpn_protocol() == "http/1.1"


def test_tls12_client_still_served(relay):
    ctx = relay.client_ssl_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with dial(relay.url, ssl_context=ctx) as s:
        assert s.version() == "TLSv1.2"


def test_ca_issued_cert_files_with_meta_cert(tmp_path):
    ca, make_leaf = make_test_ca(tmp_path)
    cert, key = make_leaf(["localhost", "127.0.0.1"])
    with DerpServer(certfile=cert, keyfile=key, keepalive_interval=0) as srv:
        assert srv.tls
        ctx = ssl.create_default_context(cafile=ca)
        with RawDerpClient(srv.url, ssl_context=ctx, fast_start=True) as a:
            a.send(a.public_key, b"ca")
            assert a.recv_packet().data == b"ca"
        with dial(srv.url, ssl_context=ctx) as s:
            assert meta_key_from_chain(peer_chain_der(s)) == (srv.public_key, 2)
        raw = http_get(srv.url, "/derp/probe", ssl_context=ctx)
        assert raw.startswith(b"HTTP/1.1 200 ")


def test_tls_handshake_timeout():
    with DerpServer(tls=True, handshake_timeout=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            t0 = time.monotonic()
            assert wait_closed(s, timeout=5)  # never sent a ClientHello
            assert time.monotonic() - t0 < 4


def test_plain_http_to_tls_port_is_closed(relay):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_closed(s, timeout=5)


def test_ready_made_server_ssl_context(tmp_path):
    from derpnet.server.certs import read_cert_files, server_ssl_context
    ca, make_leaf = make_test_ca(tmp_path)
    ctx = server_ssl_context(*read_cert_files(*make_leaf(["localhost"])))
    with DerpServer(tls=ctx, keepalive_interval=0) as srv:
        assert srv.url.startswith("https://localhost:")
        with pytest.raises(ValueError):
            srv.client_ssl_context()  # we did not make the certificate, so we cannot vouch for it
        with RawDerpClient(srv.url, ssl_context=ssl.create_default_context(cafile=ca)) as a:
            a.send(a.public_key, b"own context")
            assert a.recv_packet().data == b"own context"


def test_client_close_notify_after_last_frame_is_processed(relay):
    ctx = relay.client_ssl_context()
    with RawDerpClient(relay.url, ssl_context=ctx) as b:
        a = RawDerpClient(relay.url, ssl_context=ctx)
        a.send(b.public_key, b"last words")
        a.sock.unwrap().close()  # close_notify right behind the packet
        assert b.recv_packet().data == b"last words"
        assert b.recv(F.PeerGone).key == a.public_key
