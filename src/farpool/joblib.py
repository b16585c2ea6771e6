"""The joblib backend "farpool": ``joblib.Parallel`` over a farpool cluster.

::

    import joblib, farpool.joblib
    farpool.joblib.register()                       # idempotent
    with joblib.parallel_config(backend="farpool", n_jobs=-1):
        joblib.Parallel()(joblib.delayed(f)(i) for i in range(100))

``FarpoolBackend`` is a real ``joblib.parallel.ParallelBackendBase`` on
joblib's current interface (``submit`` with a completion callback,
``retrieve_result_callback``, ``supports_retrieve_callback``,
``get_nested_backend``, ``retrieval_context``); nothing of joblib is patched.
It runs in the process that calls ``Parallel`` (a driver, or a task running a
nested ``Parallel``), on the caller's thread and the core client's callback
thread, and is built on the facades' dispatcher (_facade/dispatcher.py)::

    Parallel --BatchedCalls--> FarpoolBackend.submit --> _Dispatcher --> task `_call(_run_batch, ...)`
    Parallel <--BatchCompletionCallBack (callback thread) <-- DistributedFuture

How it differs from joblib's process backends:

* ``n_jobs=-1`` (the default) means the cluster's CPUs; ``n_jobs=1`` runs in
  this process, as with loky.  Resource hints (``num_cpus``, ``num_gpus``,
  ``memory``, ``resources``) and ``address`` are backend parameters:
  ``parallel_config(backend="farpool", num_gpus=1)``.
* A numpy array of at least ``max_nbytes`` (joblib's memmapping threshold,
  1 MB by default) is put in the cluster once per ``Parallel`` call however
  many tasks use it (the same array object: joblib memory-maps it once per
  call too), and arrives read-only when ``mmap_mode="r"`` (joblib's default),
  as a memory-mapped array would.  A smaller one from ``SHARE_MIN_BYTES``
  (100 KiB) is put once per call for each content passed (an array changed
  between batches is put again; of many different ones only the last few stay
  stored once their batches are done), and arrives writable: what loky
  pickles into every batch, without the copy per batch.
* A ``Parallel`` inside a task runs on the cluster too (the nested backend is
  this one); the task lends its CPU while it waits, so nesting cannot deadlock.
* A worker process that dies is retried (``max_retries``), not reported as a
  ``TerminatedWorkerError``.
* ``initializer``/``initargs`` (joblib >= 1.5) run once in every worker process
  serving the call; calls with the same initializer and arguments share them.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import threading
from typing import Any

import joblib
from joblib._parallel_backends import AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, SequentialBackend

import farpool
from farpool._private import protocol, segments
from farpool._private.shared_args import digest_of
from farpool._facade import (DistributedFuture, _acquire_cluster, _blocked_while_waiting, _Dispatcher,
                             _fix_result, _in_flight_limit, _PLAIN, _register_pool, _release_cluster,
                             _Shared, _task_name, _TaskMaker, _WorkItem, _writable)

__all__ = ["FarpoolBackend", "register"]

BACKEND_NAME = "farpool"
# After the last Parallel call ends, an embedded cluster the facades started
# waits this long for the next one before it stops: Parallel starts and ends
# its backend for every call (GridSearchCV makes several in a row).  Longer
# reuses the cluster across slower loops; shorter frees the processes sooner.
CLUSTER_LINGER_S = 2.0
# Arrays at least this large are put once per call below joblib's max_nbytes (or with
# memmapping disabled) too, by content: from here a batch's arguments would go through
# the node store with every batch anyway (segments.INLINE_MAX), so one stored copy for
# the batches that pass the same bytes saves a store write each (a 920 KB array: 0.6 ms
# a batch instead of 1.0 here; the digest costs a seventh of a copy).  Lower would store
# small arrays that travel inline.
SHARE_MIN_BYTES = segments.INLINE_MAX
# ... and the copies of the last this many contents passed stay stored for the call's next
# batches (besides those its batches in flight hold).  More reuses copies across calls that
# alternate among more arrays; fewer keeps less memory (at most this many x max_nbytes).
RECENT_CONTENTS = 8


def _run_batch(batch, readonly: tuple, *shared):
    """In the worker: put the shared arrays back into joblib's batch and run it."""
    register()  # code in the task may name the backend "farpool" too
    items = []
    for func, args, kwargs in batch.items:
        if not all(type(a) in _PLAIN for a in args) or not all(type(v) in _PLAIN for v in kwargs.values()):
            args = tuple(_restore(a, shared, readonly) for a in args)
            kwargs = {k: _restore(v, shared, readonly) for k, v in kwargs.items()}
        items.append((func, args, kwargs))
    batch.items = items
    return batch()


