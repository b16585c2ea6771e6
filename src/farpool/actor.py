"""Actors: ``@farpool.remote`` on a class, handles, methods, ``get_actor`` and ``kill``.

Called from user threads.  An actor lives in a worker process of its own,
placed and restarted by the head (see _private/actor_table.py); method calls
go from the caller straight to that worker, in submission order per caller.
"""

from __future__ import annotations

import inspect
import os

from farpool import _placement_group, exceptions
from farpool._generator import ObjectRefGenerator
from farpool._private import context as context_mod
from farpool._private import options, placement_groups, protocol, runtime, runtime_env, scheduling
from farpool._private import object_ref
from farpool._private.object_ref import ObjectRef
from farpool._private.streams import StreamState

ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "max_restarts", "max_task_retries",
                 "max_concurrency", "name", "namespace", "lifetime", "get_if_exists", "scheduling_strategy",
                 "runtime_env")


def _check_num_returns(num_returns) -> None:
    if num_returns != "streaming" and (isinstance(num_returns, bool) or not isinstance(num_returns, int)
                                       or num_returns < 0):
        raise ValueError(f"`num_returns` must be an int >= 0 or 'streaming', got {num_returns!r}")


def method(*, num_returns: int | str = 1):
    """``@farpool.method(num_returns=2)`` on an actor method sets its default ("streaming": its
    calls return an ObjectRefGenerator, as a generator method's do without it)."""
    _check_num_returns(num_returns)

    def mark(fn):
        fn.__farpool_num_returns__ = num_returns
        return fn
    return mark


def _check_actor_options(opts: dict, cls_name: str) -> dict:
    options.check_ray_only_options(opts, f"actor {cls_name}")
    unknown = sorted(set(opts) - set(ACTOR_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for actor {cls_name}; valid options: "
                         f"{', '.join(ACTOR_OPTIONS)}")
    for key in ("max_restarts", "max_task_retries"):
        value = opts.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"`{key}` must be an int >= -1 (-1: forever), got {value!r}")
    concurrency = opts.get("max_concurrency")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"`max_concurrency` must be an int >= 1, got {concurrency!r}")
    lifetime = opts.get("lifetime")
    if lifetime not in (None, "detached"):
        raise ValueError(f"`lifetime` must be None or 'detached', got {lifetime!r}")
    name = opts.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"`name` must be a non-empty str, got {name!r}")
    options.check_scheduling_strategy(opts.get("scheduling_strategy"))
    scheduling.make_request(opts.get("num_cpus") or 0, opts.get("num_gpus", 0), opts.get("memory"),
                            opts.get("resources"))
    return opts


def _class_meta(cls) -> dict:
    """What a handle knows of its actor's class: method names and their num_returns
    ("streaming" for generator methods, sync or async: decided here, once per class)."""
    methods = {}
    is_async = False
    for name, member in inspect.getmembers(cls, predicate=inspect.isfunction):
        if name.startswith("__") and name != "__call__":
            continue
        default = "streaming" if inspect.isgeneratorfunction(member) or inspect.isasyncgenfunction(member) else 1
        methods[name] = getattr(member, "__farpool_num_returns__", default)
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            is_async = True
    return {"class_name": cls.__qualname__, "methods": methods, "is_async": is_async}


