"""get_runtime_context(): assigned resources, accelerator ids and the current actor."""

import pytest

import farpool


@pytest.fixture(scope="module")
def gpu_cluster():
    farpool.shutdown()
    info = farpool.init(num_cpus=2, num_gpus=2, resources={"ssd": 1})
    yield info
    farpool.shutdown()


@farpool.remote
def assigned():
    ctx = farpool.get_runtime_context()
    return ctx.get_assigned_resources(), ctx.get_accelerator_ids()


@farpool.remote
def current_actor_in_task():
    try:
        farpool.get_runtime_context().current_actor
    except RuntimeError as exc:
        return str(exc)


@farpool.remote
class Me:
    def me(self):
        return farpool.get_runtime_context().current_actor

    def ping(self):
        return "pong"

    def assigned(self):
        ctx = farpool.get_runtime_context()
        return ctx.get_assigned_resources(), ctx.get_accelerator_ids()


def test_task_resources_and_gpus(gpu_cluster):
    res, acc = farpool.get(assigned.remote(), timeout=60)
    assert res == {"CPU": 1.0} and acc == {"GPU": []}
    res, acc = farpool.get(assigned.options(num_cpus=0.5, num_gpus=1, resources={"ssd": 1}).remote(),
                           timeout=60)
    assert res == {"CPU": 0.5, "GPU": 1.0, "ssd": 1.0}
    assert len(acc["GPU"]) == 1 and acc["GPU"][0] in ("0", "1")


def test_actor_resources_and_gpus(gpu_cluster):
    a = Me.options(num_cpus=1, num_gpus=1).remote()
    res, acc = farpool.get(a.assigned.remote(), timeout=60)
    assert res == {"CPU": 1.0, "GPU": 1.0}
    assert len(acc["GPU"]) == 1
    b = Me.remote()
    assert farpool.get(b.assigned.remote(), timeout=60) == ({}, {"GPU": []})


def test_current_actor(gpu_cluster):
    a = Me.remote()
    me = farpool.get(a.me.remote(), timeout=60)
    assert me == a
    assert farpool.get(me.ping.remote(), timeout=60) == "pong"
    with pytest.raises(RuntimeError, match="only available inside an actor"):
        farpool.get_runtime_context().current_actor
    assert "only available inside an actor" in farpool.get(current_actor_in_task.remote(), timeout=60)
