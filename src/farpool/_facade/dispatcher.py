"""The dispatcher: a bounded number of a facade's tasks in flight, handed out in order.

Owns ``_Dispatcher`` (pending work items and map feeds, the tasks in
flight, the broken state), ``_WorkItem`` (one task not yet handed out),
``_Feed`` (a map's inputs, read lazily, big arrays shared once per call) and
``_OnDone`` (a task's completion callback).  Any thread may push and cancel;
completions arrive on the core client's one callback thread, where the
user's done-callbacks run.  Only the facades and sizing.py use it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, NamedTuple

import farpool
from farpool import exceptions as _exc
from farpool._facade.errors import (BrokenDistributedExecutor, _is_initializer_error, _not_loaded,
                                    _pickling_error, _process_pool_error, _remote_text, _RemoteTraceback,
                                    _task_name, _user_error)
from farpool._facade.futures import _CANCELLED, _CANCELLED_AND_NOTIFIED, _PENDING, DistributedFuture
from farpool._facade.tasks import (_PLAIN, _all_plain, _AuthKey, _fix_result, _pack_plain, _Shared,
                                   _submitter_authkey)

# A numpy array at least this large, passed to many calls of one map(), is put
# in the cluster once and passed by reference; smaller ones are pickled with
# each task (cheaper than a put for small data).
SHARE_MIN_BYTES = 1 << 20
# Tasks an executor hands to the runtime per max_workers slot when the cluster's
# resources already keep fewer than max_workers of them running at once (the
# default: max_workers = the cluster's CPUs).  The runtime pipelines a deep
# backlog of short tasks into its workers: more hides the round trip per task
# (16 gives ~4x the throughput of 1 for tiny tasks on 2 cores); fewer keeps more
# of the queued work in this process, where cancel() always succeeds.
OVERSUBSCRIBE = 16
# ... but only once this many tasks came back (tasks seen to be quick), and
# only while the oldest task in flight is younger than
# max(OVERSUBSCRIBE_GUARD_MIN_S, OVERSUBSCRIBE_GUARD_FACTOR x the usual time a
# task takes to come back): the runtime does not take back tasks it pipelined
# to a busy worker, so a long task must not get a queue of short ones behind it.
# Larger values reach full speed sooner; smaller ones risk fewer tasks waiting
# behind a long one.
OVERSUBSCRIBE_AFTER = 16
OVERSUBSCRIBE_GUARD_MIN_S = 0.002
OVERSUBSCRIBE_GUARD_FACTOR = 8
# imap/imap_unordered with a small chunksize (the stdlib's default is 1) send several
# chunks per task while tasks come back within GROUP_TASK_S seconds, up to GROUP_MAX
# chunks: a task costs ~100x a tiny item, so grouping reaches the stdlib's throughput.
# Larger values group more (faster for tiny items); smaller ones keep fewer items queued
# behind a slow one in the same task, and deliver the first results sooner.
GROUP_TASK_S = 0.02
GROUP_MAX = 64


class _Limit(NamedTuple):
    """Tasks in flight allowed while a source waits: ``burst`` while tasks come back quickly."""
    strict: int
    burst: int


class _WorkItem:
    """One task not yet handed to the runtime: ``remote.remote(*args)`` makes it.

    It waits while ``limit`` or more tasks are in flight.  ``deps``: futures are among
    its arguments (see ``_dependency``).
    """
    __slots__ = ("future", "remote", "args", "chunk", "limit", "deps")

    def __init__(self, future: DistributedFuture, remote, args: tuple, limit: _Limit, chunk: bool = False,
                 deps: bool = False):
        self.future = future
        self.remote = remote
        self.args = args
        self.limit = limit
        self.chunk = chunk
        self.deps = deps


class _DependencyFailed(Exception):
    """A future given as an argument ended without a value: its error is the dependent's."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _dependency(future: DistributedFuture):
    """A future passed as an argument (the Dask idiom): the ref of its task, which the runtime
    resolves to the value before the function runs (nobody waits here; a failed task fails
    the dependent with its error).  A future of this executor always has its ref by the
    time a later submission is handed out (first in, first out)."""
    ref = future._ref
    if ref is not None:
        return ref
    if future.cancelled():
        raise _DependencyFailed(concurrent.futures.CancelledError(
            f"an argument of this call was the future of {future._name or 'a task'}, which was cancelled"))
    if future.done():
        error = future.exception()
        if error is not None:
            raise _DependencyFailed(error)
        return farpool.put(future.result())
    raise _DependencyFailed(ValueError(
        f"an argument of this call is the future of {future._name or 'a task'} that another executor has not "
        "handed to its cluster yet (it waits behind that executor's max_workers): pass future.result() "
        "instead, or submit both calls to one executor"))


