"""How long an actor lives: its pending calls keep it, and its death says truthfully why."""

import os
import signal

import pytest

import farpool
import farpool.actor
from farpool_testing import wait_until


@farpool.remote
class Counter:
    def __init__(self):
        self.value = 0

    def inc(self, by=1):
        self.value += by
        return self.value

    def pid(self):
        return os.getpid()

    def leave(self):
        farpool.actor.exit_actor()
        return "bye"


def wait_gone(pid: int) -> None:
    import psutil
    try:
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass


def test_a_call_on_a_temporary_handle_runs(cluster):
    assert farpool.get(Counter.remote().inc.remote(), timeout=60) == 1
    refs = [Counter.remote().inc.remote(i) for i in range(3)]
    assert farpool.get(refs, timeout=60) == [0, 1, 2]


def test_actor_ends_when_handles_and_calls_are_gone(cluster):
    c = Counter.remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    ref = c.inc.remote()
    del c
    assert farpool.get(ref, timeout=60) == 1
    wait_gone(pid)  # no handle and no pending call: the actor ends


@farpool.remote
def call_later(handle_box):
    return farpool.get(handle_box[0].inc.remote(), timeout=60)


def test_released_handle_death_says_so(cluster):
    c = Counter.remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    actor_id = c._actor_id
    del c
    wait_gone(pid)
    from farpool.actor import ActorHandle
    orphan = ActorHandle(actor_id, {"class_name": "Counter", "methods": {"inc": 1}})
    with pytest.raises(farpool.ActorDiedError) as info:
        farpool.get(orphan.inc.remote(), timeout=60)
    assert "all its handles were released" in str(info.value)
    assert "farpool.kill" not in str(info.value)


def test_kill_death_says_kill(cluster):
    c = Counter.remote()
    farpool.get(c.pid.remote(), timeout=60)
    farpool.kill(c)
    with pytest.raises(farpool.ActorDiedError, match=r"killed with farpool\.kill\(\)"):
        farpool.get(c.inc.remote(), timeout=60)


def test_crash_names_the_signal(cluster):
    c = Counter.remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(farpool.ActorDiedError, match="SIGKILL"):
        farpool.get(c.inc.remote(), timeout=60)


def test_out_of_restarts_says_so(cluster):
    c = Counter.options(max_restarts=1, max_task_retries=3).remote()  # (a call racing a death is retried)
    for _ in range(2):
        pid = farpool.get(c.pid.remote(), timeout=60)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    with pytest.raises(farpool.ActorDiedError, match=r"max_restarts=1"):
        farpool.get(c.inc.remote(), timeout=60)


def test_exit_actor_ends_it_for_good(cluster):
    c = Counter.options(max_restarts=3).remote()
    pid = farpool.get(c.pid.remote(), timeout=60)
    assert farpool.get(c.leave.remote(), timeout=60) == "bye"
    wait_gone(pid)
    with pytest.raises(farpool.ActorDiedError, match="exit_actor"):
        farpool.get(c.inc.remote(), timeout=60)


def test_exit_actor_outside_an_actor_is_an_error(cluster):
    with pytest.raises(RuntimeError, match="inside an actor"):
        farpool.actor.exit_actor()
