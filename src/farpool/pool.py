"""``Pool``: ``multiprocessing.pool.Pool`` over a farpool cluster.

The whole change for existing code is one import::

    from farpool import Pool          # instead of: from multiprocessing import Pool

Runs in the user's process on the threads that call it and on the core
client's one callback thread (where ``callback``/``error_callback`` run, as
they run on the stdlib pool's result-handler thread).  Built on the same
dispatcher as ``DistributedExecutor`` (see the _facade package): at most ``processes``
tasks in flight, each chunk of a map one task, handed to whichever worker is
free (no chunk is pinned to a worker).

How it differs from the stdlib (everything else matches ``multiprocessing.pool.Pool``):

* Workers start on demand; ``initializer(*initargs)`` runs once in every
  worker process serving this pool, before its first task (such pools get
  workers of their own), and ``maxtasksperchild`` replaces those processes.
  ``_processes`` and ``len(_pool)`` give ``processes``; the entries of
  ``_pool`` are placeholders, not processes.
* ``context`` is accepted and ignored.
* An exception raised by a ``callback`` is logged and later results still
  arrive (the stdlib's result thread dies and the pool hangs).  A worker
  killed mid-task is retried (``max_retries``) instead of hanging the pool;
  past the retries that task fails with ``farpool.WorkerCrashedError``.
* An initializer that raises breaks the pool: pending and later calls fail
  with ``BrokenPoolError`` (the stdlib restarts workers forever).
* ``imap``/``imap_unordered`` read their input as work is handed out (a
  bounded prefetch), not all at once; an iterator dropped before its end stops
  reading the input (tasks already handed out still run).
* After ``terminate()``, results still pending fail with
  ``farpool.TaskCancelledError`` instead of never completing.
* Results are serialized with cloudpickle when plain pickle cannot, so a
  lambda returned by a task arrives instead of raising ``MaybeEncodingError``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import multiprocessing.pool as _mpp
import threading
import time
import types
import warnings
import weakref
from collections import deque
from typing import Any, Callable, Iterable

from farpool import exceptions as _exc
from farpool._facade import (DistributedFuture, _ClusterHold, _Dispatcher, _feasible, _Feed, _in_flight_limit,
                             _open_facade, _task_name, _TaskMaker, _WorkItem)
from farpool._facade.errors import _user_error
from farpool._facade.tasks import _ChunkFailed, _Grouped

log = logging.getLogger(__name__)

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator", "IMapUnorderedIterator",
           "BrokenPoolError"]

INIT, RUN, CLOSE, TERMINATE = _mpp.INIT, _mpp.RUN, _mpp.CLOSE, _mpp.TERMINATE

_job_counter = itertools.count()


def _start_worker() -> None:
    """A pool's first task in each of its workers (see Pool._start_workers); the worker ran
    the initializer before it."""


class BrokenPoolError(_exc.FarpoolError):
    """The pool cannot run anything more: its initializer raised, or the cluster was lost."""


BrokenPoolError.__module__ = "farpool.pool"


def _pool_error(error: BaseException) -> BaseException:
    """A result that could not be pickled is a ``MaybeEncodingError``, as in the stdlib."""
    from farpool._private import protocol
    if isinstance(error, protocol.SerializationError) and "the result of" in str(error):
        return _mpp.MaybeEncodingError(error, "<the result, which could not be pickled>")
    return error


def _outcome(future: concurrent.futures.Future) -> tuple[bool, Any]:
    """(success, value or error) of a finished future."""
    try:
        return True, future.result(timeout=0)
    except BaseException as error:  # noqa: BLE001 - it is the task's outcome
        return False, _pool_error(error)


def _chunk_values(future: concurrent.futures.Future) -> list:
    """The results of a finished chunk task; raises its error."""
    ok, value = _outcome(future)
    if not ok:
        raise value
    return value


class _ItemError:
    """In an imap iterator's queue: the error of a chunk of a grouped task, raised at its place."""
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _items_of(future, tb_cls) -> list:
    """The items of a finished imap task, in order; a chunk of a group that failed leaves one
    ``_ItemError`` in its place, the error its own task would have raised.  Raises the task's error."""
    value = _chunk_values(future)
    if type(value) is not _Grouped:
        return value
    items: list = []
    for part in value:
        if type(part) is _ChunkFailed:
            error = _exc.TaskError.wrap(future._name, part.text, part.error, part.type_name, part.where)
            items.append(_ItemError(_pool_error(_user_error(error, tb_cls, future._name))))
        else:
            items.extend(part)  # (made writable where needed by _fix_result, on the callback thread)
    return items


