"""Wire messages, framing and value serialization.

Owned by nobody in particular: pure functions used by every process (driver,
head, node agent, worker) on whatever thread does the I/O.  No sockets here.

A message on the wire is a list of zmq frames::

    [tag, header, *buffers]

``tag`` names the message (``b"ExecuteTask"``); ``header`` is a pickle
(protocol 5) of a tuple of fields; ``buffers`` are out-of-band pickle buffers
(numpy data and other large byte blobs) sent as their own frames without a
copy.  Headers are unpickled only from authenticated peers: CURVE + ZAP on
TCP, a 0700 directory for ``ipc://``.

User values are serialized with plain pickle first and cloudpickle only when
plain pickle fails (lambdas, closures, interactive ``__main__``).
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import NamedTuple


# Values pickled at least this large are not inlined in a message header but
# sent as separate zero-copy frames (or, later, put in the node store).
OOB_MIN_BYTES = 64 * 1024
# The exit code of an actor's worker that ended itself with farpool.actor.exit_actor():
# the head reads it in WorkerExited and ends the actor for good (no restart).
ACTOR_EXIT_CODE = 77

TAGS = frozenset({
    # client <-> head
    "Hello", "Welcome", "RegisterNode", "NodeRegistered", "Heartbeat", "HeartbeatAck",
    "NodeTable", "NodeTableDelta", "SyncNodes", "GetNodes", "Nodes", "KVPut", "KVGet", "KVValue", "Goodbye",
    "DriverDied",
    # owners' task events, in batches (task_events.py); status/list/timeline questions (cluster_state.py)
    "TaskEvents", "GetState",
    # node agent's liveness thread <-> head (pulse.py)
    "NodeAlive", "NodeAliveAck",
    # client <-> node agent
    "RequestLease", "LeaseGranted", "LeaseSpillback", "LeaseInfeasible", "LeaseRejected",
    "ReturnLease", "WorkerExited", "CancelLease", "Relay", "Relayed", "SignalWorker",
    "YieldLease",  # node agent -> client: give this lease back once its tasks end (leases.tick)
    "WorkerBlocked", "WorkerUnblocked",
    # node agent -> client on TCP: are you still connected? (see node_clients._check_tcp_clients)
    "Probe",
    # owner messages between nodes, routed by the agents: ToPeer(target, *message) in,
    # FromPeer(sender, *message) out (raw frames, like Relay); PeerGone(identity), also
    # the answer to WatchPeer(identity) when that client leaves or is not connected
    "ToPeer", "FromPeer", "PeerGone", "WatchPeer",
    # worker <-> node agent (Retire: the node drains; finish the running task, hand back the rest, exit)
    "WorkerReady", "WorkerLog", "Retire",
    # client <-> worker
    "ExecuteTask", "TaskFinished", "GetObject", "ObjectValue", "CancelTask", "BorrowReleased", "AddBorrower",
    "TakeBack", "TakenBack",
    # streaming generator tasks (streams.py, worker_streams.py): worker -> owner, each item as it is
    # yielded; owner -> worker, how many items it may have made (back-pressure), and stop;
    # worker <-> its node agent: tell me when this caller (a stream's owner, on any node) is gone
    "ItemReady", "StreamCredit", "StopStream", "WatchCaller", "UnwatchCaller", "CallerGone",
    # node object store
    "AllocateObject", "ObjectAllocated", "FreeObjects", "RestoreObject", "StoreStats", "SegmentsDropped",
    # copies between node stores (pull.py): reader -> its agent, agent -> agent, owner <- borrower
    "PullObject", "ObjectCopied", "ReadChunk", "Chunk", "AddCopy",
    # a draining agent asks the owners of what its store holds to copy it away; they answer
    "ObjectsLeaving", "ObjectsSaved",
    # a client on another machine puts a large value into its agent's store, and reads it back
    "UploadObject", "WriteChunk", "ChunkWritten",
    # observing (farpool stack/logs): client -> node agent, answered by Reply(request_id, value)
    "DumpStacks", "ReadLogs", "Reply",
    # actors: client <-> head <-> agent <-> worker
    "CreateActor", "ActorRegistered", "ActorCreated", "WaitActor", "ActorInfo", "KillActor",
    "GetNamedActor",
    # placement groups: client <-> head (PlacementGroupReply answers each), head <-> agent (two phases)
    "CreatePlacementGroup", "RemovePlacementGroup", "WaitPlacementGroup", "GetPlacementGroups",
    "PlacementGroupReply", "PrepareBundles", "BundlesPrepared", "CommitBundles", "BundlesCommitted",
    "ReleaseBundles", "BundlesReleased",
    # anything
    "Error", "Ping", "Pong",
})


class ProtocolError(Exception):
    """A message that cannot be decoded: garbage, an unknown tag, a bad header."""


def encode(tag: str, fields: tuple = (), buffers: list | tuple = ()) -> list:
    """Frames for one message; ``buffers`` are sent as they are (no copy)."""
    return [tag.encode(), pickle.dumps(fields, protocol=5), *buffers]


def decode(frames: list) -> tuple[str, tuple, list]:
    """(tag, fields, buffers) of one message; raises ProtocolError on garbage."""
    if len(frames) < 2:
        raise ProtocolError(f"message has {len(frames)} frame(s), expected at least 2")
    raw_tag = bytes(frames[0])
    try:
        tag = raw_tag.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"message tag is not text: {raw_tag[:32]!r}") from None
    if tag not in TAGS:
        raise ProtocolError(f"unknown message tag {tag[:64]!r}")
    try:
        fields = pickle.loads(frames[1])
    except Exception as exc:
        raise ProtocolError(f"cannot decode the header of {tag}: {exc}") from None
    if not isinstance(fields, tuple):
        raise ProtocolError(f"header of {tag} is a {type(fields).__name__}, expected a tuple")
    return tag, fields, frames[2:]


def decode_or_log(frames: list, source: str, logger) -> tuple | None:
    """``decode``, or None for garbage, which is dropped with one warning naming ``source``."""
    try:
        return decode(frames)
    except ProtocolError as exc:
        logger.warning("dropped a bad message from %s: %s", source, exc)
        return None


# --- compound values inside messages -------------------------------------
# They travel as plain tuples (the wire format is the tuple); the receiver reads them
# by name through ``_make``, the sender builds them by name and sends ``tuple(...)``.

class ExecuteTask(NamedTuple):
    """The fields of ExecuteTask((specs, caller, store_results), arg and ref buffers...)."""
    specs: list                 # TaskSpec tuples, in the order they run
    caller: tuple | None        # the owner's OwnerAddress (a plain tuple: the worker passes it on)
    store_results: bool = False  # large results into the worker's node store (else inline)


class Error(NamedTuple):
    """The fields of Error(code, detail): a refusal, e.g. "version-mismatch", "unknown-node"."""
    code: str
    detail: str


class TakeBack(NamedTuple):
    """The fields of TakeBack(task_ids, token): an owner wants queued tasks back."""
    task_ids: list
    token: object               # echoed in TakenBack


class OwnerAddress(NamedTuple):
    """How a client is reached by the processes holding its refs: ObjectRef._owner,
    ExecuteTask.caller, AddBorrower's borrower, TaskFinished's sender.  Sent as the plain
    tuple (see ``owner_address``); tests name a process by its identity alone."""
    identity: bytes             # b"c:<client id>"
    node_id: str | None = None  # its home node
    endpoint: str | None = None  # its owner service (ipc://...), None when reached through its agent
    pid: int | None = None


def owner_address(address) -> OwnerAddress:
    """An address as it came in a message (a plain tuple), named."""
    return address if type(address) is OwnerAddress else OwnerAddress(*address)


class TaskLease(NamedTuple):
    """TaskSpec.lease: what the lease a task runs on holds."""
    gpu_ids: list
    num_cpus: float
    shape: dict                 # the task's resources (the same dict for a batch of one shape)


class TaskSpec(NamedTuple):
    """One task of ExecuteTask((specs, caller, store_results), arg and ref buffers...)."""
    task_id: bytes
    fn_hash: bytes
    fn_bytes: bytes | None      # the function's code, the first time it goes to this lease
    name: str
    args: object                # pickled (args, kwargs), or ("loc"|"pull", ...) when stored
    n_arg_bufs: int
    ref_values: list            # [(slot, payload or ("loc"|"pull", ...), n buffers)]
    num_returns: int            # or a StreamSpec: a streaming generator task
    job_setup: dict | None      # the job's set-up, the first time it goes to this lease
    lease: tuple                # a TaskLease: (gpu ids, CPUs, resources) of the lease it runs on


class StreamSpec(NamedTuple):
    """TaskSpec.num_returns of a streaming generator task (told from a count by its type: an int
    is an ordinary task).  The task's one return value is the number of items it yielded."""
    skip: int                   # items the owner has already (a retry): made again, not sent
    limit: int | None           # items the owner lets it make in all for now (None: no limit)


