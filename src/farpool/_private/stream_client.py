"""Streaming generator tasks, as the owner carries them out.

The state of each stream is a StreamState (streams.py, pure); this part locks it, turns
``ItemReady`` into objects of ours (stored like results: an entry in the reference
table, READY at once, with no lineage: a stream is not replayed to rebuild one item),
hands refs to the user's ``ObjectRefGenerator`` (farpool/_generator.py) in order, grants
the producer credit as items are handed out (``StreamCredit``) and stops it when the
generator is cancelled or dropped (``StopStream``, and the task is cancelled)::

    submit(stream=StreamState) --> opened: a waiter on the task's own object (ends the stream)
    ItemReady (I/O thread) --> Entry READY + ObjectRef --> StreamState.arrive --> wake takers
    take() (user thread) <-- StreamState.take --> StreamCredit to the worker (I/O thread)
    close() (the generator dropped) --> release the refs still queued, cancel the task

The task's own object (the generator's ``completed()``) becomes the number of items, or
the task's error; that error is also what the last ref handed out raises.

Who may touch it: ``opened``, ``take``, ``ready_future``, ``forget_future``, ``close`` and
``spec`` from any thread; the rest on the I/O thread.  ``cond`` guards every StreamState.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

from farpool import exceptions as exc_mod
from farpool._private import protocol
from farpool._private.client_part import ClientPart
from farpool._private.object_ref import ObjectRef
from farpool._private.protocol import encode
from farpool._private.refs import FAILED, READY, Entry, Location
from farpool._private.streams import Next, StreamState
from farpool._private.task_queues import TaskRecord, TaskState


class Streams(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def __init__(self, c):
        super().__init__(c)
        self.cond = threading.Condition()
        self.running: dict[bytes, StreamState] = {}   # task id -> its stream, until the task ends
        self.async_waiters: dict[bytes, list] = {}    # task id -> futures of __anext__ waiting

    # ------------------------------------------------------------------ any thread
    def opened(self, task: TaskRecord) -> None:
        """``task`` (just submitted, not dispatched yet) streams into ``task.stream``."""
        state = task.stream
        state.task_id, state.name = task.task_id, task.name
        with self.cond:
            self.running[task.task_id] = state
        with self.lock:
            entry = self.objects[task.task_id]
            entry.add_waiter(lambda entry, state=state: self._task_ended(state, entry))

    def spec(self, state: StreamState) -> tuple:
        """The StreamSpec a dispatch of its task carries (TaskSpec.num_returns)."""
        with self.cond:
            return state.spec()

    def take(self, state: StreamState, timeout: float | None):
        """The next ref (blocks until it came, or ``timeout`` seconds: GetTimeoutError);
        StopIteration at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        blocked = False
        try:
            with self.cond:
                while True:
                    kind, item = state.take()
                    if kind is Next.ITEM:
                        break
                    if kind is Next.END:
                        raise StopIteration
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise exc_mod.GetTimeoutError(
                            f"no item of the streaming task {state.name} came within {timeout} s "
                            f"({state.handed} handed out so far); wait longer, or check is_finished()")
                    if not blocked:  # inside a task: lend our CPU while the producer works
                        blocked = True
                        self.c.values.set_blocked(True)
                    self.cond.wait(left)
        finally:
            if blocked:
                self.c.values.set_blocked(False)
        if state.max_pending is not None:
            self.loop.call_soon(self._grant, state)
        return item

    def ready_future(self, state: StreamState) -> concurrent.futures.Future | None:
        """None when ``take`` would not wait; else a future done when it would not (for asyncio)."""
        with self.cond:
            if state.has_next():
                return None
            future: concurrent.futures.Future = concurrent.futures.Future()
            self.async_waiters.setdefault(state.task_id, []).append(future)
            return future

    def forget_future(self, state: StreamState, future: concurrent.futures.Future) -> None:
        """A waiter of ``ready_future`` gave up (wait's timeout): its future is not kept."""
        with self.cond:
            waiting = self.async_waiters.get(state.task_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self.async_waiters[state.task_id]

    def close(self, state: StreamState) -> None:
        """The generator is dropped (or closed): free the items it still held and stop its task."""
        with self.cond:
            if state.closed:
                return
            dropped = state.close()
            running = self.running.pop(state.task_id, None) is not None
            self._wake(state)
        del dropped  # (the refs go: their objects are freed)
        if running:
            self.c.cancel(ObjectRef(state.task_id, self.c.owner_address, _register=False), False, True)

    def _wake(self, state: StreamState) -> None:
        """(cond held)"""
        self.cond.notify_all()
        for future in self.async_waiters.pop(state.task_id, ()):
            if not future.done():
                future.set_result(None)

    # ------------------------------------------------------------------ I/O thread
    def on_item_ready(self, fields, buffers, came_over=None) -> None:
        """``came_over``: the agent connection that relayed it, or the worker's own stream."""
        task_id, index, item, sender = protocol.ItemReady._make(fields)
        if sender is not None:
            sender = protocol.owner_address(sender)
        payload, nbuf, inner = item
        task = self.c.tasks.get(task_id)
        if isinstance(payload, tuple):  # in the worker's node store
            at = protocol.StoredAt._make(payload)
            node_id = task.lease.node_id if task is not None and task.lease is not None else \
                sender.node_id if sender is not None else self.conns.home.node_id
            value = Location("seg", node_id, at.store_id, at.path, at.size)
        else:
            value = (payload, buffers[:nbuf])
        with self.cond:
            state = self.running.get(task_id)
            wanted = state is not None and not state.closed and state.arrived == index
        # (an item of an attempt given up on, late: it names a store we may no longer reach)
        wanted = wanted and self.c.queues.stale_result(task_id, came_over) is None
        if not wanted:  # the generator is gone, or a duplicate of an attempt before (skipped since)
            with self.lock:
                self.refs.discard_value(value, inner, sender)
            self.c.borrowing.schedule_frees()
            return
        if isinstance(value, Location):
            entry = Entry(state=READY, location=value, size=value.size)
        else:
            entry = Entry(state=READY, payload=value[0], buffers=value[1],
                          size=len(value[0]) + sum(len(b) for b in value[1]))
        entry.no_lineage = (f"it is item {index} of the streaming generator task {state.name}: streams are not "
                            "rebuilt (a generator cannot be resumed from the middle); keep a copy elsewhere, "
                            "or run the stream again")
        oid = protocol.item_id(task_id, index)
        with self.lock:
            self.objects[oid] = entry
            if inner:
                self.refs.hold_nested(entry, inner, sender)
        if inner:
            self.c.borrowing.schedule_frees()
        ref = ObjectRef(oid, self.c.owner_address)
        with self.cond:
            state.arrive(index, ref)  # (False: closed meanwhile; dropping our ref frees it)
            self._wake(state)

    def _task_ended(self, state: StreamState, entry: Entry) -> None:
        """The task's own object is done: the stream ends (the error, if any, is handed out last)."""
        failure = ObjectRef(state.task_id, self.c.owner_address) if entry.state == FAILED else None
        with self.cond:
            self.running.pop(state.task_id, None)
            state.end(failure)
            self._wake(state)
        with self.lock:  # the generator (its last ref) may have gone while the task ran: nothing keeps it
            if self.objects.get(state.task_id) is entry:
                self.refs.delete_if_unreferenced(state.task_id, entry)

    def _grant(self, state: StreamState) -> None:
        """An item was handed out: the running producer may make one more (StreamCredit)."""
        task = self.c.tasks.get(state.task_id)
        with self.cond:
            if task is None or task.state != TaskState.RUNNING or task.lease is None:
                return  # not running now: its next dispatch carries the limit (spec)
            limit = state.credit_to_send()
        if limit is not None:
            task.lease.channel.send(encode("StreamCredit", (state.task_id, limit)))

    def stop_running(self, task: TaskRecord) -> None:
        """A running stream's task is cancelled: its producer stops before its next item."""
        task.lease.channel.send(encode("StopStream", (task.task_id,)))
