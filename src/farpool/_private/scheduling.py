"""Resource accounting and placement decisions: pure code, no sockets, threads or clocks.

Amounts are fixed-point integers in 1/10000 units, never floats, so that ten
tasks of 0.1 GPU add up to exactly one GPU.  Whole GPUs are distinct devices
with ids; a fractional request is packed onto one GPU id.

Used by the node agent (its own resources and leases) and by anyone choosing a
node from the head's view (spillback).
"""

from __future__ import annotations

import math

UNIT = 10_000
RESERVED = ("CPU", "GPU", "memory", "object_store_memory")


def to_fixed(amount: float) -> int:
    return int(round(amount * UNIT))


def to_float(amount: int) -> float:
    return amount / UNIT


def _check_amount(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")
    return float(value)


def make_request(num_cpus=1, num_gpus=0, memory=None, resources=None) -> dict[str, int]:
    """A resource shape in fixed point from user options; validates every value.

    Raises ValueError/TypeError with the offending option and value.
    """
    shape: dict[str, int] = {}
    cpus = _check_amount("num_cpus", 1 if num_cpus is None else num_cpus)
    if cpus:
        shape["CPU"] = to_fixed(cpus)
    gpus = _check_amount("num_gpus", num_gpus or 0)
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(f"`num_gpus` above 1 must be a whole number, got {gpus}")
    if gpus:
        shape["GPU"] = to_fixed(gpus)
    if memory is not None:
        mem = _check_amount("memory", memory)
        if mem:
            shape["memory"] = to_fixed(mem)
    if resources:
        if not isinstance(resources, dict):
            raise TypeError(f"`resources` must be a dict of name -> amount, got {type(resources).__name__}")
        for name, value in resources.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"resource names must be non-empty strings, got {name!r}")
            if name in RESERVED:
                raise ValueError(
                    f"`{name}` is reserved and cannot be given in `resources=`; use the "
                    f"`{ {'CPU': 'num_cpus', 'GPU': 'num_gpus'}.get(name, name) }` option instead")
            amount = _check_amount(f"resources[{name!r}]", value)
            if amount:
                shape[name] = to_fixed(amount)
    return shape


def make_totals(num_cpus: float, num_gpus: float = 0, resources: dict | None = None,
                memory: float | None = None, object_store_memory: float | None = None) -> dict[str, int]:
    totals = {"CPU": to_fixed(_check_amount("num_cpus", num_cpus))}
    gpus = _check_amount("num_gpus", num_gpus or 0)
    if gpus != int(gpus):
        raise ValueError(f"a node's `num_gpus` must be a whole number, got {gpus}")
    if gpus:
        totals["GPU"] = to_fixed(gpus)
    if memory:
        totals["memory"] = to_fixed(memory)
    if object_store_memory:
        totals["object_store_memory"] = to_fixed(object_store_memory)
    for name, value in (resources or {}).items():
        if name in RESERVED:
            raise ValueError(f"`{name}` is reserved and cannot be given in `resources=`; "
                             "use num_cpus/num_gpus instead")
        totals[name] = to_fixed(_check_amount(f"resources[{name!r}]", value))
    return totals


def describe(shape: dict[str, int]) -> str:
    """``{CPU: 2, GPU: 0.5}`` for messages."""
    if not shape:
        return "{}"
    parts = []
    for name, amount in sorted(shape.items()):
        if not amount:  # a tag (placement_groups.CAPTURE), not a resource
            continue
        value = to_float(amount)
        parts.append(f"{name}: {int(value) if value == int(value) else value}")
    return "{" + ", ".join(parts) + "}"


def as_floats(shape: dict[str, int]) -> dict[str, float]:
    return {name: to_float(amount) for name, amount in shape.items()}


def check_shape(shape) -> dict[str, int]:
    """A shape from the wire, checked before anything holds it: a dict of resource names to
    amounts in fixed point (ints >= 0).  A negative amount would *add* to a node's free
    resources when acquired (and leak when released, which stops at the total)."""
    if not isinstance(shape, dict):
        raise ValueError(f"a resource shape must be a dict, got {type(shape).__name__}")
    for name, amount in shape.items():
        if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"a resource shape maps names to ints >= 0 (fixed point), got {name!r}: {amount!r}")
    return shape


def is_cpu(name: str) -> bool:
    """CPU, also as a placement group's bundle has it (``CPU_group_...``): what a blocked worker lends."""
    return name == "CPU" or name.startswith("CPU_group_")