def _restore(value, shared: tuple, readonly: tuple):
    if type(value) is not _Shared:
        return _writable(value)
    array = shared[value.index]
    if readonly[value.index]:
        if array.flags.writeable:
            array = array.view()
            array.flags.writeable = False  # as joblib's memory-mapped arguments (mmap_mode="r")
    else:
        array = _writable(array)
    return array


class FarpoolBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's backend "farpool" (see the module docstring).

    Args:
        nesting_level, inner_max_num_threads: as every joblib backend.
        address: the cluster to join when none is initialized; by default the
            embedded one shared by the facades.
        num_cpus, num_gpus, memory, resources: resources one batch holds.
        max_retries: retries of a batch whose worker process died.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None, *,
                 address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 memory: float | None = None, resources: dict | None = None, max_retries: int = 3,
                 **backend_kwargs):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
                         **backend_kwargs)
        self._address = address
        self._hints = {"num_cpus": num_cpus, "num_gpus": num_gpus, "memory": memory, "resources": resources,
                       "max_retries": max_retries}
        farpool.remote(_run_batch).options(**{k: v for k, v in self._hints.items() if v is not None})
        self._workers: _Dispatcher | None = None  # joblib's tests look for `_workers`
        self._holding = False
        self._client = None
        self._lock = threading.Lock()
        # This call's stored arrays: id(array) -> (array, ref) from max_nbytes (joblib's memmapping
        # cache: kept until the call ends), content digest -> ref below it (what pickling every
        # batch would show; the RECENT_CONTENTS last passed, so a call over many different
        # arrays keeps only those and the ones its batches in flight hold).
        self._forget_shared()
        self._max_nbytes: int | None = 1_000_000
        self._mmap_mode: str | None = "r"

    def __reduce__(self):  # the nested backend travels inside joblib's batches
        return (_rebuild, (type(self), self.nesting_level, self.inner_max_num_threads, self._address,
                           self._hints, self.backend_kwargs))

    # -- sizing ------------------------------------------------------------
    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        n_jobs = int(n_jobs)
        if n_jobs < 0:
            n_jobs = max(self._cluster_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def _cluster_cpus(self) -> int:
        if farpool.is_initialized():
            return max(1, int(farpool.cluster_resources().get("CPU", 1)))
        from joblib import cpu_count  # what the embedded cluster would have, without starting it
        return cpu_count()

    # -- lifecycle ---------------------------------------------------------
    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **backend_kwargs):
        """Join (or start) the cluster and return the number of batches run at once."""
        if self.effective_n_jobs(n_jobs) == 1:  # as loky: run here, and start no cluster for it
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        if not self._holding:
            self._client = _acquire_cluster(self._address)
            self._holding = True
        client = self._client
        try:
            n_jobs = self.effective_n_jobs(n_jobs)
            kwargs = {**self.backend_kwargs, **backend_kwargs}
            self._max_nbytes = kwargs.get("max_nbytes", 1_000_000)
            self._mmap_mode = kwargs.get("mmap_mode", "r")
            nodes = farpool.nodes()
            pool_key = None
            if kwargs.get("initializer") is not None:
                pool_key = _initializer_pool(client, kwargs["initializer"], kwargs.get("initargs") or ())
            self._tasks = _TaskMaker(self._hints, pool_key)
            self._limit = _in_flight_limit(n_jobs, self._hints, nodes)
            self._workers = _Dispatcher(client)
        except BaseException:
            self._holding = False
            _release_cluster(client)
            raise
        self.parallel = parallel
        self._n_jobs = n_jobs
        return n_jobs

    def terminate(self):
        """The Parallel call is over: forget this call's data; the cluster may stop after a while."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.cancel_pending()
        self._forget_shared()
        self.reset_batch_stats()
        if self._holding:
            self._holding = False
            _release_cluster(self._client, linger_s=CLUSTER_LINGER_S)

    def stop_call(self):
        self._forget_shared()

    def abort_everything(self, ensure_ready=True):
        """An error (or a timeout) ended the call: drop queued batches, kill the running ones."""
        workers, self._workers = self._workers, None
        if workers is not None:
            # Killed like loky's workers: a signal that interrupts Python code could land outside the task.
            workers.terminate(lambda: farpool.TaskCancelledError("the joblib call was aborted"), force=True)
        self._forget_shared()
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel, **self.parallel._backend_kwargs)

    def get_nested_backend(self):
        """A Parallel inside a task runs on the cluster too."""
        nesting_level = (self.nesting_level or 0) + 1
        return type(self)(nesting_level=nesting_level, address=self._address, **self._hints), None

    @contextlib.contextmanager
    def retrieval_context(self):
        """While a task waits for its nested Parallel, it lends its CPU to the cluster."""
        with _blocked_while_waiting():
            yield

    # -- work --------------------------------------------------------------
    def submit(self, func, callback=None):
        workers = self._workers
        if workers is None:
            raise RuntimeError("the farpool joblib backend is not configured: Parallel ended or was aborted")
        batch, readonly, refs = self._share(func)
        future = DistributedFuture(workers)
        first = getattr(func, "items", None)
        future._name = _task_name(first[0][0]) if first else _task_name(func)
        if callback is not None:
            future.add_done_callback(callback)
        named = first[0][0] if first else func
        item = _WorkItem(future, self._tasks.call(named), (_run_batch, (), batch, readonly, *refs), self._limit)
        workers.push(item)
        return future

    def retrieve_result_callback(self, future):
        return _fix_result(future.result(), chunk=True)

    def _share(self, batch) -> tuple[Any, tuple, list]:
        """Big arrays among the batch's arguments become refs put once per call (joblib's memmapping)."""
        items = getattr(batch, "items", None)
        if not items:
            return batch, (), []
        max_nbytes = self._max_nbytes
        threshold = SHARE_MIN_BYTES if max_nbytes is None else min(max_nbytes, SHARE_MIN_BYTES)
        readonly_mode = self._mmap_mode == "r"
        refs: list = []
        readonly: list = []
        index_of: dict[int, int] = {}
        changed = False

        def marker(value):
            nonlocal changed
            if type(value).__name__ != "ndarray" or getattr(value, "nbytes", 0) < threshold:
                return value
            mapped = max_nbytes is not None and value.nbytes >= max_nbytes
            ref = self._stored_once(value) if mapped else self._stored_once_by_content(value)
            k = index_of.get(id(ref))
            if k is None:
                k = index_of[id(ref)] = len(refs)
                refs.append(ref)
                readonly.append(mapped and readonly_mode)
            changed = True
            return _Shared(k)

        new_items = [(func, tuple(marker(a) for a in args), {k: marker(v) for k, v in kwargs.items()})
                     for func, args, kwargs in items]
        if not changed:
            return batch, (), []
        shared_batch = copy.copy(batch)
        shared_batch.items = new_items
        return shared_batch, tuple(readonly), refs

    def _forget_shared(self) -> None:
        self._shared: dict[int, tuple] = {}
        self._by_content: collections.OrderedDict = collections.OrderedDict()

    def _stored_once(self, array):
        """The ref of ``array``'s stored copy, put at the first batch of this call that passes
        this array object (as joblib memory-maps it once per call)."""
        with self._lock:
            cached = self._shared.get(id(array))
            if cached is None or cached[0] is not array:
                cached = self._shared[id(array)] = (array, farpool.put(array))
        return cached[1]

    def _stored_once_by_content(self, array):
        """The ref of a stored copy of ``array``'s bytes, put at the first batch of this call
        that passes them (digested at every batch: an array changed between batches is put
        again, as pickling it into each batch would show it)."""
        payload, bufs = protocol.dumps(array, what="an array argument")
        digest = digest_of(payload, bufs)
        with self._lock:
            ref = self._by_content.get(digest)
            if ref is not None:
                self._by_content.move_to_end(digest)
                return ref
        ref = farpool.put(array)
        with self._lock:
            ref = self._by_content.setdefault(digest, ref)
            while len(self._by_content) > RECENT_CONTENTS:
                self._by_content.popitem(last=False)  # (its batches in flight keep their copy)
        return ref


FarpoolBackend.__module__ = "farpool.joblib"


_init_pools: dict[tuple, str] = {}  # (client id, digest of initializer+initargs) -> pool key
_init_lock = threading.Lock()


def _initializer_pool(client, initializer, initargs) -> str:
    """Workers of their own that ran ``initializer(*initargs)``; reused while both are the same (as loky)."""
    import hashlib
    from farpool._private import protocol
    try:
        data, _ = protocol.dumps((initializer, tuple(initargs)), what="the initializer and its initargs")
        digest = hashlib.sha1(data).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - _register_pool raises the clear error below
        digest = os.urandom(8).hex()
    key = (id(client), digest)
    with _init_lock:
        pool_key = _init_pools.get(key)
        if pool_key is None:
            pool_key = _init_pools[key] = f"joblib-{digest}"
            _register_pool(client, pool_key, initializer, initargs, None)
    return pool_key


def _rebuild(cls, nesting_level, inner_max_num_threads, address, hints, backend_kwargs):
    return cls(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, address=address,
               **hints, **backend_kwargs)


def register() -> None:
    """Register the joblib backend "farpool" (idempotent).

    The factory is ``FarpoolBackend`` itself: joblib calls it with
    ``nesting_level=`` and the ``**backend_params`` of ``parallel_config``.
    """
    joblib.register_parallel_backend(BACKEND_NAME, FarpoolBackend)
