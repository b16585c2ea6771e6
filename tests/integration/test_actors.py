"""Actors on a real embedded cluster: ordering, concurrency, names, restarts, kill, handles."""

import asyncio
import os
import threading

import pytest

import farpool
from farpool.util import ActorPool


def wait_gone(pid: int) -> None:
    """Until the process has ended (psutil.TimeoutExpired after 30 s)."""
    import psutil
    try:
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass  # already gone (and reaped) before we looked


@farpool.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def inc(self, by=1):
        self.value += by
        return self.value

    def get(self):
        return self.value

    def pid(self):
        return os.getpid()

    def actor_id(self):
        return farpool.get_runtime_context().actor_id

    @farpool.method(num_returns=2)
    def pair(self):
        return self.value, -self.value

    def fail(self):
        raise KeyError("inside a method")

    def crash(self):
        os._exit(1)


@farpool.remote
class Log:
    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)
        return len(self.items)

    def items_(self):
        return self.items


@farpool.remote
def slow_value(path, value):
    import time
    while not os.path.exists(path):
        time.sleep(0.005)
    return value


def test_create_call_and_state(cluster):
    c = Counter.remote(10)
    assert isinstance(c, farpool.ActorHandle)
    assert farpool.get(c.inc.remote(), timeout=60) == 11
    assert farpool.get(c.inc.remote(by=5), timeout=30) == 16
    a, b = c.pair.remote()
    assert farpool.get([a, b], timeout=30) == [16, -16]
    x, y = c.inc.options(num_returns=1).remote(), c.pair.options(num_returns=2).remote()
    assert farpool.get(x, timeout=30) == 17 and farpool.get(list(y), timeout=30) == [17, -17]


def test_a_named_method_call_shows_its_name_in_errors_and_the_timeline(cluster):
    c = Counter.remote()
    with pytest.raises(KeyError) as info:
        farpool.get(c.fail.options(name="step-7").remote(), timeout=60)
    assert "step-7" in str(info.value)
    assert farpool.get(c.inc.options(name="bump").remote(), timeout=30) == 1
    assert "bump" in {event["name"] for event in farpool.timeline()}
    with pytest.raises(TypeError, match="`name` must be a str"):
        c.inc.options(name=7)
    with pytest.raises(ValueError, match="`num_returns` must be an int >= 0"):
        c.inc.options(num_returns=-1)


def test_a_thousand_calls_from_one_caller_run_in_order(cluster):
    log = Log.remote()
    refs = [log.add.remote(i) for i in range(1000)]
    assert farpool.get(refs, timeout=120) == list(range(1, 1001))
    assert farpool.get(log.items_.remote(), timeout=30) == list(range(1000))


def test_order_holds_when_an_earlier_argument_resolves_later(cluster, tmp_path):
    log = Log.remote()
    gate = str(tmp_path / "gate")
    late = slow_value.remote(gate, "first")
    r1 = log.add.remote(late)           # waits for its argument...
    r2 = log.add.remote("second")       # ...and this later call must not overtake it
    ready, _ = farpool.wait([r2], timeout=0.5)
    assert ready == []
    open(gate, "w").close()
    assert farpool.get([r1, r2], timeout=60) == [1, 2]
    assert farpool.get(log.items_.remote(), timeout=30) == ["first", "second"]


def test_constructor_and_method_ref_arguments(cluster):
    c = Counter.remote(farpool.put(100))
    assert farpool.get(c.inc.remote(farpool.put(5)), timeout=60) == 105


def test_threaded_actor_calls_overlap(cluster):
    @farpool.remote(max_concurrency=2)
    class Meeting:
        def __init__(self):
            self.barrier = threading.Barrier(2, timeout=30)

        def meet(self):
            return self.barrier.wait() in (0, 1)  # both calls must be inside at once
    m = Meeting.remote()
    assert farpool.get([m.meet.remote(), m.meet.remote()], timeout=60) == [True, True]


