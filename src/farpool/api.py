"""The native API: init/shutdown, @remote, get/put/wait/cancel and introspection.

Called from user threads.  A thin face: checks arguments and turns them into
calls on this process's ``CoreClient`` (_private/client.py); starting,
joining and stopping clusters is _private/runtime.py's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time

from farpool import _placement_group, exceptions
from farpool._generator import ObjectRefGenerator
from farpool._private import client as client_mod
from farpool._private import context as context_mod
from farpool._private import progress_bar, runtime, runtime_env, scheduling
from farpool._private import runtime_env as runtime_env_mod
from farpool._private import options as options_mod
from farpool._private.options import (NodeAffinity, PlacementGroupScheduling, check_ray_only_options,  # noqa: F401
                                      check_scheduling_strategy)
from farpool._private.object_ref import ObjectRef
from farpool._private.streams import StreamState

log = logging.getLogger("farpool")

FUNCTION_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "num_returns", "max_retries",
                    "retry_exceptions", "name", "scheduling_strategy", "runtime_env", "max_pending_items")
# Private options the facades use: workers of their own (see CoreClient.register_pool).
_PRIVATE_OPTIONS = ("_pool_key",)


def is_initialized() -> bool:
    """Whether this process has a client (``init`` ran, or a call started one)."""
    return runtime.is_initialized()


def init(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
         resources: dict | None = None, object_store_memory: int | None = None,
         namespace: str | None = None, log_to_driver: bool = True, ignore_reinit_error: bool = False,
         token: str | None = None, runtime_env: dict | None = None, spill_dir: str | None = None) -> dict:
    """Start an embedded cluster (``address=None``) or join one ("auto" or "HOST:PORT").

    ``spill_dir``: where objects go when the object store is full (default: the session's
    directory under the tmp root); the node uses a directory of its own inside it.

    ``runtime_env`` applies to every task and actor of this job, on every node; a task's
    or actor's own ``runtime_env`` adds to it (see ``runtime_env.merge``).

    Returns a dict with at least ``address``, ``node_id`` and ``session_dir``.
    """
    runtime_env_mod.check(runtime_env, "init(runtime_env=...)")  # before anything starts
    if runtime.is_initialized() and ignore_reinit_error:
        return runtime.init(ignore_reinit_error=True)
    info = runtime.init(address, num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                        object_store_memory=object_store_memory, namespace=namespace,
                        log_to_driver=log_to_driver, ignore_reinit_error=ignore_reinit_error, token=token,
                        spill_dir=spill_dir)
    if runtime_env:
        try:  # its code is packaged and uploaded to the head once, here
            runtime.set_job_runtime_env(runtime_env_mod.canonical(runtime_env))
        except BaseException:
            runtime.shutdown()
            raise
    return info


def shutdown() -> None:
    """Disconnect; stop the embedded cluster if this process started it.  Idempotent."""
    runtime.shutdown()


# This process's client, starting the embedded cluster first if nothing was started.
_client = runtime.client


# ---------------------------------------------------------------------- remote functions
def _check_options(opts: dict, allowed: tuple, what: str) -> dict:
    check_ray_only_options(opts, what)
    unknown = sorted(set(opts) - set(allowed) - set(_PRIVATE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {what}; valid options: {', '.join(allowed)}")
    num_returns = opts.get("num_returns", 1)
    if num_returns == "dynamic":
        raise ValueError(f"{what}: num_returns='dynamic' (Ray's older generator tasks) is not supported by "
                         "farpool; a generator function streams its items: num_returns='streaming' (the "
                         "default for generator functions) gives an ObjectRefGenerator")
    if num_returns != "streaming" and (isinstance(num_returns, bool) or not isinstance(num_returns, int)
                                       or num_returns < 0):
        raise ValueError(f"`num_returns` must be an int >= 0 or 'streaming', got {num_returns!r}")
    options_mod.check_max_pending_items(opts.get("max_pending_items"))
    max_retries = opts.get("max_retries", 3)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < -1:
        raise ValueError(f"`max_retries` must be an int >= -1 (-1: retry forever), got {max_retries!r}")
    retry = opts.get("retry_exceptions", False)
    if not isinstance(retry, bool):
        if not isinstance(retry, (list, tuple)) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in retry):
            raise TypeError(f"`retry_exceptions` must be a bool or a list of exception types, got {retry!r}")
    check_scheduling_strategy(opts.get("scheduling_strategy", "DEFAULT") or "DEFAULT")
    name = opts.get("name")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__}")
    scheduling.make_request(opts.get("num_cpus", 1), opts.get("num_gpus", 0), opts.get("memory"),
                            opts.get("resources"))
    runtime_env.check(opts.get("runtime_env"))
    return opts




class RemoteFunction:
    """What ``@farpool.remote`` makes of a function: call ``.remote()``, not the function.

    A generator function (or one with ``num_returns="streaming"``) streams: ``.remote()``
    returns an ObjectRefGenerator (decided here, once: no per-call check).
    """

    def __init__(self, fn, options: dict):
        self._fn = fn
        what = f"remote function {fn.__qualname__}"
        self._options = _check_options(dict(options), FUNCTION_OPTIONS, what)
        self._info: client_mod.RemoteFunctionInfo | None = None
        self._shape, self._strategy = self._placement(self._options)
        if options_mod.streams(fn, self._options, what):
            self.remote = self._remote_stream
        functools.update_wrapper(self, fn)

    def _placement(self, opts: dict) -> tuple:
        """(shape, strategy): in a placement group, the shape of its bundle (options.placement)."""
        shape = scheduling.make_request(opts.get("num_cpus", 1), opts.get("num_gpus", 0), opts.get("memory"),
                                        opts.get("resources"))
        return options_mod.placement(opts, shape, f"remote function {self._fn.__qualname__}")

    @property
    def _farpool_function(self):
        return self._fn

    def __call__(self, *args, **kwargs):
        name = getattr(self._fn, "__name__", "f")
        raise TypeError(f"remote function {name} cannot be called directly; use {name}.remote(...) "
                        f"to run it as a task and farpool.get() on the returned ref (e.g. "
                        f"farpool.get({name}.remote(1)))")

    def options(self, **options) -> "RemoteFunction":
        merged = dict(self._options)
        merged.update(options)
        bound = RemoteFunction.__new__(RemoteFunction)
        bound._fn = self._fn
        bound._options = _check_options(merged, FUNCTION_OPTIONS, f"remote function {self._fn.__qualname__}")
        bound._info = self._info
        bound._shape, bound._strategy = bound._placement(merged)
        if options_mod.streams(self._fn, bound._options, f"remote function {self._fn.__qualname__}"):
            bound.remote = bound._remote_stream
        bound._parent = self
        functools.update_wrapper(bound, self._fn)
        return bound

    def _function_info(self) -> client_mod.RemoteFunctionInfo:
        info = self._info
        if info is None:
            parent = getattr(self, "_parent", None)
            if parent is not None:
                info = parent._function_info()
            else:
                info = client_mod.function_info(self._fn, getattr(self._fn, "__qualname__", "task"), self)
            self._info = info
        return info

    def remote(self, *args, **kwargs):
        client = _client()
        opts = self._options
        num_returns = opts.get("num_returns", 1)
        info = self._function_info()
        name = opts.get("name") or info.name
        pool, env = opts.get("_pool_key"), opts.get("runtime_env")
        shape, strategy = self._shape, self._strategy
        if strategy is None:  # none given: in a task whose placement group captures its children, that group
            group = context_mod.context.capture_group
            shape, strategy = (shape, "DEFAULT") if group is None else \
                _placement_group.captured(shape, group, f"remote function {name}")
        refs = client.submit(info, args, kwargs, max(num_returns, 1), shape, opts.get("max_retries", 3),
                             opts.get("retry_exceptions", False), name, strategy,
                             runtime_env.pool_key(pool, env) if pool or env or runtime.has_job_runtime_env() else None)
        if num_returns == 1:
            return refs[0]
        if num_returns == 0:
            return None
        return refs

    def _remote_stream(self, *args, **kwargs) -> ObjectRefGenerator:
        """``remote`` of a generator function: an ObjectRefGenerator, at once."""
        client = _client()
        opts = self._options
        info = self._function_info()
        name = opts.get("name") or info.name
        pool, env = opts.get("_pool_key"), opts.get("runtime_env")
        shape, strategy = self._shape, self._strategy
        if strategy is None:
            group = context_mod.context.capture_group
            shape, strategy = (shape, "DEFAULT") if group is None else \
                _placement_group.captured(shape, group, f"remote function {name}")
        state = StreamState(opts.get("max_pending_items"))
        refs = client.submit(info, args, kwargs, 1, shape, opts.get("max_retries", 3),
                             opts.get("retry_exceptions", False), name, strategy,
                             runtime_env.pool_key(pool, env) if pool or env or runtime.has_job_runtime_env() else None,
                             stream=state)
        return ObjectRefGenerator(refs[0], state, client)


RemoteFunction.__module__ = "farpool"


def remote(*args, **options):
    """``@farpool.remote`` or ``@farpool.remote(num_cpus=2, ...)`` on a function."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@farpool.remote takes either a function or keyword options, e.g. "
                        "@farpool.remote(num_cpus=2)")
    return lambda fn: _make_remote(fn, options)


