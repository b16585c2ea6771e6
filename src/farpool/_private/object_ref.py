"""``ObjectRef``, and what refs need of the process they live in: its client and the refs being
(un)pickled on this thread.

A ref counts itself with this process's client (``current()``, set by
runtime.py) from its creation to its ``__del__``, which may run on any thread.
Pickling a ref inside a value that farpool serializes adds it to the list
``collecting`` gathers (the value's nested refs, lent to whoever gets it);
unpickling one inside a borrowed value records it for ``arriving`` (the
borrower reports it).  Each of these is thread-local and nests: leaving a
``with`` block restores the outer value.  A leaf beside client.py: it calls the
client only through the methods a ref needs (``add_local_ref``,
``release_ref``, ``pin_forever``, ``future_for``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref

from farpool import exceptions as exc_mod
from farpool._private import context as context_mod
from farpool._private.protocol import OwnerAddress


class ObjectRef:
    """A reference to a (possibly future) value in the cluster.

    Hashable, compared by id, picklable (the receiver becomes a borrower).
    ``get(ref)`` returns the value; ``await ref`` works in asyncio;
    ``ref.future()`` gives a ``concurrent.futures.Future``.
    """

    __slots__ = ("_id", "_owner", "_counted_by", "__weakref__")

    def __init__(self, object_id: bytes, owner: tuple, _register: bool = True):
        self._id = object_id
        self._owner = owner
        self._counted_by = None
        if _register:
            client = _current_client
            if client is not None:
                client.add_local_ref(self)
                self._counted_by = client

    def hex(self) -> str:
        return self._id.hex()

    def binary(self) -> bytes:
        return self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __reduce__(self):
        collector = _nested_refs.collector
        if collector is not None:
            collector.append(self)
        elif self._counted_by is not None:
            # Pickled outside farpool (pickle.dumps by hand, a queue, a file): nobody will
            # tell us when the copy is gone, so the object stays pinned for this session.
            self._counted_by.pin_forever(self)
        return (_rebuild_ref, (self._id, tuple(self._owner)))  # (the plain tuple: cheaper to pickle)

    def __del__(self):
        client = self._counted_by
        if client is not None:
            try:
                client.release_ref(self._id)
            except Exception:
                pass

    def future(self) -> concurrent.futures.Future:
        """A ``concurrent.futures.Future`` completed with the value (or the error)."""
        return _require_client().future_for(self)

    def __await__(self):
        import asyncio
        loop = asyncio.get_running_loop()
        afut = loop.create_future()
        cfut = self.future()

        def done(f):
            def settle():
                if afut.cancelled():
                    return
                error = f.exception()
                if error is not None:
                    afut.set_exception(error)
                else:
                    afut.set_result(f.result())
            loop.call_soon_threadsafe(settle)
        cfut.add_done_callback(done)
        return afut.__await__()


ObjectRef.__module__ = "farpool"


def _rebuild_ref(object_id: bytes, owner: tuple) -> ObjectRef:
    owner = OwnerAddress(*owner)
    if _current_client is None and context_mod.worker_config is not None and _connect is not None:
        _connect()  # a ref arrives in a worker: its client must exist to count it (we borrow it)
    if _nested_refs.uncounted:
        return ObjectRef(object_id, owner, _register=False)
    ref = ObjectRef(object_id, owner)
    arrivals = _nested_refs.arrivals
    if arrivals is not None:
        arrivals.append(weakref.ref(ref))
    return ref


def counted(object_id: bytes, owner: tuple) -> ObjectRef:
    """A ref of ours whose local count the reference table took already (under its lock,
    where the object was found alive: RefTable.reuse_stored / add_stored)."""
    ref = ObjectRef(object_id, owner, _register=False)
    ref._counted_by = _current_client
    return ref


class _NestedRefs(threading.local):
    collector: list | None = None   # refs pickled inside a value farpool is serializing
    arrivals: list | None = None    # weakrefs to refs unpickled from a task's arguments
    uncounted: bool = False         # unpickling only to check that a value loads: count nothing


_nested_refs = _NestedRefs()


class _nested:
    """Set one of ``_nested_refs``' fields for a ``with`` block, then restore the outer value.
    (A class, not contextlib.contextmanager: this runs several times per task, and the
    generator machinery costs 3 us a use where this costs under 1.)"""
    __slots__ = ("name", "value", "outer")

    def __init__(self, name: str, value):
        self.name = name
        self.value = value

    def __enter__(self):
        self.outer = getattr(_nested_refs, self.name)
        setattr(_nested_refs, self.name, self.value)
        return self.value

    def __exit__(self, *exc) -> bool:
        setattr(_nested_refs, self.name, self.outer)
        return False


def collecting(refs: list):
    """Refs pickled inside a value meanwhile (on this thread) are appended to ``refs``."""
    return _nested("collector", refs)


def arriving(refs: list):
    """Weakrefs to the refs unpickled meanwhile (on this thread) are appended to ``refs``."""
    return _nested("arrivals", refs)


def uncounted():
    """Refs unpickled meanwhile (on this thread) are not counted (the value is only checked)."""
    return _nested("uncounted", True)


_current_client = None  # this process's CoreClient (runtime.py sets it)


def set_current(client) -> None:
    global _current_client
    _current_client = client


def current():
    return _current_client


# Starts or joins this process's cluster when a ref is used before init(): set by runtime.py,
# which sits above this module (it creates clients), so that this one need not import it.
_connect = None


def set_connector(connect) -> None:
    global _connect
    _connect = connect


def _require_client():
    if _current_client is None and _connect is not None:
        _connect()
    if _current_client is None:
        raise exc_mod.FarpoolError("farpool is not initialized in this process: call farpool.init() first")
    return _current_client
