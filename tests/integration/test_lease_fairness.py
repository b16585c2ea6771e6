"""A busy kind of task never starves another: leases held while one queue has work are asked
back for a request that waits behind them (leases.tick, YieldLease).

Before, a client fed its leases for as long as one queue (shape, pool, strategy) had work,
so a task of another shape or of another driver waited until that queue ran dry: with a
loop that never stops submitting, for ever.
"""

import contextlib
import threading

import pytest

import farpool


@pytest.fixture(scope="module")
def cluster():
    farpool.shutdown()
    farpool.init(num_cpus=2)
    yield
    farpool.shutdown()


@farpool.remote
def square(x):
    return x * x


@contextlib.contextmanager
def busy_loop():
    """A thread that keeps both CPUs leased with rounds of ``square`` tasks (its queue's leases
    are fed, never returned) until the block ends; entered once a round has gone through."""
    stop, first_round = threading.Event(), threading.Event()
    errors = []

    def busy():
        try:
            while not stop.is_set():
                assert farpool.get([square.remote(i) for i in range(300)], timeout=120) == [i * i for i in range(300)]
                first_round.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread below
            errors.append(exc)
            first_round.set()

    loop = threading.Thread(target=busy, daemon=True)
    loop.start()
    try:
        assert first_round.wait(timeout=120), "the busy loop's first round did not end"
        assert not errors, errors
        yield
    finally:
        stop.set()
        loop.join(timeout=120)
    assert not loop.is_alive()
    assert not errors, errors


def test_a_task_of_another_shape_runs_while_a_busy_loop_keeps_every_cpu_leased(cluster):
    with busy_loop():
        half = square.options(num_cpus=0.5)
        assert farpool.get([half.remote(3) for _ in range(4)], timeout=60) == [9] * 4
        wide = square.options(num_cpus=1.5)  # needs both leases back at once
        assert farpool.get(wide.remote(4), timeout=60) == 16


@pytest.mark.parametrize("soft", [True, False])
def test_a_task_pinned_to_a_node_runs_while_a_busy_loop_of_its_shape_keeps_every_cpu_there(cluster, soft):
    # The same shape as the loop's tasks, but another queue (its node affinity): the agent
    # must tell the two apart, or it never asks the loop's leases back for it.
    node_id = next(n["node_id"] for n in farpool.nodes() if n["alive"])
    with busy_loop():
        pinned = square.options(scheduling_strategy=farpool.NodeAffinity(node_id, soft=soft))
        assert farpool.get(pinned.remote(5), timeout=60) == 25
