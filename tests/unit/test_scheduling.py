import pytest

from farpool._private import scheduling
from farpool._private.scheduling import UNIT, NodeResources, make_request, make_totals


def test_fixed_point_adds_up_exactly():
    node = NodeResources(make_totals(1, 1))
    allocs = [node.acquire(make_request(0.1, 0.1)) for _ in range(10)]
    assert all(a is not None for a in allocs)
    assert node.available["CPU"] == 0 and node.available["GPU"] == 0
    assert node.acquire(make_request(0.1)) is None
    for a in allocs:
        node.release(a)
    assert node.available == node.total


@pytest.mark.parametrize("kwargs, error, text", [
    ({"num_cpus": -1}, ValueError, "`num_cpus` must be >= 0, got -1"),
    ({"num_cpus": "2"}, TypeError, "`num_cpus` must be a number"),
    ({"num_gpus": 1.5}, ValueError, "`num_gpus` above 1 must be a whole number, got 1.5"),
    ({"resources": {"CPU": 1}}, ValueError, "`CPU` is reserved"),
    ({"resources": {"GPU": 1}}, ValueError, "`GPU` is reserved"),
    ({"resources": {"memory": 1}}, ValueError, "`memory` is reserved"),
    ({"resources": {"ssd": -2}}, ValueError, "must be >= 0"),
    ({"resources": ["ssd"]}, TypeError, "must be a dict"),
])
def test_request_validation_messages(kwargs, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        make_request(**kwargs)


def test_whole_gpus_are_distinct_and_fractions_pack():
    node = NodeResources(make_totals(8, 2))
    a = node.acquire(make_request(0, 1))
    b = node.acquire(make_request(0, 1))
    assert sorted(a.gpu_ids + b.gpu_ids) == [0, 1]
    assert node.acquire(make_request(0, 0.5)) is None
    node.release(a)
    h1 = node.acquire(make_request(0, 0.5))
    h2 = node.acquire(make_request(0, 0.5))
    assert h1.gpu_ids == h2.gpu_ids == a.gpu_ids  # both halves on the freed GPU
    assert node.acquire(make_request(0, 0.25)) is None


def test_fractional_gpu_cannot_straddle_devices():
    node = NodeResources(make_totals(4, 2))
    x = node.acquire(make_request(0, 0.75))
    y = node.acquire(make_request(0, 0.75))
    assert x.gpu_ids != y.gpu_ids
    # 0.5 GPU is free in total, but only 0.25 on each device.
    assert node.acquire(make_request(0, 0.5)) is None
    assert node.acquire(make_request(0, 1)) is None


def test_two_gpu_request_needs_two_whole_free_gpus():
    node = NodeResources(make_totals(4, 2))
    node.acquire(make_request(0, 0.1))
    assert node.acquire(make_request(0, 2)) is None
    assert node.acquire(make_request(0, 1)) is not None


def test_feasible_vs_available():
    node = NodeResources(make_totals(2, 0, {"ssd": 1}))
    assert node.feasible(make_request(2, 0, None, {"ssd": 1}))
    assert not node.feasible(make_request(3))
    assert not node.feasible(make_request(1, 0, None, {"tpu": 1}))


def test_choose_node_prefers_available_then_least_loaded():
    def node(nid, cpu_total, cpu_free, alive=True, **extra):
        total = {"CPU": cpu_total * UNIT, **{k: v * UNIT for k, v in extra.items()}}
        avail = {"CPU": cpu_free * UNIT, **{k: v * UNIT for k, v in extra.items()}}
        return {"node_id": nid, "alive": alive, "total": total, "available": avail}
    nodes = [node("a", 4, 0), node("b", 4, 2), node("c", 4, 3, alive=False), node("d", 2, 2, ssd=1)]
    assert scheduling.choose_node(nodes, make_request(1)) in ("b", "d")
    assert scheduling.choose_node(nodes, make_request(1, 0, None, {"ssd": 1})) == "d"
    assert scheduling.choose_node(nodes, make_request(1, 0, None, {"ssd": 1}), exclude="d") is None
    assert scheduling.choose_node(nodes, make_request(8)) is None
    # Nothing free now: a feasible node is still chosen (the task queues there).
    assert scheduling.choose_node([node("a", 4, 0)], make_request(1)) == "a"


def test_describe():
    assert scheduling.describe(make_request(2, 0.5, None, {"ssd": 1})) == "{CPU: 2, GPU: 0.5, ssd: 1}"


@pytest.mark.parametrize("shape", [{"CPU": -1}, {"CPU": True}, {"CPU": 1.5}, {"CPU": "many"}, {1: 10000},
                                   [("CPU", 1)], None])
def test_a_shape_from_the_wire_is_checked(shape):
    with pytest.raises(ValueError, match="a resource shape"):
        scheduling.check_shape(shape)


def test_a_good_shape_passes_the_check():
    assert scheduling.check_shape({"CPU": 10000, "GPU": 0, "memory": 1 << 40}) == {"CPU": 10000, "GPU": 0,
                                                                                    "memory": 1 << 40}
