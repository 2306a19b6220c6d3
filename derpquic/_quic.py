"""Our adaptation of aioquic's sans-IO `QuicConnection` (no I/O, no threads, no locks here).

aioquic 1.x unchanged but for four narrow overrides, checked at import time: receive
windows that follow the application, STREAM frames longer than 16383 bytes, streams
announced by an empty STREAM frame, and optional ALPN on both sides. Plus helpers to
resize packets of a live connection and to probe at once. Why each: docs/derpquic.md.
"""

from __future__ import annotations

import logging
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer, size_uint_var  # type: ignore[attr-defined]  # re-exported by aioquic
from aioquic.quic import events
from aioquic.quic.congestion.base import K_INITIAL_WINDOW
from aioquic.quic.connection import QuicConnection, QuicConnectionState, stream_is_client_initiated
from aioquic.quic.packet import QuicFrameType, QuicStreamFrame, QuicTransportParameters, pull_quic_transport_parameters
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream

from . import _aioquic_check

__all__ = ["DerpQuicConnection", "peer_transport_parameters", "END_STATES",
           "ALPN_AUTH"]

logger = logging.getLogger("derpquic.quic")

ALPN_AUTH = "derpnet-auth/2"  # /1 (static-static proofs, open to key-compromise impersonation) retired

END_STATES = frozenset({QuicConnectionState.CLOSING, QuicConnectionState.DRAINING,
                        QuicConnectionState.TERMINATED})

_MAX_2BYTE_VARINT = 0x3FFF

for _name in ("_write_connection_limits", "_write_stream_limits", "_write_stream_frame", "_initialize",
              "_write_new_connection_id_frame",
              "_get_or_create_stream", "_stream_limit"):
    if not hasattr(QuicConnection, _name):  # pragma: no cover - only with an incompatible aioquic
        raise ImportError(f"derpquic needs aioquic 1.x: QuicConnection.{_name} is missing")
_aioquic_check.check()  # every private name used here, attributes included (ImportError if one is missing)


class _Unpaced(QuicPacketPacer):
    """aioquic's pacer switched off: whatever the congestion window allows leaves at once.
    On a relay path the packets go into one TCP connection, which smooths them anyway;
    pacing them only costs a timer wake-up, a flush and a relay write per few packets
    (measured: Python sending to the Go derpconnect through derper, 8.6 -> 9.9 MB/s)."""

    def next_send_time(self, now: float) -> None:  # type: ignore[override]
        return None

    def update_after_send(self, now: float) -> None:
        pass

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        pass


