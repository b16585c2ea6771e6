"""Segment files: how any process of a node writes and reads one object in the node's store.

The node agent (store.py) hands out segment files; writers (put, task results,
large arguments) and readers (get) in any process of the node use these helpers
on them directly::

    writer --AllocateObject(size)--> agent --path of a segment--> writer writes, tells the owner
    reader: open + flock(LOCK_SH) + mmap(PROT_READ) --> numpy arrays are views of the segment

A reader holds a shared flock on the file for as long as any view of its mapping
lives (``weakref.finalize`` closes the fd); the agent reuses or spills a segment
only when it can take the lock exclusively, so memory is never reused under a
reader, and a reader that is killed leaks nothing.  Writers hold the lock
exclusively, so no reader maps a value being written.

Layout: the object's store id (a length byte, then the id, in 32 bytes),
little-endian u64s (payload length, buffer count, then each buffer's length),
padded to 64 bytes, then the pickle payload, then each out-of-band buffer at a
64-byte-aligned offset (page-aligned from 64 KiB).  A reader checks the id under
its lock: a location kept after its object was freed (its owner died) may name
a segment that now holds another object, and must not read it as the old one.
Any thread; the writers' cache of mappings has its own lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import threading
import weakref
from typing import NamedTuple

ALIGN = 64
# Large buffers start on a page boundary: memcpy into a destination a few cache lines
# off the source's page offset runs at a third of its speed here (1 GB: 0.3 s, not 0.1 s).
PAGE_ALIGN_MIN = 64 * 1024
PAGE = 4096
# Values whose pickled size (payload + buffers) reaches this go to the store
# instead of travelling inline in messages.  Lower saves copies of medium
# values, higher saves the allocation round trip for small ones.
INLINE_MAX = 100 * 1024
# A reader whose object was spilled again between the agent's answer and its mapping
# asks again this many times in all.  More rides out a store thrashing under many
# readers; fewer fails sooner when something else is wrong.
READ_ATTEMPTS = 5


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


ID_FIELD = 32  # the store id at the start of a segment: a length byte, then the id


class SegmentReused(FileNotFoundError):
    """The segment no longer holds the object asked for (it was freed, and reused)."""


def layout(payload_len: int, buf_lens: list[int]) -> tuple[int, list[int], int]:
    """(payload offset, buffer offsets, total size) of a segment."""
    header = round_up(ID_FIELD + 8 * (2 + len(buf_lens)), ALIGN)
    pos = header + payload_len
    offsets = []
    for n in buf_lens:
        pos = round_up(pos, PAGE if n >= PAGE_ALIGN_MIN else ALIGN)
        offsets.append(pos)
        pos += n
    return header, offsets, max(pos, 1)


def value_size(payload: bytes, buffers: list) -> int:
    return layout(len(payload), [memoryview(b).nbytes for b in buffers])[2]


def id_field(store_id: bytes) -> bytes:
    if len(store_id) >= ID_FIELD:
        raise ValueError(f"a store id of {len(store_id)} bytes does not fit a segment header")
    return bytes([len(store_id)]) + store_id.ljust(ID_FIELD - 1, b"\0")


def write_segment(path: str, payload: bytes, buffers: list, store_id: bytes) -> int:
    """Write a pickled value into an allocated segment file; returns the bytes used.

    The writer holds the lock exclusively while it writes, so the agent never spills
    or reuses a segment under a half-written value and no reader maps one.
    """
    views = [memoryview(b).cast("B") if memoryview(b).format != "B" or memoryview(b).ndim != 1
             else memoryview(b) for b in buffers]
    header_len, offsets, total = layout(len(payload), [v.nbytes for v in views])
    with _writer_maps.mapping(path, total) as m:
        header = id_field(store_id) + struct.pack(f"<{2 + len(views)}Q", len(payload), len(views),
                                                   *[v.nbytes for v in views])
        m[:len(header)] = header
        m[header_len:header_len + len(payload)] = payload
        for off, v in zip(offsets, views):
            m[off:off + v.nbytes] = v
    return total


class _Mapping(NamedTuple):
    """A segment this process wrote, still mapped (_WriterMaps)."""
    fd: int
    mapped: mmap.mmap
    length: int
    inode: int


class _WriterMaps:
    """This process's mappings of segments it wrote, kept for the next write to the same segment.

    The agent hands freed segments out again; a writer that still maps one writes
    at memcpy speed, where a fresh mapping costs a page-table fill (MAP_POPULATE)
    and an unmap, about as much again as the copy.  The cached mappings share the
    segments' pages, so they cost no memory while the segments exist; when the
    agent drops or spills a segment it tells its writers (SegmentsDropped) and
    they let go here, so the memory really comes back.
    """

    MIN_SIZE = 1 << 20   # smaller segments: mapping them is cheap, not worth a slot
    MAX_ENTRIES = 32

    def __init__(self):
        self.lock = threading.Lock()
        self.maps: dict[str, _Mapping] = {}   # path -> its mapping, oldest first

    @contextlib.contextmanager
    def mapping(self, path: str, total: int):
        with self.lock:
            cached = self.maps.pop(path, None)
        if cached is not None:
            try:
                current = os.stat(path).st_ino
            except OSError:
                current = None
            if current != cached.inode or cached.length < total:
                self._close(cached)
                cached = None
        if cached is None:
            fd = os.open(path, os.O_RDWR)
            try:
                st = os.fstat(fd)
                length = max(st.st_size, total)
                if st.st_size < total:
                    os.ftruncate(fd, total)
                # MAP_POPULATE fills every page table entry at once: far cheaper than one fault per page.
                m = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            except BaseException:
                os.close(fd)
                raise
            cached = _Mapping(fd, m, length, st.st_ino)
        fcntl.flock(cached.fd, fcntl.LOCK_EX)
        try:
            yield cached.mapped
        finally:
            fcntl.flock(cached.fd, fcntl.LOCK_UN)
            if cached.length < self.MIN_SIZE:
                self._close(cached)
            else:
                with self.lock:
                    self.maps[path] = cached
                    evicted = [self.maps.pop(p) for p in list(self.maps)[:-self.MAX_ENTRIES]]
                for entry in evicted:
                    self._close(entry)

    def forget(self, paths) -> None:
        """The agent dropped or spilled these segments: unmap them so their memory is freed."""
        with self.lock:
            gone = [self.maps.pop(p) for p in paths if p in self.maps]
        for entry in gone:
            self._close(entry)

    def clear(self) -> None:
        self.forget(list(self.maps))

    @staticmethod
    def _close(entry: _Mapping) -> None:
        entry.mapped.close()
        os.close(entry.fd)


_writer_maps = _WriterMaps()


def forget_written(paths) -> None:
    _writer_maps.forget(paths)


def clear_written() -> None:
    _writer_maps.clear()


def read_segment(path: str, size: int, private: bool = False, store_id: bytes | None = None):
    """(payload view, buffer views) of a segment, zero-copy; SegmentReused (a
    FileNotFoundError) when it no longer holds the object ``store_id``.

    Read-only views, or with ``private`` copy-on-write ones: writable, pages are
    copied only when written, and the store never sees the writes (task
    arguments, so code that mutates its argument works as with the stdlib).
    The views keep the mapping (and a shared lock on the file) alive; when the
    last of them dies the fd closes and the lock goes.
    """
    expected = id_field(store_id) if store_id is not None else None
    fd = os.open(path, os.O_RDONLY)
    try:
        # A location kept after its object was spilled or freed names a segment that may
        # hold another object now: seen before locking, it is let go without the lock, which
        # would otherwise keep the agent from reusing the segment for the restore this
        # reader is about to ask for (it would serve the object from its spill file instead).
        if expected is not None and os.pread(fd, ID_FIELD, 0) != expected:
            raise SegmentReused(f"{path} no longer holds object {store_id.hex()}: it was freed")
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink == 0:  # spilled (unlinked) between our open and our lock
            raise FileNotFoundError(errno.ENOENT, f"{path} was spilled to disk: ask for a restore")
        if private:
            m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    release = weakref.finalize(m, os.close, fd)
    if expected is not None and m[:ID_FIELD] != expected:
        m.close()
        release()  # now: the traceback keeps ``m`` alive, and its lock would pin the segment
        raise SegmentReused(f"{path} no longer holds object {store_id.hex()}: it was freed")
    return parse(memoryview(m), private)


def parse(view: memoryview, private: bool = False):
    """(payload view, buffer views) of a whole segment's bytes (a mapping, or a copy read
    back from another machine); the buffers writable only with ``private``."""
    payload_len, count = struct.unpack_from("<2Q", view, ID_FIELD)
    lens = struct.unpack_from(f"<{count}Q", view, ID_FIELD + 16) if count else ()
    header_len, offsets, _ = layout(payload_len, list(lens))
    payload = view[header_len:header_len + payload_len]
    buffers = [view[off:off + n] if private else view[off:off + n].toreadonly() for off, n in zip(offsets, lens)]
    return payload, buffers


def pieces(payload: bytes, buffers: list, store_id: bytes, chunk: int) -> list[tuple[int, memoryview]]:
    """A segment as (offset, bytes) pieces of at most ``chunk`` bytes, views of the value's
    own buffers (no copy): what a client on another machine sends to fill one
    (the gaps between them are padding, never read)."""
    views = [memoryview(b).cast("B") if memoryview(b).format != "B" or memoryview(b).ndim != 1
             else memoryview(b) for b in buffers]
    header_len, offsets, _ = layout(len(payload), [v.nbytes for v in views])
    header = id_field(store_id) + struct.pack(f"<{2 + len(views)}Q", len(payload), len(views),
                                               *[v.nbytes for v in views])
    head = memoryview(header.ljust(header_len, b"\0") + bytes(payload))
    out = []
    for start, view in [(0, head), *zip(offsets, views)]:
        for i in range(0, view.nbytes, chunk):
            out.append((start + i, view[i:i + chunk]))
    return out


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a segment (or spill) file from ``offset``: a chunk sent to another node."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(f"{path} holds {offset + len(data)} bytes, expected at least {offset + length}")
    return data


def open_to_fill(path: str) -> int:
    """An fd for writing a segment in pieces (a copy arriving from another node).

    It holds the lock exclusively, as writers do, so the agent neither spills nor
    reuses the segment before it is complete; closing the fd drops the lock.
    """
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
