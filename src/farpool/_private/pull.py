"""Copying a stored object from the node stores that hold it: the chunk schedule.

A reader on node B needs an object whose bytes are in the store of node A (and
maybe cached on other nodes too).  B's agent pulls it into its own store, once,
and every reader on B maps that copy zero-copy::

    reader --PullObject(store_id, size, sources)--> agent B
    agent B --ReadChunk(pull_id, store_id, offset, n)--> agent A   (several in flight, per source)
    agent A --Chunk(pull_id, offset, error) + the bytes--> agent B  (written into B's segment)
    agent B --ObjectAllocated(path)--> every reader that asked meanwhile

This module is the schedule only (no I/O, so it is tested on its own): which
chunk to ask of which source, what to do when a source fails.  A source that
does not have the object (freed, never pulled, still arriving itself) or
cannot be reached is dropped and its chunks go to the others; the pull fails
only when no source is left.  The owner knows every node it sent a copy to and
frees them all when the object dies (client ``Entry.copies``).
"""

from __future__ import annotations

import os
import time
from collections import deque

# Big enough that per-message costs vanish, small enough that several sources share the work.
CHUNK = 4 << 20
MAX_CHUNK = 64 << 20   # the most a source sends in one chunk (a bound on garbage requests)
# Chunks asked of one source before its first answers: keeps the pipe full over TCP.
WINDOW = 4
# A source that answers none of its chunks for this long is given up on.
SILENT_S = float(os.environ.get("FARPOOL_PULL_SILENT_S", "30"))


class Pull:
    """The chunks of one object still to fetch, in flight, and from where."""

    def __init__(self, pull_id: int, store_id: bytes, size: int, sources: list, chunk: int = CHUNK,
                 window: int = WINDOW):
        self.pull_id = pull_id
        self.store_id = store_id
        self.size = size
        self.chunk = chunk
        self.window = window
        self.todo = deque(range(0, size, chunk))
        self.inflight: dict[int, object] = {}   # offset -> source asked for it
        self.load: dict[object, int] = {s: 0 for s in dict.fromkeys(sources)}
        self.sent: dict[object, int] = dict.fromkeys(self.load, 0)  # source -> bytes it sent (the timeline's)
        self.received = 0
        self.failures: list[str] = []
        self.waiters: list = []                 # whoever asked for the object, answered at the end
        self.heard: dict[object, float] = {}    # source -> when it last sent a chunk (or was first asked)

    @property
    def done(self) -> bool:
        return self.received >= self.size

    @property
    def failed(self) -> bool:
        return not self.done and not self.load

    def error(self) -> str:
        why = "; ".join(self.failures) or "no node holds it"
        return f"no node could send object {self.store_id.hex()[:16]} ({self.size / 1e6:.1f} MB): {why}"

    def requests(self) -> list[tuple]:
        """(source, offset, length) to ask for now: the least loaded sources first, up to the window."""
        out = []
        while self.todo and self.load:
            source = min(self.load, key=self.load.get)
            if self.load[source] >= self.window:
                break
            offset = self.todo.popleft()
            if not self.load[source]:
                self.heard[source] = time.monotonic()
            self.inflight[offset] = source
            self.load[source] += 1
            out.append((source, offset, min(self.chunk, self.size - offset)))
        return out

    def received_chunk(self, source, offset: int, length: int) -> bool:
        """A chunk arrived (and was written); False when it was not one we wait for."""
        if self.inflight.get(offset) != source:
            return False
        del self.inflight[offset]
        if source in self.load:
            self.load[source] -= 1
        self.received += length
        self.sent[source] = self.sent.get(source, 0) + length
        self.heard[source] = time.monotonic()
        return True

    def source_failed(self, source, why: str) -> None:
        """``source`` cannot send (it lacks the object, or is unreachable): its chunks go to the others."""
        if source not in self.load:
            return
        del self.load[source]
        self.failures.append(why)
        for offset in [o for o, s in self.inflight.items() if s == source]:
            del self.inflight[offset]
            self.todo.appendleft(offset)

    def silent_sources(self, now: float, silent_s: float = SILENT_S) -> list:
        """Sources that owe us chunks and sent none for ``silent_s``."""
        return [s for s, n in self.load.items() if n and now - self.heard.get(s, now) >= silent_s]