class ActorClass:
    """What ``@farpool.remote`` makes of a class: ``Cls.remote(*args)`` creates an actor."""

    def __init__(self, cls, options: dict):
        self._cls = cls
        self._options = _check_actor_options(dict(options), cls.__name__)
        self._cls_bytes: bytes | None = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__

    @property
    def _farpool_function(self):
        return self._cls

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor class {self._cls.__name__} cannot be instantiated directly; use "
                        f"{self._cls.__name__}.remote(...) to create an actor")

    def options(self, **options) -> "ActorClass":
        merged = dict(self._options)
        merged.update(options)
        bound = ActorClass(self._cls, merged)
        bound._cls_bytes = self._cls_bytes
        bound._parent = self
        return bound

    def _meta(self) -> dict:
        return _class_meta(self._cls)

    def remote(self, *args, **kwargs) -> "ActorHandle":
        client = runtime.client()
        opts = self._options
        if opts.get("lifetime") == "detached" and client.embedded:
            raise ValueError(
                f"actor {self._cls.__name__}: lifetime='detached' needs a cluster started with "
                "`farpool start --head` (init(address=...)); the embedded cluster of init() ends "
                "with this driver, so nothing could outlive it")
        parent = getattr(self, "_parent", None)
        if self._cls_bytes is None:
            self._cls_bytes = (parent._cls_bytes if parent is not None and parent._cls_bytes else
                               protocol.dumps_function(self._cls, parent or self))
            if parent is not None:
                parent._cls_bytes = self._cls_bytes
        # Top-level ref arguments are resolved here, before the actor is registered.
        args = [client.get([a], None)[0] if isinstance(a, ObjectRef) else a for a in args]
        kwargs = {k: client.get([v], None)[0] if isinstance(v, ObjectRef) else v for k, v in kwargs.items()}
        with object_ref.collecting([]) as nested:
            payload, bufs = protocol.dumps((tuple(args), kwargs), what=f"an argument of {self._cls.__name__}()")
        meta = self._meta()
        num_cpus = opts.get("num_cpus")
        hold = scheduling.make_request(num_cpus or 0, opts.get("num_gpus", 0), opts.get("memory"),
                                       opts.get("resources"))
        place = dict(hold)
        if num_cpus is None:
            place["CPU"] = scheduling.UNIT  # counts one CPU when placing, so actors spread
        hold, strategy = options.placement(opts, hold, f"actor {self._cls.__name__}")
        if strategy is None:  # none given: created by code whose placement group captures its children?
            hold, strategy = _placement_group.captured(hold, context_mod.context.capture_group,
                                                       f"actor {self._cls.__name__}")
        group = placement_groups.group_of(hold)
        if group is not None:
            place = dict(hold)  # in its bundle, by what it holds
        concurrency = opts.get("max_concurrency") or (1000 if meta["is_async"] else 1)
        namespace = opts.get("namespace", runtime.namespace())
        job_setup = dict(client.job_setup, pool_key=runtime_env.key(opts.get("runtime_env")))  # (with the job's)
        spec = {
            "class_name": self._cls.__qualname__, "cls_bytes": self._cls_bytes, "args_payload": payload,
            "arg_bufs": [bytes(b.raw()) for b in bufs], "ref_values": [], "ref_bufs": [],
            "job_setup": job_setup,
            "options": {"max_concurrency": concurrency, "is_async": meta["is_async"],
                        "class_name": self._cls.__qualname__,
                        "resources": hold, "num_cpus": num_cpus or 1},
            "hold_shape": hold, "place_shape": place, "max_restarts": opts.get("max_restarts", 0),
            "name": opts.get("name"), "namespace": namespace, "get_if_exists": opts.get("get_if_exists", False),
            "detached": opts.get("lifetime") == "detached", "job_id": client.job_id, "meta": meta,
            "node_affinity": (strategy.node_id, strategy.soft) if strategy is not None
            and not isinstance(strategy, str) else None,
            "placement_group": group,
        }
        actor_id = os.urandom(16).hex()
        used_id, error, known_meta = client.head_request("CreateActor", (actor_id, spec))
        if error is not None:
            raise ValueError(error)
        if nested and used_id == actor_id:  # (``nested`` holds the refs until now)
            client.pin_for_actor(actor_id, nested)
        if used_id != actor_id or spec["name"] is not None or spec["detached"]:
            # Named, detached or pre-existing: others can find it, so no handle count ends it.
            return ActorHandle(used_id, known_meta or meta, opts.get("max_task_retries", 0))
        # Handles are counted like objects: they share a token owned here, borrowed by
        # every process a handle travels to; when the token is freed, the actor ends.
        token = client.actor_token(actor_id)
        return ActorHandle(used_id, known_meta or meta, opts.get("max_task_retries", 0), token)


ActorClass.__module__ = "farpool"


class ActorHandle:
    """A reference to an actor: ``handle.method.remote(...)``; picklable into tasks and actors."""

    def __init__(self, actor_id: str, meta: dict, max_task_retries: int = 0, token: ObjectRef | None = None):
        self._actor_id = actor_id
        self._meta = meta
        self._max_task_retries = max_task_retries
        self._token = token  # an ObjectRef whose lifetime is the actor's (None: not counted)

    def __getattr__(self, name: str) -> "ActorMethod":
        methods = self.__dict__.get("_meta", {}).get("methods", {})
        if name not in methods:
            raise AttributeError(f"actor {self._meta.get('class_name')} has no method {name!r}")
        return ActorMethod(self, name, methods[name])

    def __reduce__(self):
        return (ActorHandle, (self._actor_id, self._meta, self._max_task_retries, self._token))

    def __repr__(self) -> str:
        return f"ActorHandle({self._meta.get('class_name')}, {self._actor_id[:12]})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


