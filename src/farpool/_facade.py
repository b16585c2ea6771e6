"""What the three facades share: ``DistributedExecutor`` (executor.py), ``Pool`` (pool.py) and joblib's backend.

Owns the dispatcher that keeps a bounded number of tasks in flight, the work
items and the map feeds that read inputs lazily (sharing big arrays once per
call), the task functions that run them in the workers, the translation of
remote errors into the user's own exceptions, and the reference count of the
cluster the facades start.  Runs in the user's process, on the threads that
call a facade and on the core client's one callback thread; it owns no thread,
socket or process of its own.  Only the facades import it::

    submit() / map() / Pool.apply_async() / imap() / joblib's submit() ...
        |
        v
    _Dispatcher.pending: work items and lazy _Feeds (map inputs, read on demand)
        |  pump(): a bounded number of tasks in flight (max_workers)
        v
    farpool task `_call` / `_run_chunk` --> ObjectRef
        |  CoreClient.add_done_callback: the client's one callback thread
        v
    _Dispatcher._on_done: pump the next item, then settle the future
                          (the user's done-callbacks run here, on that thread)

The task functions (``_call``, ``_run_chunk``, ``_run_initializer``) and the
markers that travel with tasks (``_Shared``, ``_AuthKey``) are pickled by
reference: workers import them from this module.  ``DistributedFuture`` and
``BrokenDistributedExecutor`` are defined here because the dispatcher makes
them for every facade; they are public as ``farpool.executor.*``, which is
where pickle and tracebacks name them.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures._base as _futures_base
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, NamedTuple

import farpool
from farpool import exceptions as _exc

log = logging.getLogger(__name__)

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
# Task names (shown in errors and the timeline) are cached per function name;
# more entries cost memory, fewer cost an options() rebuild per submit.
REMOTE_CACHE_SIZE = 256

_PENDING = _futures_base.PENDING
_RUNNING = _futures_base.RUNNING
_CANCELLED = _futures_base.CANCELLED
_CANCELLED_AND_NOTIFIED = _futures_base.CANCELLED_AND_NOTIFIED


# ---------------------------------------------------------------------------- the shared cluster
_cluster_lock = threading.RLock()
_cluster_client = None      # the client the facades' count is about
_cluster_users = 0          # facades using it
_cluster_started = False    # a facade started it, so the last facade stops it
_cluster_timer: threading.Timer | None = None


def _in_worker() -> bool:
    return os.environ.get("FARPOOL_WORKER") == "1"


@contextlib.contextmanager
def _blocked_while_waiting():
    """Inside a task: tell the node agent this worker waits, so its CPU is lent (nested work cannot deadlock).

    The native ``farpool.get`` does this itself; the facades wait on futures instead.
    """
    from farpool._private import object_ref
    client = object_ref.current() if _in_worker() else None
    if client is None:
        yield
        return
    client.set_blocked(True)
    try:
        yield
    finally:
        client.set_blocked(False)


def _acquire_cluster(address: str | None = None):
    """Join the current cluster, or start the embedded one; returns the CoreClient.

    A cluster started here is shared by every facade and ends with the last
    ``_release_cluster``; one the user started (``farpool.init``) is left
    alone.  Any thread.
    """
    global _cluster_client, _cluster_users, _cluster_started, _cluster_timer
    from farpool._private import object_ref
    with _cluster_lock:
        if _cluster_timer is not None:
            _cluster_timer.cancel()
            _cluster_timer = None
        started = False
        if not farpool.is_initialized():
            farpool.init(address=address)
            started = not _in_worker()  # inside a task: the task's cluster, never ours to stop
        client = object_ref.current()
        if client is None:  # the user shut it down concurrently
            raise _exc.FarpoolError("farpool was shut down while a facade was starting; create it again")
        if client is not _cluster_client:  # a new cluster: facades of an earlier one no longer count
            _cluster_client, _cluster_users, _cluster_started = client, 0, started
        _cluster_users += 1
        return client


def _release_cluster(client, linger_s: float = 0.0) -> None:
    """Drop one facade's use of ``client``'s cluster; the last one stops a cluster the facades started.

    With ``linger_s``, the stop waits that long for another facade to come
    (joblib starts and ends its backend for every ``Parallel`` call).
    """
    global _cluster_users, _cluster_timer
    with _cluster_lock:
        if client is not _cluster_client:  # that cluster is gone already
            return
        _cluster_users = max(0, _cluster_users - 1)
        if _cluster_users or not _cluster_started:
            return
        if linger_s > 0:
            if _cluster_timer is None:
                _cluster_timer = threading.Timer(linger_s, _stop_idle_cluster)
                _cluster_timer.daemon = True
                _cluster_timer.name = "farpool-facade-linger"
                _cluster_timer.start()
            return
        _stop_idle_cluster()


class _ClusterHold:
    """One facade's use of the shared cluster (joined by ``_open_facade``); let go of once, from any thread."""

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            _release_cluster(self.client)