def item_id(task_id: bytes, index: int) -> bytes:
    """The object id of item ``index`` of the streaming task ``task_id`` (owner and worker agree)."""
    return task_id + b"#" + index.to_bytes(4, "little")


class ItemReady(NamedTuple):
    """The fields of ItemReady((task_id, index, item, sender), buffers...): an item a streaming
    task yielded, sent before the task goes on (see StreamCredit)."""
    task_id: bytes
    index: int                  # 0, 1, ... in the order yielded
    item: tuple                 # as a result: (payload or ("loc", path, size, store_id), n buffers, nested refs)
    sender: tuple | None        # the worker's client address (refs nested in the item are lent by it)


class StreamCredit(NamedTuple):
    """The fields of StreamCredit(task_id, limit): the streaming task may make items up to
    ``limit`` in all (the owner handed out ``limit - max_pending_items``)."""
    task_id: bytes
    limit: int


class TaskResult(NamedTuple):
    """One result of TaskFinished((results, retiring, sender, borrowed, pairs), buffers...)."""
    task_id: bytes
    ok: object                  # True, False (body is a TaskFailure) or "retired" (not run)
    body: object                # ok: [(payload or ("loc", path, size, store_id), n buffers, nested refs)]
    started: float
    ended: float


class StoredAt(NamedTuple):
    """A value in a node's store, as a message names it (a result's payload, an argument)."""
    kind: str                   # "loc"
    path: str
    size: int
    store_id: bytes


