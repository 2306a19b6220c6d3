"""TimerHeap (pure: no clock, no thread): schedule, supersede, cancel, pop order, earliest."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from derpquic.timers import TimerHeap


def test_empty():
    h: TimerHeap[str] = TimerHeap()
    assert h.earliest() is None
    assert h.pop_due(1e9) == []
    assert len(h) == 0 and "a" not in h and h.when("a") is None


def test_schedule_and_pop_in_time_order():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("c", 3.0)
    h.schedule("a", 1.0)
    h.schedule("b", 2.0)
    assert len(h) == 3 and "b" in h and h.when("b") == 2.0
    assert h.earliest() == 1.0
    assert h.pop_due(0.5) == []
    assert h.pop_due(2.0) == ["a", "b"]  # at or before now
    assert h.earliest() == 3.0 and len(h) == 1
    assert h.pop_due(10.0) == ["c"]
    assert h.earliest() is None and len(h) == 0


def test_popped_keys_are_unscheduled():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    assert h.pop_due(1.0) == ["a"]
    assert "a" not in h and h.when("a") is None
    assert h.pop_due(5.0) == []


def test_supersede_with_an_earlier_time():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 5.0)
    h.schedule("a", 1.0)
    assert h.earliest() == 1.0 and h.when("a") == 1.0
    assert h.pop_due(1.0) == ["a"]
    assert h.pop_due(10.0) == []  # the old entry at 5.0 is gone with it


def test_supersede_with_a_later_time():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    h.schedule("b", 2.0)
    h.schedule("a", 5.0)
    assert h.earliest() == 2.0  # exact, although a's entry at 1.0 is still in the heap
    assert h.pop_due(1.5) == []
    assert h.pop_due(2.0) == ["b"]
    assert h.earliest() == 5.0
    assert h.pop_due(4.9) == []
    assert h.pop_due(5.0) == ["a"]


def test_supersede_back_to_the_original_time():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    h.schedule("a", 3.0)
    h.schedule("a", 1.0)
    assert h.earliest() == 1.0 and h.pop_due(1.0) == ["a"] and len(h) == 0


def test_schedule_none_cancels():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    h.schedule("a", None)
    assert "a" not in h and h.earliest() is None and h.pop_due(5.0) == []


def test_cancel():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    h.schedule("b", 2.0)
    h.cancel("a")
    h.cancel("a")  # idempotent
    h.cancel("never scheduled")
    assert h.earliest() == 2.0
    assert h.pop_due(10.0) == ["b"]


def test_cancel_then_schedule_again():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    h.cancel("a")
    h.schedule("a", 4.0)
    assert h.pop_due(3.0) == [] and h.pop_due(4.0) == ["a"]


def test_equal_times_pop_in_schedule_order():
    h: TimerHeap[str] = TimerHeap()
    for k in "dbca":
        h.schedule(k, 1.0)
    assert h.pop_due(1.0) == list("dbca")


def test_equal_times_after_a_move_keep_schedule_order():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 0.5)
    h.schedule("a", 2.0)  # a wants 2.0 first ...
    h.schedule("b", 2.0)  # ... then b
    assert h.pop_due(2.0) == ["a", "b"]


def test_equal_times_after_a_return_keep_schedule_order():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 0.0)
    h.schedule("a", 5.0)
    h.schedule("b", 0.0)
    h.schedule("a", 0.0)  # a set its time last
    assert h.pop_due(0.0) == ["b", "a"]


def test_clear():
    h: TimerHeap[str] = TimerHeap()
    h.schedule("a", 1.0)
    h.clear()
    assert len(h) == 0 and h.earliest() is None and h.pop_due(2.0) == []


def test_stale_entries_do_not_pile_up():
    """A key that keeps moving earlier leaves stale entries behind; they are compacted."""
    h: TimerHeap[int] = TimerHeap()
    for i in range(10_000):
        h.schedule(1, 1e6 - i)
    assert len(h._heap) < 200
    assert h.earliest() == 1e6 - 9999
    assert h.pop_due(1e6) == [1]


def test_keys_are_never_compared():
    class Key:
        __lt__ = None  # type: ignore[assignment]  # unorderable

    h: TimerHeap[Key] = TimerHeap()
    a, b = Key(), Key()
    h.schedule(a, 1.0)
    h.schedule(b, 1.0)
    assert h.pop_due(1.0) == [a, b]


# ---------------------------------------------------------------- against a model

ops = st.lists(st.one_of(
    st.tuples(st.just("schedule"), st.integers(0, 5), st.one_of(st.none(), st.integers(0, 20))),
    st.tuples(st.just("cancel"), st.integers(0, 5), st.none()),
    st.tuples(st.just("pop"), st.none(), st.integers(0, 20)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_behaves_like_a_dict_of_times(sequence):
    h: TimerHeap[int] = TimerHeap()
    model: dict[int, tuple[float, int]] = {}  # key -> (time, order of the schedule call)
    order = 0
    for op, key, t in sequence:
        if op == "schedule":
            order += 1
            if t is None:
                model.pop(key, None)
            elif key not in model or model[key][0] != t:
                model[key] = (float(t), order)
            h.schedule(key, None if t is None else float(t))
        elif op == "cancel":
            model.pop(key, None)
            h.cancel(key)
        else:
            due = sorted((v, k) for k, v in model.items() if v[0] <= t)
            assert h.pop_due(float(t)) == [k for _, k in due]
            for _, k in due:
                del model[k]
        assert h.earliest() == min((v[0] for v in model.values()), default=None)
        assert len(h) == len(model)
        assert all(h.when(k) == v[0] for k, v in model.items())
