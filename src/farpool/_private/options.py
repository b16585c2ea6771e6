"""Checks of task and actor options shared by api.py and actor.py, and Ray's names farpool has not.

Pure, called from user threads.  ``NodeAffinity`` lives here so both public
modules can check for it without importing each other; it is ``farpool.NodeAffinity``.
"""

from __future__ import annotations


class NodeAffinity:
    """Run on ``node_id``; with ``soft=True`` fall back to any node when it cannot."""

    def __init__(self, node_id: str, soft: bool = False):
        self.node_id = node_id
        self.soft = soft

    def __repr__(self):
        return f"NodeAffinity({self.node_id!r}, soft={self.soft})"


NodeAffinity.__module__ = "farpool"


_NO_PLACEMENT_GROUPS = ("placement groups are not available in this version of farpool yet "
                        "(farpool.util.placement_group and scheduling_strategy=farpool.PlacementGroupScheduling"
                        "(pg, bundle_index=...) are planned); until then ask each task or actor for its "
                        "resources, or pin it to a node with farpool.NodeAffinity(node_id)")
# Options Ray has and farpool has not: what to do instead (the ValueError says it).
RAY_ONLY_OPTIONS = {
    "max_calls": "farpool reuses workers; to recycle a worker after N tasks use "
                 "DistributedExecutor(max_tasks_per_child=N) or Pool(maxtasksperchild=N)",
    "accelerator_type": "farpool has no accelerator types: give the nodes that have them a custom resource "
                        "(farpool start --resources '{\"A100\": 1}') and ask for resources={\"A100\": 1}",
    "_metadata": "farpool has no task metadata; name the task with name=... (shown in status and the timeline)",
    "label_selector": "farpool has no node labels: give those nodes a custom resource "
                      "(farpool start --resources '{\"ssd\": 1}') and ask for resources={\"ssd\": 0.01}",
    "placement_group": _NO_PLACEMENT_GROUPS,
    "placement_group_bundle_index": _NO_PLACEMENT_GROUPS,
    "placement_group_capture_child_tasks": _NO_PLACEMENT_GROUPS,
    "_generator_backpressure_num_objects": "farpool does not stream generators from tasks yet",
    "enable_task_events": "farpool records its tasks for farpool.timeline() always; there is nothing to enable",
    "concurrency_groups": "farpool has no concurrency groups; max_concurrency=N runs N calls at once "
                          "(an actor with async methods runs them on one event loop)",
    "max_pending_calls": "farpool does not limit an actor's pending calls; wait on refs (farpool.wait) "
                         "to bound your own",
    "object_store_memory": "object store memory belongs to the nodes: init(object_store_memory=...) or "
                           "farpool start --object-store-memory",
    "_labels": "farpool has no labels; use name=... to tell tasks and actors apart",
}


def check_ray_only_options(opts: dict, what: str) -> None:
    """A ValueError that names farpool's way for Ray options farpool has not."""
    for key in sorted(set(opts) & set(RAY_ONLY_OPTIONS)):
        raise ValueError(f"{what}: Ray's option `{key}` is not supported by farpool: {RAY_ONLY_OPTIONS[key]}")


def check_scheduling_strategy(strategy) -> None:
    """'DEFAULT', 'SPREAD' or a farpool.NodeAffinity; Ray's strategy objects get farpool's name."""
    if strategy is None or isinstance(strategy, NodeAffinity) or (isinstance(strategy, str) and strategy in
                                                                  ("DEFAULT", "SPREAD")):
        return
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if "NodeAffinity" in name:
        node_id, soft = getattr(strategy, "node_id", None), getattr(strategy, "soft", False)
        example = f"farpool.NodeAffinity({node_id!r}, soft={bool(soft)})" if node_id else \
            "farpool.NodeAffinity(node_id, soft=False)"
        raise ValueError(f"`scheduling_strategy`: Ray's {name} is spelled {example} in farpool "
                         "(node ids come from farpool.nodes() or get_runtime_context().node_id)")
    if "PlacementGroup" in name:
        raise ValueError(f"`scheduling_strategy`: Ray's {name}: {_NO_PLACEMENT_GROUPS}")
    if isinstance(strategy, str) and strategy.upper() in ("DEFAULT", "SPREAD"):
        raise ValueError(f"`scheduling_strategy` must be 'DEFAULT' or 'SPREAD' in capitals, got {strategy!r}")
    raise ValueError(f"`scheduling_strategy` must be 'DEFAULT', 'SPREAD' or farpool.NodeAffinity(node_id, "
                     f"soft=False), got {strategy!r}")
