"""Placement groups on an embedded cluster of 4 logical CPUs and 2 logical GPUs: reserved
bundles, tasks and actors in them, children captured, infeasible groups, removal.

Every wait is on refs, a gate or cluster state with a deadline, never on time.
"""

import pytest

import farpool
from farpool import PlacementGroupScheduling
from farpool.util import placement_group, placement_group_table, remove_placement_group
from farpool_testing import wait_at_gate, wait_until

TIMEOUT = 60


@pytest.fixture(scope="module")
def pg_cluster():
    farpool.shutdown()
    info = farpool.init(num_cpus=4, num_gpus=2)
    yield info
    farpool.shutdown()


@pytest.fixture
def cleanup():
    """Groups the test made are removed afterwards, whatever happened."""
    made = []
    yield made
    for pg in made:
        remove_placement_group(pg)


def free_cpus():
    return farpool.available_resources().get("CPU", 0)


@farpool.remote
def assigned():
    return farpool.get_runtime_context().get_assigned_resources()


@farpool.remote
def gpu_ids():
    return farpool.get_gpu_ids()


@farpool.remote
def child_group(capture_default):
    """The group this task's children land in (private: the capture tag of their shape)."""
    from farpool._private.context import context

    @farpool.remote(num_cpus=0)
    def inner():
        from farpool._private.context import context as inner_context
        return inner_context.capture_group

    opts = {} if capture_default else {"scheduling_strategy": "DEFAULT"}
    return context.capture_group, farpool.get(inner.options(**opts).remote(), timeout=TIMEOUT)


