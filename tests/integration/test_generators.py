"""Streaming generators: a generator function or actor method called with .remote() gives an
ObjectRefGenerator whose refs arrive as the task yields (API.md "Streaming generators")."""

import asyncio
import concurrent.futures
import os
import signal

import numpy as np
import pytest

import farpool
from farpool_testing import TIMEOUT, store_stats_of, wait_at_gate, wait_for_file, wait_until

MB = 1024 * 1024


@farpool.remote
def count(n, gate=None, at=None):
    for i in range(n):
        if i == at:
            wait_at_gate(gate)
        yield i


@farpool.remote
def fails_after(n):
    for i in range(n):
        yield i
    raise ValueError(f"failed after {n} items")


@farpool.remote
def forever(stopped_marker):
    i = 0
    try:
        while True:
            yield i
            i += 1
    finally:
        open(stopped_marker, "w").close()


@farpool.remote
def arrays(n, mb, progress=None):
    for i in range(n):
        if progress is not None:
            with open(progress, "a") as f:
                f.write(f"{i}\n")
        yield np.full(mb * MB, i % 256, dtype=np.uint8)


@farpool.remote
def total(array):
    return int(array.sum())


@farpool.remote
def first_of_box(box):
    return int(farpool.get(box[0])[0])


@farpool.remote(max_retries=2)
def killed_once(marker, pid_file, gate):
    attempt = 2 if os.path.exists(marker) else 1
    for i in range(6):
        if i == 3 and attempt == 1:
            open(marker, "w").close()
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            wait_at_gate(gate)  # the test kills us here
        yield (i, attempt)


