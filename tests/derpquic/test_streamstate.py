"""StreamState, window_credit and close_error (pure: no QUIC, no lock, no clock)."""

from __future__ import annotations

import errno

import pytest
from aioquic.quic.events import ConnectionTerminated

from derpnet.errors import AuthenticationError
from derpquic.codes import AppError, close_error
from derpquic.streamstate import Readable, StreamState, copy_error, window_credit

# ---------------------------------------------------------------- receiving


def test_data_is_buffered_and_taken_in_order():
    st = StreamState()
    assert st.readable() is Readable.WAIT
    assert st.data_received(b"hello ", False) == 6
    assert st.data_received(b"world", False) == 5
    assert st.readable() is Readable.DATA
    assert st.take(3) == b"hel"
    buf = bytearray(100)
    n = st.take_into(memoryview(buf))
    assert bytes(buf[:n]) == b"lo world" and st.read_total == 11
    assert st.readable() is Readable.WAIT


def test_take_more_than_buffered():
    st = StreamState()
    st.data_received(b"abc", False)
    assert st.take(100) == b"abc" and st.take(5) == b""


def test_fin_after_data_reads_data_then_eof():
    st = StreamState()
    st.data_received(b"last", True)
    assert st.readable() is Readable.DATA
    st.take(4)
    assert st.readable() is Readable.EOF and st.eof


def test_empty_fin():
    st = StreamState()
    assert st.data_received(b"", True) == 0
    assert st.readable() is Readable.EOF


def test_reset_raises_after_buffered_data():
    st = StreamState()
    st.data_received(b"x", False)
    st.reset_received(7)
    st.reset_received(8)  # the first reset wins
    assert st.readable() is Readable.DATA
    st.take(1)
    with pytest.raises(ConnectionResetError, match="error 7") as e:
        st.readable()
    assert e.value.errno == errno.ECONNRESET
    with pytest.raises(ConnectionResetError):  # every read raises (a fresh copy)
        st.readable()


def test_reset_after_fin_is_ignored():
    st = StreamState()
    st.data_received(b"", True)
    st.reset_received(3)
    assert st.readable() is Readable.EOF


def test_connection_lost_raises_when_nothing_is_buffered():
    st = StreamState()
    st.data_received(b"x", False)
    st.connection_lost(ConnectionAbortedError("gone"))
    st.connection_lost(TimeoutError("second"))  # the first error stays
    assert st.take(1) == b"x"
    with pytest.raises(ConnectionAbortedError, match="gone"):
        st.readable()


def test_eof_wins_over_a_later_connection_error():
    st = StreamState()
    st.data_received(b"", True)
    st.connection_lost(ConnectionAbortedError("gone"))
    assert st.readable() is Readable.EOF


def test_closed_stream_reads_raise_ebadf():
    st = StreamState()
    st.closed = True
    with pytest.raises(OSError) as e:
        st.readable()
    assert e.value.errno == errno.EBADF


def test_an_aborted_stream_never_reads_as_ended():
    """Our own reset (abort, refusal) wakes a blocked reader with an error, never b"": only
    the peer's FIN, or shutting reading down ourselves, is an end of stream."""
    st = StreamState()
    st.data_received(b"kept", False)
    st.connection_lost(OSError(errno.EBADF, "stream aborted"))
    st.aborted = True
    st.shut_read()
    st.closed = True
    with pytest.raises(OSError) as e:
        st.readable()
    assert e.value.errno == errno.EBADF
    fin = StreamState()
    fin.data_received(b"", True)
    fin.aborted = True
    assert fin.readable() is Readable.EOF  # the whole stream had arrived before the abort


def test_shut_read_drops_buffer_and_later_data():
    st = StreamState()
    st.data_received(b"12345", False)
    assert st.shut_read() == 5
    assert st.data_received(b"more", False) == 0
    assert st.readable() is Readable.EOF
    assert st.shut_read() == 0


def test_peer_may_send():
    st = StreamState()
    assert st.peer_may_send
    st.reset_received(1)
    assert not st.peer_may_send
    st2 = StreamState()
    st2.data_received(b"", True)
    assert not st2.peer_may_send


# ---------------------------------------------------------------- writing