def test_pack_and_strict_pack_are_reserved_and_run_their_tasks(pg_cluster, cleanup):
    before = free_cpus()
    for strategy in ("PACK", "STRICT_PACK"):
        pg = placement_group([{"CPU": 1}, {"CPU": 1, "GPU": 1}], strategy=strategy, name=f"g-{strategy}")
        cleanup.append(pg)
        assert farpool.get(pg.ready(), timeout=TIMEOUT) is True
        assert pg.wait(TIMEOUT) is True
        info = placement_group_table(pg)
        assert info["state"] == "CREATED" and info["strategy"] == strategy
        assert set(info["bundles_to_node_id"]) == {0, 1}
        assert info["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0, "GPU": 1.0}}
        in_one = assigned.options(scheduling_strategy=PlacementGroupScheduling(pg, 1), num_gpus=1)
        assert farpool.get(in_one.remote(), timeout=TIMEOUT) == {"CPU": 1.0, "GPU": 1.0}
        ids = farpool.get(gpu_ids.options(scheduling_strategy=PlacementGroupScheduling(pg, 1), num_gpus=1,
                                          num_cpus=0).remote(), timeout=TIMEOUT)
        assert len(ids) == 1
    wait_until(lambda: free_cpus() == before - 4, "both groups' CPUs to show as taken")
    assert pg.id in placement_group_table()


def test_a_task_too_big_for_its_bundle_is_refused_with_advice(pg_cluster, cleanup):
    pg = placement_group([{"GPU": 1}])
    cleanup.append(pg)
    with pytest.raises(ValueError, match=r"needs \{CPU: 1\}, which bundle 0 .*\(pass num_cpus=0"):
        assigned.options(scheduling_strategy=PlacementGroupScheduling(pg, 0))
    with pytest.raises(ValueError, match="`bundle_index` must be -1"):
        PlacementGroupScheduling(pg, 1)


def test_an_infeasible_group_fails_at_once_on_the_embedded_cluster(pg_cluster):
    with pytest.raises(farpool.InfeasibleError, match="each on a node of its own.*cannot grow"):
        placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    with pytest.raises(farpool.InfeasibleError, match=r"\{CPU: 100\}"):
        placement_group([{"CPU": 100}])
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        placement_group([{"CPU": 1}], strategy="pack")


def test_a_group_waits_for_resources_in_use_then_is_placed(pg_cluster, cleanup, gate):
    hog = farpool.remote(num_cpus=4)(wait_at_gate).remote(gate.path)
    gate.wait_arrivals(1)
    pg = placement_group([{"CPU": 2}])
    cleanup.append(pg)
    assert pg.wait(0.2) is False  # (not a timing: the CPUs are held until the gate opens)
    assert placement_group_table(pg)["state"] == "PENDING"
    gate.open()
    farpool.get(hog, timeout=TIMEOUT)
    assert pg.wait(TIMEOUT) is True


def test_remove_ends_its_actors_and_fails_its_queued_and_running_tasks(pg_cluster, gate):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    assert pg.wait(TIMEOUT)

    @farpool.remote(num_cpus=1)
    class Holder:
        def ping(self):
            return "pong"

    actor = Holder.options(scheduling_strategy=PlacementGroupScheduling(pg, 0)).remote()
    assert farpool.get(actor.ping.remote(), timeout=TIMEOUT) == "pong"
    in_bundle = PlacementGroupScheduling(pg, 1)
    running = farpool.remote(wait_at_gate).options(scheduling_strategy=in_bundle).remote(gate.path)
    gate.wait_arrivals(1)
    queued = assigned.options(scheduling_strategy=in_bundle).remote()  # bundle 1 is busy: it waits
    remove_placement_group(pg)

    def actor_ended():  # (the head ends it as it answers: a call may still reach it just before)
        try:
            farpool.get(actor.ping.remote(), timeout=TIMEOUT)
        except farpool.ActorDiedError as exc:
            assert "was removed" in str(exc)
            return True
        return False
    wait_until(actor_ended, "the group's actor to end")
    for ref in (queued, running):
        with pytest.raises(farpool.InfeasibleError, match=f"placement group {pg.id} was removed"):
            farpool.get(ref, timeout=TIMEOUT)
    with pytest.raises(farpool.InfeasibleError, match="was removed"):
        farpool.get(assigned.options(scheduling_strategy=in_bundle).remote(), timeout=TIMEOUT)
    with pytest.raises(farpool.InfeasibleError, match="was removed"):
        pg.wait(TIMEOUT)
    assert placement_group_table(pg)["state"] == "REMOVED"
    wait_until(lambda: free_cpus() == 4, "the group's CPUs to come back")
    remove_placement_group(pg)  # idempotent


def test_children_stay_in_the_group_when_captured(pg_cluster, cleanup):
    pg = placement_group([{"CPU": 1}])
    cleanup.append(pg)
    captured = PlacementGroupScheduling(pg, 0, capture_child_tasks=True)
    assert farpool.get(child_group.options(scheduling_strategy=captured).remote(True),
                       timeout=TIMEOUT) == (pg.id, pg.id)
    # An explicit strategy opts out; without capture, children go anywhere.
    assert farpool.get(child_group.options(scheduling_strategy=captured).remote(False),
                       timeout=TIMEOUT) == (pg.id, None)
    plain = PlacementGroupScheduling(pg, 0)
    assert farpool.get(child_group.options(scheduling_strategy=plain).remote(True), timeout=TIMEOUT) == (None, None)


def test_a_captured_child_no_bundle_can_hold_is_refused_not_left_waiting(pg_cluster, cleanup):
    pg = placement_group([{"CPU": 1}])
    cleanup.append(pg)

    @farpool.remote
    def parent():
        return farpool.get(gpu_ids.options(num_gpus=1).remote(), timeout=TIMEOUT)
    with pytest.raises(ValueError, match="which no bundle of it can hold"):
        farpool.get(parent.options(scheduling_strategy=PlacementGroupScheduling(pg, 0, capture_child_tasks=True))
                    .remote(), timeout=TIMEOUT)


def test_a_parent_waiting_on_its_child_lends_the_bundles_cpu(pg_cluster, cleanup):
    """One CPU in the bundle, a parent and its captured child both need it: the parent blocked
    in get() lends it, as it lends a node's CPU (no deadlock)."""
    pg = placement_group([{"CPU": 1}])
    cleanup.append(pg)

    @farpool.remote
    def parent():
        return farpool.get(assigned.remote(), timeout=TIMEOUT)
    got = parent.options(scheduling_strategy=PlacementGroupScheduling(pg, 0, capture_child_tasks=True)).remote()
    assert farpool.get(got, timeout=TIMEOUT) == {"CPU": 1.0}


def test_the_groups_of_a_job_end_with_it(tmp_path):
    farpool.shutdown()
    farpool.init(num_cpus=2)
    try:
        pg = placement_group([{"CPU": 2}])
        assert pg.wait(TIMEOUT)
        farpool.shutdown()
        farpool.init(num_cpus=2)
        assert placement_group_table() == {}  # (a new embedded cluster: nothing is left of the old one)
        assert farpool.cluster_resources()["CPU"] == 2
    finally:
        farpool.shutdown()
