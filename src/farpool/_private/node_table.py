"""The node table as the head sends it: the whole table once, then versioned changes.

Pure state, no sockets or clocks: the head (``Changes``) and every subscriber, node
agents and clients (``NodeTable``), keep one each::

    head: a node joins, dies, reports other free resources
      Changes.take(nodes) -> NodeTableDelta(base, version, changes) --> every subscriber
    subscriber: NodeTable.delta(base, version, changes)
      base == its version -> applied: the rows, at the new version
      otherwise (a gap)   -> None: it sends SyncNodes, the head answers NodeTable(nodes, version)
    (join, rejoin, SyncNodes) the whole table: NodeTable.full(version, nodes)

A change is the whole record of a node the subscriber has not seen yet (joined), or
the fields of a known node that changed (``available`` when tasks come and go,
``alive`` and ``death_reason`` when it dies).  Statistics a heartbeat carries (store
use, host memory, workers) are not sent: ``farpool.nodes()``/``status`` ask the head.

Why: with the whole table in every broadcast, N busy nodes cost the head N x N records
a second (each node's change sent to every node); with changes it is N records per
subscriber and flush, and the head flushes changes that are not urgent at most every
``BATCH_S`` (head.py).

A version is ``(epoch, count)``: a restarted head (a new epoch) never matches a version
of the one before, so every subscriber takes its table whole again.
"""

from __future__ import annotations

# Fields of a node's record that change often and are not sent in changes (they are the
# heartbeat's statistics: asked of the head when shown).
NOT_SENT = frozenset({"stats"})
# In a change: the fields a node's record no longer has.
UNSET = "_unset"


def public(record: dict) -> dict:
    """What subscribers keep of a node's record."""
    return {k: v for k, v in record.items() if k not in NOT_SENT}


class Changes:
    """The head's side: the version, and the rows as last sent, to diff against."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.count = 0
        self.sent: dict[str, dict] = {}  # node id -> its public record as subscribers have it

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.count)

    def rows(self) -> list[dict]:
        """The table at ``version``, as subscribers have it: what a new one gets whole (changes
        made since come in the next delta, which a subscriber at ``version`` applies)."""
        return list(self.sent.values())

    def take(self, nodes: dict[str, dict]) -> tuple[tuple, tuple, list[dict]] | None:
        """What changed in ``nodes`` (node id -> record) since the last take: (base version,
        new version, changes), or None when nothing did.  Each change is a dict with
        ``node_id``: the whole public record of a node new to subscribers, or only the
        fields whose values differ."""
        changes = []
        for node_id, record in nodes.items():
            now = public(record)
            before = self.sent.get(node_id)
            if before is None:
                change = dict(now)
            else:
                change = {k: v for k, v in now.items() if before.get(k, _MISSING) != v}
                unset = [k for k in before if k not in now]
                if unset:
                    change[UNSET] = unset
                if not change:
                    continue
                change["node_id"] = node_id
            changes.append(change)
            self.sent[node_id] = {k: _copy(v) for k, v in now.items()}
        for node_id in [n for n in self.sent if n not in nodes]:  # (the head never forgets a node today)
            del self.sent[node_id]
            changes.append({"node_id": node_id, "removed": True})
        if not changes:
            return None
        base = self.version
        self.count += 1
        return base, self.version, changes


class NodeTable:
    """A subscriber's copy of the head's node table (an agent's or a client's)."""

    def __init__(self):
        self.version: tuple | None = None
        self.nodes: dict[str, dict] = {}  # node id -> record, in the order the head listed them

    def full(self, version, rows: list[dict]) -> list[dict]:
        """The whole table (on joining, rejoining or after SyncNodes): its rows."""
        self.version = tuple(version) if version is not None else None
        self.nodes = {row["node_id"]: dict(row) for row in rows}
        return self.rows()

    def delta(self, base, version, changes: list[dict]) -> list[dict] | None:
        """Apply changes made from ``base``: the rows now, or None when our table is not at
        ``base`` (a delta was missed, or the head restarted): ask for the whole table."""
        if self.version is None or tuple(base) != self.version:
            return None
        for change in changes:
            node_id = change["node_id"]
            if change.get("removed"):
                self.nodes.pop(node_id, None)
                continue
            row = self.nodes.setdefault(node_id, {})
            for k, v in change.items():
                if k == UNSET:
                    for gone in v:
                        row.pop(gone, None)
                else:
                    row[k] = v
        self.version = tuple(version)
        return self.rows()

    def rows(self) -> list[dict]:
        return list(self.nodes.values())


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _copy(value):
    """A copy deep enough that the head changing a record in place shows in the next diff
    (records hold dicts of resources, replaced or updated)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