def test_async_actor_runs_on_an_event_loop_and_awaits_refs(cluster):
    @farpool.remote
    class AsyncActor:
        def __init__(self):
            self.event = None

        async def wait_for_peer(self):
            if self.event is None:
                self.event = asyncio.Event()
                await asyncio.wait_for(self.event.wait(), 30)
                return "waited"
            self.event.set()
            return "released"

        async def double_ref(self, box):
            return 2 * await box[0]
    a = AsyncActor.remote()
    first = a.wait_for_peer.remote()
    second = a.wait_for_peer.remote()
    assert farpool.get([first, second], timeout=60) == ["waited", "released"]
    assert farpool.get(a.double_ref.remote([farpool.put(21)]), timeout=60) == 42


def test_handles_pass_into_tasks(cluster):
    c = Counter.remote()

    @farpool.remote
    def bump(handle, n):
        return farpool.get([handle.inc.remote() for _ in range(n)], timeout=60)[-1]
    farpool.get([bump.remote(c, 10), bump.remote(c, 10)], timeout=120)
    assert farpool.get(c.get.remote(), timeout=30) == 20


def test_method_exception_is_a_task_error_and_the_actor_keeps_serving(cluster):
    c = Counter.remote()
    with pytest.raises(KeyError) as info:
        farpool.get(c.fail.remote(), timeout=60)
    assert isinstance(info.value, farpool.TaskError)
    assert farpool.get(c.inc.remote(), timeout=30) == 1


def test_init_exception_makes_every_call_fail(cluster):
    @farpool.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("bad config")

        def ping(self):
            return 1
    b = Broken.remote()
    for _ in range(2):
        with pytest.raises(farpool.ActorDiedError, match="bad config"):
            farpool.get(b.ping.remote(), timeout=60)


def test_restart_after_os_exit_resets_state_and_retries(cluster):
    c = Counter.options(max_restarts=2, max_task_retries=0).remote(5)
    first_pid = farpool.get(c.pid.remote(), timeout=60)
    farpool.get(c.inc.remote(), timeout=30)
    with pytest.raises(farpool.ActorDiedError, match="exited with code 1"):
        farpool.get(c.crash.remote(), timeout=60)
    assert farpool.get(c.get.remote(), timeout=60) == 5   # __init__ ran again
    assert farpool.get(c.pid.remote(), timeout=30) != first_pid


def test_unlimited_restarts_and_call_retries_survive_repeated_sigkills(cluster, tmp_path):
    import signal

    @farpool.remote(max_restarts=-1, max_task_retries=-1)
    class Fragile:
        def pid(self):
            return os.getpid()

        def killed_until(self, path, n):
            """SIGKILLs its own worker until ``path`` records n runs."""
            with open(path, "a") as f:
                f.write("x")
            with open(path) as f:
                if len(f.read()) <= n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return "answered"
    f = Fragile.remote()
    pids = {farpool.get(f.pid.remote(), timeout=60)}
    count = tmp_path / "runs"
    assert farpool.get(f.killed_until.remote(str(count), 3), timeout=60) == "answered"
    assert count.read_text() == "xxxx"
    pids.add(farpool.get(f.pid.remote(), timeout=60))
    assert len(pids) == 2  # a restarted process answers


@pytest.mark.parametrize("key", ["max_restarts", "max_task_retries"])
def test_actor_retry_limits_below_minus_one_are_refused(key):
    with pytest.raises(ValueError, match=rf"`{key}` must be an int >= -1 \(-1: forever\), got -2"):
        farpool.remote(**{key: -2})(type("Plain", (), {}))


def test_no_restarts_means_dead(cluster):
    c = Counter.remote()
    farpool.get(c.inc.remote(), timeout=60)
    with pytest.raises(farpool.ActorDiedError):
        farpool.get(c.crash.remote(), timeout=60)
    with pytest.raises(farpool.ActorDiedError):
        farpool.get(c.inc.remote(), timeout=60)


def test_kill(cluster):
    c = Counter.remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    farpool.kill(c)
    with pytest.raises(farpool.ActorDiedError, match="farpool.kill"):
        farpool.get(c.inc.remote(), timeout=60)
    wait_gone(pid)  # the process really ends
    with pytest.raises(TypeError):
        farpool.kill("not a handle")


