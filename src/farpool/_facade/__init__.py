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

Its modules, each importing only those above it in this list:

- ``tasks``: the task functions (``_call``, ``_run_chunk``, ``_run_initializer``)
  and the markers that travel with tasks (``_Shared``, ``_AuthKey``), pickled by
  reference: workers import them from there;
- ``errors``: remote errors as the user's own, ``BrokenDistributedExecutor``, and
  the ``BrokenProcessPool`` errors of one future;
- ``cluster``: the shared cluster's reference count, and ``_open_facade``;
- ``futures``: ``DistributedFuture``;
- ``dispatcher``: ``_Dispatcher``, ``_WorkItem``, ``_Feed``;
- ``sizing``: tasks in flight per facade, feasibility, ``_TaskMaker``.

``DistributedFuture`` and ``BrokenDistributedExecutor`` are defined here because
the dispatcher makes them for every facade; they are public as
``farpool.executor.*``, which is where pickle and tracebacks name them.  This
module re-exports the names the facades import, so ``from farpool._facade
import X`` keeps working; a setting (``SHARE_MIN_BYTES``, ``OVERSUBSCRIBE``...)
is read where it is defined, so change it there.
"""

from farpool._facade.tasks import (_PLAIN, _adopt_authkey, _adopted_authkey, _all_plain,  # noqa: F401
                                   _AuthKey, _call, _fix_result, _pack_plain, _restore, _run_chunk,
                                   _run_initializer, _Shared, _submitter_authkey, _writable)
from farpool._facade.errors import (BrokenDistributedExecutor, _as_broken, _broken_dual,  # noqa: F401
                                    _BrokenBase, _is_initializer_error, _not_loaded, _pickling_error,
                                    _process_pool_error, _rebuild_broken, _reduce_broken, _remote_text,
                                    _RemoteTraceback, _task_name, _user_error)
from farpool._facade.cluster import (_acquire_cluster, _blocked_while_waiting, _ClusterHold,  # noqa: F401
                                     _in_worker, _open_facade, _register_pool, _release_cluster,
                                     _stop_idle_cluster)
from farpool._facade.futures import DistributedFuture  # noqa: F401
from farpool._facade.dispatcher import (OVERSUBSCRIBE, OVERSUBSCRIBE_AFTER,  # noqa: F401
                                        OVERSUBSCRIBE_GUARD_FACTOR, OVERSUBSCRIBE_GUARD_MIN_S,
                                        SHARE_MIN_BYTES, _Dispatcher, _Feed, _Limit, _OnDone, _WorkItem)
from farpool._facade.sizing import (REMOTE_CACHE_SIZE, _capacity, _feasible, _in_flight_limit,  # noqa: F401
                                    _requested, _TaskMaker)
