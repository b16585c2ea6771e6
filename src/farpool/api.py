"""The native API: init/shutdown, @remote, get/put/wait/cancel and introspection.

Called from user threads.  Holds the one ``CoreClient`` of this process (see
_private/client.py) and, for an embedded cluster, the head and node agent
processes it started.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import os
import sys
import threading

from farpool import exceptions
from farpool._private import client as client_mod
from farpool._private import protocol, scheduling, session
from farpool._private.client import ObjectRef

log = logging.getLogger("farpool")

_lock = threading.RLock()
_state: dict | None = None  # {"client", "procs", "session_dir", "info", "auto"}

FUNCTION_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "num_returns", "max_retries",
                    "retry_exceptions", "name", "scheduling_strategy", "runtime_env")
# Private options the facades use: workers of their own (see CoreClient.register_pool).
_PRIVATE_OPTIONS = ("_pool_key",)
# How long init() waits for a freshly started embedded cluster.
START_DEADLINE_S = 60


def is_initialized() -> bool:
    return _state is not None


def init(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
         resources: dict | None = None, object_store_memory: int | None = None,
         namespace: str | None = None, log_to_driver: bool = True, ignore_reinit_error: bool = False,
         token: str | None = None, runtime_env: dict | None = None, spill_dir: str | None = None,
         _auto: bool = False) -> dict:
    """Start an embedded cluster (``address=None``) or join one ("auto" or "HOST:PORT").

    ``spill_dir``: where objects go when the object store is full (default: the session's
    directory under the tmp root); the node uses a directory of its own inside it.

    Returns a dict with at least ``address``, ``node_id`` and ``session_dir``.
    """
    global _state
    with _lock:
        if _state is not None:
            if ignore_reinit_error:
                return dict(_state["info"])
            raise RuntimeError("farpool.init() was already called in this process; call "
                               "farpool.shutdown() first, or pass ignore_reinit_error=True")
        from farpool._private import worker as worker_mod
        if worker_mod.worker_config is not None and address is None:
            _state = _join_from_worker(worker_mod.worker_config)
            return dict(_state["info"])
        if address is None:
            address = os.environ.get("FARPOOL_ADDRESS") or None
        if address is None and worker_mod.context.worker_id is not None:
            raise RuntimeError("farpool.init() inside a worker before its job was set up: a task cannot "
                               "start a cluster of its own; it joins the cluster it runs on")
        if address is None:
            _state = _start_embedded(num_cpus, num_gpus, resources, object_store_memory, namespace,
                                     log_to_driver, spill_dir)
        else:
            if any(v is not None for v in (num_cpus, num_gpus, resources, object_store_memory, spill_dir)):
                raise ValueError(
                    "num_cpus, num_gpus, resources, object_store_memory and spill_dir cannot be given when "
                    f"joining an existing cluster ({address!r}): resources belong to the nodes. Pass them "
                    "to `farpool start` on each node, or call init() without an address for a "
                    "private cluster")
            _state = _join(address, token, namespace, log_to_driver)
        _state["auto"] = _auto
        _state["namespace"] = namespace
        return dict(_state["info"])


def _job_setup(head_address: str | None, namespace) -> dict:
    main = sys.modules.get("__main__")
    main_path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    main_module = spec.name if spec is not None and spec.name not in ("__main__",) else None
    if main_path and (os.path.basename(main_path).startswith("ipython") or main_path.endswith("ipykernel_launcher.py")
                      or not protocol.main_script_importable(main)):
        main_path = None
    return {"sys_path": [p if p else os.getcwd() for p in sys.path], "cwd": os.getcwd(),
            "main_path": os.path.abspath(main_path) if main_path else None,
            "main_module": main_module, "head_address": head_address, "namespace": namespace}


def _start_embedded(num_cpus, num_gpus, resources, object_store_memory, namespace, log_to_driver,
                    spill_dir=None) -> dict:
    # Validate before starting anything; the node agent computes the defaults itself
    # (loky.cpu_count() costs 100 ms of imports we need not wait for here).
    scheduling.make_totals(1 if num_cpus is None else num_cpus, num_gpus or 0, resources)
    if spill_dir is not None:
        _check_spill_dir(spill_dir)
    session.remove_dead_sessions()
    session_dir = session.new_session_dir()
    token = session.new_token()
    node_id = os.urandom(8).hex()
    head_address = session.ipc(session_dir, "head")
    procs = []
    client = None
    try:
        procs.append(session.spawn("farpool._private.head",
                                   ["--session-dir", session_dir, "--embedded", "--lifeline"],
                                   session_dir, "head.log", token, lifeline=True))
        node_args = ["--session-dir", session_dir, "--head-address", head_address, "--node-id", node_id,
                     "--resources", json.dumps(resources or {}), "--embedded", "--head-node", "--lifeline"]
        if num_cpus is not None:
            node_args += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            node_args += ["--num-gpus", str(num_gpus)]
        if object_store_memory:
            node_args += ["--object-store-memory", str(object_store_memory)]
        if spill_dir is not None:
            node_args += ["--spill-dir", os.path.abspath(spill_dir)]
        procs.append(session.spawn("farpool._private.node", node_args, session_dir, "node.log", token,
                                   lifeline=True))
        cfg = {"head_address": head_address, "agent_address": session.ipc(session_dir, "node"),
               "watch_pids": [(procs[0].pid, "head"), (procs[1].pid, "node agent")],
               "node_id": node_id, "session_dir": session_dir, "token": token, "embedded": True,
               "local": True, "start_deadline_s": START_DEADLINE_S, "log_to_driver": log_to_driver,
               "job_setup": _job_setup(None, namespace)}
        client = client_mod.CoreClient(cfg)
        client_mod.set_current(client)
        welcome = client.connect()
    except BaseException:
        client_mod.set_current(None)
        if client is not None:
            client.close_unstarted()
        _stop_procs(procs)
        session.remove_session(session_dir)
        raise
    client.job_setup["job_id"] = client.job_id
    info = {"address": None, "node_id": node_id, "session_dir": session_dir, "job_id": client.job_id,
            "dashboard_url": None, "embedded": True}
    del welcome
    return {"client": client, "procs": procs, "session_dir": session_dir, "info": info}


def _check_spill_dir(spill_dir) -> None:
    if not isinstance(spill_dir, (str, os.PathLike)) or not str(spill_dir):
        raise ValueError(f"`spill_dir` must be a directory path, got {spill_dir!r}")
    try:
        os.makedirs(spill_dir, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"`spill_dir` {str(spill_dir)!r} cannot be created: {exc}") from None
    if not os.access(spill_dir, os.W_OK | os.X_OK):
        raise ValueError(f"`spill_dir` {str(spill_dir)!r} is not writable by this user; pick a directory "
                         "on a disk with room for what does not fit in memory")


def _join(address: str, token: str | None, namespace, log_to_driver) -> dict:
    state = session.read_state()
    local = False
    if address == "auto":
        if not state:
            raise ConnectionError("init(address='auto') found no cluster started on this machine; "
                                  "run `farpool start --head` first, or call init() for a private cluster")
        head_address = session.ipc(state["session_dir"], "head")
        session_dir = state["session_dir"]
        local = True
        token = token or _read_token(state)
        shown = state.get("address")
    else:
        if ":" not in address:
            raise ValueError(f"address must be 'HOST:PORT' or 'auto', got {address!r}")
        head_address = address
        session_dir = None
        shown = address
        if token is None:
            token = os.environ.get("FARPOOL_TOKEN")
        if token is None and state and state.get("address") == address:
            token = _read_token(state)
        if not token:
            raise exceptions.AuthenticationError(
                f"no token to join the cluster at {address}: set FARPOOL_TOKEN or pass "
                "init(token=...) with the token `farpool start --head` printed")
    private_dir = None if local else session.new_session_dir()  # for our owner ipc socket
    cfg = {"head_address": head_address, "session_dir": session_dir if local else private_dir,
           "token": token, "embedded": False, "local": local, "start_deadline_s": 10,
           "log_to_driver": log_to_driver,
           "job_setup": _job_setup(address, namespace)}
    client = client_mod.CoreClient(cfg)
    client_mod.set_current(client)
    try:
        client.connect()
    except BaseException:
        client_mod.set_current(None)
        client.close_unstarted()
        if private_dir:
            session.remove_session(private_dir)
        raise
    client.job_setup["job_id"] = client.job_id
    client.job_setup["head_address"] = client.head_address
    info = {"address": shown, "node_id": client.home.node_id, "session_dir": session_dir,
            "job_id": client.job_id, "dashboard_url": None, "embedded": False}
    return {"client": client, "procs": [], "session_dir": None, "info": info}


def _read_token(state: dict) -> str | None:
    try:
        with open(state["token_file"]) as f:
            return f.read().strip()
    except (OSError, KeyError):
        return None


def _join_from_worker(cfg: dict) -> dict:
    """Inside a task: a client of the cluster this worker belongs to."""
    setup = _job_setup(None, cfg.get("namespace"))
    setup["job_id"] = cfg.get("job_id")
    ccfg = {"head_address": cfg["cluster_head"], "agent_address": cfg["agent_address"],
            "node_id": cfg["node_id"], "session_dir": cfg["session_dir"], "token": cfg.get("token"),
            "in_worker": True, "worker_id": cfg["worker_id"], "job_id": cfg.get("job_id"), "local": True,
            "job_setup": setup}
    client = client_mod.CoreClient(ccfg)
    client_mod.set_current(client)
    client.connect()
    info = {"address": None, "node_id": cfg["node_id"], "session_dir": cfg["session_dir"],
            "job_id": cfg.get("job_id"), "dashboard_url": None, "embedded": False}
    return {"client": client, "procs": [], "session_dir": None, "info": info, "in_worker": True}


def _auto_init() -> None:
    with _lock:
        if _state is None:
            init(_auto=True)


def _client() -> client_mod.CoreClient:
    state = _state
    if state is None:
        _auto_init()
        state = _state
    return state["client"]


def shutdown() -> None:
    """Disconnect; stop the embedded cluster if this process started it.  Idempotent."""
    global _state
    with _lock:
        state, _state = _state, None
        if state is None:
            return
        client = state["client"]
        try:
            client.shutdown()
        finally:
            client_mod.set_current(None)
            _stop_procs(state["procs"])
            if state.get("session_dir"):
                session.remove_session(state["session_dir"])
            elif not state.get("in_worker") and client.session_dir and not state["info"].get("session_dir"):
                session.remove_session(client.session_dir)
            from farpool._private import transport
            if not state.get("in_worker"):
                transport.term_context()


def _stop_procs(procs) -> None:
    for proc in procs:
        try:
            proc.stdin.close()  # the lifeline: they exit and clean up
        except Exception:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()


atexit.register(shutdown)


def _disable_in_forked_child() -> None:
    """A user's fork() copies our client but not its I/O thread: the child must not use it."""
    global _state
    _state = None
    client_mod.set_current(None)
    from farpool._private import transport
    transport.forget_context_after_fork()


