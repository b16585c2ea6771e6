"""Large by-value arguments stored once: the same bytes passed again reuse the stored copy.

Owns: finding the large top-level arguments of a call, their content digest, and turning
each into a ref of a stored object, reused while that object lives::

    submit(args) -- pickled args have a buffer >= SHARE_MIN_BYTES --> share(args, kwargs)
      each top-level argument alone: pickled (zero-copy), digest of payload + buffers (xxh3)
        digest known and its object alive (RefTable.by_content) --> a ref of that object
        else --> stored in the node store, then known by its digest until it is freed: when
                 no task uses it and its source value is gone or SHARED_LINGER_S passed
      the argument travels as that ref: the worker maps it as it maps any by-value argument

The result is what copying gives: the digest is taken at every call, so an array changed
between calls hashes differently and is stored again; a reused copy is mapped
copy-on-write by each task, as a per-call copy is.  An argument given twice in one call
(the same object), or one holding refs, stays by value (identity and borrowing as before).
xxh3 is not cryptographic: two different values with one 128-bit digest are possible in
theory only by construction, and would be only the caller's own data.

Who may touch it: ``share`` and ``held_by_task`` on user threads (the submitter's caller);
the releases on any thread (a finalizer) or the I/O thread (the timer); the table lives in
the RefTable, under its lock.  (The facades' map-like calls put a big array once per call
themselves; their ``submit``/``apply_async`` calls come through here.)
"""

from __future__ import annotations

import weakref

from farpool._private import protocol
from farpool._private.client_part import ClientPart
from farpool._private.object_ref import ObjectRef, collecting, counted
from farpool._private.refs import READY, Entry

# A top-level argument whose pickled buffers reach this many bytes is stored once by
# content and passed as a ref; smaller ones travel with their call.  Lower shares more
# calls' data, at one digest per argument per call (xxh3: ~7 GB/s here, a third of a
# copy into fresh store pages); higher hashes less.  joblib memory-maps above 1 MB.
SHARE_MIN_BYTES = 1 << 20


# A stored argument stays while a task uses it, then while the value it was made from lives,
# at most this long after the last call that passed it: a next call with the same bytes
# reuses it.  Longer reuses it across slower loops of calls; shorter gives memory back sooner.
SHARED_LINGER_S = 1.0


def has_large_buffer(bufs: list) -> bool:
    """True if any pickled out-of-band buffer is large enough to share (``share``'s trigger)."""
    for b in bufs:
        if b.raw().nbytes >= SHARE_MIN_BYTES:
            return True
    return False


# A buffer this large is hashed in two halves at once, this thread and a helper (xxhash lets
# go of the GIL): 200 MB in 8.5 ms instead of 12.3 here, at every call that passes it.  Below
# it, starting the helper costs more than it saves.
SPLIT_DIGEST_MIN = 32 << 20


def digest_of(payload: bytes, bufs: list) -> bytes:
    """A 128-bit content digest of a pickled value: its payload and every buffer, with lengths
    (a buffer of SPLIT_DIGEST_MIN or more by the digests of its two halves)."""
    import xxhash  # (only on this path: most programs never pass a large argument)
    h = xxhash.xxh3_128()
    h.update(len(payload).to_bytes(8, "little"))
    h.update(payload)
    for b in bufs:
        raw = b.raw() if isinstance(b, protocol.pickle.PickleBuffer) else memoryview(b).cast("B")
        h.update(raw.nbytes.to_bytes(8, "little"))
        h.update(_halves_digest(xxhash, raw) if raw.nbytes >= SPLIT_DIGEST_MIN else raw)
    return h.digest()


def _halves_digest(xxhash, raw: memoryview) -> bytes:
    """The digests of ``raw``'s two halves, one made by a helper thread meanwhile."""
    import threading
    half = raw.nbytes // 2
    second: list = []
    helper = threading.Thread(target=lambda: second.append(xxhash.xxh3_128_digest(raw[half:])),
                              name="farpool-digest", daemon=True)
    helper.start()
    first = xxhash.xxh3_128_digest(raw[:half])
    helper.join()
    return first + second[0]


