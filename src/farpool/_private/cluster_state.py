"""What `farpool status`, `farpool list`, the timeline and the dashboard show, built from the head's tables.

Runs in the head, on its one thread (the dashboard's HTTP threads hand their queries
to it); pure functions over the head's node table, actor table and task history
(task_history.py), answering with plain JSON-able dicts.  One function, ``query``,
answers both the head's ``GetState`` message (the CLI and ``farpool.status()``) and
the dashboard's JSON API, so they always agree.

Placement groups: ``placement_groups`` lists what ``head.placement_group_rows()``
returns once the head has placement groups (their helper fills it); until then an
empty table with the columns below.
"""

from __future__ import annotations

import time

from farpool._private import scheduling

WHATS = ("status", "nodes", "tasks", "actors", "placement_groups", "timeline", "summary")
NODE_COLUMNS = ("node_id", "state", "address", "hostname", "cpu_percent", "memory_used", "memory_total",
                "workers", "actors", "store_used", "store_capacity", "spilled", "resources_total",
                "resources_available")
ACTOR_COLUMNS = ("actor_id", "class_name", "name", "namespace", "state", "node_id", "worker_id", "job_id",
                 "restarts", "detached", "cause")
TASK_COLUMNS = ("task_id", "name", "state", "shape", "node_id", "worker_id", "job_id", "submitted", "started",
                "ended", "error_type", "waiting_for", "runs")
PLACEMENT_GROUP_COLUMNS = ("placement_group_id", "name", "state", "strategy", "bundles", "nodes")
# The most rows one list answer holds (the CLI's --limit and the dashboard ask for fewer).
MAX_ROWS = 10_000
# Chrome-trace events in one timeline answer (the history bounds it too).
TIMELINE_LIMIT = 100_000


def query(head, what: str, params: dict | None = None):
    """The answer to one question about the cluster (see WHATS); ValueError for a bad one."""
    params = params or {}
    if not isinstance(params, dict):
        raise ValueError(f"query parameters must be a dict, got {type(params).__name__}")
    if what == "status":
        return status(head)
    if what == "nodes":
        return _filtered(nodes(head), params, node_key="node_id")
    if what == "tasks":
        limit = _limit(params)
        return head.history.tasks(state=_upper(params.get("state")), node=params.get("node") or None,
                                  limit=limit, name=params.get("name") or None)
    if what == "actors":
        return _filtered(actors(head), params, node_key="node_id")
    if what == "placement_groups":
        return _filtered(placement_groups(head), params, node_key=None)
    if what == "timeline":
        limit = min(_limit(params, TIMELINE_LIMIT), TIMELINE_LIMIT)
        copies = getattr(head, "copies", None)
        return head.history.timeline(limit, copies=copies.newest(limit) if copies is not None else ())
    if what == "summary":
        return head.history.summary()
    if what == "dashboard_link":  # (not in WHATS: the dashboard's own API does not mint links)
        dashboard = getattr(head, "dashboard", None)
        return dashboard.new_link() if dashboard is not None else None
    raise ValueError(f"unknown question {what!r}: ask one of {', '.join(WHATS)}")


def _upper(value):
    return str(value).upper() if value else None


def _limit(params: dict, default: int = 100) -> int:
    limit = params.get("limit", default)
    try:
        limit = int(limit) if limit is not None else MAX_ROWS
    except (TypeError, ValueError):
        raise ValueError(f"`limit` must be an int >= 1, got {limit!r}") from None
    if limit < 1:
        raise ValueError(f"`limit` must be an int >= 1, got {limit}")
    return min(limit, MAX_ROWS)


def _filtered(rows: list[dict], params: dict, node_key: str | None) -> list[dict]:
    state = _upper(params.get("state"))
    node = params.get("node") or None
    out = []
    for row in rows:
        if state is not None and str(row.get("state", "")).upper() != state:
            continue
        if node is not None and node_key is not None and not str(row.get(node_key) or "").startswith(node):
            continue
        out.append(row)
    return out[:_limit(params)]


def nodes(head) -> list[dict]:
    rows = []
    for n in head._table():
        stats = n.get("stats") or {}
        store = stats.get("object_store") or {}
        host = stats.get("host") or {}
        total = scheduling.as_floats(n["total"])
        capacity = store.get("capacity")
        if capacity is None and total.get("object_store_memory"):  # no heartbeat yet: its registered size
            capacity = int(total["object_store_memory"])
        rows.append({
            "node_id": n["node_id"], "state": "ALIVE" if n["alive"] else "DEAD",
            "address": n.get("tcp") or n.get("ipc"), "hostname": n.get("hostname"),
            "cpu_percent": host.get("cpu_percent"), "memory_used": host.get("memory_used"),
            "memory_total": host.get("memory_total"), "workers": stats.get("workers"),
            "actors": n.get("actors", 0), "store_used": store.get("used"), "store_capacity": capacity,
            "spilled": store.get("spilled"), "resources_total": total,
            "resources_available": scheduling.as_floats(n.get("available") or {}),
            "is_head_node": n.get("is_head_node", False), "death_reason": n.get("death_reason"),
            "ipc": n.get("ipc"), "tcp": n.get("tcp")})
    return rows


def actors(head) -> list[dict]:
    rows = []
    for record in head.actors.actors.values():
        spec = record.spec
        rows.append({
            "actor_id": record.actor_id, "class_name": spec.get("class_name"), "name": spec.get("name"),
            "namespace": spec.get("namespace"), "state": record.state, "node_id": record.node_id,
            "worker_id": record.worker_id, "job_id": spec.get("job_id"), "restarts": record.incarnation,
            "detached": bool(spec.get("detached")), "cause": record.cause or record.kill_cause or ""})
    return rows


def placement_groups(head) -> list[dict]:
    """Rows with PLACEMENT_GROUP_COLUMNS: what the head's placement groups report, once it has them."""
    source = getattr(head, "placement_group_rows", None)
    return list(source()) if callable(source) else []


def status(head) -> dict:
    """Everything `farpool status` prints, as data."""
    node_rows = nodes(head)
    by_class: dict = {}
    for row in actors(head):
        group = by_class.setdefault(row["class_name"], {})
        group[row["state"]] = group.get(row["state"], 0) + 1
    pgs = placement_groups(head)
    pg_states: dict = {}
    for row in pgs:
        pg_states[row.get("state")] = pg_states.get(row.get("state"), 0) + 1
    return {
        "time": time.time(),
        "address": head.address(),
        "nodes": node_rows,
        "nodes_alive": sum(1 for n in node_rows if n["state"] == "ALIVE"),
        "nodes_dead": sum(1 for n in node_rows if n["state"] == "DEAD"),
        "tasks": head.history.summary(),
        "actors": [{"class_name": c, **states} for c, states in sorted(by_class.items(), key=lambda i: str(i[0]))],
        "placement_groups": pg_states,
        "tasks_per_second": head.history.tasks_per_second(time.time()),
        "object_copies": copies_summary(head),
    }


def copies_summary(head) -> dict:
    """Copies of objects between nodes the head heard of (copy_events.CopyHistory)."""
    copies = getattr(head, "copies", None)
    if copies is None:
        return {"copies": 0, "bytes": 0, "failed": 0, "dropped": 0}
    return {"copies": copies.total, "bytes": copies.total_bytes, "failed": copies.failed, "dropped": copies.dropped}