os.register_at_fork(after_in_child=_disable_in_forked_child)


# ---------------------------------------------------------------------- remote functions
def _check_options(opts: dict, allowed: tuple, what: str) -> dict:
    unknown = sorted(set(opts) - set(allowed) - set(_PRIVATE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {what}; valid options: {', '.join(allowed)}")
    num_returns = opts.get("num_returns", 1)
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"`num_returns` must be an int >= 0, got {num_returns!r}")
    max_retries = opts.get("max_retries", 3)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < -1:
        raise ValueError(f"`max_retries` must be an int >= -1 (-1: retry forever), got {max_retries!r}")
    retry = opts.get("retry_exceptions", False)
    if not isinstance(retry, bool):
        if not isinstance(retry, (list, tuple)) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in retry):
            raise TypeError(f"`retry_exceptions` must be a bool or a list of exception types, got {retry!r}")
    strategy = opts.get("scheduling_strategy", "DEFAULT") or "DEFAULT"
    if not (strategy in ("DEFAULT", "SPREAD") or isinstance(strategy, NodeAffinity)):
        raise ValueError(f"`scheduling_strategy` must be 'DEFAULT', 'SPREAD' or farpool.NodeAffinity(...), "
                         f"got {strategy!r}")
    name = opts.get("name")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {type(name).__name__}")
    scheduling.make_request(opts.get("num_cpus", 1), opts.get("num_gpus", 0), opts.get("memory"),
                            opts.get("resources"))
    _runtime_env_key(opts.get("runtime_env"))
    return opts


