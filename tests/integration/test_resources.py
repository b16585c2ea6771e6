"""Resource accounting on an embedded cluster of 4 logical CPUs, 2 logical GPUs and
one custom resource: concurrency limits, GPU ids, validation, thread-count env.

Concurrency is measured with files (each running task holds an entry in a
shared directory), and every wait is on files, refs or cluster state with a
deadline, never on time.
"""

import collections
import os

import pytest

import farpool
from farpool_testing import meet, run_script, wait_for_file, wait_until

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.fixture(scope="module")
def gpu_cluster():
    """4 logical CPUs, 2 logical GPUs and one "ssd" on this 2-core machine."""
    farpool.shutdown()
    info = farpool.init(num_cpus=4, num_gpus=2, resources={"ssd": 1})
    yield info
    farpool.shutdown()


# ---------------------------------------------------------------------- helpers
def gpus_seen():
    ids = [str(i) for i in farpool.get_gpu_ids()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return ids, visible


# ---------------------------------------------------------------------- remote functions
@farpool.remote
def hold(gate):
    return wait_for_file(gate)


@farpool.remote(num_cpus=2)
def hold_two_cpus(running_dir, me, gate):
    """Counts the tasks running with it at its start and its end; leaves when ``gate`` opens."""
    mine = os.path.join(running_dir, me)
    open(mine, "w").close()
    at_start = len(os.listdir(running_dir))
    opened = wait_for_file(gate)
    at_end = len(os.listdir(running_dir))
    os.unlink(mine)  # before returning, so before the CPUs are given back
    return opened, max(at_start, at_end)


@farpool.remote
def gpus_after_meeting(directory, me, n):
    met = meet(directory, me, n)
    return met, gpus_seen()


@farpool.remote
def gpus_now():
    return gpus_seen()


@farpool.remote
def thread_vars():
    return tuple(os.environ.get(name) for name in THREAD_VARS)


@farpool.remote
def echo(x):
    return x


# ---------------------------------------------------------------------- totals and availability
def test_cluster_resources_report_the_declared_amounts(gpu_cluster):
    totals = farpool.cluster_resources()
    assert totals["CPU"] == 4.0 and totals["GPU"] == 2.0 and totals["ssd"] == 1.0
    (node,) = farpool.nodes()
    assert node["resources_total"]["CPU"] == 4.0
    assert node["resources_total"]["GPU"] == 2.0
    assert node["resources_total"]["ssd"] == 1.0


def test_available_resources_track_fractional_and_custom_use(gpu_cluster, tmp_path):
    def idle():
        avail = farpool.available_resources()
        return avail.get("CPU") == 4.0 and avail.get("GPU") == 2.0 and avail.get("ssd") == 1.0

    wait_until(idle, "an idle cluster")
    gate = tmp_path / "gate"
    ref = hold.options(num_gpus=0.5, resources={"ssd": 1}).remote(str(gate))
    try:
        def held():
            avail = farpool.available_resources()
            return avail.get("CPU") == 3.0 and avail.get("GPU") == 1.5 and avail.get("ssd") == 0.0
        wait_until(held, "CPU 3, GPU 1.5, ssd 0 available while the task runs")
    finally:
        gate.touch()
    assert farpool.get(ref, timeout=60) is True
    wait_until(idle, "every resource given back")


# ---------------------------------------------------------------------- CPU limits
def test_two_cpu_tasks_run_two_at_a_time_never_more(gpu_cluster, tmp_path):
    running, gate = tmp_path / "running", tmp_path / "gate"
    running.mkdir()
    refs = [hold_two_cpus.remote(str(running), f"t{i}", str(gate)) for i in range(4)]
    try:
        # Two tasks of 2 CPUs fill the 4 CPUs; the other two must stay queued.
        wait_until(lambda: len(os.listdir(running)) >= 2 and farpool.available_resources().get("CPU") == 0.0,
                   "two 2-CPU tasks running and no CPU left")
        assert len(os.listdir(running)) == 2
        ready, _ = farpool.wait(refs, num_returns=len(refs), timeout=0)
        assert ready == []
    finally:
        gate.touch()
    results = farpool.get(refs, timeout=60)
    assert all(opened for opened, _ in results)
    concurrency = [seen for _, seen in results]
    assert max(concurrency) == 2, f"tasks ran {concurrency} at a time; 4 CPUs fit two 2-CPU tasks"


# ---------------------------------------------------------------------- GPUs
def test_fractional_gpus_share_ids_two_per_gpu(gpu_cluster, tmp_path):
    refs = [gpus_after_meeting.options(num_gpus=0.5).remote(str(tmp_path / "meet"), f"t{i}", 4)
            for i in range(4)]
    results = farpool.get(refs, timeout=60)
    assert all(met for met, _ in results), "four 0.5-GPU tasks could not run at once on 2 GPUs"
    per_gpu = collections.Counter()
    for _, (ids, visible) in results:
        assert len(ids) == 1 and ids[0] in ("0", "1"), ids
        assert visible == ids[0], (ids, visible)
        per_gpu[ids[0]] += 1
    assert max(per_gpu.values()) <= 2, f"more than two 0.5-GPU tasks on one GPU at once: {per_gpu}"


def test_whole_gpu_tasks_at_the_same_time_get_distinct_ids(gpu_cluster, tmp_path):
    refs = [gpus_after_meeting.options(num_gpus=1).remote(str(tmp_path / "meet"), f"t{i}", 2)
            for i in range(2)]
    (met_a, (ids_a, visible_a)), (met_b, (ids_b, visible_b)) = farpool.get(refs, timeout=60)
    assert met_a and met_b, "two 1-GPU tasks could not run at once on 2 GPUs"
    assert len(ids_a) == 1 and len(ids_b) == 1
    assert {ids_a[0], ids_b[0]} == {"0", "1"}
    assert visible_a == ids_a[0] and visible_b == ids_b[0]


def test_two_gpu_task_sees_both_devices(gpu_cluster):
    ids, visible = farpool.get(gpus_now.options(num_gpus=2).remote(), timeout=60)
    assert sorted(ids) == ["0", "1"]
    assert sorted(visible.split(",")) == ["0", "1"]


def test_cpu_task_after_gpu_tasks_sees_no_gpu(gpu_cluster):
    assert farpool.get(gpus_now.options(num_gpus=1).remote(), timeout=60)[0]
    # One at a time, so a worker that held a GPU may be reused.
    for _ in range(4):
        ids, visible = farpool.get(gpus_now.remote(), timeout=60)
        assert ids == [], ids
        assert not (visible or "").strip(","), f"a CPU-only task sees CUDA_VISIBLE_DEVICES={visible!r}"


def test_num_gpus_above_one_must_be_whole(gpu_cluster):
    with pytest.raises(ValueError, match="num_gpus"):
        farpool.remote(num_gpus=1.5)(lambda: 1)
    with pytest.raises(ValueError, match="num_gpus"):
        echo.options(num_gpus=1.5)
    echo.options(num_gpus=2)  # whole amounts above 1 are fine
    echo.options(num_gpus=0.25)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["CPU", "GPU", "memory", "object_store_memory"])