class PullFrom(NamedTuple):
    """A value in other nodes' stores, as a message names it (an argument): the reader's
    agent copies it into this node's store first (PullObject, pull.py)."""
    kind: str                   # "pull"
    store_id: bytes
    size: int
    sources: list               # ids of the nodes that hold it
    owner: tuple                # (owner identity, its node id): it frees the copy
    what: str                   # what the value is, for errors


class Location(NamedTuple):
    """Where an owner's object lives in a node's store (the owner's table; an ObjectValue's
    payload for a borrower on the same node, which maps it)."""
    kind: str                   # "seg"
    node_id: str
    store_id: bytes
    path: str
    size: int


_STORED_KINDS = {"loc": StoredAt, "pull": PullFrom, "seg": Location}


def stored_value(payload) -> StoredAt | PullFrom | Location | None:
    """A payload a message carries, named when it is stored (a StoredAt, PullFrom or
    Location, told apart by their ``kind``); None for a pickle carried in the message itself."""
    if not isinstance(payload, tuple):
        return None
    kind = payload[0]
    return _STORED_KINDS[kind]._make(payload)


class NodeAffinity(NamedTuple):
    """An actor spec's "node_affinity": where to place the actor."""
    node_id: str
    soft: bool                  # elsewhere when that node is gone (else never)


class TaskFailure(NamedTuple):
    """The body of a failed TaskResult."""
    payload: bytes | None       # the exception pickled; None when it cannot travel (its text does)
    type_name: str
    traceback: str
    function: str
    where: str
    inner: list = ()            # refs inside the exception, lent to the caller


# --- values ---------------------------------------------------------------

_main_by_value: bool | None = None