def _make_remote(obj, options):
    if inspect.isclass(obj):
        from farpool.actor import ActorClass
        return ActorClass(obj, options)
    if not callable(obj):
        raise TypeError(f"@farpool.remote needs a function or a class, got {type(obj).__name__}")
    return RemoteFunction(obj, options)


# ---------------------------------------------------------------------- objects
def _check_refs(refs, what: str) -> tuple[list, bool]:
    if isinstance(refs, ObjectRef):
        return [refs], True
    if isinstance(refs, (list, tuple)):
        for i, r in enumerate(refs):
            if not isinstance(r, ObjectRef):
                raise TypeError(f"{what}() takes ObjectRefs; item {i} is a {type(r).__name__}")
        return list(refs), False
    if isinstance(refs, ObjectRefGenerator):
        raise TypeError(f"{what}() takes ObjectRefs, not an ObjectRefGenerator: iterate it and {what}() each "
                        f"ref as it comes (for ref in gen: {what}(ref)), or {what}(list(gen)) for all of them")
    raise TypeError(f"{what}() takes an ObjectRef or a list of ObjectRefs, got {type(refs).__name__}")


def _check_timeout(timeout) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"`timeout` must be None or a number of seconds >= 0, got {timeout!r}")


def get(refs, *, timeout: float | None = None):
    """The value of a ref, or the values of a list of refs, in order.

    Raises the task's error (``TaskError``, ``WorkerCrashedError``, ...) and
    ``GetTimeoutError`` when ``timeout`` seconds pass first.
    """
    ref_list, single = _check_refs(refs, "get")
    _check_timeout(timeout)
    values = _client().get(ref_list, timeout)
    return values[0] if single else values


