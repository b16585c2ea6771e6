"""Streaming generator tasks, worker side: run the user's generator, send each item as it is
yielded, and make no more items than the owner's credit allows.

A task whose TaskSpec carries a ``protocol.StreamSpec`` instead of a count returned a
generator (or an async generator): it is iterated here, each item stored like a result
(small inline, large in this node's store) and sent at once as ``ItemReady``; the task's
own result is the number of items.  The owner says how far the producer may go
(``StreamCredit``, back-pressure: ``max_pending_items``) and when to stop (``StopStream``:
a cancel, or the owner dropped its generator).  An owner that dies says nothing: the
node agent watches it for us, wherever it lives (``WatchCaller`` while a stream of its
runs here; ``CallerGone`` stops its streams, see node_clients.py)::

    worker main thread:  next(gen) -> store -> ItemReady --> owner (same channel as TaskFinished)
                              ^                                 |
                              +--- credit/stop (Producer) <-----+ StreamCredit / StopStream
                              +--- stop <-- CallerGone <-- node agent <-- WatchCaller(owner)

Three ways to run, as the worker runs calls: on the main thread (tasks, actors with
``max_concurrency=1``: while it waits for credit, the main thread runs the worker's event
loop itself, so messages keep being read), on an actor's thread pool (waits on the
Producer's condition) or on an async actor's event loop (awaits it).  On a retry the
owner's StreamSpec says how many items it has already: they are made again and dropped.

Who may touch it: ``credit``/``stop``/``caller_gone`` on the worker's loop thread; the
``run_*`` on the thread that runs the stream; the tables of producers, ended streams and
watched callers under ``lock``.
"""

from __future__ import annotations

import threading
import time
import types
from collections import OrderedDict

from farpool._private import object_ref, protocol, transport
from farpool._private.context import context
from farpool._private.protocol import encode
from farpool._private.worker_process import call_user

# How long the main thread waits in one turn of the event loop for credit or for the owner to
# read what we sent, before it looks again at the cancel flags a signal handler set.  Longer
# wakes less; shorter notices a cancel that came as a signal sooner.
WAIT_TURN_S = 0.2
# Streams that ended here, remembered so that an owner's late StreamCredit or StopStream (sent
# before it learned of the end) is dropped, not kept for a start that never comes.  More
# remembers longer; each costs a few dozen bytes.
ENDED_REMEMBERED = 1024


class Producer:
    """One running stream's credit and stop flag (set by the loop thread, read by the stream's)."""

    def __init__(self, task_id: bytes):
        self.task_id = task_id
        self.caller: bytes | None = None  # the owner's client identity (watched while it runs)
        self.limit: int | None = 0       # items it may make in all (None: no limit)
        self.stopped = False
        self.cond = threading.Condition()
        self.wake = None                 # an async stream's wake-up (from the loop thread)

    def start(self, spec: protocol.StreamSpec) -> None:
        with self.cond:
            if self.limit is not None:  # (a credit may have come before the task started)
                self.limit = None if spec.limit is None else max(self.limit, spec.limit)

    def may_make(self, index: int) -> bool:
        return self.stopped or self.limit is None or index < self.limit

    def changed(self) -> None:
        """(cond held) Wake whoever waits."""
        self.cond.notify_all()
        if self.wake is not None:
            self.wake()