def main_script_importable(main) -> bool:
    """Can workers load the driver's script as ``__mp_main__`` without running it?

    Only a script whose top-level work sits under ``if __name__ == "__main__":``
    can be re-imported safely, as with multiprocessing's spawn.  Other scripts
    (and REPLs and notebooks) have their ``__main__`` objects pickled by value.
    """
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None:
        return bool(path)  # `python -m pkg.mod`: workers import pkg.mod by name
    try:
        import ast
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [n for n in ast.walk(node.test) if isinstance(n, ast.Name) and n.id == "__name__"]
            consts = [n for n in ast.walk(node.test) if isinstance(n, ast.Constant) and n.value == "__main__"]
            if names and consts:
                return True
    return False


def _main_is_interactive() -> bool:
    """True when objects of __main__ must travel by value (see main_script_importable)."""
    global _main_by_value
    if _main_by_value is None:
        main = sys.modules.get("__main__")
        _main_by_value = main is None or not main_script_importable(main)
    return _main_by_value


def _plain_pickle_will_do(data: bytes) -> bool:
    """Whether what the stdlib's pickle made of a value is what cloudpickle would make, read
    the same way in a worker: it names nothing of ``__main__`` where __main__ must travel by
    value (the stdlib names functions and classes; cloudpickle sends them), and no module
    was registered with cloudpickle to travel by value.  Most arguments and results are
    plain data, and the stdlib's pickle is ~5x cheaper per call than cloudpickle's.  (A
    string that happens to hold "__main__" only sends the value through cloudpickle.)"""
    if _main_is_interactive() and b"__main__" in data:
        return False
    cp = sys.modules.get("cloudpickle.cloudpickle")
    return cp is None or not getattr(cp, "_PICKLE_BY_VALUE_MODULES", None)


def reset_interactive_cache() -> None:
    global _main_by_value
    _main_by_value = None


# The phase of a task an exception interrupted, set by the worker as an attribute of the
# exception itself (so it travels in its __dict__): the facades tell a task that could not
# start (its arguments did not unpickle: the stdlib's BrokenProcessPool) from its function raising.
PHASE_ATTRIBUTE = "_farpool_phase"
LOADING_ARGUMENTS = "unpickling the arguments"


class SerializationError(TypeError):
    """A value cannot be pickled; the message says what and the likely culprit.

    ``original`` is the exception pickling raised (it travels with this one, where
    ``__cause__`` would not), so a facade can raise it as the stdlib does.
    """

    original: BaseException | None = None


_CULPRITS = (
    ("lock", "a threading lock"), ("RLock", "a threading lock"),
    ("_io.", "an open file"), ("pickle files", "an open file"), ("TextIOWrapper", "an open file"), ("BufferedReader", "an open file"),
    ("socket", "a socket"), ("generator", "a generator"), ("Connection", "a connection object"),
    ("SSLContext", "an SSL context"), ("Thread", "a thread"),
)


def _hint(text: str) -> str:
    if "through inheritance" in text:  # multiprocessing's Queue, Lock, Semaphore, Event, ...
        return (" It looks like a multiprocessing synchronization object (a Queue, Lock, Event, ...): the "
                "stdlib hands those to its child processes by inheritance, but farpool's workers are not "
                "our children and may run on other machines. Use a Manager's instead "
                "(multiprocessing.Manager().Queue(), .Lock(), ...), which any process can reach.")
    for needle, what in _CULPRITS:
        if needle in text:
            return (f" It looks like {what}: such objects cannot travel to another process; "
                    "create it inside the task instead, or pass what is needed to rebuild it.")
    return " Pass plain data (numbers, strings, numpy arrays, dataclasses) or create the object inside the task."


def dumps(value, what: str = "value") -> tuple[bytes, list]:
    """Pickle ``value`` (protocol 5) with large buffers out of band.

    Returns the pickle bytes and a list of ``PickleBuffer``s that must travel
    beside it.  Raises SerializationError naming ``what`` could not be pickled.
    """
    buffers: list = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=_oob_filter(buffers))
        if _plain_pickle_will_do(data):
            return data, buffers
    except Exception:  # noqa: BLE001 - cloudpickle's turn (a lambda, a local class, ...)
        pass
    buffers.clear()
    import cloudpickle  # imported on first need: it costs ~25 ms at start-up
    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=_oob_filter(buffers))
        return data, buffers
    except Exception as exc:
        raise _serialization_error(exc, what) from exc


