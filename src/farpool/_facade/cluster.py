"""The cluster the facades share: joined or started by the first facade, stopped by the last.

Owns the count of facades using the embedded cluster (``_acquire_cluster`` /
``_release_cluster``, ``_ClusterHold``), the linger timer joblib's backend
uses between ``Parallel`` calls, what every facade does first
(``_open_facade``: validate hints, join the cluster, size the facade, get
workers of its own for an initializer), and whether this process is a worker
(``_in_worker``, ``_blocked_while_waiting``: a task waiting on a facade's
future lends its CPU back).  Runs in the user's process, on any thread; only
the facades (executor.py, pool.py, joblib.py) and the other ``_facade``
modules call it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import farpool
from farpool import exceptions as _exc
from farpool._facade.tasks import _call, _run_initializer, _submitter_authkey

log = logging.getLogger(__name__)

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
