"""``DistributedExecutor``: ``concurrent.futures.ProcessPoolExecutor`` over a farpool cluster.

The whole change for existing code is one import::

    from farpool import DistributedExecutor as ProcessPoolExecutor

Runs in the user's process, on the threads that call it and on the core
client's one callback thread; it owns no thread, socket or process of its own.
The dispatcher, the map feeds and the task functions it submits with are the
facades' shared machinery (the ``_facade`` package, whose opening docstring also shows the data flow);
this module is the ``Executor`` interface over them.

How it differs from the stdlib (everything else matches ``ProcessPoolExecutor``):

* ``mp_context`` is accepted and ignored.  ``max_workers`` caps how many tasks
  run at once (default: the cluster's CPUs), not a number of processes of its
  own; the workers are the cluster's.
* A future is RUNNING once its task was dispatched to a worker, so
  ``cancel()`` returning True means the function never runs.  Work beyond
  ``max_workers`` waits in this process; its ``object_ref`` is None until it
  is handed to the runtime.
* A worker that dies is retried (``max_retries``); after that only its future
  fails, with a ``farpool.WorkerCrashedError`` that is also a
  ``BrokenProcessPool``, and the executor goes on.  So does a task whose
  arguments (in the worker) or result (here) do not unpickle: its future
  fails with the unpickling error, also a ``BrokenProcessPool``.  A result
  that does not pickle fails with its own error, as the stdlib's does.
  ``BrokenDistributedExecutor`` (a ``BrokenProcessPool``) is for an
  initializer that raised or a lost cluster: the whole executor is broken.
* ``shutdown(cancel_futures=True)`` lets the tasks already handed to the
  runtime (at most ``max_workers``) finish, as the stdlib lets those it handed
  to its workers, and cancels the rest.
* ``map`` reads its inputs as work is handed out (a bounded prefetch), not all
  at once; an exception raised by the input iterator is raised when its item
  is reached (from ``map()`` itself when that happens at once).  A numpy array
  of at least ``_facade.dispatcher.SHARE_MIN_BYTES`` (1 MiB) passed to many calls of one
  ``map`` is stored once; an ``ObjectRef`` passed as an argument is resolved to
  its value.
* ``options(num_gpus=1, ...)`` returns a view of the same executor that submits
  with other resource hints.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import threading
import time
import weakref
from typing import Callable, Iterable, Iterator

from farpool import exceptions as _exc
from farpool._facade import (BrokenDistributedExecutor, DistributedFuture, _ClusterHold, _Dispatcher, _feasible,
                             _Feed, _in_flight_limit, _open_facade, _task_name, _TaskMaker, _WorkItem)

__all__ = ["DistributedExecutor", "DistributedFuture", "BrokenDistributedExecutor"]

# Hints accepted by DistributedExecutor(...) and .options(...).
_HINTS = ("num_cpus", "num_gpus", "memory", "resources", "max_retries", "scheduling_strategy")


class _MapResults(itertools.chain):
    """What ``map`` returns: its results in input order, item by item in C (a chain over each
    chunk's items: no Python frame per item, as a generator had, which cost a map of tiny
    items a tenth of its time); ``close()`` as the stdlib's generator: nothing more comes, the
    feed stops, its futures are cancelled."""

    def close(self) -> None:
        self._turns[0].clear()  # the current chunk's remaining pops: the chain moves on ...
        self._chunks.close()    # ... to a closed generator of chunks


def _ordered_results(feed: _Feed, end_time: float | None, convert: Callable | None = None) -> _MapResults:
    turns = [[]]
    chunks = _ordered_chunks(feed, end_time, convert, turns)
    results = _MapResults.from_iterable(chunks)
    results._chunks, results._turns = chunks, turns
    return results


def _ordered_chunks(feed: _Feed, end_time: float | None, convert: Callable | None, turns: list):
    """Each chunk's results as an iterator over its items, in input order (the stdlib's map
    result iterator, a chunk at a time); ``turns[0]``: the current one's remaining pops."""
    try:
        while True:
            future = feed.next_future(end_time)
            if future is None:
                return
            try:
                if end_time is None:
                    chunk = future.result()
                else:
                    chunk = future.result(end_time - time.monotonic())
            finally:
                future.cancel()
            del future  # (it holds the chunk too)
            if convert is not None:
                chunk = convert(chunk)
            # Item by item off the list, as the stdlib does: an item the caller let go of is
            # freed at once, not kept by this iterator until the chunk is done (CPython issue 14406).
            chunk.reverse()
            turns[0] = [-1] * len(chunk)
            yield map(chunk.pop, turns[0])
            del chunk
    finally:
        feed.close()
        for future in feed.remaining_futures():
            future.cancel()


