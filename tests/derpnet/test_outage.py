"""OutageReport: one line when the relay goes, a reminder a minute at most, one when it is
back (issue 11, item 9: 23 warnings in 35 s before). Pure: time is an argument."""

from __future__ import annotations

from derpnet.outage import OutageReport


def _retries(report: OutageReport, start: float, end: float, every: float) -> list[float]:
    """Failed reconnects from `start` to `end`; the times a reminder was due."""
    said = []
    t = start
    while t < end:
        if report.failed(t):
            said.append(t)
        t += every
    return said


def test_one_line_down_reminders_a_minute_apart_one_line_back():
    r = OutageReport(remind_every=60.0)
    assert r.lost(100.0) is True
    assert r.lost(100.5) is False  # still the same outage
    reminders = _retries(r, 101.0, 101.0 + 150.0, every=3.7)  # every backoff step up to 5 s
    assert len(reminders) == 2  # 150 s down: at about 160 and 220, never closer than a minute
    assert reminders[0] >= 160.0 and reminders[1] - reminders[0] >= 60.0
    assert r.attempts == len(range(0, 1500, 37))
    assert r.restored(260.0) == 160.0
    assert r.restored(261.0) is None  # said once


def test_a_35_second_outage_says_two_lines():
    r = OutageReport()
    lines = int(r.lost(0.0))
    lines += len(_retries(r, 0.1, 35.0, every=1.5))
    lines += r.restored(35.0) is not None
    assert lines == 2


def test_a_failure_without_a_loss_starts_an_outage():
    r = OutageReport()
    assert r.failed(5.0) is True and r.down
    assert r.failed(6.0) is False
    assert r.restored(7.0) == 2.0


def test_each_outage_is_reported_on_its_own():
    r = OutageReport()
    assert r.lost(0.0) and r.restored(1.0) == 1.0
    assert r.lost(2.0) and r.restored(2.5) == 0.5