ActorHandle.__module__ = "farpool"


class ActorMethod:
    def __init__(self, handle: ActorHandle, name: str, num_returns: int | str, call_name: str | None = None,
                 max_pending_items: int | None = None):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns  # or "streaming": a generator method
        self._call_name = call_name  # shown in errors and the timeline instead of Class.method
        self._max_pending_items = max_pending_items

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name} cannot be called directly; use "
                        f"handle.{self._name}.remote(...)")

    def options(self, *, num_returns: int | str | None = None, name: str | None = None,
                max_pending_items: int | None = None) -> "ActorMethod":
        """The same method with ``num_returns`` and/or a ``name`` for its calls (errors, timeline);
        ``max_pending_items`` for a generator method: its call pauses while that many items are unread."""
        if num_returns is not None:
            _check_num_returns(num_returns)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a str, got {type(name).__name__}")
        options.check_max_pending_items(max_pending_items)
        num_returns = self._num_returns if num_returns is None else num_returns
        pending = self._max_pending_items if max_pending_items is None else max_pending_items
        if pending is not None and num_returns != "streaming":
            raise ValueError(f"`max_pending_items` applies to generator methods only; {self._name} returns "
                             "its result at once")
        return ActorMethod(self._handle, self._name, num_returns, self._call_name if name is None else name,
                           pending)

    def remote(self, *args, **kwargs):
        client = runtime.client()
        handle = self._handle
        qualname = self._call_name or f"{handle._meta.get('class_name')}.{self._name}"
        if self._num_returns.__class__ is str:  # "streaming": a generator method
            state = StreamState(self._max_pending_items)
            refs = client.submit_actor_call(handle._actor_id, self._name, qualname, args, kwargs, 1,
                                            handle._max_task_retries, handle._token, stream=state)
            return ObjectRefGenerator(refs[0], state, client)
        refs = client.submit_actor_call(handle._actor_id, self._name, qualname, args, kwargs,
                                        max(self._num_returns, 1), handle._max_task_retries, handle._token)
        if self._num_returns == 1:
            return refs[0]
        if self._num_returns == 0:
            return None
        return refs


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor called ``name``; ValueError when there is none."""
    if not isinstance(name, str):
        raise TypeError(f"get_actor() takes the actor's name (a str), got {type(name).__name__}")
    client = runtime.client()
    if namespace is None:
        namespace = runtime.namespace()
    actor_id, error, meta = client.head_request("GetNamedActor", (name, namespace))
    if error is not None:
        raise ValueError(error)
    return ActorHandle(actor_id, meta)


def exit_actor() -> None:
    """End the actor this runs in once the current call returns, for good (no restart).

    The call itself finishes and its caller gets its result; calls after it raise
    ``ActorDiedError`` saying the actor exited.  Like ``sys.exit`` for an actor, but
    it returns: code after it in the method still runs.
    """
    from farpool._private.context import context
    if context.actor_id is None:
        raise RuntimeError("exit_actor() must be called inside an actor's method; to end an actor "
                           "from outside, use farpool.kill(handle)")
    context.exit_requested = True


def kill(handle: ActorHandle, *, no_restart: bool = True) -> None:
    """End the actor's process now; with ``no_restart`` later calls raise ActorDiedError."""
    if not isinstance(handle, ActorHandle):
        raise TypeError(f"kill() takes an ActorHandle, got {type(handle).__name__}")
    runtime.client().kill_actor(handle._actor_id, bool(no_restart))


def _current_actor_handle(actor_id: str, cls) -> "ActorHandle":
    """RuntimeContext.current_actor: a handle that does not count (the actor's creator's do)."""
    return ActorHandle(actor_id, _class_meta(cls) if cls is not None else {"class_name": "?", "methods": {}})


context_mod.actor_handle_factory = _current_actor_handle

del exceptions
