"""The owner's state of a streaming generator task (streams.py), event by event, without processes."""

import pytest

from farpool._private.protocol import StreamSpec
from farpool._private.streams import Next, StreamState


def _checked(state: StreamState) -> StreamState:
    state.validate_state()
    return state


def test_items_are_handed_out_in_order_then_the_stream_ends():
    s = _checked(StreamState())
    assert s.take() == (Next.WAIT, None) and not s.has_next()
    assert s.arrive(0, "a") and s.arrive(1, "b")
    _checked(s)
    assert s.take() == (Next.ITEM, "a")
    s.end()
    assert not s.finished() and s.has_next()  # "b" is still unread
    assert s.take() == (Next.ITEM, "b")
    assert s.take() == (Next.END, None) and s.finished()
    _checked(s)


def test_a_failed_task_hands_out_its_error_after_the_items_once():
    s = StreamState()
    s.arrive(0, "a")
    s.end(failure="error-ref")
    _checked(s)
    assert s.take() == (Next.ITEM, "a")
    assert s.take() == (Next.ITEM, "error-ref")
    assert s.take() == (Next.END, None)
    assert s.handed == 1  # the error is not an item
    _checked(s)


def test_duplicates_and_items_out_of_order_are_refused():
    s = StreamState()
    assert s.arrive(0, "a")
    assert not s.arrive(0, "again")   # an earlier attempt's copy
    assert not s.arrive(2, "gap")     # not the next index
    assert s.arrive(1, "b")
    assert [s.take()[1], s.take()[1]] == ["a", "b"]
    _checked(s)


def test_nothing_arrives_after_the_end():
    s = StreamState()
    s.end()
    assert not s.arrive(0, "late")
    assert s.take() == (Next.END, None)


def test_a_retry_skips_what_the_owner_has_and_keeps_the_limit():
    s = StreamState(max_pending=2)
    assert s.spec() == tuple(StreamSpec(0, 2))
    s.arrive(0, "a")
    s.arrive(1, "b")
    s.take()
    # the worker died: the next attempt makes items 0 and 1 again and drops them
    assert s.spec() == tuple(StreamSpec(2, 3))
    assert not s.arrive(1, "b again")
    assert s.arrive(2, "c")
    _checked(s)
    assert StreamState().spec() == tuple(StreamSpec(0, None))


def test_credit_grows_by_one_per_item_handed_out_and_is_sent_once():
    s = StreamState(max_pending=2)
    s.spec()  # the first dispatch carries limit 2
    assert s.credit_to_send() is None  # nothing handed out: the producer knows its limit
    s.arrive(0, "a")
    s.arrive(1, "b")
    assert s.take()[1] == "a"
    assert s.credit_to_send() == 3
    assert s.credit_to_send() is None
    assert s.take()[1] == "b"
    assert s.credit_to_send() == 4
    _checked(s)
    s.end()
    s.arrive(2, "late")
    assert s.credit_to_send() is None  # an ended stream is told nothing


def test_unread_items_never_exceed_max_pending_when_the_producer_obeys():
    s = StreamState(max_pending=3)
    limit = s.spec()[1]
    made = 0
    for _round in range(10):
        while made < limit:  # the producer makes what its credit allows
            assert s.arrive(made, made)
            made += 1
        assert s.arrived - s.handed <= 3
        s.take()
        limit = s.credit_to_send() or limit
        _checked(s)
    assert s.handed == 10


def test_closing_drops_the_unread_items_and_refuses_later_ones():
    s = StreamState(max_pending=1)
    s.arrive(0, "a")
    assert s.close() == ["a"]
    _checked(s)
    assert s.finished() and s.has_next()
    assert not s.arrive(1, "b")
    assert s.take() == (Next.END, None)
    s.end(failure="error-ref")  # the task ends cancelled after the generator was dropped
    assert s.failure is None and s.take() == (Next.END, None)
    assert s.credit_to_send() is None
    _checked(s)


def test_closing_an_ended_stream_releases_its_error_too():
    s = StreamState()
    s.end(failure="error-ref")
    assert s.close() == ["error-ref"]
    _checked(s)


def test_validate_state_catches_contradictions():
    s = StreamState()
    s.arrive(0, "a")
    s.handed = 2
    with pytest.raises(AssertionError, match="handed out more than arrived"):
        s.validate_state()
    s = StreamState(max_pending=1)
    s.credit_sent = 5
    with pytest.raises(AssertionError, match="allowed more"):
        s.validate_state()