class WorkerStreams:
    """The worker's running streams.  ``w``: the Worker (its loop, lock, agent and ``_pack_one``)."""

    def __init__(self, w):
        self.w = w
        self.producers: dict[bytes, Producer] = {}
        self.ended: OrderedDict = OrderedDict()  # task ids of streams that ended here, oldest first
        self.callers: dict[bytes, int] = {}  # owner identity -> its streams running here (watched)
        self.lock = threading.Lock()  # the tables: an actor's threads start and end streams too

    # ------------------------------------------------------------------ owner messages (loop thread)
    def _producer(self, task_id: bytes) -> Producer | None:
        with self.lock:
            producer = self.producers.get(task_id)
            if producer is None and task_id not in self.ended:  # not started yet: kept for its start
                producer = self.producers[task_id] = Producer(task_id)
            return producer

    def _ended(self, task_id: bytes, send) -> None:
        """The stream of ``task_id`` is over here (``send``: to our agent, from this thread)."""
        unwatch = None
        with self.lock:
            producer = self.producers.pop(task_id, None)
            self.ended[task_id] = None
            while len(self.ended) > ENDED_REMEMBERED:
                self.ended.popitem(last=False)
            caller = producer.caller if producer is not None else None
            if caller is not None:
                self.callers[caller] -= 1
                if not self.callers[caller]:
                    del self.callers[caller]
                    unwatch = caller
        if unwatch is not None:
            send(encode("UnwatchCaller", (unwatch,)))

    def credit(self, task_id: bytes, limit: int) -> None:
        producer = self._producer(task_id)
        if producer is None:
            return
        with producer.cond:
            if producer.limit is not None and limit > producer.limit:
                producer.limit = limit
                producer.changed()

    def stop(self, task_id: bytes) -> None:
        producer = self._producer(task_id)
        if producer is None:
            return
        with producer.cond:
            producer.stopped = True
            producer.changed()

    def caller_gone(self, identity: bytes) -> None:
        """CallerGone from our agent: the owner of these streams is gone (its process, or its
        node), and nobody reads what they make: stop them (their generators are closed)."""
        with self.lock:
            gone = [p for p in self.producers.values() if p.caller == identity]
        for producer in gone:
            with producer.cond:
                producer.stopped = True
                producer.changed()

    # ------------------------------------------------------------------ items
    def _item_frames(self, task_id: bytes, index: int, value, name: str, caller) -> list:
        """ItemReady for one item (stored like a result: large into the node store)."""
        out_buffers: list = []
        item = self.w._pack_one(protocol.item_id(task_id, index) + b"\x00", value,
                                f"item {index} of {name}", caller, out_buffers)
        client = object_ref.current()
        sender = client.peer_address if client is not None else None
        return encode("ItemReady", (task_id, index, item, sender), out_buffers)

    @staticmethod
    def _cancelled(task_id: bytes) -> KeyboardInterrupt:
        return KeyboardInterrupt(f"task {task_id.hex()} was cancelled")

    def _begin(self, task_id: bytes, spec: protocol.StreamSpec, caller, send) -> Producer:
        """A stream starts; its owner (``caller``) is watched while one of its streams runs here
        (``send``: to our agent, from this thread)."""
        address = protocol.owner_address(caller) if caller else None
        watch = False
        with self.lock:
            self.ended.pop(task_id, None)  # (a retry on the worker that ran an attempt before)
            producer = self.producers.get(task_id)
            if producer is None:
                producer = self.producers[task_id] = Producer(task_id)
            if address is not None and producer.caller is None:
                producer.caller = address.identity
                watch = not self.callers.get(address.identity)
                self.callers[address.identity] = self.callers.get(address.identity, 0) + 1
        if watch:
            send(encode("WatchCaller", (address.identity, address.node_id)))
        producer.start(spec)
        return producer

    def _send_inline(self, frames) -> None:
        """To our agent from the main thread while a task runs (the loop is not running)."""
        with self.w.io_lock:
            transport.send(self.w.agent, frames)

    def _send_soon(self, frames) -> None:
        """To our agent from an actor's thread or event loop: the worker's loop thread sends it."""
        self.w.loop.call_soon(transport.send, self.w.agent, frames)

    # ------------------------------------------------------------------ on the main thread
    def run_inline(self, task_id: bytes, gen, spec: protocol.StreamSpec, name: str, batch, caller) -> int:
        """Iterate ``gen`` on the main thread (inside _execute; the worker's io_lock is not held);
        returns the number of items."""
        w = self.w
        step = _stepper(gen, name)
        producer = self._begin(task_id, spec, caller, self._send_inline)
        channel = batch.channel  # a local owner's stream (None: relayed by the agent, zmq queues it)
        index = 0
        looked = time.monotonic()
        try:
            while True:
                if index >= spec.skip and not producer.may_make(index):
                    with w.io_lock:  # the loop runs here meanwhile: StreamCredit comes through it
                        while not (producer.may_make(index) or context.cancel_pending
                                   or (channel is not None and channel.closed)):
                            w.loop.run_once(WAIT_TURN_S)
                if producer.stopped or (channel is not None and channel.closed):
                    raise self._cancelled(task_id)
                try:
                    value = call_user(step, (), {})  # (a cancel signal interrupts the user's code only)
                except StopIteration:
                    return _count(index, spec, name)
                if index >= spec.skip:
                    frames = self._item_frames(task_id, index, value, name, caller)
                    value = None
                    with w.io_lock:
                        batch.reply(frames)
                        frames = None
                        # What the socket did not take now goes before the next item is made (the
                        # loop that would send it is not running while the task runs).
                        while channel is not None and channel._out and not channel.closed \
                                and not context.cancel_pending:
                            w.loop.run_once(WAIT_TURN_S)
                        if time.monotonic() - looked > WAIT_TURN_S:
                            # A stream that never waits still reads its messages now and then
                            # (a StopStream, a CallerGone), as it would while it waits.
                            w.loop.run_once(0)
                            looked = time.monotonic()
                index += 1
        finally:
            self._ended(task_id, self._send_inline)
            _close(gen, step)

    # ------------------------------------------------------------------ on an actor's threads
    def run_threaded(self, task_id: bytes, gen, spec: protocol.StreamSpec, name: str, reply, caller) -> int:
        """Iterate ``gen`` on a threaded actor's pool thread; items leave from the loop thread."""
        step = _stepper(gen, name)
        producer = self._begin(task_id, spec, caller, self._send_soon)
        index = 0
        try:
            while True:
                if index >= spec.skip:
                    with producer.cond:
                        producer.cond.wait_for(lambda: producer.may_make(index))
                if producer.stopped:
                    raise self._cancelled(task_id)
                try:
                    value = step()
                except StopIteration:
                    return _count(index, spec, name)
                if index >= spec.skip:
                    self.w.loop.call_soon(reply, self._item_frames(task_id, index, value, name, caller))
                value = None
                index += 1
        finally:
            self._ended(task_id, self._send_soon)
            _close(gen, step)

    async def run_async(self, task_id: bytes, gen, spec: protocol.StreamSpec, name: str, reply, caller) -> int:
        """Iterate ``gen`` (async or not) on an async actor's event loop."""
        import asyncio  # (here: asyncio brings ssl, about 6 MB, into every worker that never needs it)
        loop = asyncio.get_running_loop()
        is_async = isinstance(gen, types.AsyncGeneratorType)
        step = None if is_async else _stepper(gen, name)
        producer = self._begin(task_id, spec, caller, self._send_soon)
        index = 0
        try:
            while True:
                while index >= spec.skip and not producer.may_make(index):
                    ready = asyncio.Event()
                    with producer.cond:
                        producer.wake = lambda: loop.call_soon_threadsafe(ready.set)
                        if producer.may_make(index):
                            break
                    await ready.wait()
                producer.wake = None
                if producer.stopped:
                    raise self._cancelled(task_id)
                try:
                    value = await gen.__anext__() if is_async else step()
                except (StopIteration, StopAsyncIteration):
                    return _count(index, spec, name)
                if index >= spec.skip:
                    self.w.loop.call_soon(reply, self._item_frames(task_id, index, value, name, caller))
                value = None
                index += 1
        finally:
            self._ended(task_id, self._send_soon)
            if is_async:
                await gen.aclose()
            else:
                _close(gen)


