"""The worker's side of a stream (worker_streams.py) without processes: credit that comes before
a stream starts is kept, after it ended is dropped; a stream's owner is watched while its
streams run and its death stops them; generators of every kind are stepped."""

import asyncio

import pytest

from farpool._private import protocol
from farpool._private.protocol import OwnerAddress, StreamSpec
from farpool._private.worker_streams import ENDED_REMEMBERED, WorkerStreams, _close, _stepper


def _unsent(frames):
    raise AssertionError(f"a stream without a caller sent {frames[0]!r} to the agent")


def test_credit_before_the_start_is_kept_and_the_larger_limit_wins():
    streams = WorkerStreams(w=None)
    streams.credit(b"t", 5)
    producer = streams._begin(b"t", StreamSpec(0, 3), None, _unsent)
    assert producer.limit == 5 and producer.may_make(4) and not producer.may_make(5)
    streams.credit(b"t", 4)  # an older credit overtaken by a newer one: no step back
    assert producer.limit == 5
    unlimited = streams._begin(b"u", StreamSpec(0, None), None, _unsent)
    assert unlimited.may_make(10 ** 9)


def test_a_stop_lets_a_waiting_producer_go_on_to_see_it():
    streams = WorkerStreams(w=None)
    producer = streams._begin(b"t", StreamSpec(0, 1), None, _unsent)
    assert not producer.may_make(1)
    streams.stop(b"t")
    assert producer.stopped and producer.may_make(1)


def test_messages_for_an_ended_stream_are_dropped_and_the_memory_is_bounded():
    streams = WorkerStreams(w=None)
    streams._begin(b"t", StreamSpec(0, 1), None, _unsent)
    streams._ended(b"t", _unsent)
    streams.credit(b"t", 9)
    streams.stop(b"t")
    assert b"t" not in streams.producers
    for i in range(ENDED_REMEMBERED + 5):
        streams._ended(i.to_bytes(4, "little"), _unsent)
    assert len(streams.ended) == ENDED_REMEMBERED
    assert streams._begin(b"t", StreamSpec(2, 3), None, _unsent).limit == 3  # a retry here starts it again


def test_a_caller_is_watched_while_its_streams_run_and_its_death_stops_only_them():
    streams = WorkerStreams(w=None)
    sent = []

    def send(frames):
        tag, fields, _ = protocol.decode(frames)
        sent.append((tag, *fields))

    owner = tuple(OwnerAddress(b"c:owner", "node-a"))
    other = tuple(OwnerAddress(b"c:other", "node-b"))
    first = streams._begin(b"t1", StreamSpec(0, 1), owner, send)
    second = streams._begin(b"t2", StreamSpec(0, 1), owner, send)
    third = streams._begin(b"t3", StreamSpec(0, 1), other, send)
    assert sent == [("WatchCaller", b"c:owner", "node-a"), ("WatchCaller", b"c:other", "node-b")]
    streams.caller_gone(b"c:owner")
    assert first.stopped and second.stopped and not third.stopped
    assert first.may_make(5)  # a producer waiting for credit goes on, to see the stop
    streams._ended(b"t1", send)
    assert len(sent) == 2  # t2 still runs for it
    streams._ended(b"t2", send)
    streams._ended(b"t3", send)
    assert sent[2:] == [("UnwatchCaller", b"c:owner"), ("UnwatchCaller", b"c:other")]
    assert streams.callers == {} and streams.producers == {}


def test_steppers_for_generators_async_generators_and_iterables():
    def gen():
        yield 1
        yield 2

    async def agen():
        await asyncio.sleep(0)
        yield "a"

    step = _stepper(gen(), "g")
    assert [step(), step()] == [1, 2]
    with pytest.raises(StopIteration):
        step()
    a = agen()
    step = _stepper(a, "a")
    assert step() == "a"
    with pytest.raises(StopIteration):
        step()
    _close(a, step)
    assert step.loop.is_closed()
    step = _stepper([7, 8], "list")
    assert step() == 7
    with pytest.raises(TypeError, match="f is a streaming task .* returned a value of type int, not a generator or iterator"):
        _stepper(3, "f")


def test_closing_a_stopped_generator_runs_its_finally():
    closed = []

    def gen():
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)
    g = gen()
    step = _stepper(g, "g")
    step()
    _close(g, step)
    assert closed == [True]


def test_a_retry_that_yields_fewer_items_than_were_delivered_fails():
    from farpool._private.worker_streams import _count
    assert _count(5, StreamSpec(3, None), "g") == 5
    with pytest.raises(RuntimeError, match="the retry of streaming task g yielded 2 items, but its earlier "
                                           "attempt had already delivered 3"):
        _count(2, StreamSpec(3, None), "g")
