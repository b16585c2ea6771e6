"""Helpers over the native API: ``ActorPool`` spreads work over a fixed set of actors;
``Queue`` is a queue.Queue shared by drivers, tasks and actors; placement groups
(``placement_group``, ``remove_placement_group``, ``placement_group_table``: see
_placement_group.py)."""

from __future__ import annotations

import asyncio
import queue as _queue
from collections import deque

import farpool
from farpool._placement_group import (PlacementGroup, get_placement_group, placement_group,  # noqa: F401
                                      placement_group_table, remove_placement_group)


class ActorPool:
    """Give work to whichever of ``actors`` is idle; results by order or as they come.

    ``fn(actor, value)`` must return the ObjectRef of a call on ``actor``, e.g.
    ``lambda a, v: a.process.remote(v)``.  Not thread-safe: use from one thread.
    """

    def __init__(self, actors: list):
        if not actors:
            raise ValueError("ActorPool needs at least one actor")
        self._idle = deque(actors)
        self._pending: deque = deque()              # (fn, value) waiting for an idle actor
        self._running: dict = {}                     # ref -> (index, actor)
        self._done: dict = {}                        # index -> ref (finished, not yet returned)
        self._next_submit = 0
        self._next_return = 0
        self._returned: set = set()

    def submit(self, fn, value) -> None:
        """Schedule ``fn(actor, value)`` on an idle actor (queued until one is idle)."""
        self._pending.append((fn, value, self._next_submit))
        self._next_submit += 1
        self._fill()

    def _fill(self) -> None:
        while self._idle and self._pending:
            fn, value, index = self._pending.popleft()
            actor = self._idle.popleft()
            self._running[fn(actor, value)] = (index, actor)

    def has_next(self) -> bool:
        return bool(self._running or self._pending or self._done)

    def _wait_one(self, timeout) -> None:
        ready, _ = farpool.wait(list(self._running), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError(f"no result from the actor pool within {timeout} s")
        ref = ready[0]
        index, actor = self._running.pop(ref)
        self._idle.append(actor)
        self._done[index] = ref
        self._fill()

    def get_next(self, timeout: float | None = None):
        """The next result in submission order."""
        if not self.has_next():
            raise StopIteration("no more results: submit() more work first")
        while self._next_return not in self._done:
            self._wait_one(timeout)
        ref = self._done.pop(self._next_return)
        self._mark_returned(self._next_return)
        return farpool.get(ref)

    def get_next_unordered(self, timeout: float | None = None):
        """The next result to finish, whatever its submission order."""
        if not self.has_next():
            raise StopIteration("no more results: submit() more work first")
        if not self._done:
            self._wait_one(timeout)
        index = next(iter(self._done))
        ref = self._done.pop(index)
        self._mark_returned(index)
        return farpool.get(ref)

    def _mark_returned(self, index: int) -> None:
        """Ordered results resume after the lowest index not yet handed out."""
        self._returned.add(index)
        while self._next_return in self._returned:
            self._returned.discard(self._next_return)
            self._next_return += 1

    def map(self, fn, values):
        """Results of ``fn(actor, v)`` for each value, in order."""
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn, values):
        """Results of ``fn(actor, v)`` for each value, as they finish."""
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next_unordered()


class _QueueActor:
    """The state behind a ``Queue``: an asyncio.Queue on the actor's event loop.

    An async actor runs its calls concurrently on one loop, so a ``get`` that waits
    for an item never blocks a ``put`` from another caller, and nobody polls.
    Answers are (ok, item) rather than exceptions: the caller raises queue.Empty/Full.
    """

    def __init__(self, maxsize: int):
        self.queue = asyncio.Queue(maxsize)

    async def put(self, item, timeout):
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def get(self, timeout):
        try:
            return True, await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def put_nowait(self, item):
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def get_nowait(self):
        try:
            return True, self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return False, None

    async def qsize(self):
        return self.queue.qsize()


_queue_actor_class = None  # farpool.remote(_QueueActor), made on first use


class Queue:
    """A FIFO queue shared by drivers, tasks and actors, with ``queue.Queue``'s methods.

    ``put``/``get`` block (``block``, ``timeout`` in seconds) and raise ``queue.Full`` /
    ``queue.Empty`` as the stdlib's do; ``maxsize`` <= 0 means unbounded.  The items
    live in an actor (``actor_options`` are its options, e.g. ``{"num_cpus": 0}`` or a
    ``name``); pass the Queue to tasks and actors like any value: they all use the same
    one.  It ends with the last copy of it (or ``shutdown()``).  Items are pickled, so a
    ``get`` returns a copy.  Thread-safe.
    """

    def __init__(self, maxsize: int = 0, actor_options: dict | None = None):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"`maxsize` must be an int, got {type(maxsize).__name__}")
        self.maxsize = maxsize
        global _queue_actor_class
        if _queue_actor_class is None:
            _queue_actor_class = farpool.remote(_QueueActor)
        self.actor = _queue_actor_class.options(**(actor_options or {})).remote(maxsize)

    @staticmethod
    def _check_timeout(block, timeout):
        if not block:
            return 0.0
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return timeout

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item``; when full, wait (up to ``timeout`` s) for room, else raise queue.Full."""
        timeout = self._check_timeout(block, timeout)
        ok = farpool.get(self.actor.put_nowait.remote(item) if timeout == 0.0 else
                         self.actor.put.remote(item, timeout))
        if not ok:
            raise _queue.Full
        return None

    def get(self, block: bool = True, timeout: float | None = None):
        """Remove and return the first item; when empty, wait (up to ``timeout`` s), else queue.Empty."""
        timeout = self._check_timeout(block, timeout)
        ok, item = farpool.get(self.actor.get_nowait.remote() if timeout == 0.0 else
                               self.actor.get.remote(timeout))
        if not ok:
            raise _queue.Empty
        return item

    def put_nowait(self, item) -> None:
        return self.put(item, block=False)

    def get_nowait(self):
        return self.get(block=False)

    def qsize(self) -> int:
        """The number of items now (others may change it at once)."""
        return farpool.get(self.actor.qsize.remote())

    def size(self) -> int:
        return self.qsize()

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return 0 < self.maxsize <= self.qsize()

    def shutdown(self) -> None:
        """End the queue's actor now; its items are lost, later calls raise ActorDiedError."""
        farpool.kill(self.actor)

    def __repr__(self) -> str:
        return f"Queue(maxsize={self.maxsize})"
