"""Seeing what the cluster does: ``status()``, the ``list_*`` tables, ``timeline()``, ``progress()``.

Called from user threads (and by ``farpool status``, ``farpool list`` and ``farpool
timeline``).  Everything but objects and progress is one ``GetState`` question to the
head, answered from its tables and its bounded history of every owner's tasks
(``_private/cluster_state.py``, the same answers the dashboard's JSON API gives);
objects come from each node's store, as ``farpool memory`` reads them.
"""

from __future__ import annotations

import json
import sys

from farpool._private import cluster_state, progress_bar, runtime

LIST_KINDS = ("tasks", "actors", "objects", "nodes", "placement-groups")


def _ask(what: str, timeout: float = 30.0, **params):
    client = runtime.client()
    # This process's own task events go first (the same socket keeps their order), so a
    # status right after get() shows the tasks it just ran.
    client.loop.call_soon(client.reporter.flush)
    answer = client.head_request("GetState", (what, params), timeout)
    if "error" in answer:
        raise ValueError(answer["error"])
    return answer["ok"]


def status() -> dict:
    """The cluster at a glance, as data (what ``farpool status`` prints): ``nodes`` (alive or
    dead, resources total and available, workers, store use, spilled bytes, CPU and memory),
    ``tasks`` (``groups``: pending/running/finished/failed by function name and resource shape;
    ``infeasible``: tasks no node can run now, with the reason), ``actors`` by class and state,
    ``placement_groups`` by state, ``tasks_per_second`` over the last minute."""
    return _ask("status")


def list_tasks(state: str | None = None, node: str | None = None, limit: int = 100) -> list[dict]:
    """Every owner's tasks (newest first) that the head remembers; ``state``: PENDING, RUNNING,
    FINISHED or FAILED; ``node``: a prefix of the node id that ran it."""
    return _ask("tasks", state=state, node=node, limit=limit)


def list_actors(state: str | None = None, node: str | None = None, limit: int = 100) -> list[dict]:
    return _ask("actors", state=state, node=node, limit=limit)


def list_nodes(state: str | None = None, node: str | None = None, limit: int = 100) -> list[dict]:
    return _ask("nodes", state=state, node=node, limit=limit)


def list_placement_groups(state: str | None = None, limit: int = 100) -> list[dict]:
    return _ask("placement_groups", state=state, limit=limit)


def list_objects(state: str | None = None, node: str | None = None, limit: int = 100) -> list[dict]:
    """The objects in every live node's store, largest first (``state``: SPILLED or IN_MEMORY)."""
    limit = cluster_state._limit({"limit": limit})
    wanted = str(state).upper() if state else None
    if wanted not in (None, "SPILLED", "IN_MEMORY"):
        raise ValueError(f"an object's state is SPILLED or IN_MEMORY, got {state!r}")
    spilled = None if wanted is None else wanted == "SPILLED"
    client = runtime.client()
    rows = []
    for n in client.request_nodes():
        if not n["alive"] or (node and not n["node_id"].startswith(node)):
            continue
        try:
            agent = client.home if n["node_id"] == client.home.node_id else client.agent_of(n["node_id"])
            _stats, listing = client.agent_request(agent, "StoreStats", (limit, spilled), timeout=10)
        except Exception as exc:  # noqa: BLE001 - one silent node must not hide the others
            rows.append({"object_id": None, "node_id": n["node_id"], "state": "UNKNOWN", "error": str(exc)})
            continue
        for row in listing:
            row_state = "SPILLED" if row.get("spilled") else "IN_MEMORY"
            if state and row_state != str(state).upper():
                continue
            rows.append({"object_id": row["object_id"], "node_id": n["node_id"], "state": row_state,
                         "size": row["size"], "pinned": row.get("pinned"), "copy": row.get("copy", False),
                         "owner": row.get("owner"), "created_at": row.get("created_at")})
    rows.sort(key=lambda r: -(r.get("size") or 0))
    return rows[:limit]


def list_state(kind: str, state: str | None = None, node: str | None = None, limit: int = 100) -> list[dict]:
    """``farpool list KIND``: one of LIST_KINDS."""
    if kind not in LIST_KINDS:
        raise ValueError(f"farpool list takes one of {', '.join(LIST_KINDS)}, got {kind!r}")
    if kind == "placement-groups":
        return list_placement_groups(state, limit)
    return {"tasks": list_tasks, "actors": list_actors, "objects": list_objects, "nodes": list_nodes}[kind](
        state, node, limit)


def timeline(path: str | None = None) -> list[dict]:
    """Chrome-trace events of the whole cluster's recent tasks (every owner's, as far back as the
    head's bounded history goes): a process per node, a lane per worker, a bar per run.  Open the
    file in chrome://tracing or https://ui.perfetto.dev.  Writes them to ``path`` when given."""
    events = _ask("timeline", timeout=60.0)
    if path is not None:
        with open(path, "w") as f:
            json.dump(events, f)  # (the JSON array form of a Chrome trace)
    return events


# ---------------------------------------------------------------------- text, for the CLI
def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 1e10 else f"{n / 1e6:.1f} MB"


