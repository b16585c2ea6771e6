"""The task functions the facades submit, and the markers that travel with them.

``_call`` (submit / apply_async), ``_run_chunk`` (map-like calls) and
``_run_initializer`` run in the workers; ``_Shared`` and ``_AuthKey`` travel
inside their arguments.  All are pickled by reference: workers import them
from this module, so their names and signatures are a contract between the
submitting process and the workers of the same version.  The submitter's side
of that contract is here too: ``_pack_plain`` (a chunk pickled up front when
it holds nothing to share), ``_submitter_authkey`` and ``_fix_result``
(values handed back writable, as the stdlib does).  Imports nothing of the
other ``_facade`` modules.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle

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
    return _packed(_apply(fn, star, plain, chunk, shared))


def _apply(fn, star: bool, plain: bool, chunk: list, shared: tuple) -> list:
    if star:
        if plain:
            return list(itertools.starmap(fn, chunk))
        return [fn(*[_restore(a, shared) for a in args]) for args in chunk]
    if plain:
        return list(map(fn, chunk))
    return [fn(x if type(x) in _PLAIN else _restore(x, shared)) for x in chunk]


# A map chunk with at least this many results travels pickled by the worker (_Packed).
# Below it a look at each result in the submitter costs less than the worker's extra
# pickling step; above it the look costs more (~20 ns a result against ~10 us a chunk).
PACK_MIN_RESULTS = 64


class _Packed:
    """A chunk's results as the worker pickled them (``_packed``); ``plain``: no array inside.

    The submitter then needs no look at every result (``_fix_result``): the
    worker's scan of the pickle is ~10x cheaper than a look at every item's type."""
    __slots__ = ("plain", "data")

    def __init__(self, plain: bool, data: bytes):
        self.plain = plain
        self.data = data

    def __reduce__(self):
        return (_Packed, (self.plain, self.data))


def _packed(results: list, count: int | None = None):
    """In the worker: a chunk's results (or a ``_Grouped`` of ``count`` items) pickled here when
    there are enough of them and nothing in them needs the runtime (no ref, no large buffer;
    see _pack_plain), else as they are (the general path)."""
    if (len(results) if count is None else count) < PACK_MIN_RESULTS:
        return results
    packed = _pack_plain(results)
    return results if packed is None else _Packed(*packed)


class _Grouped(list):
    """The result of a grouped task (``_run_chunks``): per chunk, its results or a ``_ChunkFailed``."""
    __slots__ = ()


class _ChunkFailed:
    """A chunk of a grouped task raised: what a failed task of its own would have reported."""
    __slots__ = ("error", "type_name", "text", "where")

    def __init__(self, error: BaseException | None, type_name: str, text: str, where: str):
        self.error = error          # None when the exception cannot travel (its text does)
        self.type_name = type_name
        self.text = text
        self.where = where

    def __reduce__(self):
        return (_ChunkFailed, (self.error, self.type_name, self.text, self.where))

    @classmethod
    def of(cls, error: Exception) -> "_ChunkFailed":
        import os
        from farpool._private import context, protocol
        try:
            pickle.loads(pickle.dumps(error, protocol=5))
            travels = error
        except Exception:  # noqa: BLE001 - as a task's own unpicklable exception: the text only
            travels = None
        ctx = context.context
        where = f"node {(getattr(ctx, 'node_id', None) or '?')[:8]} worker {getattr(ctx, 'worker_id', '?')} " \
                f"(pid {os.getpid()})"
        return cls(travels, type(error).__qualname__, protocol.format_exception_text(error), where)


def _run_chunks(authkey: bytes | None, fn, star: bool, plain: bool, chunksize: int, chunk, *shared):
    """The task behind a group of small chunks of imap/imap_unordered (see _Feed.next_item):
    ``fn`` over each ``chunksize`` items of ``chunk``; a chunk that raises fails alone, as its
    own task would have (``_ChunkFailed``), and the next chunks run."""
    _adopt_authkey(authkey)
    if type(chunk) is bytes:
        chunk = pickle.loads(chunk)
    out = _Grouped()
    for i in range(0, len(chunk), chunksize):
        try:
            out.append(_apply(fn, star, plain, chunk[i:i + chunksize], shared))
        except Exception as error:  # noqa: BLE001 - that chunk's outcome (BaseExceptions end the task)
            out.append(_ChunkFailed.of(error))
    return _packed(out, len(chunk))


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


def _fix_result(value, chunk: bool = False):
    """A task's value as the facades hand it out: arrays writable, a map chunk's results (a list,
    ``_Packed`` or ``_Grouped``) unpacked."""
    if not chunk:
        return _writable(value)
    if type(value) is _Packed:
        try:
            unpacked = pickle.loads(value.data)
        except BaseException as exc:
            exc.add_note("(farpool: while unpickling the results of a chunk of a map here; the error comes "
                         "from a result's unpickling code)")
            raise
        if value.plain:
            return unpacked
        value = unpacked
    if type(value) is list:
        return value if _all_plain(value) else [v if type(v) in _PLAIN else _writable(v) for v in value]
    if type(value) is _Grouped:
        return _Grouped(part if type(part) is _ChunkFailed else _fix_result(part, chunk=True) for part in value)
    return _writable(value)