class NodeAffinity:
    """Run on ``node_id``; with ``soft=True`` fall back to any node when it cannot."""

    def __init__(self, node_id: str, soft: bool = False):
        self.node_id = node_id
        self.soft = soft

    def __repr__(self):
        return f"NodeAffinity({self.node_id!r}, soft={self.soft})"


NodeAffinity.__module__ = "farpool"


RUNTIME_ENV_KEYS = ("env_vars", "working_dir", "py_modules")


def _runtime_env_key(runtime_env: dict | None) -> str | None:
    """Tasks with a runtime_env get workers of their own, keyed by the env's canonical form."""
    if not runtime_env:
        return None
    if not isinstance(runtime_env, dict):
        raise TypeError(f"`runtime_env` must be a dict, got {type(runtime_env).__name__}")
    unknown = sorted(set(runtime_env) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise ValueError(f"unknown runtime_env field(s) {', '.join(unknown)}; supported: "
                         f"{', '.join(RUNTIME_ENV_KEYS)}")
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in env_vars.items()):
        raise TypeError("runtime_env['env_vars'] must be a dict of str -> str")
    canonical = dict(runtime_env)
    # Code travels with the task: working_dir and py_modules are packaged (by content
    # hash, uploaded once to the head) and unpacked on whichever node runs the task.
    if canonical.get("working_dir"):
        canonical["working_dir"] = _package(canonical["working_dir"], "working_dir")
    if canonical.get("py_modules"):
        if not isinstance(canonical["py_modules"], (list, tuple)):
            raise TypeError("runtime_env['py_modules'] must be a list of paths")
        canonical["py_modules"] = [_package(p, "py_modules") for p in canonical["py_modules"]]
    return "runtime_env:" + json.dumps(canonical, sort_keys=True)