def _inputs(iterable: Iterable):
    """What a map's feed reads: a list itself (sliced as work is handed out), else an iterator."""
    return iterable if type(iterable) is list else iter(iterable)


def _weak(method: Callable) -> Callable:
    """A callable that calls a bound method without keeping its object alive."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        if bound is not None:
            bound(*args)
    return call


def _run_user_callback(fn: Callable, value, what: str) -> None:
    try:
        fn(value)
    except Exception:
        log.exception("the %s of a farpool Pool task raised; the pool goes on (later results still arrive)",
                      what)


class ApplyResult:
    """The result of ``apply_async``: ``get``, ``wait``, ``ready``, ``successful``, as in the stdlib."""

    def __init__(self, pool: "Pool", callback: Callable | None, error_callback: Callable | None):
        self._pool = pool
        self._event = threading.Event()
        self._job = next(_job_counter)
        self._cache = pool._cache
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None
        self._cache[self._job] = self

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("{0!r} not ready".format(self))
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None):
        """The value, or raises the task's exception; ``multiprocessing.TimeoutError`` after ``timeout`` s."""
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, i: int, obj: tuple[bool, Any]) -> None:
        self._success, self._value = obj
        if self._callback and self._success:
            _run_user_callback(self._callback, self._value, "callback")
        if self._error_callback and not self._success:
            _run_user_callback(self._error_callback, self._value, "error_callback")
        self._event.set()
        self._cache.pop(self._job, None)
        self._pool = None

    __class_getitem__ = classmethod(types.GenericAlias)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: ready once every chunk has finished."""

    def __init__(self, pool: "Pool", chunksize: int, length: int, callback, error_callback):
        super().__init__(pool, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._lock = threading.Lock()
        self._created = 0
        self._left = 0
        self._inputs_done = False
        self._completed = False
        self._client = pool._dispatcher.client
        if chunksize <= 0:
            self._number_left = 0
            self._event.set()
            self._cache.pop(self._job, None)

    # called by the feed, under the dispatcher's lock
    def _on_future(self, future: DistributedFuture, n: int) -> None:
        with self._lock:
            index = self._created
            self._created += 1
            self._left += 1
        future.add_done_callback(lambda f, i=index: self._chunk_done(i, f))

    def _on_finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._inputs_done = True
            if error is not None and self._success:
                self._success, self._value = False, error
            complete = self._left == 0 and not self._completed
            self._completed |= complete
        if complete:  # run the user's callback on the callback thread, not under the dispatcher's lock
            self._client.run_callback(self._complete)

    def _chunk_done(self, i: int, future) -> None:
        ok, value = _outcome(future)
        with self._lock:
            self._left -= 1
            if ok and self._success:
                self._value[i * self._chunksize:(i + 1) * self._chunksize] = value
            elif not ok and self._success:
                self._success, self._value = False, value
            complete = self._inputs_done and self._left == 0 and not self._completed
            self._completed |= complete
        if complete:
            self._complete()

    def _complete(self) -> None:
        if self._success:
            if self._callback:
                _run_user_callback(self._callback, self._value, "callback")
        elif self._error_callback:
            _run_user_callback(self._error_callback, self._value, "error_callback")
        self._event.set()
        self._cache.pop(self._job, None)
        self._pool = None


def _unwrap(item):
    """An item of a chunk's results: its value, or its error raised."""
    if type(item) is _ItemError:
        raise item.error
    return item


class _ItemsIterator:
    """What both imap iterators share: ``self._items`` (a deque of results already here) and
    ``next()`` (which waits for more)."""

    def __next__(self):
        """``next(it)``: an item already here without the lock (a deque pops atomically), else ``next()``."""
        try:
            item = self._items.popleft()
        except IndexError:
            return self.next()
        return _unwrap(item)


