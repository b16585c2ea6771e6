"""Ray's names farpool has not: a ValueError that names farpool's way (no cluster needed)."""

import pytest

import farpool


class NodeAffinitySchedulingStrategy:  # what Ray's looks like to us
    def __init__(self, node_id, soft):
        self.node_id, self.soft = node_id, soft


class PlacementGroupSchedulingStrategy:
    def __init__(self, placement_group, placement_group_bundle_index=-1):
        self.placement_group = placement_group


def f():
    return 1


class A:
    def m(self):
        return 1


def test_node_affinity_object_names_farpool_node_affinity():
    for make in (lambda **o: farpool.remote(**o)(f), lambda **o: farpool.remote(f).options(**o),
                 lambda **o: farpool.remote(**o)(A)):
        with pytest.raises(ValueError, match=r"farpool\.NodeAffinity\('abc', soft=True\)"):
            make(scheduling_strategy=NodeAffinitySchedulingStrategy("abc", soft=True))
    with pytest.raises(ValueError, match=r"farpool\.NodeAffinity\(node_id, soft=False\)"):
        farpool.remote(scheduling_strategy="NodeAffinitySchedulingStrategy")(f)


def test_placement_group_strategy_names_farpool_placement_group_scheduling():
    for make in (lambda **o: farpool.remote(**o)(f), lambda **o: farpool.remote(**o)(A)):
        with pytest.raises(ValueError, match=r"Ray's PlacementGroupSchedulingStrategy: farpool spells it "
                                             r"scheduling_strategy=farpool\.PlacementGroupScheduling\(pg"):
            make(scheduling_strategy=PlacementGroupSchedulingStrategy(object()))
    with pytest.raises(ValueError, match=r"Ray's option `placement_group`.*farpool\.PlacementGroupScheduling"):
        farpool.remote(placement_group=object())(f)


def test_strategy_in_lower_case_and_garbage():
    with pytest.raises(ValueError, match="in capitals, got 'spread'"):
        farpool.remote(scheduling_strategy="spread")(f)
    with pytest.raises(ValueError, match=r"must be 'DEFAULT', 'SPREAD' or farpool\.NodeAffinity"):
        farpool.remote(scheduling_strategy=3)(A)


@pytest.mark.parametrize("option, value, advice", [
    ("max_calls", 1, "max_tasks_per_child"),
    ("accelerator_type", "A100", "custom resource"),
    ("_metadata", {}, "name="),
    ("label_selector", {}, "custom resource"),
])
def test_ray_only_function_options(option, value, advice):
    with pytest.raises(ValueError, match=f"Ray's option `{option}` is not supported by farpool: .*{advice}"):
        farpool.remote(**{option: value})(f)


@pytest.mark.parametrize("option, advice", [("concurrency_groups", "max_concurrency"),
                                            ("max_pending_calls", "farpool.wait")])
def test_ray_only_actor_options(option, advice):
    with pytest.raises(ValueError, match=f"actor A: Ray's option `{option}` .*{advice}"):
        farpool.remote(**{option: 1})(A)


def test_dynamic_num_returns_names_streaming():
    with pytest.raises(ValueError, match=r"num_returns='dynamic' .* not supported by farpool; .*"
                                         r"num_returns='streaming'"):
        farpool.remote(num_returns="dynamic")(f)


def test_generator_backpressure_option_names_max_pending_items():
    with pytest.raises(ValueError, match=r"`_generator_backpressure_num_objects` .* max_pending_items=N"):
        farpool.remote(_generator_backpressure_num_objects=2)(f)


def test_max_pending_items_is_checked_and_only_for_generators():
    def gen():
        yield 1
    with pytest.raises(ValueError, match=r"`max_pending_items` must be an int >= 1 \(or None: no limit\), got 0"):
        farpool.remote(max_pending_items=0)(gen)
    with pytest.raises(ValueError, match=r"remote function f: `max_pending_items` applies to generator functions"):
        farpool.remote(max_pending_items=2)(f)
    with pytest.raises(ValueError, match=r"`num_returns` must be an int >= 0 or 'streaming', got 'stream'"):
        farpool.remote(num_returns="stream")(gen)
    farpool.remote(max_pending_items=2)(gen)  # accepted: decided once, here
    farpool.remote(num_returns="streaming", max_pending_items=1)(f)


def test_runtime_env_pip_says_install_on_the_nodes():
    with pytest.raises(ValueError, match=r"runtime_env\['pip'\] is not supported.*install them on every node"):
        farpool.remote(runtime_env={"pip": ["requests"]})(f)
