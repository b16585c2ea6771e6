"""Checks of task and actor options shared by api.py and actor.py, and Ray's names farpool has not.

Pure, called from user threads.  ``NodeAffinity`` and ``PlacementGroupScheduling`` live
here so both public modules can check for them without importing each other; they are
``farpool.NodeAffinity`` and ``farpool.PlacementGroupScheduling``.  A task or actor in a
placement group is translated here into the resource shape of its bundle
(``in_group``), so that the client schedules it like any other.
"""

from __future__ import annotations

import inspect

from farpool._private import placement_groups, scheduling


class NodeAffinity:
    """Run on ``node_id``; with ``soft=True`` fall back to any node when it cannot."""

    def __init__(self, node_id: str, soft: bool = False):
        self.node_id = node_id
        self.soft = soft

    def __repr__(self):
        return f"NodeAffinity({self.node_id!r}, soft={self.soft})"


NodeAffinity.__module__ = "farpool"


class PlacementGroupScheduling:
    """Run in bundle ``bundle_index`` of ``placement_group`` (-1: any of its bundles), using the
    resources the bundle reserved; with ``capture_child_tasks=True`` the tasks and actors it
    starts (without a scheduling_strategy of their own) go to the same group."""

    def __init__(self, placement_group, bundle_index: int = -1, capture_child_tasks: bool = False):
        count = getattr(placement_group, "bundle_count", None)
        if not isinstance(getattr(placement_group, "id", None), str) or not isinstance(count, int):
            raise TypeError("PlacementGroupScheduling takes the group farpool.util.placement_group() returned, "
                            f"got {type(placement_group).__name__}")
        if isinstance(bundle_index, bool) or not isinstance(bundle_index, int) or not -1 <= bundle_index < count:
            raise ValueError(f"`bundle_index` must be -1 (any bundle) or 0..{count - 1} for a group of {count} "
                             f"bundle(s), got {bundle_index!r}")
        self.placement_group = placement_group
        self.bundle_index = bundle_index
        self.capture_child_tasks = bool(capture_child_tasks)

    def __repr__(self):
        return (f"PlacementGroupScheduling({self.placement_group!r}, bundle_index={self.bundle_index}, "
                f"capture_child_tasks={self.capture_child_tasks})")


PlacementGroupScheduling.__module__ = "farpool"


def in_group(strategy: PlacementGroupScheduling, shape: dict, what: str) -> dict:
    """The shape of a task or actor that runs in the group ``strategy`` names; ValueError when no
    bundle it may use could ever hold ``shape``."""
    pg = strategy.placement_group
    bundles = placement_groups.check_bundles(pg.bundle_specs)
    index = strategy.bundle_index
    allowed = [bundles[index]] if index >= 0 else bundles
    if not any(scheduling.fits(b, shape) for b in allowed):
        which = f"bundle {index}" if index >= 0 else "any bundle"
        described = ", ".join(scheduling.describe(b) for b in allowed)
        hint = " (pass num_cpus=0 for a task or actor that needs no CPU)" if "CPU" in shape and not all(
            "CPU" in b for b in allowed) else ""
        raise ValueError(f"{what} needs {scheduling.describe(shape)}, which {which} of placement group "
                         f"{pg.name or pg.id} cannot hold ({described}); ask for less{hint} or give the "
                         "bundle more")
    return placement_groups.task_shape(pg.id, index, shape, strategy.capture_child_tasks)


def placement(opts: dict, shape: dict, what: str) -> tuple[dict, object]:
    """(shape, strategy) to submit with: a placement group's bundle turned into its shape (and
    'DEFAULT'); None for the strategy when none was given (a child of a task whose group
    captures its children goes to that group: ``captured``)."""
    strategy = opts.get("scheduling_strategy")
    if isinstance(strategy, PlacementGroupScheduling):
        return in_group(strategy, shape, what), "DEFAULT"
    return shape, strategy


def captured(shape: dict, group: str | None, bundles: list | None = None, what: str = "") -> tuple[dict, str]:
    """(shape, strategy) of a task or actor that gave no strategy, started by code running in
    ``group`` with capture_child_tasks (None: not in such a group).  ``bundles``: the group's
    (fixed point), to refuse at once a shape no bundle could hold (it would wait for ever)."""
    if group is None:
        return shape, "DEFAULT"
    if bundles is not None and not any(scheduling.fits(b, shape) for b in bundles):
        raise ValueError(f"{what} is started inside placement group {group}, which captures its children, "
                         f"and needs {scheduling.describe(shape)}, which no bundle of it can hold "
                         f"({', '.join(scheduling.describe(b) for b in bundles)}); give it a scheduling_strategy "
                         "of its own ('DEFAULT' runs it outside the group), or ask for less")
    return placement_groups.task_shape(group, -1, shape, capture=True), "DEFAULT"


_NO_PLACEMENT_GROUPS = ("farpool spells it scheduling_strategy=farpool.PlacementGroupScheduling(pg, "
                        "bundle_index=-1, capture_child_tasks=False), with pg from farpool.util.placement_group()")
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
    "_generator_backpressure_num_objects": "farpool spells it max_pending_items=N (the producer pauses while N "
                                           "items are unread)",
    "enable_task_events": "farpool records its tasks for farpool.timeline() always; there is nothing to enable",
    "concurrency_groups": "farpool has no concurrency groups; max_concurrency=N runs N calls at once "
                          "(an actor with async methods runs them on one event loop)",
    "max_pending_calls": "farpool does not limit an actor's pending calls; wait on refs (farpool.wait) "
                         "to bound your own",
    "object_store_memory": "object store memory belongs to the nodes: init(object_store_memory=...) or "
                           "farpool start --object-store-memory",
    "_labels": "farpool has no labels; use name=... to tell tasks and actors apart",
}


def check_max_pending_items(value) -> None:
    """``max_pending_items``: None (no back-pressure), or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`max_pending_items` must be an int >= 1 (or None: no limit), got {value!r}")


def streams(fn, opts: dict, what: str) -> bool:
    """Whether calls of ``fn`` stream (decided once, when the function, method or its options
    are made, never per call): a generator function (sync or async) does unless it gives an int
    ``num_returns``; ``num_returns="streaming"`` says so explicitly."""
    num_returns = opts.get("num_returns")
    streaming = num_returns == "streaming" or (
        num_returns is None and (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)))
    if not streaming and opts.get("max_pending_items") is not None:
        raise ValueError(f"{what}: `max_pending_items` applies to generator functions only (it pauses a "
                         "streaming task while that many items are unread); this one returns its result at once")
    return streaming


def check_ray_only_options(opts: dict, what: str) -> None:
    """A ValueError that names farpool's way for Ray options farpool has not."""
    for key in sorted(set(opts) & set(RAY_ONLY_OPTIONS)):
        raise ValueError(f"{what}: Ray's option `{key}` is not supported by farpool: {RAY_ONLY_OPTIONS[key]}")


def check_scheduling_strategy(strategy) -> None:
    """'DEFAULT', 'SPREAD' or a farpool.NodeAffinity; Ray's strategy objects get farpool's name."""
    if strategy is None or isinstance(strategy, (NodeAffinity, PlacementGroupScheduling)) or (
            isinstance(strategy, str) and strategy in ("DEFAULT", "SPREAD")):
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
                     f"soft=False), or farpool.PlacementGroupScheduling(pg, bundle_index), got {strategy!r}")
