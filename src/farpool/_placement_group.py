"""Placement groups, the public face: ``farpool.util.placement_group`` and friends.

Called from user threads (drivers, tasks, actors).  The head reserves the
bundles (_private/placement_groups.py holds the decisions, head.py applies
them, the node agents hold the bundles); tasks and actors go into a bundle with
``scheduling_strategy=farpool.PlacementGroupScheduling(pg, bundle_index)``
(translated into the bundle's resources in _private/options.py).  Re-exported
by ``farpool.util``; only that module's names are public.
"""

from __future__ import annotations

import logging
import os
import warnings

from farpool import exceptions
from farpool._private import options, placement_groups, runtime, scheduling

log = logging.getLogger("farpool")


class PlacementGroup:
    """A gang reservation of resource bundles, made by ``farpool.util.placement_group``.

    Picklable: pass it to tasks and actors like any value.  ``id`` (str),
    ``bundle_specs`` (the bundles as given), ``bundle_count``, ``strategy``, ``name``.
    """

    def __init__(self, pg_id: str, bundle_specs: list, strategy: str, name: str = ""):
        self.id = pg_id
        self.bundle_specs = [dict(b) for b in bundle_specs]
        self.strategy = strategy
        self.name = name
        self._ready_ref = None

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self):
        """An ObjectRef that becomes ``True`` once every bundle is reserved; its ``get`` raises
        ``InfeasibleError`` if the group is removed first.  The same ref while it is pending
        (a task waits for the head's word: one per group, however often you ask)."""
        import farpool
        ref = self._ready_ref
        if ref is None or farpool.wait([ref], timeout=0, fetch_local=False)[0]:
            ref = self._ready_ref = _ready_task().remote(self.id, self.name)  # (asked again: the state now)
        return ref

    def wait(self, timeout_seconds: float | None = 30) -> bool:
        """Block until the group is reserved (True) or ``timeout_seconds`` pass (False)."""
        import farpool
        ready, _ = farpool.wait([self.ready()], timeout=timeout_seconds, fetch_local=False)
        if ready:
            farpool.get(ready[0])  # a removed group raises here
        return bool(ready)

    def __reduce__(self):
        return (PlacementGroup, (self.id, self.bundle_specs, self.strategy, self.name))

    def __eq__(self, other) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return f"PlacementGroup({label}{self.id}, {self.strategy}, {self.bundle_specs})"


PlacementGroup.__module__ = "farpool.util"


def _wait_for_group(pg_id: str, name: str) -> bool:
    """In a worker: block until the head says the group is reserved (True) or removed (raise)."""
    state, why = runtime.client().head_request("WaitPlacementGroup", (pg_id,), timeout=None)
    if state == placement_groups.CREATED:
        return True
    raise exceptions.InfeasibleError(why or f"placement group {name or pg_id} was removed before it was ready")


_ready_fn = None


def _ready_task():
    """``pg.ready()``'s remote function (made on first use): it holds nothing while it waits."""
    global _ready_fn
    if _ready_fn is None:
        import farpool
        _ready_fn = farpool.remote(num_cpus=0, max_retries=-1, name="placement_group.ready")(_wait_for_group)
    return _ready_fn


_bundles_of: dict[str, list] = {}  # group id -> its bundles (fixed point), as the head gave them


def captured(shape: dict, group: str | None, what: str) -> tuple[dict, str]:
    """(shape, strategy) of a task or actor started without a strategy by code in ``group``
    (capture_child_tasks); the group's bundles are asked of the head once per process."""
    if group is None:
        return shape, "DEFAULT"
    bundles = _bundles_of.get(group)
    if bundles is None:
        info = runtime.client().head_request("GetPlacementGroups", (group,))
        if group in info:
            bundles = _bundles_of[group] = placement_groups.check_bundles(list(info[group]["bundles"].values()))
    return options.captured(shape, group, bundles, what)


def placement_group(bundles: list[dict], strategy: str = "PACK", name: str = "", lifetime: str | None = None,
                    _max_cpu_fraction_per_node=None) -> PlacementGroup:
    """Reserve ``bundles`` (dicts of resource name -> amount) on the cluster's nodes, all or none.

    ``strategy``: ``"PACK"`` (as few nodes as possible), ``"SPREAD"`` (as many as possible),
    ``"STRICT_PACK"`` (one node), ``"STRICT_SPREAD"`` (a node per bundle).  Returns at once;
    ``pg.ready()`` / ``pg.wait()`` tell when the bundles are reserved.  A group that no set
    of nodes could hold raises ``InfeasibleError`` at once on the embedded cluster, and waits
    (with one warning) for nodes that fit on a cluster from ``farpool start``.
    ``lifetime="detached"`` keeps it after this job ends (else it is removed with the job).
    """
    if _max_cpu_fraction_per_node is not None:
        raise ValueError("`_max_cpu_fraction_per_node` is not supported by farpool")
    shapes = placement_groups.check_bundles(bundles)
    if strategy not in placement_groups.STRATEGIES:
        raise ValueError(f"`strategy` must be one of {', '.join(placement_groups.STRATEGIES)}, got {strategy!r}")
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"`lifetime` must be None or 'detached', got {lifetime!r}")
    client = runtime.client()
    if lifetime == "detached" and client.embedded:
        raise ValueError("lifetime='detached' needs a cluster started with `farpool start --head` "
                         "(init(address=...)); the embedded cluster of init() ends with this driver")
    pg_id = placement_groups.new_id(os.urandom(8))
    error, warning = client.head_request("CreatePlacementGroup", (pg_id, shapes, strategy, name,
                                                                  lifetime == "detached", client.job_id))
    if error is not None:
        if "already exists" in error:  # (a name taken; anything else: it can never fit)
            raise ValueError(error)
        raise exceptions.InfeasibleError(error)
    if warning:
        log.warning("%s", warning)
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    return PlacementGroup(pg_id, [scheduling.as_floats(s) for s in shapes], strategy, name)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Release the group's bundles: its actors end, its tasks waiting for it fail with
    ``InfeasibleError``, its running tasks are ended (and fail the same way).  Idempotent."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"remove_placement_group() takes a PlacementGroup, got {type(placement_group).__name__}")
    runtime.client().head_request("RemovePlacementGroup", (placement_group.id,))


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict:
    """Every group of the cluster by id (or the one given): ``state`` (PENDING, PREPARING,
    COMMITTING, CREATED, REMOVED), ``strategy``, ``name``, ``bundles`` (index -> resources),
    ``bundles_to_node_id`` (index -> node id, once CREATED)."""
    if placement_group is not None:
        return runtime.client().head_request("GetPlacementGroups", (placement_group.id,)).get(placement_group.id, {})
    return runtime.client().head_request("GetPlacementGroups", ())


def get_placement_group(name: str) -> PlacementGroup:
    """The live group named ``name``; ValueError if there is none."""
    for pg_id, info in runtime.client().head_request("GetPlacementGroups", ()).items():
        if info["name"] == name and info["state"] != placement_groups.REMOVED:
            return PlacementGroup(pg_id, list(info["bundles"].values()), info["strategy"], name)
    raise ValueError(f"no placement group named {name!r}")