_PACKAGES: dict = {}  # (path, newest mtime) -> package key, per driver process
# Packages larger than this are refused: runtime_env is for code, not data (put() data).
MAX_PACKAGE_BYTES = 100 * 1024 * 1024


def _package(path: str, what: str) -> str:
    """Zip a directory or .py file, upload it to the head once; returns "pkg:<hash>:<name>"."""
    import hashlib
    import io
    import zipfile
    if not isinstance(path, str) or not os.path.exists(path):
        raise ValueError(f"runtime_env['{what}']: {path!r} does not exist on this machine")
    path = os.path.abspath(path)
    files = []
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
            for name in sorted(names):
                if not name.endswith(".pyc"):
                    full = os.path.join(root, name)
                    files.append((full, os.path.relpath(full, os.path.dirname(path) if what == "py_modules"
                                                        else path)))
    else:
        files.append((path, os.path.basename(path)))
    stamp = (path, max((os.path.getmtime(f) for f, _ in files), default=0), len(files))
    key = _PACKAGES.get(stamp)
    if key is not None:
        return key
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for full, arc in files:
            info = zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (os.stat(full).st_mode & 0o777) << 16
            with open(full, "rb") as f:
                zf.writestr(info, f.read())
    data = buf.getvalue()
    if len(data) > MAX_PACKAGE_BYTES:
        raise ValueError(f"runtime_env['{what}'] {path} packs to {len(data) / 1e6:.0f} MB, over the "
                         f"{MAX_PACKAGE_BYTES / 1e6:.0f} MB limit: ship code here and data with farpool.put()")
    key = f"pkg:{hashlib.sha256(data).hexdigest()[:32]}:{os.path.basename(path)}"
    _client().head_request("KVPut", (key, data))
    _PACKAGES[stamp] = key
    return key


def _pool_key(pool: str | None, runtime_env: dict | None) -> str | None:
    env = _runtime_env_key(runtime_env)
    return "|".join(k for k in (pool, env) if k) or None