def _stop_idle_cluster() -> None:
    global _cluster_client, _cluster_started, _cluster_timer
    from farpool._private import object_ref
    with _cluster_lock:
        _cluster_timer = None
        if _cluster_users or not _cluster_started:
            return
        client, _cluster_client, _cluster_started = _cluster_client, None, False
        if object_ref.current() is client:
            log.info("stopping the embedded farpool cluster: the last facade using it shut down")
            try:
                farpool.shutdown()
            except OSError as error:  # a client whose I/O thread already died; nothing more to stop here
                log.warning("stopping the farpool cluster the facades started failed: %r", error)


# ---------------------------------------------------------------------------- in the worker
class _Shared:
    """Marks an argument that travels as the task's ``index``-th top-level ref argument."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (_Shared, (self.index,))


# Types that never need a look (the per-item fast path of maps).
_PLAIN = frozenset({int, float, str, bytes, bool, complex, type(None), tuple, list, dict})


def _all_plain(values) -> bool:
    """True if no value needs a look (the per-item fast path, at C speed)."""
    return set(map(type, values)) <= _PLAIN


def _writable(value):
    """The stdlib hands tasks and callers fresh, writable arrays: so do we (copy read-only ones)."""
    if type(value) in _PLAIN or type(value).__name__ != "ndarray":
        return value
    return value if value.flags.writeable else value.copy()


def _adopt_authkey(authkey: bytes | None) -> None:
    """Take the submitter's multiprocessing authkey, as a child process of the stdlib's pools does.

    ``multiprocessing.Manager`` proxies passed to tasks authenticate with it.
    """
    if authkey is not None:
        process = multiprocessing.current_process()
        if process.authkey != authkey:
            process.authkey = authkey


def _call(authkey: bytes | None, fn, kwnames: tuple, *values):
    """The task behind ``submit``/``apply_async``: ``values`` are the positional
    arguments then the keyword values, all top level so that refs among them
    are resolved by the runtime."""
    _adopt_authkey(authkey)
    if kwnames:
        n = len(values) - len(kwnames)
        args = [_writable(v) for v in values[:n]]
        kwargs = {k: _writable(v) for k, v in zip(kwnames, values[n:])}
        return fn(*args, **kwargs)
    return fn(*[_writable(v) for v in values])


def _restore(value, shared: tuple):
    return _writable(shared[value.index] if type(value) is _Shared else value)


def _pack_plain(chunk: list) -> tuple[bool, bytes] | None:
    """(plain, the chunk pickled) when pickling finds no ObjectRef and no large buffer in it
    (nothing to share or resolve): a look at every item's type costs as much as the pickling.
    ``plain`` is False when an array might be inside (the worker then makes arrays writable)."""
    from farpool._private import object_ref
    from farpool._private import protocol
    if protocol._main_is_interactive():
        return None  # values of __main__ travel by value (cloudpickle): the general path
    refs: list = []
    large: list = []
    try:
        with object_ref.collecting(refs):
            data = protocol.pickle.dumps(chunk, protocol=5, buffer_callback=protocol._oob_filter(large))
    except Exception:  # noqa: BLE001 - e.g. a lambda among the items: the general path says why
        return None
    if refs or large:
        return None
    # Every pickled ndarray names a numpy function: without the name there is no array.
    return b"numpy" not in data, data


def _run_chunk(authkey: bytes | None, fn, star: bool, plain: bool, chunk, *shared):
    """The task behind map-like calls: ``fn`` over a chunk of items (argument tuples if ``star``).

    ``chunk`` is a list, or the list pickled by the submitter (_pack_plain).  ``plain``:
    the submitter found only plain values in it (nothing to restore, no need to look
    again).  ``shared`` are the values of the refs that the chunk's ``_Shared`` markers
    point at.
    """
    _adopt_authkey(authkey)
    if type(chunk) is bytes:
        chunk = pickle.loads(chunk)
    if star:
        if plain:
            return list(itertools.starmap(fn, chunk))
        return [fn(*[_restore(a, shared) for a in args]) for args in chunk]
    if plain:
        return list(map(fn, chunk))
    return [fn(x if type(x) in _PLAIN else _restore(x, shared)) for x in chunk]


def _run_initializer(authkey: bytes | None, payload: bytes) -> None:
    """A facade's initializer, in the worker: the authkey first, then ``initializer(*initargs)``.

    The pair travels pickled so that Manager proxies among ``initargs`` are
    rebuilt only once the authkey is in place.
    """
    from farpool._private import protocol
    _adopt_authkey(authkey)
    initializer, initargs = protocol.loads(payload)
    initializer(*initargs)


def _submitter_authkey() -> bytes:
    return bytes(multiprocessing.current_process().authkey)


def _adopted_authkey(authkey: bytes) -> bytes:
    _adopt_authkey(authkey)
    return authkey


class _AuthKey:
    """The submitter's authkey as a task's first argument: adopted while the arguments are unpickled.

    Pickle rebuilds a tuple's items in order, so Manager proxies among the
    later arguments find the authkey in place when they reconnect.
    """
    __slots__ = ("key",)

    def __init__(self, key: bytes):
        self.key = key

    def __reduce__(self):
        return (_adopted_authkey, (self.key,))


def _open_facade(kind: str, address, hints: dict, workers, initializer, initargs, max_tasks):
    """What every facade does first: validate hints, join or start the cluster, size the
    facade (default: the cluster's CPUs) and, with an initializer or a task limit, get
    workers of its own.  Returns (client, nodes, workers, pool_key)."""
    # Validate the hints before starting anything (raises the runtime's own messages).
    farpool.remote(_call).options(**{k: v for k, v in hints.items() if v is not None})
    client = _acquire_cluster(address)
    try:
        nodes = farpool.nodes()
        if workers is None:
            cpus = sum(n["resources_total"].get("CPU", 0.0) for n in nodes if n.get("alive"))
            workers = max(1, int(cpus))
        pool_key = None
        if initializer is not None or max_tasks is not None:
            pool_key = f"{kind}-{os.urandom(6).hex()}"
            _register_pool(client, pool_key, initializer, initargs, max_tasks)
    except BaseException:
        _release_cluster(client)
        raise
    return client, nodes, workers, pool_key


def _register_pool(client, pool_key: str, initializer, initargs, max_tasks: int | None) -> None:
    """Workers of their own for ``pool_key``: the initializer runs once in each, before its first task."""
    if initializer is None:
        client.register_pool(pool_key, None, (), max_tasks)
        return
    from farpool._private import protocol
    pair = (initializer, tuple(initargs))
    data, buffers = protocol.dumps(pair, what="the initializer and its initargs")
    if buffers:  # keep big buffers in band: the pair travels as one bytes object
        import cloudpickle
        data = cloudpickle.dumps(pair, protocol=5)
    client.register_pool(pool_key, _run_initializer, (_submitter_authkey(), data), max_tasks)


def _fix_result(value, chunk: bool = False):
    if chunk and type(value) is list:
        return value if _all_plain(value) else [v if type(v) in _PLAIN else _writable(v) for v in value]
    return _writable(value)


# ---------------------------------------------------------------------------- errors
try:
    from concurrent.futures.process import BrokenProcessPool as _BrokenBase
    from concurrent.futures.process import _RemoteTraceback
except ImportError:  # pragma: no cover - every CPython has them
    _BrokenBase = concurrent.futures.BrokenExecutor

    class _RemoteTraceback(Exception):
        def __init__(self, tb):
            self.tb = tb

        def __str__(self):
            return self.tb


class BrokenDistributedExecutor(_BrokenBase):
    """The executor cannot run anything more: its initializer raised, or the cluster was lost.

    A ``concurrent.futures.BrokenExecutor`` (and a ``BrokenProcessPool``), so
    code written for ``ProcessPoolExecutor`` catches it unchanged.
    """


BrokenDistributedExecutor.__module__ = "farpool.executor"  # public (and pickled) there, see the docstring


def _remote_text(error: _exc.TaskError, name: str | None = None) -> str:
    where = f" on {error.where}" if error.where else ""
    return (f'\n"""\n{error.traceback_text.rstrip()}\n(raised by {name or error.function_name}{where})'
            '\n"""')