# ---------------------------------------------------------------------------- the executor
_interpreter_exiting = False
# Every executor's dispatcher, for _python_exit (weak: an executor nobody uses any more, with
# nothing in flight, is not waited for).
_dispatchers: "weakref.WeakSet[_Dispatcher]" = weakref.WeakSet()


def _python_exit() -> None:
    """At interpreter exit (before atexit's farpool.shutdown), as the stdlib's executors do:
    no new work, and the work already submitted runs to the end (shutdown(wait=False) too)."""
    global _interpreter_exiting
    _interpreter_exiting = True
    from farpool._private import object_ref
    for dispatcher in list(_dispatchers):
        # Only on the cluster still connected: work on a lost one has failed (or is failing) already.
        if dispatcher.client is object_ref.current() and dispatcher.client.broken is None:
            dispatcher.wait_idle()


threading._register_atexit(_python_exit)


class _ExecutorState:
    """What an executor and its ``options()`` views share."""

    def __init__(self, dispatcher: _Dispatcher, pool_key: str | None, nodes: list, embedded: bool):
        self.dispatcher = dispatcher
        self.pool_key = pool_key
        self.nodes = nodes
        self.embedded = embedded
        # Held while submitting (as the stdlib's shutdown lock); re-entrant because
        # pickling user arguments may run user code that submits too.
        self.lock = threading.RLock()
        self.shutdown = False
        self.hold = _ClusterHold(dispatcher.client)