def test_names_and_namespaces(cluster):
    c = Counter.options(name="svc", namespace="ns1").remote(1)
    assert farpool.get(farpool.get_actor("svc", namespace="ns1").inc.remote(), timeout=60) == 2
    with pytest.raises(ValueError, match="already exists"):
        Counter.options(name="svc", namespace="ns1").remote()
    same = Counter.options(name="svc", namespace="ns1", get_if_exists=True).remote()
    assert same == c
    other = Counter.options(name="svc", namespace="ns2").remote(50)
    assert farpool.get(other.get.remote(), timeout=60) == 50
    with pytest.raises(ValueError, match="no actor named"):
        farpool.get_actor("missing")


def test_detached_is_refused_on_the_embedded_cluster(cluster):
    with pytest.raises(ValueError, match="detached"):
        Counter.options(lifetime="detached").remote()


def test_runtime_context_actor_id_and_live_count(cluster):
    c = Counter.remote()
    assert farpool.get(c.actor_id.remote(), timeout=60) == c._actor_id
    assert farpool.nodes()[0]["actors"] >= 1


def test_more_actors_than_cpus(cluster):
    actors = [Counter.remote(i) for i in range(6)]
    assert farpool.get([a.get.remote() for a in actors], timeout=120) == list(range(6))


def test_cancel_a_queued_actor_call_and_force_is_refused(cluster, tmp_path):
    log = Log.remote()
    gate = str(tmp_path / "gate")
    blocked = log.add.remote(slow_value.remote(gate, "a"))
    queued = log.add.remote("b")
    farpool.cancel(queued)
    with pytest.raises(ValueError, match="force"):
        farpool.cancel(blocked, force=True)
    open(gate, "w").close()
    assert farpool.get(blocked, timeout=60) == 1
    with pytest.raises(farpool.TaskCancelledError):
        farpool.get(queued, timeout=30)
    assert farpool.get(log.items_.remote(), timeout=30) == ["a"]


def test_actor_pool_gives_work_to_idle_actors(cluster):
    actors = [Counter.remote(0), Counter.remote(1000)]
    pool = ActorPool(actors)
    out = list(pool.map(lambda a, v: a.inc.remote(v), [1, 1, 1, 1]))
    assert len(out) == 4 and all(isinstance(x, int) for x in out)
    unordered = sorted(pool.map_unordered(lambda a, v: a.get.remote(), range(4)))
    assert len(unordered) == 4
    pool.submit(lambda a, v: a.inc.remote(v), 0)
    assert pool.has_next()
    pool.get_next(timeout=60)
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()


def test_calling_an_actor_class_or_method_directly_is_a_type_error(cluster):
    with pytest.raises(TypeError, match="remote"):
        Counter()
    c = Counter.remote()
    with pytest.raises(TypeError, match="remote"):
        c.inc()
    with pytest.raises(AttributeError, match="no method"):
        c.nope


def test_actor_ends_when_its_last_handle_is_dropped(cluster):
    import gc
    c = Counter.remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    del c
    gc.collect()
    wait_gone(pid)  # the actor's process ends


def test_a_handle_kept_elsewhere_keeps_the_actor_until_it_is_dropped(cluster):
    """Handles are counted like objects: a borrower that stores one keeps the actor alive."""
    import gc

    @farpool.remote
    class Holder:
        def __init__(self):
            self.handle = None

        def hold(self, box):
            self.handle = box[0]
            return farpool.get(self.handle.inc.remote(), timeout=60)

        def use(self):
            return farpool.get(self.handle.inc.remote(), timeout=60)

        def release(self):
            self.handle = None
            return True
    c = Counter.remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    holder = Holder.remote()
    assert farpool.get(holder.hold.remote([c]), timeout=60) == 1
    del c
    gc.collect()
    # Our last copy is gone, but the holder's handle keeps the actor working.
    assert farpool.get(holder.use.remote(), timeout=60) == 2
    assert farpool.get(holder.release.remote(), timeout=60)
    wait_gone(pid)  # no handle left anywhere: the actor ends


def test_calls_in_flight_are_retried_on_the_restarted_actor(cluster, tmp_path):
    @farpool.remote(max_restarts=1, max_task_retries=1)
    class Fragile:
        def __init__(self):
            self.calls = 0

        def crash_once(self, path):
            self.calls += 1
            if not os.path.exists(path):
                open(path, "w").close()
                os._exit(1)
            return self.calls  # on the restarted actor: its first call
    f = Fragile.remote()
    assert farpool.get(f.crash_once.remote(str(tmp_path / "crashed")), timeout=60) == 1
