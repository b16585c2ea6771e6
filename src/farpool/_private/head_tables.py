"""A restarted head's tables: what an actor's row holds, and what a node that registers
again tells about its actors.  Pure: no sockets, threads or clocks.

Used by the head (head.py) on its loop thread: ``actor_state`` when it writes an actor's
row (head_store.py), ``restore_actors`` once when it starts on a database, and
``reconcile`` when a node agent registers again after the head restarted, holding
leases the previous head granted::

    database rows --restore_actors--> ActorTable (+ lease requests still out)
    RegisterNode(held) --reconcile--> keep / lost (worker gone: restart or end) /
                                      recreate (creation not confirmed) / stray leases (give back)
"""

from __future__ import annotations

import itertools

from farpool._private.actor_table import ALIVE, DEAD, ActorRecord, ActorTable

# The fields of an ActorRecord written to its row (everything but the spec and the
# subscribers, which are connections of the head that wrote it).
STATE_FIELDS = ("state", "incarnation", "restarts_left", "node_id", "worker_id", "path", "lease_id",
                "request_id", "cause", "killed", "kill_cause")
# Lease request ids of an epoch start at epoch << REQUEST_ID_BITS: a grant that an agent
# sends for a request of the previous head never matches a request of this one.
REQUEST_ID_BITS = 40


def actor_state(record: ActorRecord) -> dict:
    return {name: getattr(record, name) for name in STATE_FIELDS}


def first_request_id(epoch: int) -> int:
    return (epoch << REQUEST_ID_BITS) + 1


def restore_actors(table: ActorTable, rows: dict, epoch: int) -> dict[int, str]:
    """Fill ``table`` from ``rows`` ({actor_id: (spec, state)}); the lease requests still out
    ({request_id: actor_id}: their grants may yet come)."""
    requests = {}
    for actor_id, (spec, state) in rows.items():
        record = ActorRecord(actor_id, spec, **{k: v for k, v in state.items() if k in STATE_FIELDS})
        table.actors[actor_id] = record
        name = spec.get("name")
        if name is not None:
            key = (spec.get("namespace"), name)
            current = table.actors.get(table.names.get(key, ""))
            if current is None or current.state == DEAD:  # the live one keeps the name
                table.names[key] = actor_id
        if record.state != DEAD and record.request_id is not None and record.lease_id is None:
            requests[record.request_id] = actor_id
    table._requests = itertools.count(first_request_id(epoch))
    return requests


class Reconciled:
    """What a node's re-registration means for the actors the head placed there."""

    def __init__(self):
        self.kept: list = []       # records whose worker the node still holds
        self.lost: list = []       # records whose worker is gone (restart or end them)
        self.recreate: list = []   # records created without a confirmation: again
        self.stray: list = []      # lease ids no actor holds: give them back (kill)


def reconcile(table: ActorTable, node_id: str, held: dict) -> Reconciled:
    """``held``: {"leases": [(lease_id, worker_id, pool_key)], "requests": [request_id]} of the
    head's leases and lease requests the node still has."""
    leases = {lease_id: (worker_id, pool_key) for lease_id, worker_id, pool_key in held.get("leases", ())}
    requests = set(held.get("requests", ()))
    out = Reconciled()
    claimed = set()
    for record in table.actors.values():
        if record.node_id != node_id or record.state == DEAD:
            continue
        if record.lease_id is not None and record.lease_id in leases:
            claimed.add(record.lease_id)
            if record.state != ALIVE:  # created or not: the head never heard; do it again
                out.recreate.append(record)
            else:
                out.kept.append(record)
        elif record.lease_id is not None:
            out.lost.append(record)
        elif record.request_id is not None and record.request_id not in requests:
            out.recreate.append(record)  # its request (or its grant) went with the previous head
        else:
            out.kept.append(record)      # its request is still waiting on the node
    out.stray = [lease_id for lease_id in leases if lease_id not in claimed]
    out.stray += [r.lease_id for r in out.recreate if r.lease_id is not None]
    return out
