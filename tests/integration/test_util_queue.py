"""farpool.util.Queue: a queue.Queue shared by the driver, tasks and actors."""

import queue
import threading

import pytest

import farpool
from farpool.util import Queue


@farpool.remote
def produce(q, items):
    for item in items:
        q.put(item)
    return len(items)


@farpool.remote
def consume(q, n):
    return [q.get(timeout=60) for _ in range(n)]


def test_producer_task_consumer_driver(cluster):
    q = Queue()
    ref = produce.remote(q, list(range(20)))
    assert [q.get(timeout=60) for _ in range(20)] == list(range(20))
    assert farpool.get(ref, timeout=60) == 20
    assert q.empty() and q.qsize() == 0


def test_empty_and_full(cluster):
    q = Queue(maxsize=2)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    q.put_nowait("a")
    q.put("b")
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    with pytest.raises(queue.Full):
        q.put("c", block=False)
    assert q.get() == "a" and not q.full()


def test_timeouts_raise_once_they_pass(cluster):
    q = Queue(maxsize=1)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put(2, timeout=0.2)
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    assert q.get(timeout=60) == 1


def test_a_blocked_get_does_not_block_other_callers(cluster):
    q = Queue()
    got = []
    waiter = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
    waiter.start()
    assert q.qsize() == 0           # answered while a get waits in the actor
    q.put("x")                      # reaches the waiting get
    waiter.join(60)
    assert got == ["x"]


def test_maxsize_makes_a_producer_wait_for_room(cluster):
    q = Queue(maxsize=3)
    ref = produce.remote(q, list(range(10)))
    out = [q.get(timeout=60) for _ in range(10)]
    assert out == list(range(10)) and farpool.get(ref, timeout=60) == 10


def test_one_queue_many_tasks(cluster):
    q = Queue()
    producers = [produce.remote(q, [(p, i) for i in range(5)]) for p in range(3)]
    consumers = [consume.remote(q, 5) for _ in range(3)]
    assert farpool.get(producers, timeout=60) == [5, 5, 5]
    got = sorted(item for items in farpool.get(consumers, timeout=60) for item in items)
    assert got == sorted((p, i) for p in range(3) for i in range(5))


@farpool.remote
class Relay:
    def __init__(self, q_in, q_out):
        self.q_in, self.q_out = q_in, q_out

    def step(self):
        self.q_out.put(self.q_in.get(timeout=60) * 2)


def test_queue_used_from_an_actor(cluster):
    q_in, q_out = Queue(), Queue()
    relay = Relay.remote(q_in, q_out)
    q_in.put(21)
    farpool.get(relay.step.remote(), timeout=60)
    assert q_out.get(timeout=60) == 42
