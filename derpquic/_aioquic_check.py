"""Every private aioquic name derpquic/_quic.py relies on, checked when derpquic is imported.

aioquic's classes have no `__slots__`: writing an attribute that a new aioquic renamed
creates a new attribute and silently stops an adjustment from working (a receive window
that grows again with the network, a pacer on the old packet size). So `check()` builds
throwaway aioquic objects (a client connection that has started its handshake, a stream, a
packet builder, both congestion controllers) and looks every name up where aioquic keeps
it; a missing one is an ImportError naming it. `tests/derpquic/test_aioquic_check.py` keeps
this list complete: it fails when _quic.py uses a private name not listed here. The aioquic
versions this was tested with: pyproject.toml's pin, run by CI at both ends of the range.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRIVATE_NAMES", "check", "missing"]

#: Where each name lives -> the names (dotted: attribute of an attribute).
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "QuicConnection": (
        "_write_connection_limits", "_write_stream_limits", "_write_stream_frame", "_initialize",
        "_write_new_connection_id_frame", "_get_or_create_stream", "_stream_limit", "_idle_timeout",
        "_ack_delay", "_local_max_data.used", "_local_max_data.value", "_local_max_stream_data_bidi_remote",
        "_local_max_streams_bidi.value", "_local_max_streams_bidi.sent", "_loss._pto_count",
        "_loss._rtt_smoothed", "_loss._pacer._max_datagram_size", "_loss._cc._max_datagram_size",
        "_loss._cc.congestion_window", "_max_datagram_size", "_close_event", "_state", "_configuration",
        "_is_client", "_quic_logger", "_spaces", "_streams", "_datagrams_pending",
        "_remote_max_datagram_frame_size",
    ),
    "QuicPacketSpace": ("ack_at",),
    "tls.Context": ("_client_handle_encrypted_extensions", "_server_handle_hello", "_alpn_protocols",
                    "_supported_groups", "received_extensions"),
    "cubic": ("additive_increase_factor", "_max_datagram_size", "congestion_window"),
    "QuicStream": ("max_stream_data_local", "receiver.highest_offset", "receiver.is_finished",
                   "sender.get_frame", "sender.on_data_delivery", "sender.buffer_is_empty",
                   "sender.highest_offset", "sender.next_offset", "sender.is_finished", "sender.reset_pending"),
    "QuicPacketBuilder": ("remaining_flight_space", "start_frame", "quic_logger_frames"),
}


def _samples() -> dict[str, Any]:
    """One live object of each kind above."""
    from aioquic import tls
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet_builder import QuicPacketBuilder
    from aioquic.quic.stream import QuicStream

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"]))
    conn.connect(("127.0.0.1", 9), now=0.0)  # creates the TLS context and the packet spaces
    cubic = QuicConnection(configuration=QuicConfiguration(is_client=True, congestion_control_algorithm="cubic"))
    builder = QuicPacketBuilder(host_cid=bytes(8), peer_cid=bytes(8), version=conn._version or 1, is_client=True,
                                max_datagram_size=1200)
    return {"QuicConnection": conn, "QuicPacketSpace": conn._spaces[tls.Epoch.INITIAL], "tls.Context": conn.tls,
            "cubic": cubic._loss._cc, "QuicStream": QuicStream(stream_id=0, max_stream_data_local=1,
                                                               max_stream_data_remote=1),
            "QuicPacketBuilder": builder}


def missing() -> list[str]:
    """The private names aioquic does not have (empty: all there)."""
    try:
        samples = _samples()
    except Exception as e:  # the constructors themselves changed
        return [f"(cannot build aioquic's objects: {type(e).__name__}: {e})"]
    gone = []
    for where, names in PRIVATE_NAMES.items():
        for dotted in names:
            obj: Any = samples[where]
            for part in dotted.split("."):
                if not (hasattr(type(obj), part) or hasattr(obj, part)):  # (a property may need state)
                    gone.append(f"{where}.{dotted}")
                    break
                obj = getattr(obj, part, None)
    return gone


def check() -> None:
    """Raise ImportError unless every name is there."""
    gone = missing()
    if gone:
        import aioquic

        raise ImportError(f"derpquic does not support aioquic {aioquic.__version__} (see pyproject.toml for the "
                          f"tested range): missing {', '.join(gone)}")