def test_write_errors_in_priority_order():
    st = StreamState()
    assert st.write_error() is None
    st.connection_lost(ConnectionAbortedError("lost"))
    assert isinstance(st.write_error(), ConnectionAbortedError)
    st.stop_sending_received(9)
    err = st.write_error()
    assert isinstance(err, ConnectionResetError) and "stopped reading" in str(err)
    st.shut_wr = True
    assert isinstance(st.write_error(), BrokenPipeError)
    st.closed = True
    err = st.write_error()
    assert isinstance(err, OSError) and err.errno == errno.EBADF


def test_writer_may_proceed():
    st = StreamState()
    assert st.writer_may_proceed(1) and not st.writer_may_proceed(0)
    st.stop_sending_received(1)
    assert st.writer_may_proceed(0)  # to raise


def test_lingering():
    st = StreamState()
    assert not st.lingering(sender_finished=False)  # still writing
    st.shut_wr = True
    assert st.lingering(sender_finished=False)
    assert not st.lingering(sender_finished=True)
    st.stop_sending_received(1)
    assert not st.lingering(sender_finished=False)  # the peer does not want it any more


def test_copy_error_is_a_fresh_object():
    e = ConnectionResetError(errno.ECONNRESET, "x")
    c = copy_error(e)
    assert c is not e and type(c) is type(e) and c.args == e.args


# ---------------------------------------------------------------- window credit


@pytest.mark.parametrize("consumed, window, limit, expected", [
    (0, 1000, 1000, None),         # nothing read: the window is intact
    (249, 1000, 1000, None),       # less than a quarter window read
    (250, 1000, 1000, 1250),       # a quarter: raise to consumed + window
    (5000, 1000, 1000, 6000),
    (100, 1000, 2000, None),       # already granted further than needed
])
def test_window_credit(consumed, window, limit, expected):
    assert window_credit(consumed, window, limit) == expected


def test_window_credit_never_lets_more_than_a_window_wait_unread():
    limit, consumed, window = 4096, 0, 4096
    for step in [1, 100, 1000, 3000, 7, 4096, 5000]:
        consumed += step
        new = window_credit(consumed, window, limit)
        if new is not None:
            assert new > limit
            limit = new
        assert limit - consumed <= window


# ---------------------------------------------------------------- close_error


def _err(code, frame_type, reason, **kw):
    args = dict(peer="PEER", describe="to PEER", handshaking=False, heard_from_peer=True, idle_timeout=30.0)
    args.update(kw)
    return close_error(ConnectionTerminated(error_code=code, frame_type=frame_type, reason_phrase=reason), **args)


def test_idle_timeout_without_an_answer():
    e = _err(0, 0, "Idle timeout", heard_from_peer=False)
    assert isinstance(e, TimeoutError) and "no answer from PEER" in str(e)


def test_idle_timeout_of_a_live_connection():
    e = _err(0, 0, "Idle timeout", idle_timeout=12.4)
    assert isinstance(e, ConnectionAbortedError) and "nothing heard for 12 s" in str(e)


@pytest.mark.parametrize("code, kind, text", [
    (AppError.NOT_ALLOWED, ConnectionRefusedError, "allow-list"),
    (AppError.AUTH_REQUIRED, AuthenticationError, "requires peers to prove"),
    (AppError.AUTH_FAILED, AuthenticationError, "rejected our key proof"),
    (AppError.CLOSED, ConnectionResetError, "closed the connection: bye"),
    (0x77, ConnectionResetError, "closed the connection"),
])
def test_application_close_by_the_peer(code, kind, text):
    e = _err(code, None, "bye")
    assert isinstance(e, kind) and text in str(e)


def test_application_close_without_reason():
    assert str(_err(AppError.CLOSED, None, "")) == "PEER closed the connection"


def test_application_error_during_the_handshake_is_a_refusal():
    assert isinstance(_err(0xC, 0, "", handshaking=True), ConnectionRefusedError)
    e = _err(0xC, 0, "", handshaking=False)
    assert isinstance(e, ConnectionResetError) and "0xc" in str(e)


def test_transport_error():
    e = _err(0x7, 0x1E, "Failed to parse frame")
    assert isinstance(e, ConnectionResetError)
    assert str(e) == "connection to PEER closed: QUIC error 0x7 (Failed to parse frame)"