def test_reserved_names_refused_in_task_resources(gpu_cluster, name):
    with pytest.raises(ValueError, match=name):
        echo.options(resources={name: 1})
    with pytest.raises(ValueError, match=name):
        farpool.remote(resources={name: 1})(lambda: 1)


def test_reserved_names_refused_in_init_resources(tmp_path):
    result = run_script(tmp_path, """
        import farpool
        for name in ("CPU", "GPU"):
            try:
                farpool.init(num_cpus=1, resources={name: 4})
            except ValueError as exc:
                assert name in str(exc), exc
            else:
                raise SystemExit(f"init(resources={{{name!r}: 4}}) did not raise ValueError")
            assert not farpool.is_initialized()
        print("OK")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["OK"]


# ---------------------------------------------------------------------- worker environment
def test_thread_count_env_equals_num_cpus(gpu_cluster):
    # One at a time, alternating, so a reused worker must update them.
    for n in (2, 1, 2, 1):
        expected = tuple(os.environ.get(name, str(n)) for name in THREAD_VARS)  # a user's own value wins
        assert farpool.get(thread_vars.options(num_cpus=n).remote(), timeout=60) == expected


def test_thread_count_env_set_by_the_user_is_kept(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["OMP_NUM_THREADS"] = "3"
    result = run_script(tmp_path, """
        import os, farpool

        @farpool.remote(num_cpus=2)
        def thread_vars():
            return [os.environ.get(n) for n in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")]

        if __name__ == "__main__":
            farpool.init(num_cpus=2)
            print(*farpool.get(thread_vars.remote(), timeout=60))
            farpool.shutdown()
    """, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "2", "2"], result.stdout + result.stderr
