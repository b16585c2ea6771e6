"""Futures as dependencies (#15, the Dask idiom): a DistributedExecutor future passed to
submit or map is resolved to its value before the function runs, without the driver
waiting; a failed dependency fails the dependent with the same exception."""

import concurrent.futures
import pickle

import pytest

import farpool
from farpool.executor import DistributedExecutor
from farpool_testing import wait_at_gate


def add(a, b=0):
    return a + b


def fails(x):
    raise KeyError(f"no {x}")


def total(*xs):
    return sum(xs)


def test_a_future_argument_is_its_value_and_submit_does_not_wait(gate):
    with DistributedExecutor(max_workers=2) as ex:
        slow = ex.submit(wait_at_gate, gate.path, 20)  # runs until the gate opens
        dependent = ex.submit(add, slow, b=slow)  # returned at once: nobody waits for slow here
        gate.wait_arrivals(1)
        assert not dependent.done()
        gate.open()
        assert dependent.result(timeout=60) == 40
        assert isinstance(slow.object_ref, farpool.ObjectRef)
        chained = ex.submit(add, ex.submit(add, 1, 2), 3)
        assert [f.result(timeout=60) for f in concurrent.futures.as_completed([chained, dependent])] \
            and chained.result() == 6


def test_futures_as_map_items_are_their_values():
    with DistributedExecutor(max_workers=2) as ex:
        parts = [ex.submit(add, i, i) for i in range(5)]
        assert list(ex.map(add, parts, range(5))) == [3 * i for i in range(5)]


def test_a_failed_dependency_fails_the_dependent_with_the_same_exception():
    with DistributedExecutor(max_workers=2) as ex:
        bad = ex.submit(fails, "key")
        dependent = ex.submit(total, 1, bad)
        with pytest.raises(KeyError, match="no key"):
            dependent.result(timeout=60)
        with pytest.raises(KeyError, match="no key"):
            bad.result()


def test_a_cancelled_dependency_cancels_nothing_else_and_fails_the_dependent(gate):
    with DistributedExecutor(max_workers=1) as ex:
        busy = ex.submit(wait_at_gate, gate.path, 1)
        gate.wait_arrivals(1)
        queued = ex.submit(add, 1, 1)  # waits behind max_workers=1
        assert queued.cancel()
        dependent = ex.submit(add, queued, 1)
        gate.open()
        with pytest.raises(concurrent.futures.CancelledError):
            dependent.result(timeout=60)
        assert busy.result(timeout=60) == 1


def test_a_future_inside_a_container_says_how_to_pass_it():
    with DistributedExecutor(max_workers=1) as ex:
        f = ex.submit(add, 1, 1)
        with pytest.raises(TypeError, match="cannot be pickled: pass it as an argument"):
            pickle.dumps(f)
        g = ex.submit(total, *[f])
        assert g.result(timeout=60) == 2
        nested = ex.submit(len, [f])
        with pytest.raises(Exception, match="cannot be pickled"):
            nested.result(timeout=60)