def _user_error(error: BaseException, tb_cls=_RemoteTraceback, name: str | None = None) -> BaseException:
    """The user's own exception with the remote traceback as ``__cause__``, as the stdlib gives it."""
    if isinstance(error, _exc.TaskError):
        cause = error.cause
        if cause is not None and cause is not error and not isinstance(cause, _exc.TaskError):
            cause.__cause__ = tb_cls(_remote_text(error, name))
            cause.__traceback__ = None
            return cause
    return error


def _pickling_error(error: BaseException) -> BaseException:
    """A value that cannot be pickled: the original error (as the stdlib raises), with our advice."""
    from farpool._private import protocol
    if isinstance(error, protocol.SerializationError):
        original = error.original if error.original is not None else error.__cause__
        if original is not None:
            original.add_note(str(error))
            if error.__cause__ is not original:  # it came from a worker: keep the remote traceback
                original.__cause__ = error.__cause__
            return original
    return error


# ---------------------------------------------------------------------------- BrokenProcessPool, for one future
# Where the stdlib's process pool breaks (a worker died; a task's arguments or its result would
# not unpickle), the executor retries, then fails only that future, with an error that is
# farpool's (or the pickling error) and also a BrokenProcessPool, so `except BrokenProcessPool`
# keeps working; the executor itself goes on.
_BROKEN_DUALS: dict[type, type | None] = {}


