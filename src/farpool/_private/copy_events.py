"""Copies of objects between nodes, as the timeline shows them: recorded by agents, kept by the head.

Pure (no sockets, threads or clocks of its own).  A node agent records each copy it
made into its store when the copy ends (node_objects.py, ``_end_pull``: once per
object, never per chunk), and its heartbeat carries what was recorded since the
last one; the head keeps the newest ``HISTORY_COPIES``::

    agent: _end_pull --CopyRecord--> CopyLog (bounded; full: dropped, counted)
    agent: _heartbeat --Heartbeat(..., {"stats": ..., "copies": CopyLog.take()})--> head
    head: CopyHistory.add (bounded) --> task_history.timeline(copies=...) --> farpool timeline

A heartbeat the head turns away (it restarted) loses its copies: the timeline is a
view of the recent past, not an account.
"""

from __future__ import annotations

import os
from collections import deque
from typing import NamedTuple

# Copies an agent holds between heartbeats: more rides out a burst of small pulls (or a
# head that does not answer), fewer bounds the agent's memory (about 200 bytes each).
BUFFER_COPIES = 10_000
# Copies the head keeps for the timeline (about 300 bytes each): more shows a longer
# past, fewer bounds the head's memory.
HISTORY_COPIES = int(os.environ.get("FARPOOL_COPY_HISTORY", "20000"))


class CopyRecord(NamedTuple):
    """One object copied into ``to_node``'s store (or an attempt that failed)."""
    object_id: bytes          # the store id: the object's id (a put, a task's result) or its arguments'
    size: int                 # bytes of the object
    what: str                 # what it is ("put", "result of f", "arguments of f")
    to_node: str              # the node that copied it (the reader's)
    sources: list             # [(node id, bytes it sent)], every node asked, in the order asked
    started: float            # time.time() when the first chunk was asked for
    ended: float              # time.time() when the last one arrived (or the copy failed)
    error: str | None         # why it failed, None when the copy is whole


class CopyLog:
    """An agent's copies not yet sent to the head."""

    def __init__(self, limit: int = BUFFER_COPIES):
        self.records: deque = deque()
        self.limit = limit
        self.dropped = 0      # records not kept (the log was full), since the last take

    def add(self, record: CopyRecord) -> None:
        if len(self.records) >= self.limit:
            self.dropped += 1
            return
        self.records.append(record)

    def take(self) -> dict | None:
        """What the next heartbeat carries (None: nothing); the log is empty after."""
        if not self.records and not self.dropped:
            return None
        batch = {"records": [tuple(r) for r in self.records], "dropped": self.dropped}
        self.records.clear()
        self.dropped = 0
        return batch


class CopyHistory:
    """The head's newest copies, every node's, oldest first."""

    def __init__(self, limit: int = HISTORY_COPIES):
        if limit < 1:
            raise ValueError(f"the copy history must hold at least 1 copy, got {limit}")
        self.records: deque = deque(maxlen=limit)
        self.dropped = 0      # copies agents did not keep (their log was full)
        self.bad = 0          # records that did not decode (a peer's garbage)
        self.total = 0        # copies ever heard of (failed ones too)
        self.total_bytes = 0  # ... the bytes of those that did not fail
        self.failed = 0

    def add(self, batch) -> None:
        """Fold in one heartbeat's ``copies`` (CopyLog.take's dict, as it came off the wire)."""
        if not isinstance(batch, dict):
            self.bad += 1
            return
        dropped = batch.get("dropped")
        if isinstance(dropped, int) and dropped > 0:
            self.dropped += dropped
        for raw in batch.get("records") or ():
            try:
                record = CopyRecord(*raw)
                sources = [(str(node), int(n)) for node, n in record.sources]
                record = record._replace(size=int(record.size), sources=sources, started=float(record.started),
                                         ended=float(record.ended), to_node=str(record.to_node),
                                         object_id=bytes(record.object_id), what=str(record.what))
            except (TypeError, ValueError):
                self.bad += 1
                continue
            self.records.append(record)
            self.total += 1
            if record.error is None:
                self.total_bytes += record.size
            else:
                self.failed += 1

    def newest(self, limit: int | None = None) -> list[CopyRecord]:
        records = list(self.records)
        return records if limit is None else records[-limit:]
