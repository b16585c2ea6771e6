"""``farpool.ObjectRefGenerator``: what calling a generator function or method with ``.remote()``
returns.  A thin face over the client's streams part (_private/stream_client.py).

Iterate it (``for ref in gen``, or ``async for`` in asyncio) to get each item's ObjectRef as
soon as the task has yielded it, in order.  Any thread may iterate it; one consumer at a
time is the intended use (two threads share the items between them).
"""

from __future__ import annotations


from farpool._private.object_ref import ObjectRef

__all__ = ["ObjectRefGenerator"]


class ObjectRefGenerator:
    """The refs a streaming task yields, in order (Ray's name and methods).

    - ``next(gen)`` blocks for the next ref; ``gen._next_sync(timeout_s)`` waits at most
      ``timeout_s`` seconds (``GetTimeoutError``); ``async for`` / ``await gen.__anext__()``
      in asyncio.
    - When the task raises (or is cancelled, or its worker dies past ``max_retries``), the
      refs it yielded before come first, then one ref whose ``get`` raises that error, then
      the iteration ends.
    - ``completed()``: the ref of the task itself (``get`` gives the number of items, or raises
      its error); ``is_finished()``: nothing more will come; ``next_ready()``: ``next`` would
      not wait.
    - ``farpool.cancel(gen)`` stops the producer.  Dropping the generator before its end
      stops it too and frees the items it had not handed out.
    """

    def __init__(self, ref: ObjectRef, state, client):
        self._ref = ref
        self._state = state
        self._client = client

    def __iter__(self) -> "ObjectRefGenerator":
        return self

    def __next__(self) -> ObjectRef:
        return self._client.streams.take(self._state, None)

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next ref, waiting at most ``timeout_s`` seconds (GetTimeoutError); StopIteration at the end."""
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or timeout_s < 0):
            raise ValueError(f"`timeout_s` must be None or a number of seconds >= 0, got {timeout_s!r}")
        return self._client.streams.take(self._state, timeout_s)

    def __aiter__(self) -> "ObjectRefGenerator":
        return self

    async def __anext__(self) -> ObjectRef:
        streams = self._client.streams
        while True:
            future = streams.ready_future(self._state)
            if future is None:
                try:
                    return streams.take(self._state, 0)
                except StopIteration:
                    raise StopAsyncIteration from None
            import asyncio  # (here: asyncio brings ssl into processes that never iterate asynchronously)
            await asyncio.wrap_future(future)

    def completed(self) -> ObjectRef:
        """The ref of the task itself: ready when it ended (its value is the number of items)."""
        return self._ref

    def is_finished(self) -> bool:
        """True when every ref has been handed out and nothing more will come."""
        return self._state.finished()

    def next_ready(self) -> bool:
        """True when ``next`` would return (or end) at once."""
        return self._state.has_next()

    def close(self) -> None:
        """Stop the producer and free the items not handed out yet (as dropping it does)."""
        self._client.streams.close(self._state)

    def __del__(self):
        try:
            if not self._state.finished():
                self._client.streams.close(self._state)
        except Exception:  # noqa: BLE001 - at interpreter exit the client may be gone
            pass

    def __reduce__(self):
        raise TypeError("an ObjectRefGenerator cannot be pickled or passed to tasks: it belongs to the process "
                        "that called .remote(); pass the refs it yields instead (each is an ordinary ObjectRef)")

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._ref.hex()})"


ObjectRefGenerator.__module__ = "farpool"
