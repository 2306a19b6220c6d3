"""derpquic's hold on aioquic's internals (issue 9, item 13): the import-time check knows every
private name _quic.py uses and notices when one goes; and the adjustments that matter have
their effect on the wire, shown against a control with the adjustment switched off (so these
tests fail if a new aioquic makes one a silent no-op)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from aioquic.quic.connection import QuicConnection

import derpquic
from derpquic import _aioquic_check
from derpquic._quic import DerpQuicConnection
from derpquic.config import Options
from tests.derpquic.test_conn_memory import Pair

QUIC_PY = Path(derpquic.__file__).with_name("_quic.py")


def test_every_private_name_is_there():
    assert _aioquic_check.missing() == []


def test_the_check_lists_every_private_name_quic_py_uses():
    """A private aioquic name added to _quic.py must be added to the check too."""
    used = set(re.findall(r"\.(_[a-z][a-z0-9_]*)", QUIC_PY.read_text()))
    listed = {part for names in _aioquic_check.PRIVATE_NAMES.values() for dotted in names
              for part in dotted.split(".")}
    ours = {n for n in used if hasattr(DerpQuicConnection, n) and n not in vars(QuicConnection)
            and not hasattr(QuicConnection, n)}
    assert used - listed - ours == set()


def test_a_renamed_attribute_is_an_import_error(monkeypatch):
    original = QuicConnection.__init__

    def renamed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._ack_delay_renamed = self.__dict__.pop("_ack_delay")

    monkeypatch.setattr(QuicConnection, "__init__", renamed)
    assert _aioquic_check.missing() == ["QuicConnection._ack_delay"]
    with pytest.raises(ImportError, match="_ack_delay"):
        _aioquic_check.check()


# ---------------------------------------------------------------- effects on the wire

WINDOW = 16384


def _unread_transfer(monkeypatch, *, override: bool) -> tuple[int, int]:
    """200 KB sent on a stream nobody reads: (the peer's MAX_STREAM_DATA for it, its MAX_DATA)
    as the sender sees them. `override=False` switches our window adjustment off."""
    if not override:
        monkeypatch.setattr(DerpQuicConnection, "_write_stream_limits", QuicConnection._write_stream_limits)
        monkeypatch.setattr(DerpQuicConnection, "_write_connection_limits", QuicConnection._write_connection_limits)
    p = Pair(opts=Options(stream_window=WINDOW, connection_window=4 * WINDOW)).connect()
    s = p.call(p.client, "open_stream")
    s.setblocking(False)
    try:
        s.send(os.urandom(200_000))
    except BlockingIOError:
        pass
    p.run(seconds=2)
    stream = p.client.quic.stream(s.stream_id)
    return stream.max_stream_data_remote, p.client.quic._remote_max_data


def test_receive_windows_do_not_grow_while_nobody_reads(monkeypatch):
    stream_limit, conn_limit = _unread_transfer(monkeypatch, override=True)
    assert stream_limit == WINDOW and conn_limit == 4 * WINDOW


def test_receive_window_control_grows_without_the_adjustment(monkeypatch):
    """The control: the same transfer with aioquic's own window logic, which doubles the
    window as data arrives. If this stops growing, the test above proves nothing."""
    stream_limit, conn_limit = _unread_transfer(monkeypatch, override=False)
    assert stream_limit > WINDOW


def test_more_concurrent_streams_than_aioquics_default():
    p = Pair(opts=Options(max_streams=1024)).connect()
    assert p.client.quic._remote_max_streams_bidi == 1024  # aioquic alone: 128


def test_pacer_follows_a_new_packet_size():
    p = Pair().connect()
    quic = p.client.quic
    quic.set_pacing(True)  # a direct UDP path: aioquic's pacer (the relay path goes unpaced)
    quic.set_max_datagram_size(4000)
    pacer = quic._loss._pacer
    pacer.update_rate(congestion_window=400_000, smoothed_rtt=0.1)
    assert pacer.packet_time == pytest.approx(4000 / (400_000 / 0.1))