def put(value) -> ObjectRef:
    """Store ``value`` in the cluster and return a ref to it (the buffer is copied now)."""
    return _client().put(value)


def wait(refs, *, num_returns: int = 1, timeout: float | None = None, fetch_local: bool = True,
         progress: bool = False):
    """(ready, not_ready): the first ``num_returns`` refs done, in the order given.

    With ``fetch_local`` (the default) a ref counts as ready once its value can be read on
    this node: a value stored on another node is copied into this node's store first (a
    driver joined over TCP, with no store, reads every value from where it is).  With
    ``fetch_local=False`` it is ready as soon as it exists anywhere in the cluster.
    The list may hold ObjectRefGenerators too (as Ray's): one is ready once ``next(gen)``
    would not wait (its next ref came, or the stream ended), and is returned as itself.
    With ``progress=True`` a bar on stderr counts the refs done towards ``num_returns``
    while it waits, when stderr is a terminal (nothing otherwise; see ``farpool.progress``).
    """
    if isinstance(refs, ObjectRef):
        raise TypeError("wait() takes a list of ObjectRefs, not a single ref: wait([ref])")
    if isinstance(refs, ObjectRefGenerator):
        raise TypeError("wait() takes a list of ObjectRefs and ObjectRefGenerators, not a single generator: "
                        "wait([gen])")
    if isinstance(refs, (list, tuple)) and any(isinstance(r, ObjectRefGenerator) for r in refs):
        return _wait_with_generators(list(refs), num_returns, timeout, fetch_local, progress)
    ref_list, _ = _check_refs(refs, "wait")
    if not ref_list:  # as Ray: nothing to wait for
        _check_timeout(timeout)
        return [], []
    if len(set(ref_list)) != len(ref_list):
        raise ValueError("wait() got the same ObjectRef more than once")
    _check_wait_options(num_returns, len(ref_list), timeout, fetch_local, progress)
    client = _client()
    started = time.monotonic()
    if progress:
        flags = progress_bar.wait_with_bar(client, ref_list, num_returns, timeout, sys.stderr)
    else:
        flags = client.wait_entries(ref_list, num_returns, timeout)
    if fetch_local:  # ready means readable here: values in other nodes' stores are copied to ours first
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        flags = client.fetch_here(ref_list, flags, num_returns, left)
    ready, not_ready = [], []
    for ref, done in zip(ref_list, flags):
        (ready if done and len(ready) < num_returns else not_ready).append(ref)
    return ready, not_ready


