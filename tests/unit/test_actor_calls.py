"""Actor calls (actor_calls.py) fed events without any process: order, restarts, retries, kill.

``validate_state`` runs after every event.
"""

import pytest

from farpool import exceptions
from farpool._private.actor_calls import ActorCalls
from farpool._private.task_queues import LeaseState, RemoteFunctionInfo, TaskRecord, TaskState

FN = RemoteFunctionInfo("A.m", b"actor:m", b"")
_ids = iter(range(1, 1 << 30))


def call(actor_id="a1", max_retries=0, deps_left=0):
    task_id = next(_ids).to_bytes(16, "little")
    t = TaskRecord(task_id, FN, b"", [], [], [task_id], {}, ("actor", actor_id), max_retries, False, [], "A.m",
                   actor_id=actor_id)
    t.deps_left = deps_left
    return t


def no_failed_argument(task):
    return None


@pytest.fixture
def calls():
    return ActorCalls()


def alive(calls, actor_id="a1", incarnation=0):
    calls.actor(actor_id)  # we hear of an actor once we call it (the first call subscribes)
    update = calls.update(actor_id, "ALIVE", incarnation, "")
    calls.validate_state()
    if update is not None and update.connect:
        aq = calls.actor(actor_id)
        calls.set_lease(aq, LeaseState(incarnation, "w", "node-a", None, [], ("actor", actor_id), actor_id=actor_id))
    return update


def test_calls_wait_for_the_actor_then_go_in_order(calls):
    a, b, c = call(), call(), call()
    for t in (a, b, c):
        calls.add(t)
    calls.validate_state()
    aq = calls.actor("a1")
    assert calls.next_batch(aq, no_failed_argument) == ([], [])  # no lease yet
    assert alive(calls).connect
    batch, failed = calls.next_batch(aq, no_failed_argument)
    calls.validate_state()
    assert batch == [a, b, c] and not failed and all(t.state == TaskState.RUNNING for t in batch)


def test_a_call_waiting_for_its_argument_holds_back_the_calls_after_it(calls):
    alive(calls)
    a, b = call(deps_left=1), call()
    calls.add(a)
    calls.add(b)
    aq = calls.actor("a1")
    assert calls.next_batch(aq, no_failed_argument) == ([], [])
    a.deps_left = 0
    assert calls.next_batch(aq, no_failed_argument)[0] == [a, b]


def test_a_call_whose_argument_failed_fails_without_running(calls):
    alive(calls)
    a, b = call(), call()
    calls.add(a)
    calls.add(b)
    batch, failed = calls.next_batch(calls.actor("a1"), lambda t: "entry" if t is a else None)
    assert batch == [b] and failed == [(a, "entry")]


def test_calls_in_flight_are_retried_on_the_restarted_actor_while_retries_last(calls):
    alive(calls)
    keep, lose = call(max_retries=1), call(max_retries=0)
    calls.add(keep)
    calls.add(lose)
    aq = calls.actor("a1")
    calls.next_batch(aq, no_failed_argument)
    update = calls.update("a1", "RESTARTING", 0, "its worker was killed by SIGKILL")
    calls.validate_state()
    assert [t for t, _ in update.failed] == [lose]
    error = update.failed[0][1]
    assert isinstance(error, exceptions.ActorDiedError) and "set max_task_retries" in str(error)
    assert list(aq.queue) == [keep] and keep.attempts == 1 and aq.lease is None
    assert alive(calls, incarnation=1).connect
    assert calls.next_batch(aq, no_failed_argument)[0] == [keep]
    update = calls.update("a1", "DEAD", 1, "out of restarts")
    calls.validate_state()
    assert [t for t, _ in update.failed] == [keep] and "max_task_retries=1 used up" in str(update.failed[0][1])


def test_the_same_incarnation_alive_again_changes_nothing(calls):
    alive(calls)
    calls.add(call())
    calls.next_batch(calls.actor("a1"), no_failed_argument)
    update = calls.update("a1", "ALIVE", 0, "")
    assert not update.failed and not update.connect


def test_a_dead_actor_fails_what_is_queued_and_stays_dead(calls):
    alive(calls)
    calls.update("a1", "DEAD", 0, "it exited")
    aq = calls.actor("a1")
    t = call()
    calls.add(t)
    failed = calls.fail_all(aq)
    calls.validate_state()
    assert failed[0][0] is t and "it exited" in str(failed[0][1])
    assert calls.update("a1", "ALIVE", 1, "") is None  # final


def test_kill_fails_every_call_in_flight_and_queued_with_the_reason(calls):
    alive(calls)
    running, queued = call(max_retries=2), call()
    calls.add(running)
    aq = calls.actor("a1")
    calls.next_batch(aq, no_failed_argument)
    calls.add(queued)
    aq, failed = calls.kill("a1")
    calls.validate_state()
    assert {t.task_id for t, _ in failed} == {running.task_id, queued.task_id}
    assert all("killed with farpool.kill()" in str(e) for _, e in failed)


def test_validate_state_catches_a_dead_actor_holding_calls(calls):
    aq = calls.actor("a1")
    calls.add(call())
    aq.state = "DEAD"
    with pytest.raises(AssertionError, match="dead actor"):
        calls.validate_state()


def test_calls_in_flight_with_max_task_retries_minus_one_are_retried_at_every_death(calls):
    alive(calls)
    aq = calls.actor("a1")
    t = call(max_retries=-1)
    calls.add(t)
    for incarnation in range(1, 6):
        batch, _ = calls.next_batch(aq, no_failed_argument)
        assert batch == [t]
        assert calls.lost(aq, "its worker was killed by SIGKILL") == []  # retried, never "-1 used up"
        calls.validate_state()
        alive(calls, incarnation=incarnation)
    assert t.attempts == 5 and t.state == TaskState.QUEUED


def test_where_says_what_a_pending_call_waits_for(calls):
    a, b = call(), call(deps_left=1)
    calls.add(a)
    calls.add(b)
    calls.validate_state()
    assert calls.where(b) == "is queued for actor a1 (UNKNOWN) behind 1 call(s), waiting for its worker"
    alive(calls)
    sent, _ = calls.next_batch(calls.actor("a1"), no_failed_argument)
    assert sent == [a]
    assert calls.where(a) == "was sent to actor a1 (ALIVE) and has not answered"
    assert calls.where(b) == "is queued for actor a1 (ALIVE) behind 0 call(s), waiting for 1 of its arguments"