def dumps_call(args: tuple, kwargs: dict, name: str) -> tuple[bytes, list]:
    """``dumps((args, kwargs))`` for a call of ``name``; when that fails, the error names the
    first argument that cannot be pickled, and its type (each is tried alone, on failure only)."""
    try:
        return dumps((args, kwargs), what=f"an argument of {name}")
    except SerializationError:
        for key, value in [*enumerate(args), *kwargs.items()]:
            label = f"argument {key}" if isinstance(key, int) else f"keyword argument {key!r}"
            dumps(value, what=f"{label} of {name} (a {type(value).__name__})")
        raise  # only together they cannot be pickled


def _serialization_error(exc: Exception, what: str) -> SerializationError:
    text = f"{type(exc).__name__}: {exc}"
    error = SerializationError(f"cannot pickle {what}: {text}.{_hint(text)}")
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))  # it travels with us only if it can
    except Exception:  # noqa: BLE001 - then the text alone says what happened
        return error
    error.original = exc
    return error


def dumps_inband(value, what: str = "value") -> bytes:
    """Pickle ``value`` with every buffer in the pickle itself (one bytes object): for
    values that travel without frames of their own (exceptions)."""
    try:
        data = pickle.dumps(value, protocol=5)
        if _plain_pickle_will_do(data):
            return data
    except Exception:  # noqa: BLE001
        pass
    import cloudpickle
    try:
        return cloudpickle.dumps(value, protocol=5)
    except Exception as exc:
        raise _serialization_error(exc, what) from exc


def _oob_filter(buffers: list):
    """A buffer_callback that keeps small buffers in-band (cheaper than a frame)."""
    def callback(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= OOB_MIN_BYTES:
            buffers.append(buf)
            return False
        return True
    return callback


def loads(data, buffers=()):
    """Unpickle what ``dumps`` made; ``buffers`` are frames or memoryviews."""
    return pickle.loads(data, buffers=buffers)


def _resolve(module_name: str, qualname: str):
    module = sys.modules.get(module_name)
    if module is None:
        import importlib
        module = importlib.import_module(module_name)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def dumps_function(fn, wrapper=None) -> bytes:
    """Pickle a function for shipping: by reference when importable, else by value.

    ``wrapper`` is what the module attribute holds when the function was
    decorated (a RemoteFunction): a reference to it is fine too, the worker
    unwraps it.
    """
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module_name and "<" not in qualname and not (module_name == "__main__" and _main_is_interactive()):
        try:
            found = _resolve(module_name, qualname)
        except Exception:
            found = None
        if found is not None and (found is fn or (wrapper is not None and found is wrapper)):
            if module_name != "__main__":
                return pickle.dumps(("ref", module_name, qualname), protocol=5)
            # The worker's __mp_main__ lacks what the script defines under its
            # `if __name__ == "__main__":` guard: carry the value as a fallback.
            import cloudpickle
            try:
                return pickle.dumps(("ref", module_name, qualname, cloudpickle.dumps(fn, protocol=5)),
                                    protocol=5)
            except Exception:
                return pickle.dumps(("ref", module_name, qualname), protocol=5)
    import cloudpickle
    try:
        return cloudpickle.dumps(("value", fn), protocol=5)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(f"cannot pickle the function {name}: {text}.{_hint(text)}") from exc


def loads_function(data: bytes):
    kind, *rest = pickle.loads(data)
    if kind == "ref":  # ("ref", module, qualname) or ("ref", module, qualname, the function by value)
        module_name, qualname, *fallback = rest
        try:
            fn = _resolve(module_name, qualname)
        except (AttributeError, ImportError):
            if not fallback:
                raise
            (by_value,) = fallback
            fn = pickle.loads(by_value)
    else:  # ("value", fn)
        (fn,) = rest
    return getattr(fn, "_farpool_function", fn)


def format_exception_text(exc: BaseException) -> str:
    import traceback
    out = io.StringIO()
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=out)
    return out.getvalue()