def _broken_dual(cls: type) -> type | None:
    """A class that is both ``cls`` and ``BrokenProcessPool`` (None if they do not combine)."""
    if cls in _BROKEN_DUALS:
        return _BROKEN_DUALS[cls]
    try:
        dual = type(cls.__name__, (cls, _BrokenBase),
                    {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__str__": cls.__str__,
                     "__reduce__": _reduce_broken, "_farpool_base": cls})
    except TypeError:  # incompatible layouts, final classes
        dual = None
    _BROKEN_DUALS[cls] = dual
    return dual


def _reduce_broken(self):
    return (_rebuild_broken, (self._farpool_base, self.args, dict(vars(self))))


def _rebuild_broken(cls: type, args: tuple, state: dict) -> BaseException:
    error = cls.__new__(cls)
    error.args = args
    vars(error).update(state)
    return _as_broken(error)


def _as_broken(error: BaseException) -> BaseException:
    """``error`` as an instance of its own type and of BrokenProcessPool (same args, notes, cause)."""
    if isinstance(error, _BrokenBase):
        return error
    dual = _broken_dual(type(error))
    if dual is None:
        broken = _BrokenBase(str(error))
        broken.__cause__ = error
        return broken
    try:
        new = dual.__new__(dual)
    except TypeError:  # MemoryError and its kind refuse a __new__ for a class not their own
        new = BaseException.__new__(dual)
    new.args = error.args
    vars(new).update(vars(error))
    new.__cause__ = error.__cause__
    new.__traceback__ = error.__traceback__
    return new


def _not_loaded(error: BaseException, what: str, name: str | None) -> BaseException:
    """An error raised while unpickling ``what`` of task ``name``: the task's result or
    arguments never arrived, as when the stdlib's pool breaks: also a BrokenProcessPool."""
    if not isinstance(error, Exception):  # SystemExit, KeyboardInterrupt: unpickling could not finish
        wrapped = pickle.UnpicklingError(f"unpickling {what} of {name} raised {error!r}")
        wrapped.__cause__ = error.__cause__ if error.__cause__ is not None else error
        error = wrapped
    error.add_note(f"(farpool: raised while unpickling {what} of {name}, so the task's result cannot be "
                   "had; this future fails with it and the executor goes on. Check that the objects "
                   "passed and returned unpickle in a fresh process)")
    return _as_broken(error)


