"""The head's actor table (actor_table.py) fed deaths without any process: restarts and their limit."""

import pytest

from farpool._private.actor_table import ALIVE, DEAD, RESTARTING, ActorTable


def actor(table, max_restarts):
    spec = {"name": None, "max_restarts": max_restarts, "place_shape": {}}
    actor_id, error = table.register("a1", spec)
    assert error is None
    record = table.actors[actor_id]
    record.state = ALIVE
    return record


def test_max_restarts_minus_one_restarts_without_limit():
    table = ActorTable()
    record = actor(table, -1)
    for _ in range(100):
        assert table.died(record, "its worker was killed by SIGKILL") is True
        assert record.state == RESTARTING
        record.state = ALIVE
    assert record.incarnation == 100 and "used up" not in record.cause


@pytest.mark.parametrize("max_restarts", [0, 1, 3])
def test_max_restarts_n_restarts_n_times_then_the_actor_is_dead(max_restarts):
    table = ActorTable()
    record = actor(table, max_restarts)
    for _ in range(max_restarts):
        assert table.died(record, "it crashed") is True
        record.state = ALIVE
    assert table.died(record, "it crashed") is False
    assert record.state == DEAD
    assert f"max_restarts={max_restarts}" in record.cause and "-1" not in record.cause
