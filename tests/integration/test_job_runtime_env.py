"""init(runtime_env=...): the job's environment, for every task and actor; a task's adds to it."""

import os

import pytest

import farpool


@pytest.fixture(scope="module")
def env_cluster():
    farpool.shutdown()
    info = farpool.init(num_cpus=2, runtime_env={"env_vars": {"FP_JOB": "job", "FP_BOTH": "job"}})
    yield info
    farpool.shutdown()


@farpool.remote
def read_env(*names):
    return [os.environ.get(n) for n in names]


@farpool.remote
def nested_read_env(*names):
    return farpool.get(read_env.remote(*names), timeout=60)


@farpool.remote
class EnvActor:
    def read(self, *names):
        return [os.environ.get(n) for n in names]


def test_a_task_sees_the_job_env(env_cluster):
    assert farpool.get(read_env.remote("FP_JOB"), timeout=60) == ["job"]


def test_an_actor_sees_the_job_env(env_cluster):
    a = EnvActor.remote()
    assert farpool.get(a.read.remote("FP_JOB"), timeout=60) == ["job"]
    b = EnvActor.options(runtime_env={"env_vars": {"FP_ACTOR": "a"}}).remote()
    assert farpool.get(b.read.remote("FP_JOB", "FP_ACTOR"), timeout=60) == ["job", "a"]


def test_a_nested_task_sees_the_job_env(env_cluster):
    assert farpool.get(nested_read_env.remote("FP_JOB"), timeout=60) == ["job"]


def test_a_task_env_adds_to_the_job_env_and_wins(env_cluster):
    f = read_env.options(runtime_env={"env_vars": {"FP_TASK": "task", "FP_BOTH": "task"}})
    assert farpool.get(f.remote("FP_JOB", "FP_TASK", "FP_BOTH"), timeout=60) == ["job", "task", "task"]
    # and the job's own tasks keep the job's value
    assert farpool.get(read_env.remote("FP_BOTH", "FP_TASK"), timeout=60) == ["job", None]


def test_init_validates_runtime_env_before_starting(tmp_path):
    farpool.shutdown()
    with pytest.raises(TypeError, match=r"init\(runtime_env=...\)\['env_vars'\] must be a dict of str -> str"):
        farpool.init(num_cpus=1, runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="unknown init.*field.*bogus"):
        farpool.init(num_cpus=1, runtime_env={"bogus": 1})
    with pytest.raises(ValueError, match="does not exist on this machine"):
        farpool.init(num_cpus=1, runtime_env={"working_dir": str(tmp_path / "missing")})
    assert not farpool.is_initialized()
