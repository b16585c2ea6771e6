"""How many tasks a facade keeps in flight, whether a node can run them, and the remote functions it submits with.

``_in_flight_limit`` sizes a facade from the cluster's nodes (see
``OVERSUBSCRIBE`` in dispatcher.py), ``_feasible`` says why no node fits the
resource hints, and ``_TaskMaker`` builds the remote functions of tasks.py
named after the user's function.  Pure over the nodes' descriptions it is
given; the facades call it when they open.
"""

from __future__ import annotations

import farpool
from farpool._facade.dispatcher import OVERSUBSCRIBE, _Limit
from farpool._facade.errors import _task_name
from farpool._facade.tasks import _call, _run_chunk, _run_chunks

# Task names (shown in errors and the timeline) are cached per function name;
# more entries cost memory, fewer cost an options() rebuild per submit.
REMOTE_CACHE_SIZE = 256


class _TaskMaker:
    """The remote functions a facade submits with, for one set of resource hints."""

    def __init__(self, hints: dict, pool_key: str | None):
        opts = {k: v for k, v in hints.items() if v is not None}
        if pool_key is not None:
            opts["_pool_key"] = pool_key
        self._bases = (farpool.remote(_call).options(**opts), farpool.remote(_run_chunk).options(**opts),
                       farpool.remote(_run_chunks).options(**opts))
        self._named: dict = {}

    def _named_after(self, which: int, fn):
        """The task named after ``fn`` (errors, the timeline and `farpool status` show it)."""
        key = (which, _task_name(fn))
        remote = self._named.get(key)
        if remote is None:
            if len(self._named) >= REMOTE_CACHE_SIZE:
                self._named.clear()
            remote = self._named[key] = self._bases[which].options(name=key[1])
        return remote

    def call(self, fn):
        """For ``_call(authkey, fn, kwnames, *values)``."""
        return self._named_after(0, fn)

    def chunk(self, fn):
        """For ``_run_chunk(authkey, fn, star, plain, chunk, *shared)``."""
        return self._named_after(1, fn)

    def chunks(self, fn):
        """For ``_run_chunks(authkey, fn, star, plain, chunksize, chunk, *shared)``."""
        return self._named_after(2, fn)


def _feasible(hints: dict, nodes: list) -> str | None:
    """None if some live node can hold one task of these hints, else the reason."""
    want = _requested(hints)
    alive = [n for n in nodes if n.get("alive")]
    for node in alive:
        total = node.get("resources_total", {})
        if all(total.get(k, 0.0) >= v for k, v in want.items()):
            return None
    totals = "; ".join(f"node {n['node_id'][:8]}: {n.get('resources_total')}" for n in alive) or "no live node"
    return (f"no node of this cluster can run a task that needs {want} ({totals}); lower the "
            "request, or start the cluster with these resources (farpool.init(num_gpus=..., "
            "resources={...}) or `farpool start ...`)")


def _requested(hints: dict) -> dict:
    want = {"CPU": hints.get("num_cpus", 1), "GPU": hints.get("num_gpus", 0) or 0}
    if hints.get("memory"):
        want["memory"] = hints["memory"]
    want.update(hints.get("resources") or {})
    return {k: float(v) for k, v in want.items() if v}


def _capacity(hints: dict, nodes: list) -> int | None:
    """How many such tasks the cluster can run at once (None: unbounded, nothing requested)."""
    want = _requested(hints)
    if not want:
        return None
    totals: dict = {}
    for node in nodes:
        if node.get("alive"):
            for k, v in node.get("resources_total", {}).items():
                totals[k] = totals.get(k, 0.0) + v
    return max(1, min(int(totals.get(k, 0.0) // v) for k, v in want.items()))


def _in_flight_limit(max_workers: int, hints: dict, nodes: list, burst: bool = True) -> _Limit:
    """Tasks to keep in flight for ``max_workers`` slots.

    Never more than the cluster can run at once (a longer backlog would be
    pipelined behind busy workers), unless ``burst``: when the cluster's
    resources already keep at most ``max_workers`` such tasks running, extra
    tasks only wait in the runtime, so the cap on concurrency still holds.
    """
    capacity = _capacity(hints, nodes)
    if capacity is None:
        return _Limit(max_workers, max_workers)
    strict = min(max_workers, capacity)
    if burst and capacity <= max_workers:
        return _Limit(strict, max_workers * OVERSUBSCRIBE)
    return _Limit(strict, strict)