def _res(d: dict) -> str:
    return ", ".join(f"{k} {v / 1e9:.1f} GB" if k in ("memory", "object_store_memory") else f"{k} {v:g}"
                     for k, v in sorted(d.items())) or "-"


def format_status(s: dict) -> str:
    lines = [f"{s['nodes_alive']} live node(s), {s['nodes_dead']} dead"]
    for n in s["nodes"]:
        cpu = "" if n.get("cpu_percent") is None else f", CPU {n['cpu_percent']:.0f}%"
        mem = "" if not n.get("memory_total") else (f", memory {n['memory_used'] / 1e9:.1f} GB of "
                                                    f"{n['memory_total'] / 1e9:.1f} GB")
        lines.append(f"  node {n['node_id'][:8]} {n['state']} at {n['address']}: total {{{_res(n['resources_total'])}}}, "
                     f"available {{{_res(n['resources_available'])}}}, workers {n.get('workers')}, "
                     f"actors {n.get('actors')}{cpu}{mem}")
        if n.get("store_capacity"):
            lines.append(f"    object store: {_mb(n['store_used'])} used of {_mb(n['store_capacity'])}, "
                         f"{_mb(n.get('spilled') or 0)} spilled")
        if n["state"] == "DEAD" and n.get("death_reason"):
            lines.append(f"    died: {n['death_reason']}")
    t = s["tasks"]
    totals = t["totals"]
    lines.append(f"tasks: {totals['PENDING']} pending, {totals['RUNNING']} running, {totals['FINISHED']} finished, "
                 f"{totals['FAILED']} failed")
    if t["groups"]:
        lines.append(f"  {'function':32} {'resources':18} {'pending':>8} {'running':>8} {'finished':>9} {'failed':>7}")
        for g in t["groups"][:30]:
            lines.append(f"  {g['name'][:32]:32} {g['shape'][:18]:18} {g['PENDING']:>8} {g['RUNNING']:>8} "
                         f"{g['FINISHED']:>9} {g['FAILED']:>7}")
        if len(t["groups"]) > 30:
            lines.append(f"  ... and {len(t['groups']) - 30} more (farpool list tasks)")
    for w in t["infeasible"]:
        lines.append(f"  waiting, no node can run it: {w['tasks']} x {w['name']} {w['shape']}: {w['reason']}")
    if t.get("events_dropped"):
        lines.append(f"  ({t['events_dropped']} task event(s) were dropped by busy owners: counts are short)")
    if s["actors"]:
        lines.append("actors: " + "; ".join(
            f"{a['class_name']} " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(a.items()) if k != "class_name")
            for a in s["actors"]))
    else:
        lines.append("actors: none")
    pgs = s.get("placement_groups") or {}
    lines.append("placement groups: " + (", ".join(f"{v} {k.lower()}" for k, v in sorted(pgs.items())) or "none"))
    c = s.get("object_copies") or {}
    if c.get("copies"):
        failed = f", {c['failed']} failed" if c.get("failed") else ""
        lines.append(f"object copies between nodes: {c['copies']} ({_mb(c['bytes'])}{failed}; "
                     "farpool timeline shows them)")
    return "\n".join(lines)


_TABLE_COLUMNS = {
    "tasks": ("task_id", "name", "state", "shape", "node_id", "worker_id", "runs", "error_type", "waiting_for"),
    "actors": ("actor_id", "class_name", "name", "state", "node_id", "restarts", "cause"),
    "objects": ("object_id", "node_id", "state", "size", "pinned", "owner"),
    "nodes": ("node_id", "state", "address", "workers", "actors", "cpu_percent", "store_used"),
    "placement-groups": cluster_state.PLACEMENT_GROUP_COLUMNS,
}
_SHORT = {"actor_id": 16, "node_id": 8, "cause": 50, "waiting_for": 50}


def format_table(kind: str, rows: list[dict]) -> str:
    columns = _TABLE_COLUMNS[kind]
    cells = [[_cell(row.get(c), _SHORT.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    if not rows:
        out.append(f"(no {kind.replace('-', ' ')})")
    return "\n".join(out)


def _cell(value, width: int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.1f}"
    else:
        text = str(value).replace("\n", " ")
    return text[:width] if width else text


# ---------------------------------------------------------------------- progress
def progress(refs, *, desc: str | None = None, file=None, min_interval_s: float = 0.2) -> list:
    """Wait for every ref, showing a progress bar on a terminal (nothing otherwise); returns the refs.

    Uses tqdm when it is installed, else a one-line bar of its own.  Any thread but
    farpool's own; the refs are not read (``get`` them after)."""
    from farpool import api
    refs = list(refs)
    out = file if file is not None else sys.stderr
    bar = progress_bar.Bar(len(refs), desc or "tasks", out, min_interval_s)
    pending = refs
    try:
        while pending:
            ready, pending = api.wait(pending, num_returns=len(pending), timeout=min_interval_s, fetch_local=False)
            if not ready and pending:
                ready, pending = api.wait(pending, num_returns=1, timeout=min_interval_s, fetch_local=False)
            bar.update(len(ready))
    finally:
        bar.close()
    return refs
