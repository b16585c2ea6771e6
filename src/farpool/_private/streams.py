"""Streaming generator tasks, owner side: the pure state of one stream.

Pure state, no sockets, threads or clocks (stream_client.py locks it and does the I/O).
A streaming task's items arrive in order (``ItemReady``, index 0, 1, ...); the owner's
``ObjectRefGenerator`` hands them out in that order; when the task ends, the stream
ends, and a task that failed hands out one more ref, whose ``get`` raises its error::

    ItemReady(index) --> arrive --> ready (unread) --> take --> handed out
    task ended (ok / failed) --> end --> take: ... then the failure (if any), then END
    max_pending_items N: the producer may make items up to handed + N in all (limit)

"Unread" (what back-pressure counts) is an item that arrived and was not handed out yet;
once the generator hands it out the producer may make one more, whether or not the user
reads its value (Ray's ``_generator_backpressure_num_objects`` counts the same).  So with
N, at most N items wait at the owner, plus those the user holds.

Retries: a new attempt is told how many items the owner has (``spec``: skip); it makes
them again and drops them, so no item is repeated.  An item with an index other than the
next expected one (a duplicate of an earlier attempt) is refused (``arrive`` is False) and
freed by the caller.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from farpool._private.protocol import StreamSpec


class Next(Enum):
    """What ``take`` found."""
    ITEM = "item"    # an item (or the failure of the task, after its items)
    WAIT = "wait"    # nothing yet: the task still runs
    END = "end"      # the stream is over


class StreamState:
    """One stream.  ``items`` are opaque to it (the client keeps ObjectRefs)."""

    def __init__(self, max_pending: int | None = None):
        self.task_id: bytes = b""
        self.name = ""
        self.max_pending = max_pending  # None: no back-pressure
        self.ready: deque = deque()     # arrived, not handed out, in order
        self.arrived = 0                # items arrived in all: the next index expected
        self.handed = 0                 # items handed out
        self.ended = False              # the task ended (no item comes after this)
        self.failure = None             # handed out after the items when the task failed
        self.closed = False             # the generator is gone: nothing is kept any more
        self.credit_sent: int | None = None  # the limit the producer was last told

    # ------------------------------------------------------------------ events
    def arrive(self, index: int, item) -> bool:
        """Item ``index`` came.  False: not kept (a duplicate from an earlier attempt, one out
        of order, or the generator is gone): the caller frees it."""
        if self.closed or self.ended or index != self.arrived:
            return False
        self.ready.append(item)
        self.arrived += 1
        return True

    def end(self, failure=None) -> None:
        """The task ended; ``failure`` (when it failed) is handed out after the items."""
        if self.ended:
            return
        self.ended = True
        if not self.closed:
            self.failure = failure

    def take(self) -> tuple[Next, object]:
        """The next thing to hand out (Next.ITEM, item), or (Next.WAIT | Next.END, None)."""
        if self.ready:
            self.handed += 1
            return Next.ITEM, self.ready.popleft()
        if self.closed:
            return Next.END, None
        if not self.ended:
            return Next.WAIT, None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            return Next.ITEM, failure
        return Next.END, None

    def close(self) -> list:
        """The generator is gone: what it still held (to release), and arrivals are refused."""
        self.closed = True
        dropped = list(self.ready)
        if self.failure is not None:
            dropped.append(self.failure)
        self.ready.clear()
        self.failure = None
        return dropped

    # ------------------------------------------------------------------ what the producer is told
    def limit(self) -> int | None:
        """How many items the producer may have made in all (None: no limit)."""
        return None if self.max_pending is None else self.handed + self.max_pending

    def credit_to_send(self) -> int | None:
        """A new limit for the running producer (StreamCredit), or None when it knows it already."""
        limit = self.limit()
        if limit is None or self.ended or self.closed or limit == self.credit_sent:
            return None
        self.credit_sent = limit
        return limit

    def spec(self) -> tuple:
        """What a (new) attempt is sent (a StreamSpec, plain): skip what we have, go up to the limit."""
        self.credit_sent = self.limit()
        return tuple(StreamSpec(self.arrived, self.credit_sent))

    # ------------------------------------------------------------------ questions
    def finished(self) -> bool:
        """Nothing more will be handed out."""
        return self.closed or (self.ended and not self.ready and self.failure is None)

    def has_next(self) -> bool:
        """``take`` would not wait."""
        return bool(self.ready) or self.ended or self.closed

    def validate_state(self) -> None:
        """Raise AssertionError if the stream contradicts itself (tests call it after each event)."""
        assert self.handed + len(self.ready) <= self.arrived, "handed out more than arrived"
        assert self.closed or self.handed + len(self.ready) == self.arrived, "an item went missing"
        assert not (self.closed and (self.ready or self.failure is not None)), "a closed stream holds items"
        assert self.failure is None or self.ended, "a failure before the end"
        assert self.max_pending is None or self.max_pending >= 1, "max_pending below 1"
        assert self.credit_sent is None or self.max_pending is not None, "credit without back-pressure"
        assert self.credit_sent is None or self.credit_sent <= self.handed + self.max_pending, \
            "the producer was allowed more than handed out + max_pending"