class _ReceiveWindows(QuicConnection):
    """1. Receive windows that follow the application: aioquic never doubles them
    by itself; the driver grants credit as the application reads."""

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        # aioquic doubles max_data when used * 2 > value; hide `used` so it never does.
        limit = self._local_max_data
        used = limit.used
        limit.used = 0
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace,
                             stream: QuicStream) -> None:
        # aioquic doubles max_stream_data when highest_offset * 2 > limit; hide it.
        receiver = stream.receiver
        highest = receiver.highest_offset
        receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest

    def grant_connection(self, limit: int) -> bool:
        """Raise MAX_DATA to `limit` (never lowers). True if a frame is now due."""
        if limit > self._local_max_data.value:
            self._local_max_data.value = limit
            return True
        return False

    def grant_stream(self, stream_id: int, limit: int) -> bool:
        """Raise MAX_STREAM_DATA of one stream to `limit` (never lowers)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        if stream.receiver.is_finished:
            return False
        if limit > stream.max_stream_data_local:
            stream.max_stream_data_local = limit
            return True
        return False

    def set_peer_stream_window(self, limit: int) -> None:
        """The first MAX_STREAM_DATA of streams the peer opens (advertised in the transport
        parameters if they are not sent yet; grant_stream raises it per stream)."""
        self._local_max_stream_data_bidi_remote = limit

    def connection_receive_window(self) -> tuple[int, int]:
        """(bytes received so far, current MAX_DATA)."""
        return self._local_max_data.used, self._local_max_data.value


class _LongStreamFrames(QuicConnection):
    """2. STREAM frames longer than 16,383 bytes (a 4-byte length) in big packets."""

    def _write_stream_frame(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream,
                            max_offset: int) -> int:
        # aioquic's frame may carry up to remaining - (3 + len(stream id) + len(offset))
        # bytes, i.e. at most remaining - 4: only when that fits a 2-byte length may it
        # write the frame. (The bound used to be 16383 + 19, which let frames of 16384 to
        # 16398 bytes through with a wrapped length: the peer then parsed data as frames
        # and closed with "Unknown frame type", seen under packet loss.)
        if builder.remaining_flight_space <= _MAX_2BYTE_VARINT + 4:
            return super()._write_stream_frame(builder=builder, space=space, stream=stream,
                                               max_offset=max_offset)
        stream_id = stream.stream_id
        assert stream_id is not None
        frame_overhead = (1 + 4 + size_uint_var(stream_id)
                          + (size_uint_var(stream.sender.next_offset) if stream.sender.next_offset else 0))
        previous_send_highest = stream.sender.highest_offset
        frame = stream.sender.get_frame(builder.remaining_flight_space - frame_overhead, max_offset)
        if frame is None:
            return 0
        frame_type = QuicFrameType.STREAM_BASE | 2  # length present
        if frame.offset:
            frame_type |= 4
        if frame.fin:
            frame_type |= 1
        buf = builder.start_frame(
            frame_type,
            capacity=frame_overhead,
            handler=stream.sender.on_data_delivery,
            handler_args=(frame.offset, frame.offset + len(frame.data), frame.fin),
        )
        buf.push_uint_var(stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint32(len(frame.data) | 0x80000000)  # 4-byte varint
        buf.push_bytes(frame.data)
        if self._quic_logger is not None and builder.quic_logger_frames is not None:
            builder.quic_logger_frames.append(self._quic_logger.encode_stream_frame(frame, stream_id=stream_id))
        return stream.sender.highest_offset - previous_send_highest


class _AnnouncedStreams(QuicConnection):
    """3. Streams announced by an empty STREAM frame, and every stream the peer opens
    reported (aioquic reports none for an empty frame)."""

    #: IDs of streams the peer opened, in order, including those opened by an empty
    #: STREAM frame (which aioquic reports with no event). The driver drains it.
    new_peer_streams: list[int]

    def _get_or_create_stream(self, frame_type: int, stream_id: int) -> QuicStream:
        limit = self._stream_limit(stream_id)
        old_used = limit.used
        stream = super()._get_or_create_stream(frame_type, stream_id)
        if limit.used > old_used and stream_is_client_initiated(stream_id) != self._is_client:
            for n in range(old_used, limit.used):
                self.new_peer_streams.append(n * 4 + stream_id % 4)
        return stream

    def announce_stream(self, stream_id: int) -> None:
        """Create our stream `stream_id` and send an empty STREAM frame (offset 0, no FIN)
        so the peer learns about it now. Re-sent if lost, until data or FIN goes out."""
        self.send_stream_data(stream_id, b"", end_stream=False)  # creates the stream
        stream = self._streams[stream_id]
        sender = stream.sender
        original_get_frame = sender.get_frame
        original_delivery = sender.on_data_delivery
        state = {"armed": True}

        def get_frame(max_size: int, max_offset: int | None = None) -> QuicStreamFrame | None:
            frame = original_get_frame(max_size, max_offset)
            if frame is None and state["armed"] and max_size >= 0 and sender.highest_offset == 0:
                state["armed"] = False
                return QuicStreamFrame(data=b"", offset=0, fin=False)
            if frame is not None:
                state["armed"] = False
            return frame

        def on_data_delivery(delivery: QuicDeliveryState, start: int, stop: int, fin: bool) -> None:
            original_delivery(delivery, start, stop, fin)
            if (delivery == QuicDeliveryState.LOST and start == stop == 0 and not fin
                    and sender.highest_offset == 0 and not sender.is_finished
                    and not sender.reset_pending):
                state["armed"] = True
                sender.buffer_is_empty = False

        sender.get_frame = get_frame  # type: ignore[method-assign]
        sender.on_data_delivery = on_data_delivery  # type: ignore[method-assign]
        sender.buffer_is_empty = False

    def take_new_peer_streams(self) -> list[int]:
        """The IDs of streams the peer opened since the last call, in order."""
        ids, self.new_peer_streams = self.new_peer_streams, []
        return ids


class _Handshake(QuicConnection):
    """4. Optional ALPN on the server (a Go peer offers none) and one key share (X25519)
    on the client."""

    #: Optional ALPN on the server: the protocols we select *if the client offers one*.
    optional_alpn: list[str] | None

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        ctx = self.tls
        if self._is_client:
            # One key share, X25519 (quic-go's and aioquic's first choice), instead of aioquic's
            # four (P-256, P-384, X25519, X448): three key generations less per dial.
            groups = getattr(ctx, "_supported_groups", None)
            if groups and tls.Group.X25519 in groups:
                ctx._supported_groups = [tls.Group.X25519]
            if self._configuration.alpn_protocols:
                # aioquic's client requires the server to select one of the offered protocols
                # (RFC 9001 8.1); quic-go without NextProtos selects none. Make it optional: a
                # server that selects none is a peer that does not speak derpnet-auth.
                original_ee = ctx._client_handle_encrypted_extensions

                def client_handle_encrypted_extensions(input_buf: Buffer, *args: Any) -> Any:
                    saved = ctx._alpn_protocols
                    ctx._alpn_protocols = None
                    try:
                        return original_ee(input_buf, *args)
                    finally:
                        ctx._alpn_protocols = saved

                ctx._client_handle_encrypted_extensions = (  # type: ignore[method-assign]
                    client_handle_encrypted_extensions)
            return
        if not self.optional_alpn:
            return
        original = ctx._server_handle_hello
        protocols = list(self.optional_alpn)

        def server_handle_hello(input_buf: Buffer, *args: Any) -> Any:
            pos = input_buf.tell()
            try:
                hello = tls.pull_client_hello(input_buf)
                offered = hello.alpn_protocols or []
            except Exception:  # malformed: let aioquic report it
                offered = []
            finally:
                input_buf.seek(pos)
            ctx._alpn_protocols = [p for p in protocols if p in offered] or None
            return original(input_buf, *args)

        ctx._server_handle_hello = server_handle_hello  # type: ignore[method-assign, assignment]


class _LiveTuning(QuicConnection):
    """Adjusting a live connection: packet size, pacing, immediate ACKs and probes."""

    #: aioquic's own pacer while `set_pacing(False)` has replaced it.
    _paced: QuicPacketPacer | None = None

    def set_max_datagram_size(self, size: int) -> None:
        """Change the packet size of a live connection (once we know what the peer can
        read, or the path changed): the packet builder, pacer and congestion controller
        all keep their own copy of it."""
        old = self._max_datagram_size
        if size == old:
            return
        self._max_datagram_size = size
        loss = self._loss
        pacer = getattr(loss, "_pacer", None)
        if pacer is not None and hasattr(pacer, "_max_datagram_size"):
            pacer._max_datagram_size = size
        cc = getattr(loss, "_cc", None)
        if cc is not None:
            if hasattr(cc, "_max_datagram_size"):
                cc._max_datagram_size = size
            if hasattr(cc, "additive_increase_factor"):  # cubic
                cc.additive_increase_factor = size
            if size > old and cc.congestion_window < K_INITIAL_WINDOW * size:
                cc.congestion_window = K_INITIAL_WINDOW * size

    @property
    def ack_pending(self) -> bool:
        """1-RTT packets wait for our acknowledgement."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        return space is not None and space.ack_at is not None

    def ack_now(self, now: float) -> None:
        """Make a pending ACK of 1-RTT packets due at once (aioquic holds it back for
        `_ack_delay`); it goes out with the next datagrams_to_send(), paced or not."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at >= now:
            space.ack_at = now - 1e-6  # strictly due: aioquic's pacer only lets past-due ACKs through

    def set_pacing(self, enabled: bool) -> None:
        """Pace packets (aioquic's pacer: a direct UDP path) or not (the relay path)."""
        loss = self._loss
        current = getattr(loss, "_pacer", None)
        if current is None or isinstance(current, _Unpaced) != enabled:
            return  # unknown aioquic internals, or already so
        if enabled:
            paced = getattr(self, "_paced", None)
            if paced is not None:
                paced._max_datagram_size = self._max_datagram_size
                loss._pacer = paced
        else:
            self._paced = current
            loss._pacer = _Unpaced(max_datagram_size=self._max_datagram_size)

    def probe_now(self, uid: int) -> None:
        """Send an ack-eliciting PING at once and forget the PTO back-off: when the relay
        link is back or the path changed, lost data is retransmitted as soon as the PING
        is acked instead of after a probe timeout that kept doubling meanwhile."""
        self._loss._pto_count = 0
        self.send_ping(uid)



#: What a 1-RTT packet and a DATAGRAM frame add around a payload, at most: short header
#: (1 + a 20-byte connection ID + a 4-byte packet number), AEAD tag (16), frame type (1)
#: and length (a 4-byte varint).
_DATAGRAM_OVERHEAD = 1 + 20 + 4 + 16 + 1 + 4


class _Datagrams(QuicConnection):
    """RFC 9221 DATAGRAM frames with a bounded queue: aioquic's own queue has no bound and
    keeps at its head, forever, a datagram too big for a packet (blocking all behind)."""

    def queue_datagram(self, data: bytes, limit: int) -> bool:
        """Queue `data` for the next packets; False (dropped) when `limit` wait already."""
        if len(self._datagrams_pending) >= limit:
            return False
        self._datagrams_pending.append(data)
        return True

    @property
    def datagram_room(self) -> int:
        """The largest DATAGRAM payload the peer takes and a packet carries (0: the peer
        takes none: it did not send max_datagram_frame_size)."""
        peer_limit = self._remote_max_datagram_frame_size
        if not peer_limit:
            return 0
        return max(0, min(peer_limit - 5, self._max_datagram_size - _DATAGRAM_OVERHEAD))


class DerpQuicConnection(_ReceiveWindows, _LongStreamFrames, _AnnouncedStreams, _Handshake, _LiveTuning,
                         _Datagrams):
    """`QuicConnection` with application-paced receive windows, long STREAM frames,
    announceable streams, optional server-side ALPN and bounded DATAGRAM frames (each a
    base class above). Not thread-safe: the driver calls it with its lock held."""

    def __init__(self, *args: Any, max_streams_bidi: int = 1024, ack_delay: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if ack_delay is not None:
            self._ack_delay = ack_delay  # aioquic's local ACK delay (K_GRANULARITY = 1 ms by default)
        # More concurrent peer-opened bidirectional streams than aioquic's 128.
        self._local_max_streams_bidi.value = max_streams_bidi
        self._local_max_streams_bidi.sent = max_streams_bidi
        # Optional ALPN on the server: the protocols we select *if the client offers one*.
        self.optional_alpn: list[str] | None = None
        # IDs of streams the peer opened, in order, including those opened by an empty
        # STREAM frame (which aioquic reports with no event). The driver drains it.
        self.new_peer_streams: list[int] = []
        # Connection IDs put into NEW_CONNECTION_ID frames since the last take_issued_cids().
        self.issued_cids: list[bytes] = []

    def _write_new_connection_id_frame(self, builder: QuicPacketBuilder, connection_id: Any) -> None:
        # aioquic reports ConnectionIdIssued as an event, which the driver only sees at the next
        # process(); quic-go switches to a new ID as soon as it has it, so the route must exist
        # before the frame leaves (else the peer's next packets are unroutable and dropped).
        super()._write_new_connection_id_frame(builder=builder, connection_id=connection_id)
        self.issued_cids.append(connection_id.cid)

    def take_issued_cids(self) -> list[bytes]:
        """Our connection IDs written into NEW_CONNECTION_ID frames since the last call."""
        cids, self.issued_cids = self.issued_cids, []
        return cids

    @property
    def state_closed(self) -> bool:
        return self._state in END_STATES

    @property
    def close_event(self) -> events.ConnectionTerminated | None:
        """The ConnectionTerminated event describing why we are closing, as soon as
        the close starts (aioquic only emits it after the draining period)."""
        return self._close_event

    def stream(self, stream_id: int) -> QuicStream | None:
        return self._streams.get(stream_id)


    @property
    def idle_timeout(self) -> float:
        """The negotiated idle timeout in seconds (the smaller of ours and the peer's)."""
        return float(self._idle_timeout())

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    @property
    def peer_max_datagram_size(self) -> int:
        """The largest UDP payload the peer says it reads (max_udp_payload_size; QUIC's
        maximum, 65,527, when it does not say)."""
        params = peer_transport_parameters(self)
        if params is None or not params.max_udp_payload_size:
            return 65527
        return params.max_udp_payload_size

    @property
    def smoothed_rtt(self) -> float:
        return self._loss._rtt_smoothed


def peer_transport_parameters(conn: QuicConnection) -> QuicTransportParameters | None:
    """The transport parameters the peer sent (parsed again from the TLS extension)."""
    exts = getattr(conn.tls, "received_extensions", None) or []
    for ext_type, ext_data in exts:
        if ext_type == tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS:
            try:
                return pull_quic_transport_parameters(Buffer(data=ext_data))
            except Exception:
                return None
    return None