class _Feed:
    """The inputs of one map-like call, read lazily: one chunk per task handed out, or with
    ``grouped`` (a ``_run_chunks`` remote) several small chunks per task once tasks come back
    quickly (see GROUP_TASK_S); each chunk of a group still succeeds or fails alone.

    ``inputs`` is an iterator, or a list: read by slicing as work is handed out (for big
    chunks ~5x cheaper than ``list(islice(...))``, which grows its list item by item).

    ``next_item`` runs under the dispatcher's lock (on whichever thread pumps);
    consumers wait on ``cond`` for the chunk futures in input order.
    """

    def __init__(self, dispatcher: "_Dispatcher", remote, fn, inputs: Iterator | list, chunksize: int,
                 star: bool, limit: _Limit, on_future: Callable | None = None,
                 on_finish: Callable | None = None, keep_futures: bool = True, grouped=None):
        self.dispatcher = dispatcher
        self.limit = limit
        self.remote = remote
        self.grouped = grouped
        self.group = 1                      # chunks per task now (see _group_size)
        self.input_error: BaseException | None = None  # the input raised after the chunks read
        self.fn = fn
        self.name = _task_name(fn)
        self.items: list | None = inputs if type(inputs) is list else None
        self.position = 0                   # of the next item in ``items``
        self.iterator = None if self.items is not None else inputs
        self.chunksize = chunksize
        self.star = star
        self.cond = threading.Condition(threading.Lock())
        self.futures: deque = deque()       # chunk futures not yet taken by the consumer
        self.done = False                   # no more chunks will come
        self.error: BaseException | None = None
        self.on_future = on_future    # (future, n_items): called under the dispatcher's lock
        self.on_finish = on_finish    # (error or None): once, when no more chunks will come
        self.keep_futures = keep_futures  # False: the consumer takes futures through on_future
        self._shared: dict[int, tuple] = {}  # id(array) -> (array, ref): the identity cache of this call

    def next_item(self) -> _WorkItem | None:
        """The next chunk as a work item, or None when the inputs are exhausted (or failed)."""
        if self.done:
            return None
        if self.input_error is not None:  # after the whole chunks read before it (see _read)
            self._finish(self.input_error)
            return None
        groups = self._group_size() if self.grouped is not None else 1
        want = self.chunksize * groups
        try:
            chunk = self._read(want)
        except BaseException as error:  # noqa: BLE001 - raised to the consumer at that point
            self._finish(error)
            return None
        if not chunk:
            self._finish(None)
            return None
        refs: list = []
        n = len(chunk)
        packed = _pack_plain(chunk)
        if packed is not None:  # no refs, no big arrays: it goes as pickled here
            plain, chunk = packed
        else:
            plain = _all_plain(itertools.chain.from_iterable(chunk) if self.star else chunk)
            if not plain:
                chunk = self._share(chunk, refs)
        future = DistributedFuture(self.dispatcher)
        future._name = self.name
        if self.on_future is not None:
            self.on_future(future, n)
        if self.keep_futures:
            with self.cond:
                self.futures.append(future)
                self.cond.notify_all()
        if n < want and self.input_error is None:
            self._finish(None)
        if n > self.chunksize:  # a group of chunks (_run_chunks)
            return _WorkItem(future, self.grouped, (self.fn, self.star, plain, self.chunksize, chunk, *refs),
                             self.limit, chunk=True)
        return _WorkItem(future, self.remote, (self.fn, self.star, plain, chunk, *refs), self.limit, chunk=True)

    def _read(self, want: int) -> list:
        """Up to ``want`` inputs.  A group is read chunk by chunk: when the input raises inside
        it, the whole chunks read before are still handed out and the error (``input_error``)
        is raised to the consumer after them, where the stdlib raises it (the part of a chunk
        read before the error is dropped, as there)."""
        if self.items is not None:
            take = self._slice
        elif self.star:
            take = lambda n: list(map(tuple, itertools.islice(self.iterator, n)))  # noqa: E731
        else:
            take = lambda n: list(itertools.islice(self.iterator, n))  # noqa: E731
        if want == self.chunksize or self.items is not None:  # (a list cannot raise partway)
            return take(want)
        out: list = []
        while len(out) < want:
            try:
                part = take(self.chunksize)
            except BaseException as error:  # noqa: BLE001 - see next_item
                if not out:
                    raise
                self.input_error = error
                return out
            out.extend(part)
            if len(part) < self.chunksize:
                break
        return out

    def _slice(self, n: int) -> list:
        start = self.position
        part = self.items[start:start + n]
        self.position = start + len(part)
        return list(map(tuple, part)) if self.star else part

    def _group_size(self) -> int:
        """Chunks for the next task: doubled while tasks come back within GROUP_TASK_S (the
        dispatcher's moving average), halved when they take twice that.  (Dispatcher's lock held.)"""
        d = self.dispatcher
        if d.returned >= OVERSUBSCRIBE_AFTER:
            if d.return_s < GROUP_TASK_S:
                self.group = min(self.group * 2, GROUP_MAX)
            elif d.return_s > 2 * GROUP_TASK_S:
                self.group = max(1, self.group // 2)
        return self.group

    def _share(self, chunk: list, refs: list) -> list:
        """Replace refs and big arrays among the arguments by markers of top-level ref arguments."""
        index_of: dict[int, int] = {}
        if self.star:
            out = None
            for i, args in enumerate(chunk):
                for j, a in enumerate(args):
                    if type(a) not in _PLAIN:
                        marker = self._marker(a, refs, index_of)
                        if marker is not None:
                            if out is None:
                                out = [list(t) for t in chunk]
                            out[i][j] = marker
            return chunk if out is None else [tuple(t) for t in out]
        for i, a in enumerate(chunk):
            if type(a) not in _PLAIN:
                marker = self._marker(a, refs, index_of)
                if marker is not None:
                    chunk[i] = marker
        return chunk

    def _marker(self, a, refs: list, index_of: dict) -> _Shared | None:
        if isinstance(a, farpool.ObjectRef):
            ref = a
        elif isinstance(a, DistributedFuture) and a._ref is not None:  # resolved by the runtime
            ref = a._ref
        elif type(a).__name__ == "ndarray" and getattr(a, "nbytes", 0) >= SHARE_MIN_BYTES:
            cached = self._shared.get(id(a))
            if cached is None or cached[0] is not a:
                cached = (a, farpool.put(a))
                self._shared[id(a)] = cached
            ref = cached[1]
        else:
            return None
        k = index_of.get(id(ref))
        if k is None:
            k = index_of[id(ref)] = len(refs)
            refs.append(ref)
        return _Shared(k)

    def _finish(self, error: BaseException | None) -> None:
        with self.cond:
            first = not self.done
            if first:
                self.done = True
                self.error = error
                self.iterator = self.items = None
                self._shared = {}
            self.cond.notify_all()
        if first and self.on_finish is not None:
            self.on_finish(error)

    def close(self, error: BaseException | None = None) -> None:
        """No more inputs are read (the consumer went away, or the work was cancelled)."""
        self._finish(error)

    def next_future(self, end_time: float | None):
        """The next chunk future in input order; None at the end; raises the input error there."""
        with self.cond:
            while not self.futures and not self.done:
                if end_time is None:
                    self.cond.wait()
                else:
                    remaining = end_time - time.monotonic()
                    if remaining <= 0 or not self.cond.wait(remaining):
                        if not self.futures and not self.done:
                            raise TimeoutError()
            if self.futures:
                return self.futures.popleft()
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            return None

    def remaining_futures(self) -> list:
        with self.cond:
            futures = list(self.futures)
            self.futures.clear()
            return futures


class _OnDone:
    """The completion callback of one task; lets go of the future once it ran.

    (The client's callback thread keeps a reference to the last callback it
    ran; results must not stay alive through it.)
    """
    __slots__ = ("dispatcher", "future", "chunk")

    def __init__(self, dispatcher: "_Dispatcher", future: DistributedFuture, chunk: bool):
        self.dispatcher = dispatcher
        self.future = future
        self.chunk = chunk

    def __call__(self, ref) -> None:
        dispatcher, future = self.dispatcher, self.future
        self.dispatcher = self.future = None
        if dispatcher is not None:
            dispatcher._on_done(future, self.chunk, ref)


class _Dispatcher:
    """Hands work to the runtime, in order, while fewer than the item's ``limit`` tasks are in flight.

    Any thread may push and cancel; completions arrive on the client's
    callback thread.  One lock (re-entrant: pickling user objects may call
    back in) guards ``pending``, ``in_flight`` and ``broken``.
    """

    def __init__(self, client, tb_cls=_RemoteTraceback, broken_cls: type = BrokenDistributedExecutor,
                 process_pool_errors: bool = False):
        self.client = client
        # The executor's futures fail as ProcessPoolExecutor's do (see _process_pool_error).
        self.process_pool_errors = process_pool_errors
        self.authkey = _AuthKey(_submitter_authkey())  # every task's first argument (see _AuthKey)
        self.tb_cls = tb_cls
        self.broken_cls = broken_cls
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)
        self.pending: deque = deque()                  # _WorkItem | _Feed, in submission order
        self.in_flight: dict[DistributedFuture, Any] = {}  # future -> ObjectRef
        self.broken: str | None = None
        self.settling = 0                              # finished tasks whose futures are being settled
        self.returned = 0                              # tasks that came back (for _may_burst)
        self.return_s = 0.0                            # moving average of the time they took
        self.on_idle: Callable | None = None

    def _may_burst(self) -> bool:
        """May more tasks than workers be handed out now (see OVERSUBSCRIBE)? Under the lock."""
        if self.returned < OVERSUBSCRIBE_AFTER:
            return False
        if not self.in_flight:
            return True
        oldest = next(iter(self.in_flight))
        guard = max(OVERSUBSCRIBE_GUARD_MIN_S, OVERSUBSCRIBE_GUARD_FACTOR * self.return_s)
        return time.monotonic() - oldest._sent_at < guard

    def broken_error(self) -> BaseException:
        return self.broken_cls(self.broken)

    def push(self, source) -> None:
        with self.lock:
            if self.broken is not None:
                raise self.broken_error()
            self.pending.append(source)
        self.pump()

    def pump(self) -> None:
        if self.broken is None and self.client.broken is not None:
            # Every unfinished future fails now (an earlier version dropped them from the
            # tables here without failing them: waiters on a dead cluster hung forever).
            self.break_(f"the farpool cluster was lost: {self.client.broken}")
            return
        failed = []
        with self.lock:
            while self.pending and self.broken is None:
                source = self.pending[0]
                limit = source.limit
                n = len(self.in_flight)
                if n >= limit.strict and (n >= limit.burst or not self._may_burst()):
                    break
                if isinstance(source, _Feed):
                    item = source.next_item()
                    if item is None:
                        self.pending.popleft()
                        continue
                else:
                    self.pending.popleft()
                    item = source
                    if item.future._state != _PENDING:  # cancelled while it waited here
                        continue
                try:
                    args = item.args
                    if item.deps:
                        args = tuple(_dependency(a) if isinstance(a, DistributedFuture) else a for a in args)
                    ref = item.remote.remote(self.authkey, *args)
                except BaseException as error:  # noqa: BLE001 - it belongs to that future
                    failed.append((item.future, error))
                    continue
                finally:
                    item.args = None  # drop the user's arguments now (they are pickled)
                future = item.future
                future._ref = ref
                future._sent_at = time.monotonic()
                self.in_flight[future] = ref
                self.client.add_done_callback(ref, _OnDone(self, future, item.chunk))
        for future, error in failed:
            if self.client.broken is not None:
                self.break_(f"the farpool cluster was lost: {self.client.broken}")
            else:
                future._set_exception_safe(error.error if isinstance(error, _DependencyFailed)
                                           else _pickling_error(error))
        if failed:
            self._notify()

    def _on_done(self, future: DistributedFuture, chunk: bool, ref) -> None:
        """A task finished (callback thread): refill first, then settle its future."""
        with self.lock:
            mine = self.in_flight.pop(future, None) is not None
            if mine:
                self.settling += 1
                took = time.monotonic() - future._sent_at
                # A short memory: the slow first tasks (workers starting) are soon forgotten.
                self.return_s = took if not self.returned else 0.75 * self.return_s + 0.25 * took
                self.returned += 1
        if mine:
            try:
                self.pump()
                if not future.done():
                    try:  # (a chunk's results may be unpickled by _fix_result)
                        value = _fix_result(self.client.value_of(ref, writable=True), chunk)  # copy-on-write
                    except BaseException as error:  # noqa: BLE001
                        if self.process_pool_errors and not isinstance(error, _exc.FarpoolError) \
                                and not self.client.has_failed(ref):  # the result would not unpickle
                            error = _not_loaded(error, "the result", future._name)
                        self._settle_error(future, error)
                    else:
                        future._set_result_safe(value)
            finally:
                with self.lock:
                    self.settling -= 1
        self._notify()

    def _settle_error(self, future: DistributedFuture, error: BaseException) -> None:
        if isinstance(error, _exc.TaskCancelledError):
            if not future._settle_cancelled():
                future._set_exception_safe(error)
        elif _is_initializer_error(error):
            what = "executor" if self.broken_cls is BrokenDistributedExecutor else "pool"
            self.break_(f"the initializer of this {what} raised in a worker, so the {what} is not usable "
                        f"anymore; fix the initializer. {_remote_text(error, 'the initializer')}")
            future._set_exception_safe(self.broken_error())
        elif self.client.broken is not None:
            self.break_(f"the farpool cluster was lost: {self.client.broken}")
            future._set_exception_safe(self.broken_error())
        else:
            error = _user_error(error, self.tb_cls, future._name)
            if self.process_pool_errors:
                error = _process_pool_error(error, future._name)
            future._set_exception_safe(error)

    def cancel(self, future: DistributedFuture) -> bool:
        with self.lock:
            if future._state != _PENDING:
                return future._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)
            ref = future._ref
        if ref is None:  # still waiting here: it never reaches a worker
            return future._settle_cancelled()
        if self.client.try_cancel(ref):
            return future._settle_cancelled()
        future._mark_running()
        return future.cancelled()

    def cancel_pending(self, keep_in_flight: int = 0) -> None:
        """What has not started never will; of the tasks in flight, the oldest ``keep_in_flight``
        go on (shutdown(cancel_futures=True): as the stdlib's work already handed to its workers)."""
        with self.lock:
            sources = list(self.pending)
            self.pending.clear()
            flying = list(self.in_flight)[keep_in_flight:]
        for source in sources:
            if isinstance(source, _Feed):
                source.close(concurrent.futures.CancelledError())
                for future in source.remaining_futures():
                    self.cancel(future)
            else:
                source.future._settle_cancelled()
        for future in flying:
            self.cancel(future)
        self._notify()

    def terminate(self, error_factory: Callable[[], BaseException], force: bool = True) -> None:
        """Stop everything now: queued work is dropped, running tasks are killed (interrupted)."""
        with self.lock:
            sources = list(self.pending)
            self.pending.clear()
            flying = dict(self.in_flight)
            self.in_flight.clear()
        for source in sources:
            if isinstance(source, _Feed):
                source.close(error_factory())
            else:
                source.future._set_exception_safe(error_factory())
        for future, ref in flying.items():
            try:
                self.client.cancel(ref, force, True)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass
            future._set_exception_safe(error_factory())
        self._notify()

    def _break_locked(self, reason: str) -> list:
        if self.broken is None:
            self.broken = reason  # raised from every future and later call, so not logged
        sources = list(self.pending)
        self.pending.clear()
        flying = dict(self.in_flight)
        self.in_flight.clear()
        return [sources, flying]

    def break_(self, reason: str) -> None:
        """Fail every unfinished future with the broken error; later pushes raise it."""
        with self.lock:
            sources, flying = self._break_locked(reason)
        for future, ref in flying.items():
            try:
                self.client.cancel(ref, False, True)
            except Exception:  # noqa: BLE001
                pass
            future._set_exception_safe(self.broken_error())
        for source in sources:
            if isinstance(source, _Feed):
                source.close(self.broken_error())
                for future in source.remaining_futures():
                    future._set_exception_safe(self.broken_error())
            else:
                source.future._set_exception_safe(self.broken_error())
        self._notify()

    def is_idle(self) -> bool:
        return not self.pending and not self.in_flight and not self.settling

    def _notify(self) -> None:
        with self.lock:
            if not self.is_idle():
                return
            self.idle.notify_all()
            on_idle, self.on_idle = self.on_idle, None
        if on_idle is not None:
            on_idle()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self.lock:
            return self.idle.wait_for(self.is_idle, timeout)

    def call_when_idle(self, fn: Callable) -> None:
        with self.lock:
            if not self.is_idle():
                self.on_idle = fn
                return
        fn()