def _check_wait_options(num_returns, count: int, timeout, fetch_local, progress) -> None:
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"`num_returns` must be an int >= 0, got {num_returns!r}")
    if num_returns > count:
        raise ValueError(f"`num_returns` ({num_returns}) is larger than the number of refs ({count})")
    _check_timeout(timeout)
    if not isinstance(fetch_local, bool):
        raise TypeError(f"`fetch_local` must be a bool, got {type(fetch_local).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be a bool, got {type(progress).__name__}")


def _wait_with_generators(waitables: list, num_returns: int, timeout, fetch_local: bool, progress: bool):
    """wait() of a list that holds ObjectRefGenerators: each is waited on as its next ref (the
    stream's state says when ``next`` would not wait); the refs as wait() waits on them."""
    refs, gens = [], []
    for i, w in enumerate(waitables):
        if isinstance(w, ObjectRefGenerator):
            gens.append(w)
        elif isinstance(w, ObjectRef):
            refs.append(w)
        else:
            raise TypeError(f"wait() takes ObjectRefs and ObjectRefGenerators; item {i} is a {type(w).__name__}")
    if len(set(refs)) != len(refs) or len({id(g) for g in gens}) != len(gens):
        raise ValueError("wait() got the same ObjectRef or ObjectRefGenerator more than once")
    _check_wait_options(num_returns, len(waitables), timeout, fetch_local, progress)
    client = _client()
    if any(g._client is not client for g in gens):
        raise ValueError("wait() got an ObjectRefGenerator of an earlier farpool.init(): its stream ended "
                         "with that session; call the generator function again")
    states = tuple(g._state for g in gens)
    started = time.monotonic()
    if progress:
        flags = progress_bar.wait_with_bar(client, refs, num_returns, timeout, sys.stderr, streams=states)
    else:
        flags = client.wait_entries(refs, num_returns, timeout, streams=states)
    ref_flags, gen_flags = flags[:len(refs)], flags[len(refs):]
    if fetch_local and refs:
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        ref_flags = client.fetch_here(refs, ref_flags, num_returns, left)
    done = {}
    for ref, flag in zip(refs, ref_flags):
        done[id(ref)] = flag
    for gen, flag in zip(gens, gen_flags):
        done[id(gen)] = flag
    ready, not_ready = [], []
    for w in waitables:
        (ready if done[id(w)] and len(ready) < num_returns else not_ready).append(w)
    return ready, not_ready


