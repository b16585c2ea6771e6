"""A worker asked to retire (its node drains: Retire) stays retiring when the setup of its
executor's or pool's workers (max_tasks_per_child) arrives afterwards with its first tasks."""

import types

from farpool._private.worker import Worker


def worker(tasks_left):
    return types.SimpleNamespace(pool_ready=False, pool_error=None, tasks_left=tasks_left)


def test_a_pool_setup_does_not_undo_a_retirement():
    retiring = worker(tasks_left=0)  # (what Worker._retire_soon leaves)
    assert Worker._apply_pool(retiring, {"max_tasks": 5, "initializer": None}) is None
    assert retiring.tasks_left == 0


def test_a_pool_setup_counts_the_tasks_of_a_worker_not_retiring():
    fresh = worker(tasks_left=None)
    Worker._apply_pool(fresh, {"max_tasks": 5, "initializer": None})
    assert fresh.tasks_left == 5
    Worker._apply_pool(fresh, {"max_tasks": 9, "initializer": None})  # (once per worker)
    assert fresh.tasks_left == 5