@farpool.remote
async def async_count(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i


@farpool.remote
def unpicklable_second():
    import threading
    yield 1
    yield threading.Lock()


@farpool.remote
def boxes(n):
    for i in range(n):
        yield [farpool.put(i * 100)]  # a ref owned by the worker, inside an item


@farpool.remote
def consume(n):
    return sum(farpool.get(ref) for ref in count.remote(n))


@farpool.remote
class Producer:
    def items(self, n):
        for i in range(n):
            yield i * 2

    def forever(self, stopped_marker):
        return forever_body(stopped_marker)

    def ping(self):
        return "pong"


def forever_body(stopped_marker):
    i = 0
    try:
        while True:
            yield i
            i += 1
    finally:
        open(stopped_marker, "w").close()


@farpool.remote
class AsyncProducer:
    async def items(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i * 3

    async def forever(self, stopped_marker):
        i = 0
        try:
            while True:
                await asyncio.sleep(0)
                yield i
                i += 1
        finally:
            open(stopped_marker, "w").close()


def _used(cluster):
    return store_stats_of(cluster["node_id"])["used"]


# ---------------------------------------------------------------------- streaming
def test_refs_arrive_while_the_task_still_runs(cluster, gate):
    gen = count.remote(5, gate.path, 3)
    assert isinstance(gen, farpool.ObjectRefGenerator)
    first = [next(gen) for _ in range(3)]  # items 0..2 come while the task waits at the gate
    gate.wait_arrivals(1)
    assert farpool.get(first, timeout=TIMEOUT) == [0, 1, 2]
    assert not gen.is_finished() and not gen.next_ready()
    with pytest.raises(farpool.GetTimeoutError, match="no item of the streaming task count came within 0.1 s"):
        gen._next_sync(timeout_s=0.1)
    gate.open()
    assert farpool.get(list(gen), timeout=TIMEOUT) == [3, 4]
    assert gen.is_finished()
    assert farpool.get(gen.completed(), timeout=TIMEOUT) == 5
    with pytest.raises(StopIteration):
        next(gen)


def test_wait_takes_generators_ready_once_next_would_not_wait(cluster, gate):
    gen = count.remote(3, gate.path, 1)  # item 0 comes, then the task waits at the gate
    ref = farpool.put("here")
    ready, not_ready = farpool.wait([gen], timeout=TIMEOUT)  # (Ray: its next ref is there)
    assert ready == [gen] and not_ready == [] and gen.next_ready()
    assert farpool.get(next(gen), timeout=TIMEOUT) == 0
    gate.wait_arrivals(1)
    ready, not_ready = farpool.wait([gen, ref], num_returns=2, timeout=0.2)  # nothing comes: not ready
    assert ready == [ref] and not_ready == [gen]
    assert farpool.wait([gen], timeout=0) == ([], [gen])
    waited = farpool.api._client().streams.async_waiters
    assert gen.completed().binary() not in waited  # a wait that timed out leaves no waiter behind
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a waiting wait wakes when the item comes
        waiting = pool.submit(farpool.wait, [ref, gen], num_returns=2, timeout=TIMEOUT)
        gate.open()
        ready, not_ready = waiting.result(timeout=TIMEOUT)
    assert ready == [ref, gen] and not_ready == []
    assert farpool.get(list(gen), timeout=TIMEOUT) == [1, 2]
    assert farpool.wait([gen], timeout=TIMEOUT) == ([gen], [])  # ended: next would not wait (it stops)
    with pytest.raises(TypeError, match=r"not a single generator: wait\(\[gen\]\)"):
        farpool.wait(gen)
    with pytest.raises(ValueError, match="the same ObjectRef or ObjectRefGenerator more than once"):
        farpool.wait([gen, gen])
    with pytest.raises(TypeError, match="item 1 is a str"):
        farpool.wait([gen, "x"])


def test_num_returns_streaming_is_explicit_and_max_pending_items_is_an_option(cluster):
    explicit = farpool.remote(num_returns="streaming")(lambda n: iter(range(n)))
    assert farpool.get(list(explicit.remote(4)), timeout=TIMEOUT) == [0, 1, 2, 3]
    gen = count.options(max_pending_items=1).remote(3)
    assert farpool.get(list(gen), timeout=TIMEOUT) == [0, 1, 2]


def test_an_error_mid_stream_is_raised_by_the_next_ref_then_the_iteration_ends(cluster):
    refs = list(fails_after.remote(2))
    assert len(refs) == 3
    assert farpool.get(refs[:2], timeout=TIMEOUT) == [0, 1]
    with pytest.raises(ValueError, match="failed after 2 items") as info:
        farpool.get(refs[2], timeout=TIMEOUT)
    assert isinstance(info.value, farpool.TaskError)
    gen = fails_after.remote(0)  # (kept: a generator dropped before its end cancels its task)
    with pytest.raises(ValueError):
        farpool.get(gen.completed(), timeout=TIMEOUT)


def test_async_for_takes_the_refs_in_asyncio(cluster):
    async def main():
        out = []
        async for ref in count.remote(4):
            out.append(await ref)
        return out
    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == [0, 1, 2, 3]


def test_an_async_generator_function_streams(cluster):
    assert farpool.get(list(async_count.remote(3)), timeout=TIMEOUT) == [0, 1, 2]


def test_an_item_that_cannot_be_pickled_fails_the_stream_there(cluster):
    refs = list(unpicklable_second.remote())
    assert len(refs) == 2 and farpool.get(refs[0], timeout=TIMEOUT) == 1
    with pytest.raises(TypeError, match="item 1 of unpicklable_second"):
        farpool.get(refs[1], timeout=TIMEOUT)


def test_a_task_consumes_a_stream_and_get_says_to_iterate_a_generator(cluster):
    assert farpool.get(consume.remote(5), timeout=TIMEOUT) == 10
    with pytest.raises(TypeError, match=r"not an ObjectRefGenerator: iterate it"):
        farpool.get(count.remote(1))


# ---------------------------------------------------------------------- actors
@pytest.mark.parametrize("make", [Producer.remote, lambda: Producer.options(max_concurrency=2).remote()],
                         ids=["in-order", "threaded"])
def test_sync_actor_methods_stream(cluster, make):
    actor = make()
    gen = actor.items.remote(4)
    assert isinstance(gen, farpool.ObjectRefGenerator)
    assert farpool.get(list(gen), timeout=TIMEOUT) == [0, 2, 4, 6]
    assert farpool.get(actor.ping.remote(), timeout=TIMEOUT) == "pong"
    limited = actor.items.options(max_pending_items=1).remote(3)
    assert farpool.get(list(limited), timeout=TIMEOUT) == [0, 2, 4]


def test_async_actor_methods_stream(cluster):
    actor = AsyncProducer.remote()
    assert farpool.get(list(actor.items.remote(5)), timeout=TIMEOUT) == [0, 3, 6, 9, 12]
    assert farpool.get(list(actor.items.options(max_pending_items=2).remote(4)), timeout=TIMEOUT) == [0, 3, 6, 9]


def test_an_explicit_streaming_method(cluster, tmp_path):
    actor = Producer.remote()
    gen = actor.forever.options(num_returns="streaming", max_pending_items=2).remote(str(tmp_path / "stopped"))
    assert [farpool.get(next(gen), timeout=TIMEOUT) for _ in range(3)] == [0, 1, 2]
    gen.close()
    wait_for_file(str(tmp_path / "stopped"))


# ---------------------------------------------------------------------- cancel and garbage
def _drain_after_cancel(gen):
    """What is left after a cancel: ordinary items the task made before it stopped, then a ref
    whose get raises TaskCancelledError."""
    rest = list(gen)
    assert rest, "the cancelled stream ended without saying so"
    with pytest.raises(farpool.TaskCancelledError):
        farpool.get(rest[-1], timeout=TIMEOUT)
    values = farpool.get(rest[:-1], timeout=TIMEOUT)
    return values


def test_cancel_stops_the_producer(cluster, tmp_path):
    stopped = str(tmp_path / "stopped")
    gen = forever.options(max_pending_items=4).remote(stopped)
    assert farpool.get([next(gen), next(gen)], timeout=TIMEOUT) == [0, 1]
    farpool.cancel(gen)
    wait_for_file(stopped)
    values = _drain_after_cancel(gen)
    assert values == list(range(2, 2 + len(values))) and len(values) <= 4  # never past its credit
    with pytest.raises(farpool.TaskCancelledError):
        farpool.get(gen.completed(), timeout=TIMEOUT)


@pytest.mark.parametrize("actor_class", [Producer, AsyncProducer], ids=["sync", "async"])
def test_cancel_stops_an_actor_method_and_the_actor_goes_on(cluster, tmp_path, actor_class):
    stopped = str(tmp_path / "stopped")
    actor = actor_class.remote()
    method = actor.forever if actor_class is AsyncProducer else actor.forever.options(num_returns="streaming")
    gen = method.options(max_pending_items=2).remote(stopped)
    assert farpool.get(next(gen), timeout=TIMEOUT) == 0
    farpool.cancel(gen)
    wait_for_file(stopped)
    _drain_after_cancel(gen)
    assert farpool.get(list(actor.items.remote(2)), timeout=TIMEOUT) == [0, 2 if actor_class is Producer else 3]


def test_a_dropped_generator_stops_the_producer_and_frees_its_items(cluster, tmp_path):
    before = _used(cluster)
    stopped = str(tmp_path / "stopped")
    gen = arrays.remote(3, 8)
    wait_until(lambda: _used(cluster) >= before + 3 * 8 * MB, "three 8 MB items to arrive")
    del gen
    wait_until(lambda: _used(cluster) <= before, "the dropped generator's items to be freed")
    gen = forever.remote(stopped)
    assert farpool.get(next(gen), timeout=TIMEOUT) == 0
    task_id = gen.completed().binary()
    del gen
    wait_for_file(stopped)  # the producer was stopped, not left running
    client = farpool.api._client()
    wait_until(lambda: task_id not in client.objects, "the ended task's own object to be forgotten")
    gen = count.remote(2)  # dropped while its task may still finish normally
    task_id = gen.completed().binary()
    del gen
    wait_until(lambda: task_id not in client.objects, "the task's own object to be forgotten")
    client.refs.validate_state()


# ---------------------------------------------------------------------- items are ordinary objects
def test_items_are_passed_to_tasks_and_nested_in_values(cluster):
    gen = arrays.remote(3, 1)
    refs = list(gen)
    assert farpool.get([total.remote(r) for r in refs], timeout=TIMEOUT) == [0, MB, 2 * MB]
    assert farpool.get(first_of_box.remote([refs[2]]), timeout=TIMEOUT) == 2
    view = farpool.get(refs[1], timeout=TIMEOUT)
    assert not view.flags.writeable  # zero-copy from the node store, like any stored result
    inner = [farpool.get(ref, timeout=TIMEOUT)[0] for ref in boxes.remote(3)]  # refs lent inside items
    assert farpool.get(inner, timeout=TIMEOUT) == [0, 100, 200]


def test_back_pressure_bounds_the_store_to_max_pending_items(cluster, tmp_path):
    n, size_mb, pending = 20, 50, 2
    progress = str(tmp_path / "progress")
    before = _used(cluster)
    peak = 0
    seen = 0

    def made():
        with open(progress) as f:
            return len(f.read().split())
    gen = arrays.options(max_pending_items=pending).remote(n, size_mb, progress)
    for ref in gen:
        # With this one handed out, the producer may make up to `pending` more: once the last of
        # them has arrived here, it has had its chance to start one more (it would, without
        # back-pressure: its progress line is the first thing it writes), and has not.
        allowed = min(seen + 1 + pending, n)
        wait_until(lambda: gen._state.arrived >= allowed, f"{allowed} items to arrive")
        assert made() == allowed, f"the producer made {made()} items with {seen + 1} handed out"
        peak = max(peak, _used(cluster) - before)
        assert farpool.get(ref, timeout=TIMEOUT)[0] == seen % 256
        seen += 1
        del ref
    assert seen == n
    # at most the unread items plus the one being read are in the store at once (and the one
    # read before it, whose free may still be on its way to the store)
    assert peak <= (pending + 2) * size_mb * MB, f"peak store use {peak / MB:.0f} MB"


# ---------------------------------------------------------------------- retries
def test_a_retry_after_sigkill_skips_the_items_already_delivered(cluster, tmp_path, gate):
    pid_file = str(tmp_path / "pid")
    gen = killed_once.remote(str(tmp_path / "marker"), pid_file, gate.path)
    first = [next(gen) for _ in range(3)]
    gate.wait_arrivals(1)
    os.kill(int(open(pid_file).read()), signal.SIGKILL)
    rest = list(gen)
    assert farpool.get(first + rest, timeout=TIMEOUT) == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    assert farpool.get(gen.completed(), timeout=TIMEOUT) == 6