class IMapIterator(_ItemsIterator):
    """The iterator ``imap`` returns: results in input order; ``next(timeout)`` as in the stdlib."""

    def __init__(self, pool: "Pool", feed: _Feed):
        self._pool = pool
        self._feed = feed
        self._tb_cls = pool._dispatcher.tb_cls
        self._items: deque = deque()
        self._current: DistributedFuture | None = None
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def __del__(self):
        # Dropped before its end: stop reading the input (an endless one would run forever).
        feed = getattr(self, "_feed", None)
        if feed is not None:
            feed.close()

    def next(self, timeout: float | None = None):
        with self._lock:
            end = None if timeout is None else time.monotonic() + timeout
            while not self._items:
                if self._current is None:
                    try:
                        self._current = self._feed.next_future(end)
                    except TimeoutError:
                        raise multiprocessing.TimeoutError from None
                    if self._current is None:
                        self._pool = None
                        raise StopIteration
                future = self._current
                try:
                    future.exception(None if end is None else max(0.0, end - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    raise multiprocessing.TimeoutError from None
                except concurrent.futures.CancelledError:
                    pass
                self._current = None
                self._items.extend(_items_of(future, self._tb_cls))
            return _unwrap(self._items.popleft())


class IMapUnorderedIterator(_ItemsIterator):
    """The iterator ``imap_unordered`` returns: chunks' results as they finish."""

    def __init__(self, pool: "Pool"):
        self._pool = pool
        self._tb_cls = pool._dispatcher.tb_cls
        self._cond = threading.Condition(threading.Lock())
        self._finished: deque = deque()
        self._created = 0
        self._delivered = 0
        self._inputs_done = False
        self._error: BaseException | None = None
        self._items: deque = deque()
        self._feed: _Feed | None = None

    def __del__(self):
        # Dropped before its end: stop reading the input (an endless one would run forever).
        feed = getattr(self, "_feed", None)
        if feed is not None:
            feed.close()

    def _on_future(self, future: DistributedFuture, n: int) -> None:
        with self._cond:
            self._created += 1
        future.add_done_callback(_weak(self._chunk_done))

    def _chunk_done(self, future) -> None:
        with self._cond:
            self._finished.append(future)
            self._cond.notify_all()

    def _on_finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._inputs_done = True
            self._error = error
            self._cond.notify_all()

    def __iter__(self):
        return self

    def _exhausted(self) -> bool:
        return self._inputs_done and self._delivered == self._created

    def next(self, timeout: float | None = None):
        while not self._items:
            with self._cond:
                if not self._cond.wait_for(lambda: self._finished or self._exhausted(), timeout):
                    raise multiprocessing.TimeoutError
                if not self._finished:
                    error, self._error = self._error, None
                    if error is not None:
                        raise error
                    self._pool = None
                    raise StopIteration
                future = self._finished.popleft()
                self._delivered += 1
            self._items.extend(_items_of(future, self._tb_cls))
        return _unwrap(self._items.popleft())


class _WorkerSlot:
    """An entry of ``Pool._pool``: farpool's workers are not the pool's own processes."""
    pid = None
    exitcode = None
    name = "farpool-worker"

    def __init__(self, pool: "Pool"):
        self._pool = pool

    def is_alive(self) -> bool:
        return self._pool._state == RUN


class Pool:
    """``multiprocessing.pool.Pool`` over a farpool cluster (see the module docstring).

    Args:
        processes: tasks in flight at most (default: the cluster's CPUs).
        initializer, initargs: run once in every worker process serving this pool.
        maxtasksperchild: replace each worker process after this many tasks.
        context: accepted for compatibility and ignored.
        address: the cluster to join when none is initialized; by default an
            embedded cluster is started and shared by every facade until the
            last one is closed and joined, or terminated.
        num_cpus, num_gpus, memory, resources: resources one task holds.
        max_retries: retries of a task whose worker process died.

    Thread-safe: its methods may be called from any thread.
    """

    def __init__(self, processes: int | None = None, initializer: Callable | None = None, initargs: Iterable = (),
                 maxtasksperchild: int | None = None, context=None, *, address: str | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, memory: float | None = None,
                 resources: dict | None = None, max_retries: int = 3):
        self._state = INIT
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if isinstance(maxtasksperchild, bool) or not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')
        hints = {"num_cpus": num_cpus, "num_gpus": num_gpus, "memory": memory, "resources": resources,
                 "max_retries": max_retries}
        client, nodes, processes, pool_key = _open_facade(
            "pool", address, hints, processes, initializer, initargs, maxtasksperchild)
        self._hold = _ClusterHold(client)
        self._processes = processes
        self._pool = [_WorkerSlot(self) for _ in range(processes)]
        self._cache: dict = {}
        self._dispatcher = _Dispatcher(client, tb_cls=_mpp.RemoteTraceback, broken_cls=BrokenPoolError)
        self._tasks = _TaskMaker(hints, pool_key)
        self._limit = _in_flight_limit(processes, hints, nodes)
        self._infeasible = _feasible(hints, nodes) if getattr(client, "embedded", False) else None
        self._state = RUN
        if initializer is not None:
            self._start_workers()

    def _start_workers(self) -> None:
        """As the stdlib's pool starts its processes at once, each running the initializer: an
        empty task for each worker the pool may use at once, so that they start (and run the
        initializer) before any work arrives.  An initializer that raises breaks the pool, as
        at a first task."""
        for _ in range(self._limit.strict):
            future = DistributedFuture(self._dispatcher)
            future._name = "the pool's initializer"
            self._dispatcher.push(_WorkItem(future, self._tasks.call(_start_worker), (_start_worker, ()),
                                            self._limit))

    # -- state -------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _check_submit(self) -> None:
        self._check_running()
        if self._dispatcher.broken is not None:
            raise self._dispatcher.broken_error()
        if self._infeasible is not None:
            raise _exc.InfeasibleError(self._infeasible)

    def __reduce__(self):
        raise NotImplementedError('pool objects cannot be passed between processes or pickled')

    def __repr__(self) -> str:
        cls = self.__class__
        return (f'<{cls.__module__}.{cls.__qualname__} state={self._state} '
                f'pool_size={len(getattr(self, "_pool", ()))}>')

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def close(self) -> None:
        """No more work is accepted; what was submitted still runs."""
        if self._state == RUN:
            self._state = CLOSE
            self._dispatcher.call_when_idle(self._hold.release)

    def terminate(self) -> None:
        """Stop now: queued work is dropped, running tasks are killed, pending results fail."""
        if self._state == INIT:
            return
        self._state = TERMINATE
        self._dispatcher.terminate(
            lambda: _exc.TaskCancelledError("the farpool Pool was terminated before this task finished"))
        self._hold.release()

    def join(self) -> None:
        """Wait for the submitted work to finish (after ``close()`` or ``terminate()``)."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._dispatcher.wait_idle()
        self._hold.release()

    # -- work --------------------------------------------------------------
    def apply(self, func: Callable, args: Iterable = (), kwds: dict = {}):
        """``func(*args, **kwds)`` in the pool; waits for and returns the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict = {}, callback: Callable | None = None,
                    error_callback: Callable | None = None) -> ApplyResult:
        """``func(*args, **kwds)`` in the pool; returns an ``AsyncResult``."""
        self._check_submit()
        result = ApplyResult(self, callback, error_callback)
        future = DistributedFuture(self._dispatcher)
        future._name = _task_name(func)
        future.add_done_callback(lambda f: result._set(0, _outcome(f)))
        kwds = dict(kwds)
        item = _WorkItem(future, self._tasks.call(func), (func, tuple(kwds), *tuple(args), *kwds.values()),
                         self._limit)
        try:
            self._dispatcher.push(item)
        except BaseException:
            self._cache.pop(result._job, None)
            raise
        return result

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """``[func(x) for x in iterable]`` in chunks, in order."""
        return self._map_async(func, iterable, False, chunksize).get()

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """``[func(*args) for args in iterable]`` in chunks, in order."""
        return self._map_async(func, iterable, True, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, star: bool, chunksize=None, callback=None, error_callback=None):
        self._check_submit()
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), len(self._pool) * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        result = MapResult(self, chunksize, len(iterable), callback, error_callback)
        if chunksize > 0:
            feed = _Feed(self._dispatcher, self._tasks.chunk(func), func, _inputs(iterable), chunksize, star,
                         self._limit, on_future=result._on_future, on_finish=result._on_finish,
                         keep_futures=False)
            try:
                self._dispatcher.push(feed)
            except BaseException:
                self._cache.pop(result._job, None)
                raise
        return result

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        """Results in input order as they come; the input is read as work is handed out."""
        self._check_submit()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        feed = _Feed(self._dispatcher, self._tasks.chunk(func), func, _inputs(iterable), chunksize, False,
                     self._limit, grouped=self._tasks.chunks(func))
        self._dispatcher.push(feed)
        return IMapIterator(self, feed)

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapUnorderedIterator:
        """Results in the order they finish; the input is read as work is handed out."""
        self._check_submit()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        result = IMapUnorderedIterator(self)
        feed = _Feed(self._dispatcher, self._tasks.chunk(func), func, _inputs(iterable), chunksize, False,
                     self._limit, on_future=_weak(result._on_future), on_finish=_weak(result._on_finish),
                     keep_futures=False, grouped=self._tasks.chunks(func))
        result._feed = feed
        self._dispatcher.push(feed)
        return result


Pool.__module__ = "farpool"