def fits(available: dict[str, int], shape: dict[str, int]) -> bool:
    return all(available.get(name, 0) >= amount for name, amount in shape.items())


class Allocation:
    """Resources taken for a lease or a bundle.  (Records of the modules the head and the
    agent import are plain classes: dataclasses, with the inspect module it imports, cost
    each of those processes about 1 MB of RSS.)"""

    def __init__(self, shape: dict[str, int], gpu_ids: list[int] | None = None, gpu_share: int = 0,
                 gpu_group: str | None = None):
        self.shape = shape
        self.gpu_ids = [] if gpu_ids is None else gpu_ids
        self.gpu_share = gpu_share  # per GPU id, in fixed point
        self.gpu_group = gpu_group  # the placement group whose reserved GPUs these are (None: the node's)

    def __repr__(self) -> str:
        return (f"Allocation({self.shape}, gpu_ids={self.gpu_ids}, gpu_share={self.gpu_share}, "
                f"gpu_group={self.gpu_group})")


class NodeResources:
    """Total and available resources of one node, with per-GPU-id accounting."""

    def __init__(self, totals: dict[str, int]):
        self.total = dict(totals)
        self.available = dict(totals)
        self._gpu_free = [UNIT] * (self.total.get("GPU", 0) // UNIT)
        # GPUs reserved by placement group bundles here: group -> {gpu id: share free}, and
        # (group, bundle index) -> its GPU ids; tasks in a bundle get ids from these.
        self._group_gpu_free: dict[str, dict[int, int]] = {}
        self._bundle_gpus: dict[tuple, list[int]] = {}

    def feasible(self, shape: dict[str, int]) -> bool:
        """Could this node ever run the shape (ignoring what is in use)?"""
        return fits(self.total, shape)

    def can_acquire(self, shape: dict[str, int]) -> bool:
        if not fits(self.available, shape):
            return False
        group = self._gpu_group(shape)
        if group is not None:
            return self._pick_group_gpus(shape, group) is not None
        return self._pick_gpus(shape.get("GPU", 0)) is not None

    def acquire(self, shape: dict[str, int]) -> Allocation | None:
        """Take the shape's resources, or None when they are not free now."""
        if not fits(self.available, shape):
            return None
        group = self._gpu_group(shape)
        if group is not None:
            return self._acquire_in_group(shape, group)
        gpu = shape.get("GPU", 0)
        ids = self._pick_gpus(gpu)
        if ids is None:
            return None
        share = gpu if gpu < UNIT else UNIT
        for i in ids:
            self._gpu_free[i] -= share
        for name, amount in shape.items():
            if amount:  # (a zero amount is a tag, such as placement_groups.CAPTURE)
                self.available[name] -= amount
        return Allocation(dict(shape), ids, share if ids else 0)

    def release(self, alloc: Allocation) -> None:
        for name, amount in alloc.shape.items():
            if name in self.total:  # (a placement group's resources may be gone: it was removed)
                self.available[name] = min(self.total[name], self.available.get(name, 0) + amount)
        free = self._gpu_free if alloc.gpu_group is None else self._group_gpu_free.get(alloc.gpu_group)
        if free is not None:
            for i in alloc.gpu_ids:
                free[i] = min(UNIT, free[i] + alloc.gpu_share)

    # --- placement group bundles (names: placement_groups.py) ---
    def add_bundle(self, group: str, index: int, added: dict[str, int], gpu_ids: list[int]) -> None:
        """A committed bundle: its own resources (``added``) and the GPU ids it reserved."""
        for name, amount in added.items():
            self.total[name] = self.total.get(name, 0) + amount
            self.available[name] = self.available.get(name, 0) + amount
        if gpu_ids:
            self._bundle_gpus[(group, index)] = list(gpu_ids)
            free = self._group_gpu_free.setdefault(group, {})
            for i in gpu_ids:
                free[i] = UNIT

    def remove_bundle(self, group: str, index: int, added: dict[str, int]) -> None:
        """Undo ``add_bundle``: a name whose total reaches 0 is gone (what leases still hold of it
        is dropped when they end)."""
        for name, amount in added.items():
            left = self.total.get(name, 0) - amount
            if left <= 0:
                self.total.pop(name, None)
                self.available.pop(name, None)
            else:
                self.total[name] = left
                self.available[name] = self.available.get(name, 0) - amount
        for i in self._bundle_gpus.pop((group, index), ()):
            self._group_gpu_free.get(group, {}).pop(i, None)
        if not self._group_gpu_free.get(group, True):
            del self._group_gpu_free[group]

    @staticmethod
    def _gpu_group(shape: dict[str, int]) -> str | None:
        """The group of a shape asking GPUs of a placement group's bundles (``GPU_group_<g>``)."""
        for name in shape:
            if name.startswith("GPU_group_") and name.count("_") == 2:
                return name[10:]
        return None

    def _pick_group_gpus(self, shape: dict[str, int], group: str) -> list[int] | None:
        gpu = shape[f"GPU_group_{group}"]
        free = self._group_gpu_free.get(group, {})
        index = next((int(n.rsplit("_", 1)[1]) for n in shape if n.startswith(f"GPU_group_{group}_")), None)
        ids = self._bundle_gpus.get((group, index), []) if index is not None else sorted(free)
        if gpu < UNIT:
            candidates = [i for i in ids if free.get(i, 0) >= gpu]
            return [min(candidates, key=lambda i: (free[i], i))] if candidates else None
        whole = [i for i in ids if free.get(i, 0) == UNIT]
        return whole[:gpu // UNIT] if len(whole) >= gpu // UNIT else None

    def _acquire_in_group(self, shape: dict[str, int], group: str) -> Allocation | None:
        ids = self._pick_group_gpus(shape, group)
        if ids is None:
            return None
        gpu = shape[f"GPU_group_{group}"]
        share = gpu if gpu < UNIT else UNIT
        for i in ids:
            self._group_gpu_free[group][i] -= share
        for name, amount in shape.items():
            if amount:
                self.available[name] -= amount
        return Allocation(dict(shape), ids, share if ids else 0, group)

    def lend(self, shape: dict[str, int]) -> None:
        """Give back CPU of a blocked worker (nested get); ``reclaim`` takes it again."""
        for name, amount in shape.items():
            if is_cpu(name) and name in self.available:
                self.available[name] += amount

    def reclaim(self, shape: dict[str, int]) -> None:
        for name, amount in shape.items():
            if is_cpu(name) and name in self.available:
                self.available[name] -= amount

    def _pick_gpus(self, gpu: int) -> list[int] | None:
        if gpu == 0:
            return []
        if gpu < UNIT:
            # Pack fractions: the fullest GPU that still has room.
            candidates = [i for i, free in enumerate(self._gpu_free) if free >= gpu]
            if not candidates:
                return None
            return [min(candidates, key=lambda i: (self._gpu_free[i], i))]
        whole = gpu // UNIT
        free = [i for i, f in enumerate(self._gpu_free) if f == UNIT]
        if len(free) < whole:
            return None
        return free[:whole]


def agent_address(nodes: list[dict], node_id: str) -> tuple:
    """(the TCP address of the agent of ``node_id``, None), or (None, why it cannot be reached),
    from a node table (the head's NodeTable)."""
    node = next((n for n in nodes if n["node_id"] == node_id), None)
    if node is None:
        return None, f"node {node_id[:8]} is not part of this cluster"
    if not node["alive"]:
        return None, f"node {node_id[:8]} died ({node.get('death_reason') or 'no reason given'})"
    if not node.get("tcp"):
        return None, f"node {node_id[:8]} listens on no TCP address (it was started without --host)"
    return node["tcp"], None


def choose_node(nodes: list[dict], shape: dict[str, int], exclude: str | None = None,
                spread_counter: int = 0, strategy: str = "DEFAULT") -> str | None:
    """Pick a node id for ``shape`` from a resource view.

    ``nodes``: dicts with ``node_id``, ``alive``, ``total`` and ``available``
    (fixed point).  Prefers nodes with the shape available now, least loaded
    first; falls back to any feasible node (the task queues there).  None when
    no live node could ever run it.  A draining node (``farpool stop`` on it) is
    never chosen.
    """
    live = [n for n in nodes if n["alive"] and not n.get("draining") and n["node_id"] != exclude
            and fits(n["total"], shape)]
    if not live:
        return None
    ready = [n for n in live if fits(n["available"], shape)]
    pool = ready or live
    if strategy == "SPREAD":
        return sorted(pool, key=lambda n: n["node_id"])[spread_counter % len(pool)]["node_id"]

    def load(n):
        cpu_total = n["total"].get("CPU", 0) or 1
        return 1 - n["available"].get("CPU", 0) / cpu_total
    return min(pool, key=lambda n: (load(n), n["node_id"]))["node_id"]