def _count(index: int, spec: protocol.StreamSpec, name: str) -> int:
    """The stream ended after ``index`` items: its count, unless a retry made fewer than the owner
    already has (the generator is not deterministic: the items would not match)."""
    if index < spec.skip:
        raise RuntimeError(
            f"the retry of streaming task {name} yielded {index} items, but its earlier attempt had already "
            f"delivered {spec.skip}: a generator must yield the same items when it runs again (max_retries "
            "re-runs it from the start and skips what was delivered); make it deterministic, or give it "
            "max_retries=0")
    return index


def _stepper(gen, name: str):
    """A callable that makes the next item (StopIteration at the end) of a generator, or of an
    async generator run step by step on an event loop of its own."""
    if isinstance(gen, types.GeneratorType):
        return gen.__next__
    if isinstance(gen, types.AsyncGeneratorType):
        return _AsyncStepper(gen)
    if hasattr(gen, "__next__"):  # an iterator returned by a num_returns="streaming" function
        return gen.__next__
    if hasattr(gen, "__iter__"):
        return iter(gen).__next__
    raise TypeError(f"{name} is a streaming task (num_returns='streaming') but returned a value of type "
                    f"{type(gen).__name__}, not a generator or iterator; yield its items instead")


class _AsyncStepper:
    """An async generator run step by step on an event loop of its own (a task, not an actor)."""

    def __init__(self, gen):
        import asyncio
        self.gen = gen
        self.loop = asyncio.new_event_loop()

    def __call__(self):
        try:
            return self.loop.run_until_complete(self.gen.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.gen.aclose())
        finally:
            self.loop.close()


def _close(gen, step=None) -> None:
    """Let the generator's finally blocks run now (it was stopped, or it ended)."""
    try:
        if isinstance(step, _AsyncStepper):
            step.close()
        elif isinstance(gen, types.GeneratorType):
            gen.close()
    except Exception:  # noqa: BLE001 - its cleanup raising must not hide how the stream ended
        pass