def cancel(ref, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes ``ref``: queued tasks never run, running ones are interrupted.
    For an ObjectRefGenerator, its producer stops: refs it had not yielded are never handed out."""
    if isinstance(ref, ObjectRefGenerator):
        ref = ref.completed()
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}")
    client = _client()
    entry = client.objects.get(ref._id)
    task = entry.task if entry is not None else None
    if force and task is not None and task.actor_id is not None:
        raise ValueError(f"cancel(force=True) is not allowed for actor calls ({task.name}): killing "
                         "the worker would kill the actor; use farpool.kill(handle) to end the actor, "
                         "or cancel(ref) to drop a queued call")
    client.cancel(ref, force, recursive)


# ---------------------------------------------------------------------- introspection
def nodes() -> list[dict]:
    """Every node the head knows: ids, address, liveness (and ``draining``: ``farpool stop
    --node`` runs, it takes no new tasks), resources, workers, actors, store use.

    ``object_store_memory`` in a node's resources is its store's capacity (total) and its
    free bytes (available), as of the node's last heartbeat (at most a second old).
    """
    out = []
    for n in _client().request_nodes():
        store = n.get("stats", {}).get("object_store")
        total = scheduling.as_floats(n["total"])
        available = scheduling.as_floats(n["available"])
        if store:
            total["object_store_memory"] = float(store["capacity"])
            available["object_store_memory"] = float(max(0, store["capacity"] - store["used"]))
        out.append({"node_id": n["node_id"], "address": n.get("tcp") or n.get("ipc"), "alive": n["alive"],
                    "draining": bool(n["alive"] and n.get("draining")), "hostname": n.get("hostname"),
                    "resources_total": total, "resources_available": available,
                    "workers": n.get("stats", {}).get("workers"), "actors": n.get("actors", 0),
                    "object_store": store,
                    "is_head_node": n.get("is_head_node", False)})
    return out


def _live_nodes_with_fresh_store() -> list[dict]:
    """``nodes()``, alive only, with this process's own node's store counted now rather than at
    its last heartbeat: what this process just put (or freed) shows at once."""
    client = _client()
    live = [n for n in nodes() if n["alive"]]
    home = client.home
    for n in live:
        if home is not None and n["node_id"] == home.node_id:
            try:
                store, _listing = client.agent_request(home, "StoreStats", (), timeout=10)
            except (exceptions.FarpoolError, TimeoutError, OSError):
                break  # the heartbeat's counts then
            n["resources_total"]["object_store_memory"] = float(store["capacity"])
            n["resources_available"]["object_store_memory"] = float(max(0, store["capacity"] - store["used"]))
    return live


def cluster_resources() -> dict:
    """The live nodes' total resources as floats (``object_store_memory``: the stores' capacity in bytes)."""
    totals: dict = {}
    for n in _live_nodes_with_fresh_store():
        for k, v in n["resources_total"].items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def available_resources() -> dict:
    """What is free now (``object_store_memory``: the stores' free bytes; this node's counted now,
    others' as of their last heartbeat, at most a second old)."""
    totals: dict = {}
    for n in _live_nodes_with_fresh_store():
        for k, v in n["resources_available"].items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def get_runtime_context():
    """Where this code runs: ids, ``get_assigned_resources()``, ``get_accelerator_ids()``,
    ``current_actor``."""
    import farpool.actor  # noqa: F401  (current_actor makes handles with it)
    ctx = context_mod.context
    if ctx.worker_id is None:
        client = _client()
        ctx = context_mod.RuntimeContext()
        ctx.node_id = client.home.node_id
        ctx.worker_id = client.client_id.hex()
        ctx.job_id = client.job_id
        ctx.namespace = runtime.namespace()
    return ctx


def get_gpu_ids() -> list[int]:
    return list(context_mod.context.gpu_ids)
