"""Helpers over the native API: ``ActorPool`` spreads work over a fixed set of actors."""

from __future__ import annotations

from collections import deque

import farpool


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