class RemoteFunction:
    """What ``@farpool.remote`` makes of a function: call ``.remote()``, not the function."""

    def __init__(self, fn, options: dict):
        self._fn = fn
        self._options = _check_options(dict(options), FUNCTION_OPTIONS, f"remote function {fn.__qualname__}")
        self._info: client_mod.RemoteFunctionInfo | None = None
        self._shape = scheduling.make_request(self._options.get("num_cpus", 1), self._options.get("num_gpus", 0),
                                              self._options.get("memory"), self._options.get("resources"))
        functools.update_wrapper(self, fn)

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
        bound._shape = scheduling.make_request(merged.get("num_cpus", 1), merged.get("num_gpus", 0),
                                               merged.get("memory"), merged.get("resources"))
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
        refs = client.submit(info, args, kwargs, max(num_returns, 1), self._shape, opts.get("max_retries", 3),
                             opts.get("retry_exceptions", False), name,
                             opts.get("scheduling_strategy", "DEFAULT") or "DEFAULT",
                             _pool_key(opts.get("_pool_key"), opts.get("runtime_env")))
        if num_returns == 1:
            return refs[0]
        if num_returns == 0:
            return None
        return refs


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


def wait(refs, *, num_returns: int = 1, timeout: float | None = None, fetch_local: bool = True):
    """(ready, not_ready): the first ``num_returns`` refs done, in the order given."""
    if isinstance(refs, ObjectRef):
        raise TypeError("wait() takes a list of ObjectRefs, not a single ref: wait([ref])")
    ref_list, _ = _check_refs(refs, "wait")
    if not ref_list:  # as Ray: nothing to wait for
        _check_timeout(timeout)
        return [], []
    if len(set(ref_list)) != len(ref_list):
        raise ValueError("wait() got the same ObjectRef more than once")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"`num_returns` must be an int >= 0, got {num_returns!r}")
    if num_returns > len(ref_list):
        raise ValueError(f"`num_returns` ({num_returns}) is larger than the number of refs ({len(ref_list)})")
    _check_timeout(timeout)
    flags = _client().wait_entries(ref_list, num_returns, timeout)
    ready, not_ready = [], []
    for ref, done in zip(ref_list, flags):
        (ready if done and len(ready) < num_returns else not_ready).append(ref)
    return ready, not_ready


def cancel(ref, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes ``ref``: queued tasks never run, running ones are interrupted."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}")
    client = _client()
    entry = client.objects.get(ref._id)
    task = entry.task if entry is not None else None
    if force and task is not None and task.key[0] == "actor":
        raise ValueError(f"cancel(force=True) is not allowed for actor calls ({task.name}): killing "
                         "the worker would kill the actor; use farpool.kill(handle) to end the actor, "
                         "or cancel(ref) to drop a queued call")
    client.cancel(ref, force, recursive)


# ---------------------------------------------------------------------- introspection
def nodes() -> list[dict]:
    out = []
    for n in _client().request_nodes():
        out.append({"node_id": n["node_id"], "address": n.get("tcp") or n.get("ipc"), "alive": n["alive"],
                    "hostname": n.get("hostname"),
                    "resources_total": scheduling.as_floats(n["total"]),
                    "resources_available": scheduling.as_floats(n["available"]),
                    "workers": n.get("stats", {}).get("workers"), "actors": n.get("actors", 0),
                    "object_store": n.get("stats", {}).get("object_store"),
                    "is_head_node": n.get("is_head_node", False)})
    return out


def cluster_resources() -> dict:
    totals: dict = {}
    for n in nodes():
        if n["alive"]:
            for k, v in n["resources_total"].items():
                totals[k] = totals.get(k, 0.0) + v
    return totals


def available_resources() -> dict:
    totals: dict = {}
    for n in nodes():
        if n["alive"]:
            for k, v in n["resources_available"].items():
                totals[k] = totals.get(k, 0.0) + v
    return totals


def get_runtime_context():
    from farpool._private import worker as worker_mod
    ctx = worker_mod.context
    if ctx.worker_id is None:
        client = _client()
        ctx = worker_mod.RuntimeContext()
        ctx.node_id = client.home.node_id
        ctx.worker_id = client.client_id.hex()
        ctx.job_id = client.job_id
        ctx.namespace = _state.get("namespace") if _state else None
    return ctx


def get_gpu_ids() -> list[int]:
    from farpool._private import worker as worker_mod
    return list(worker_mod.context.gpu_ids)


def timeline(path: str | None = None) -> list[dict]:
    """Chrome-trace JSON of the recent tasks this process submitted (open in chrome://tracing or Perfetto).

    Writes the events to ``path`` when given, and returns them.
    """
    events = _client().timeline()
    if path is not None:
        with open(path, "w") as f:
            json.dump(events, f)
    return events