class SharedArgs(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def share(self, args: tuple, kwargs: dict, ref_slots: list, name: str) -> tuple[tuple, dict, list]:
        """``args``/``kwargs`` with each large top-level value replaced by None and a ref of its
        stored copy appended to ``ref_slots`` (as the submitter does for refs given by the user),
        and the (ref, value) pairs for ``held_by_task`` once the task pins them."""
        lingering: list = []
        home = self.conns.home
        if home is None or not home.local:  # no store of ours to keep a copy in
            return args, kwargs, lingering
        slots = [(i, v) for i, v in enumerate(args)] + list(kwargs.items())
        seen: dict[int, int] = {}
        for _, value in slots:
            seen[id(value)] = seen.get(id(value), 0) + 1
        new_args, new_kwargs = None, None
        for slot, value in slots:
            if value is None or seen[id(value)] > 1 or isinstance(value, ObjectRef):
                continue
            ref = self._shared_ref(value, f"{_label(slot)} of {name}")
            if ref is None:
                continue
            ref_slots.append((slot, ref))
            lingering.append((ref, value))
            if isinstance(slot, int):
                new_args = new_args or list(args)
                new_args[slot] = None
            else:
                new_kwargs = new_kwargs or dict(kwargs)
                new_kwargs[slot] = None
        return (args if new_args is None else tuple(new_args)), (kwargs if new_kwargs is None else new_kwargs), \
            lingering

    def held_by_task(self, lingering: list) -> None:
        """The task that ``share`` made these refs for pins their objects now.  The count each
        ref held is given back when its source value (the caller's array) is garbage, or
        SHARED_LINGER_S from now, whichever comes first: so a copy outlives its last task
        only while the caller may still pass the same value again.  ``lingering``: (ref,
        source value) pairs from ``share``."""
        for ref, source in lingering:
            ref._counted_by = None  # (task events keep task records, and their refs, a while)
            release = _Release(self.c, ref._id)
            try:
                release.finalizer = weakref.finalize(source, release)
                release.finalizer.atexit = False
            except TypeError:  # not weakly referenceable: the timer alone
                pass
            self.loop.call_soon(self.loop.call_later, SHARED_LINGER_S, release)

    def _shared_ref(self, value, what: str) -> ObjectRef | None:
        """A ref of the stored copy of ``value`` (reused, or stored now); None when ``value`` is
        small, holds refs, or cannot be pickled alone (it then travels as before)."""
        nested: list = []
        try:
            with collecting(nested):
                payload, bufs = protocol.dumps(value, what=what)
        except Exception:  # noqa: BLE001 - dumps_call of the whole call reports it as before
            return None
        if nested or not has_large_buffer(bufs):
            return None
        digest = digest_of(payload, bufs)
        c = self.c
        owner = c.owner_address
        oid = self.refs.reuse_stored(digest)
        if oid is not None:
            return counted(oid, owner)
        oid = c.new_object_id()
        location = c.stored.store_value(oid, payload, bufs, what)
        if location is None:
            return None
        entry = Entry(state=READY, location=location, size=location.size, local_refs=1,
                      no_lineage="it was a by-value argument, stored once and kept no lineage")
        self.refs.add_stored(oid, entry, digest)
        return counted(oid, owner)


class _Release:
    """Gives back one local count of a stored argument, once: from the finalizer of its source
    value (any thread) or from the linger timer (the I/O thread), whichever runs first."""
    __slots__ = ("c", "ids", "finalizer")

    def __init__(self, c, oid: bytes):
        self.c = c
        self.ids = [oid]
        self.finalizer = None

    def __call__(self) -> None:
        try:
            oid = self.ids.pop()  # (atomic: only the first caller gets it)
        except IndexError:
            return
        if self.finalizer is not None:
            self.finalizer.detach()  # (a value passed many times keeps no finalizer per call)
            self.finalizer = None
        self.c.release_ref(oid)


def _label(slot) -> str:
    return f"argument {slot}" if isinstance(slot, int) else f"keyword argument {slot!r}"