class DistributedExecutor(concurrent.futures.Executor):
    """``concurrent.futures.ProcessPoolExecutor`` over a farpool cluster (see the module docstring).

    Args:
        max_workers: tasks in flight at most (default: the cluster's CPUs).
        mp_context: accepted for compatibility and ignored.
        initializer, initargs: run once in every worker process serving this
            executor, before its first task (such executors get workers of
            their own).  If it raises, the executor is broken.
        max_tasks_per_child: replace each worker process after this many tasks.
        address: the cluster to join when none is initialized ("auto",
            "HOST:PORT"); by default an embedded cluster is started and shared
            by every facade until the last one shuts down.
        num_cpus, num_gpus, memory, resources: resources one task holds.
        max_retries: retries of a task whose worker process died.

    Thread-safe: submit, map, cancel and shutdown may be called from any thread.
    """

    def __init__(self, max_workers: int | None = None, mp_context=None, initializer: Callable | None = None,
                 initargs: tuple = (), *, max_tasks_per_child: int | None = None, address: str | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, memory: float | None = None,
                 resources: dict | None = None, max_retries: int = 3):
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int or None, got {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        hints = {"num_cpus": num_cpus, "num_gpus": num_gpus, "memory": memory, "resources": resources,
                 "max_retries": max_retries}
        client, nodes, max_workers, pool_key = _open_facade(
            "executor", address, hints, max_workers, initializer, initargs, max_tasks_per_child)
        self._max_workers = max_workers
        self._state = _ExecutorState(_Dispatcher(client, process_pool_errors=True), pool_key, nodes,
                                     bool(getattr(client, "embedded", False)))
        _dispatchers.add(self._state.dispatcher)
        self._set_hints(hints)

    # -- resource hints -----------------------------------------------------
    def _set_hints(self, hints: dict) -> None:
        self._hints = hints
        self._tasks = _TaskMaker(hints, self._state.pool_key)
        self._infeasible = _feasible(hints, self._state.nodes) if self._state.embedded else None
        self._limit = _in_flight_limit(self._max_workers, hints, self._state.nodes)

    def options(self, **hints) -> "DistributedExecutor":
        """The same executor (shared queue, ``max_workers`` and shutdown) submitting with other hints.

        Accepts ``num_cpus``, ``num_gpus``, ``memory``, ``resources``,
        ``max_retries`` and ``scheduling_strategy``.
        """
        unknown = sorted(set(hints) - set(_HINTS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; DistributedExecutor.options() takes "
                            f"{', '.join(_HINTS)}")
        view = copy.copy(self)
        view._set_hints({**self._hints, **hints})
        return view

    # -- the Executor interface --------------------------------------------
    def _check_open(self) -> None:
        state = self._state
        if state.dispatcher.broken is not None:
            raise state.dispatcher.broken_error()
        if state.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._infeasible is not None:
            raise _exc.InfeasibleError(self._infeasible)

    def submit(self, fn: Callable, /, *args, **kwargs) -> DistributedFuture:
        """Schedule ``fn(*args, **kwargs)``; returns a ``DistributedFuture``."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {type(fn).__name__}")
        with self._state.lock:
            self._check_open()
            dispatcher = self._state.dispatcher
            future = DistributedFuture(dispatcher)
            future._name = _task_name(fn)
            values = args + tuple(kwargs.values()) if kwargs else args
            # Futures among the arguments are resolved to their values before fn runs (dispatcher)
            deps = any(isinstance(v, DistributedFuture) for v in values)
            item = _WorkItem(future, self._tasks.call(fn), (fn, tuple(kwargs), *values),
                             self._limit, deps=deps)
            dispatcher.push(item)
        return future

    submit.__doc__ = concurrent.futures.Executor.submit.__doc__

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:
        """Like ``ProcessPoolExecutor.map``; inputs are read as work is handed out."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        # One iterable: its items go as they are (no 1-tuples to pickle and unpack); a list
        # is sliced as work is handed out (see _Feed).
        star = len(iterables) != 1
        if star:
            iterator = zip(*iterables)
        else:
            iterator = iterables[0] if type(iterables[0]) is list else iter(iterables[0])
        with self._state.lock:
            self._check_open()
            dispatcher = self._state.dispatcher
            feed = _Feed(dispatcher, self._tasks.chunk(fn), fn, iterator, chunksize, star,
                         self._limit)
            dispatcher.push(feed)
        with feed.cond:
            error, feed.error = feed.error, None
        if error is not None:  # the inputs raised while the first tasks were handed out
            raise error
        return _ordered_results(feed, end_time)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Like the stdlib's; the cluster a facade started ends with the last facade."""
        state = self._state
        with state.lock:
            state.shutdown = True
        if cancel_futures:
            # The tasks already handed to the runtime (up to max_workers) go on, as those the
            # stdlib already handed to its workers do; the rest is cancelled.
            state.dispatcher.cancel_pending(keep_in_flight=self._max_workers)
        if wait:
            state.dispatcher.wait_idle()
            state.hold.release()
        else:
            state.dispatcher.call_when_idle(state.hold.release)

    def __repr__(self) -> str:
        state = "shutdown" if self._state.shutdown else "running"
        if self._state.dispatcher.broken is not None:
            state = "broken"
        return (f"<farpool.DistributedExecutor {state} max_workers={self._max_workers} "
                f"in_flight={len(self._state.dispatcher.in_flight)}>")


DistributedExecutor.__module__ = "farpool"