def _process_pool_error(error: BaseException, name: str | None) -> BaseException:
    """The error ProcessPoolExecutor code expects for a failed task (``error`` as the user sees it)."""
    from farpool._private import protocol
    if isinstance(error, _exc.WorkerCrashedError):
        return _as_broken(error)
    if isinstance(error, protocol.SerializationError) and error.original is not None:
        return _pickling_error(error)  # a result that would not pickle: its own error, as the stdlib's
    if getattr(error, protocol.PHASE_ATTRIBUTE, None) == protocol.LOADING_ARGUMENTS:
        delattr(error, protocol.PHASE_ATTRIBUTE)
        return _not_loaded(error, "the arguments", name)
    return error


def _is_initializer_error(error: BaseException) -> bool:
    return isinstance(error, _exc.TaskError) and error.cause_type_name == "InitializerError"


def _task_name(fn) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


# ---------------------------------------------------------------------------- futures
class DistributedFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` completed from a farpool task.

    ``object_ref`` is the task's ``farpool.ObjectRef`` once the task was handed
    to the runtime (None while it waits behind ``max_workers`` others).
    Thread-safe like the stdlib's futures.
    """

    def __init__(self, dispatcher: "_Dispatcher | None" = None):
        super().__init__()
        self._dispatcher = dispatcher
        self._ref = None
        self._name: str | None = None  # the user's function, for error texts
        self._sent_at = 0.0            # time.monotonic() when handed to the runtime

    @property
    def object_ref(self):
        return self._ref

    def result(self, timeout: float | None = None):
        if not self.done() and _in_worker():
            with _blocked_while_waiting():
                return super().result(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        if not self.done() and _in_worker():
            with _blocked_while_waiting():
                return super().exception(timeout)
        return super().exception(timeout)

    def cancel(self) -> bool:
        dispatcher = self._dispatcher
        if dispatcher is None:
            return super().cancel()
        return dispatcher.cancel(self)

    def running(self) -> bool:
        with self._condition:
            state, ref = self._state, self._ref
        if state == _PENDING and ref is not None and self._dispatcher is not None:
            if self._dispatcher.client.task_state(ref) in ("RUNNING", "DONE"):
                self._mark_running()
        return super().running()

    # -- used by the dispatcher ---------------------------------------------
    def _mark_running(self) -> None:
        with self._condition:
            if self._state == _PENDING:
                self._state = _RUNNING

    def _settle_cancelled(self) -> bool:
        """PENDING -> cancelled and notified, in one step; True if it is cancelled now."""
        with self._condition:
            if self._state == _PENDING:
                self._state = _CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
                first = True
            else:
                first = False
            cancelled = self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)
        if first:
            self._invoke_callbacks()
        return cancelled

    def _set_result_safe(self, value) -> None:
        try:
            self.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled or failed (broken) meanwhile

    def _set_exception_safe(self, error: BaseException) -> None:
        try:
            self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass


DistributedFuture.__module__ = "farpool.executor"  # public there, see the docstring


# ---------------------------------------------------------------------------- the dispatcher
class _Limit(NamedTuple):
    """Tasks in flight allowed while a source waits: ``burst`` while tasks come back quickly."""
    strict: int
    burst: int


class _WorkItem:
    """One task not yet handed to the runtime: ``remote.remote(*args)`` makes it.

    It waits while ``limit`` or more tasks are in flight.
    """
    __slots__ = ("future", "remote", "args", "chunk", "limit")

    def __init__(self, future: DistributedFuture, remote, args: tuple, limit: _Limit, chunk: bool = False):
        self.future = future
        self.remote = remote
        self.args = args
        self.limit = limit
        self.chunk = chunk


class _Feed:
    """The inputs of one map-like call, read lazily: one chunk per task handed out.

    ``next_item`` runs under the dispatcher's lock (on whichever thread pumps);
    consumers wait on ``cond`` for the chunk futures in input order.
    """

    def __init__(self, dispatcher: "_Dispatcher", remote, fn, iterator: Iterator, chunksize: int,
                 star: bool, limit: _Limit, on_future: Callable | None = None,
                 on_finish: Callable | None = None, keep_futures: bool = True):
        self.dispatcher = dispatcher
        self.limit = limit
        self.remote = remote
        self.fn = fn
        self.name = _task_name(fn)
        self.iterator = iterator
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
        try:
            if self.star:
                chunk = list(map(tuple, itertools.islice(self.iterator, self.chunksize)))
            else:
                chunk = list(itertools.islice(self.iterator, self.chunksize))
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
        if n < self.chunksize:
            self._finish(None)
        return _WorkItem(future, self.remote, (self.fn, self.star, plain, chunk, *refs), self.limit, chunk=True)

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
                self.iterator = None
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
                    ref = item.remote.remote(self.authkey, *item.args)
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
                future._set_exception_safe(_pickling_error(error))
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
                    try:
                        value = self.client.value_of(ref, writable=True)  # copy-on-write, no copy
                    except BaseException as error:  # noqa: BLE001
                        if self.process_pool_errors and not isinstance(error, _exc.FarpoolError) \
                                and not self.client.has_failed(ref):  # the result would not unpickle
                            error = _not_loaded(error, "the result", future._name)
                        self._settle_error(future, error)
                    else:
                        future._set_result_safe(_fix_result(value, chunk))
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



# ---------------------------------------------------------------------------- task makers and sizing
class _TaskMaker:
    """The remote functions a facade submits with, for one set of resource hints."""

    def __init__(self, hints: dict, pool_key: str | None):
        opts = {k: v for k, v in hints.items() if v is not None}
        if pool_key is not None:
            opts["_pool_key"] = pool_key
        self._bases = (farpool.remote(_call).options(**opts), farpool.remote(_run_chunk).options(**opts))
        self._named: dict = {}

    def _named_after(self, which: int, fn):
        """The task named after ``fn`` (errors, the timeline and `farpool status` show it)."""
        key = (which, _task_name(fn))
        remote = self._named.get(key)
        if remote is None:
            if len(self._named) >= REMOTE_CACHE_SIZE:
                self._named.clear()
            remote = self._named[key] = self._bases[which].options(name=key[1])
        return remote

    def call(self, fn):
        """For ``_call(authkey, fn, kwnames, *values)``."""
        return self._named_after(0, fn)

    def chunk(self, fn):
        """For ``_run_chunk(authkey, fn, star, plain, chunk, *shared)``."""
        return self._named_after(1, fn)


def _feasible(hints: dict, nodes: list) -> str | None:
    """None if some live node can hold one task of these hints, else the reason."""
    want = _requested(hints)
    alive = [n for n in nodes if n.get("alive")]
    for node in alive:
        total = node.get("resources_total", {})
        if all(total.get(k, 0.0) >= v for k, v in want.items()):
            return None
    totals = "; ".join(f"node {n['node_id'][:8]}: {n.get('resources_total')}" for n in alive) or "no live node"
    return (f"no node of this cluster can run a task that needs {want} ({totals}); lower the "
            "request, or start the cluster with these resources (farpool.init(num_gpus=..., "
            "resources={...}) or `farpool start ...`)")


def _requested(hints: dict) -> dict:
    want = {"CPU": hints.get("num_cpus", 1), "GPU": hints.get("num_gpus", 0) or 0}
    if hints.get("memory"):
        want["memory"] = hints["memory"]
    want.update(hints.get("resources") or {})
    return {k: float(v) for k, v in want.items() if v}


def _capacity(hints: dict, nodes: list) -> int | None:
    """How many such tasks the cluster can run at once (None: unbounded, nothing requested)."""
    want = _requested(hints)
    if not want:
        return None
    totals: dict = {}
    for node in nodes:
        if node.get("alive"):
            for k, v in node.get("resources_total", {}).items():
                totals[k] = totals.get(k, 0.0) + v
    return max(1, min(int(totals.get(k, 0.0) // v) for k, v in want.items()))


def _in_flight_limit(max_workers: int, hints: dict, nodes: list, burst: bool = True) -> _Limit:
    """Tasks to keep in flight for ``max_workers`` slots.

    Never more than the cluster can run at once (a longer backlog would be
    pipelined behind busy workers), unless ``burst``: when the cluster's
    resources already keep at most ``max_workers`` such tasks running, extra
    tasks only wait in the runtime, so the cap on concurrency still holds.
    """
    capacity = _capacity(hints, nodes)
    if capacity is None:
        return _Limit(max_workers, max_workers)
    strict = min(max_workers, capacity)
    if burst and capacity <= max_workers:
        return _Limit(strict, max_workers * OVERSUBSCRIBE)
    return _Limit(strict, strict)
