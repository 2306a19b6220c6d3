"""Regression: STREAM frames are written with a length field that fits their data.

aioquic writes a 2-byte length (at most 16383); derpquic._quic switches to a 4-byte one
for longer frames. The switch used to happen 15 bytes too late: with 16388 to 16402 bytes
left in a packet a frame of 16384+ bytes got a wrapped length, and the peer closed the
connection with "Unknown frame type" (seen under 5 % loss with 64 KiB packets, where
retransmissions and ACK ranges leave odd amounts of room).
"""

from __future__ import annotations

import pytest
from aioquic.buffer import Buffer

from derpquic._quic import DerpQuicConnection
from derpquic.config import Options


class _Builder:
    """The part of aioquic's QuicPacketBuilder that _write_stream_frame uses."""

    def __init__(self, space: int) -> None:
        self.remaining_flight_space = space
        self.buf = Buffer(capacity=1 << 17)
        self.quic_logger_frames: list = []

    def start_frame(self, frame_type, capacity=1, handler=None, handler_args=()):
        self.buf.push_uint_var(frame_type)
        return self.buf


@pytest.mark.parametrize("offset", [0, 100, 1 << 20])  # no offset field; 2 and 4 bytes
def test_stream_frame_length_matches_its_data_for_every_room_size(offset):
    conn = DerpQuicConnection(configuration=Options().quic_configuration(is_client=True))
    conn.send_stream_data(0, bytes(offset + (16 << 20)))
    stream = conn._streams[0]
    if offset:
        # Already sent (and acknowledged or not): the next frame starts at `offset`.
        while stream.sender.next_offset < offset:
            stream.sender.get_frame(min(1 << 20, offset - stream.sender.next_offset), 1 << 40)
    wrong = []
    sizes = list(range(16300, 16500)) + [1200, 1452, 8192, 32768, 65000]
    for room in sizes:
        before = stream.sender.next_offset
        b = _Builder(room)
        conn._write_stream_frame(b, None, stream, 1 << 40)
        raw = b.buf.data
        r = Buffer(data=raw)
        ftype = r.pull_uint_var()
        r.pull_uint_var()  # stream id
        if ftype & 4:
            assert r.pull_uint_var() == before
        length = r.pull_uint_var()
        if length != len(raw) - r.tell() or len(raw) > room:
            wrong.append((room, length, len(raw) - r.tell(), len(raw)))
    assert wrong == [], f"(room, length field, data bytes, frame bytes): {wrong[:5]}"
