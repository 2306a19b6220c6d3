"""Tunables of derpquic and the aioquic configurations built from them.

Every number here is a default of a `Listener`/`Dialer` keyword argument; the
figures behind the choices are in bench/quic.py's docstring and the report.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from derpnet.keys import PublicKey, PublicKeyLike

from ._quic import ALPN_AUTH

__all__ = ["Options", "GO_PACKET_SIZE", "ALPN_AUTH", "server_certificate", "coerce_keys"]

#: quic-go v0.46 reads every packet into a 1452-byte buffer (protocol.MaxPacketBufferSize,
#: also the max_udp_payload_size it advertises) and clamps InitialPacketSize to it, so a
#: Go peer neither sends nor can read anything larger. It is also our packet size until
#: the handshake tells us that the peer is one of ours.
GO_PACKET_SIZE = 1452

MiB = 1 << 20
#: The max_datagram_frame_size we advertise with `datagrams=True` (a relay packet's worth).
MAX_DATAGRAM_FRAME = 65535


@dataclass(frozen=True)
class Options:
    """QUIC-level options shared by `Listener` and `Dialer` (keyword arguments of both)."""

    #: Packet size between our own peers (negotiated by ALPN after the handshake).
    #: Go peers always get GO_PACKET_SIZE. DERP carries up to 65,535 bytes.
    max_datagram_size: int = 65527
    #: Unread bytes buffered per stream before the peer is flow-controlled
    #: (the MAX_STREAM_DATA window, raised only as the application reads).
    stream_window: int = 4 * MiB
    #: Unread bytes buffered per connection, over all its streams (MAX_DATA window).
    connection_window: int = 16 * MiB
    #: Bytes a stream's send() may queue ahead of what QUIC has put on the wire.
    send_buffer: int = 1 * MiB
    #: Close a connection after this long without hearing from the peer. The effective
    #: value is the smaller of ours and the peer's (quic-go: 30 s).
    idle_timeout: float = 30.0
    #: While a connection has open streams, PING the peer when it has been silent this
    #: long, so idle tunnels stay up (well within quic-go's 30 s idle timeout).
    keepalive_interval: float = 10.0
    #: dial() timeout when the caller passes none (the QUIC + authentication handshake).
    #: A Listener closes an incoming connection that has not finished both within this long.
    dial_timeout: float = 20.0
    #: Peer-opened streams a connection may have open at once.
    max_streams: int = 1024
    #: Streams waiting in a Listener for accept(); more are refused (reset).
    backlog: int = 1024
    #: Listener: incoming connections still in the QUIC handshake or the key proofs, at
    #: most, in all and from one peer key (like a socket backlog): Initials beyond are
    #: dropped (the dialler retransmits), and those from keys outside `allow` refused
    #: statelessly; either way before any state is created.
    max_half_open: int = 64
    max_half_open_per_peer: int = 8
    #: Listener: what a peer may send on a stream before it is accepted (the stream's first
    #: MAX_STREAM_DATA); accept() raises it to `stream_window`. So the unaccepted streams of
    #: a listener hold at most about (backlog + 16 per handshaking connection) x this.
    unaccepted_window: int = 16384
    #: How long we may hold back an ACK (aioquic: 1 ms). Fewer ACK-only packets mean less
    #: per-packet Python work on both sides: 10 ms doubled ping-pong and bulk rates through
    #: a relay (within the 25 ms max_ack_delay we advertise).
    ack_delay: float = 0.010
    #: Congestion controller ("reno" or "cubic").
    congestion_control: str = "reno"
    #: Take QUIC DATAGRAM frames (RFC 9221: unreliable, unordered): advertised in the
    #: transport parameters; see derpquic.datagrams.
    datagrams: bool = False
    #: DATAGRAM frames waiting for room in the congestion window, per connection; more are
    #: dropped (counted), as a full UDP socket buffer drops.
    datagram_queue: int = 256

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> Options:
        """Take our option names out of `kwargs` (the rest go to derpnet.listen_packet)."""
        names = {f.name for f in fields(cls)}
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        opts = cls(**mine)
        opts.validate()
        return opts

    def validate(self) -> None:
        if not 1200 <= self.max_datagram_size <= 65527:
            raise ValueError("max_datagram_size must be between 1200 and 65527 (the QUIC maximum)")
        for name in ("stream_window", "connection_window", "send_buffer"):
            if getattr(self, name) < 16384:
                raise ValueError(f"{name} must be at least 16384")
        if not 0 < self.ack_delay <= 0.025:
            raise ValueError("ack_delay must be in (0, 0.025] seconds (we advertise max_ack_delay 25 ms)")
        if self.idle_timeout <= 0 or self.keepalive_interval <= 0:
            raise ValueError("idle_timeout and keepalive_interval must be positive")
        if self.congestion_control not in ("reno", "cubic"):
            raise ValueError("congestion_control must be 'reno' or 'cubic'")
        if self.max_half_open < 1 or self.max_half_open_per_peer < 1 or self.backlog < 1:
            raise ValueError("max_half_open, max_half_open_per_peer and backlog must be at least 1")
        if self.datagram_queue < 1:
            raise ValueError("datagram_queue must be at least 1")
        if not 1024 <= self.unaccepted_window <= self.stream_window:
            raise ValueError("unaccepted_window must be between 1024 and stream_window")

    def quic_configuration(self, *, is_client: bool, alpn: list[str] | None = None,
                           secrets_log_file: Any = None,
                           max_datagram_size: int = GO_PACKET_SIZE) -> QuicConfiguration:
        """aioquic's configuration for one connection. `max_datagram_size`: the packet size
        until the handshake tells whether the peer is ours (GO_PACKET_SIZE, or less when
        the path to the peer carries less)."""
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=alpn,
            idle_timeout=self.idle_timeout,
            max_datagram_size=max_datagram_size,
            max_data=self.connection_window,
            max_stream_data=self.stream_window,
            congestion_control_algorithm=self.congestion_control,
            secrets_log_file=secrets_log_file,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME if self.datagrams else None,
        )
        if is_client:
            import ssl
            # The certificate is throw-away (the Go original's is too); the peer's identity
            # is proven with its node key instead (derpquic.auth).
            cfg.verify_mode = ssl.CERT_NONE
        else:
            cert, key = server_certificate()
            cfg.certificate = cert
            cfg.private_key = key
        return cfg


_cert_lock = threading.Lock()
_cert_cache: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None


def server_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 certificate for CN=localhost, made once per process.

    The Go original makes a fresh RSA-2048 one per start; nobody verifies it (Go
    dialers use InsecureSkipVerify, ours check the node key instead), so the cheaper
    key type changes nothing on the wire that a peer looks at."""
    global _cert_cache
    with _cert_lock:
        if _cert_cache is None:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
            now = datetime.datetime.now(datetime.UTC)
            cert = (x509.CertificateBuilder()
                    .subject_name(name).issuer_name(name)
                    .public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=365))
                    .sign(key, hashes.SHA256()))
            _cert_cache = (cert, key)
        return _cert_cache


def coerce_keys(keys: Iterable[PublicKeyLike] | None) -> frozenset[PublicKey] | None:
    if keys is None:
        return None
    return frozenset(PublicKey.coerce(k) for k in keys)
