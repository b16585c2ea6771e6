"""The node object store: large values in shared-memory segments, read zero-copy.

Owned by the node agent (allocation, reuse, accounting, spilling, cleanup);
writers (put, task results, large arguments) and readers (get) in any process
of the node use the module-level helpers on segment files directly::

    writer --AllocateObject(size)--> agent --path of a segment--> writer writes, tells the owner
    reader: open + flock(LOCK_SH) + mmap(PROT_READ) --> numpy arrays are views of the segment
    owner --FreeObjects--> agent: the segment goes back to the pool (reused: already touched)

One object per segment file.  A reader holds a shared flock on the file for as
long as any view of its mapping lives (``weakref.finalize`` closes the fd);
the agent reuses or spills a freed segment only when it can take the lock
exclusively, so memory is never reused under a reader, and a reader that is
killed leaks nothing (the kernel drops its lock and mapping).  Reusing
segments matters here: first-touch page faults make fresh memory slow.

Segment layout: the object's store id (a length byte, then the id, in 32 bytes),
little-endian u64s (payload length, buffer count, then each buffer's length),
padded to 64 bytes, then the pickle payload, then each out-of-band buffer at a
64-byte-aligned offset (page-aligned from 64 KiB).  A reader checks the id under
its lock: a location kept after its object was freed (its owner died) may name
a segment that now holds another object, and must not read it as the old one.
Writers hold the lock exclusively, so no reader maps a value being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import weakref
from dataclasses import dataclass

log = logging.getLogger("farpool.store")

ALIGN = 64
# Large buffers start on a page boundary: memcpy into a destination a few cache lines
# off the source's page offset runs at a third of its speed here (1 GB: 0.3 s, not 0.1 s).
PAGE_ALIGN_MIN = 64 * 1024
PAGE = 4096
# Values whose pickled size (payload + buffers) reaches this go to the store
# instead of travelling inline in messages.  Lower saves copies of medium
# values, higher saves the allocation round trip for small ones.
INLINE_MAX = 100 * 1024
# Default capacity: this fraction of the memory available when the agent starts.
DEFAULT_FRACTION = 0.3
# Segments are sized in these steps so that freed ones fit later objects.
SIZE_STEP = 1 << 20
# A freed segment waits this long for reuse (its pages are touched: reuse is fast), then
# it is unlinked so that the memory really comes back when the program stops using it.
FREE_IDLE_S = float(os.environ.get("FARPOOL_STORE_FREE_IDLE_S", "10"))


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


ID_FIELD = 32  # the store id at the start of a segment: a length byte, then the id


class SegmentReused(FileNotFoundError):
    """The segment no longer holds the object asked for (it was freed, and reused)."""


def layout(payload_len: int, buf_lens: list[int]) -> tuple[int, list[int], int]:
    """(payload offset, buffer offsets, total size) of a segment."""
    header = _round(ID_FIELD + 8 * (2 + len(buf_lens)), ALIGN)
    pos = header + payload_len
    offsets = []
    for n in buf_lens:
        pos = _round(pos, PAGE if n >= PAGE_ALIGN_MIN else ALIGN)
        offsets.append(pos)
        pos += n
    return header, offsets, max(pos, 1)


def value_size(payload: bytes, buffers: list) -> int:
    return layout(len(payload), [memoryview(b).nbytes for b in buffers])[2]


def _id_field(store_id: bytes) -> bytes:
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
        header = _id_field(store_id) + struct.pack(f"<{2 + len(views)}Q", len(payload), len(views),
                                                   *[v.nbytes for v in views])
        m[:len(header)] = header
        m[header_len:header_len + len(payload)] = payload
        for off, v in zip(offsets, views):
            m[off:off + v.nbytes] = v
    return total


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
        self.maps: dict[str, tuple] = {}   # path -> (fd, mmap, length, inode), oldest first

    @contextlib.contextmanager
    def mapping(self, path: str, total: int):
        with self.lock:
            cached = self.maps.pop(path, None)
        if cached is not None:
            fd, m, length, inode = cached
            try:
                current = os.stat(path).st_ino
            except OSError:
                current = None
            if current != inode or length < total:
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
            cached = (fd, m, length, st.st_ino)
        fd, m = cached[0], cached[1]
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield m
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if cached[2] < self.MIN_SIZE:
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
    def _close(entry) -> None:
        fd, m = entry[0], entry[1]
        m.close()
        os.close(fd)


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
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if private:
            m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    weakref.finalize(m, os.close, fd)
    if store_id is not None and m[:ID_FIELD] != _id_field(store_id):
        m.close()
        raise SegmentReused(f"{path} no longer holds object {store_id.hex()}: it was freed")
    view = memoryview(m)
    payload_len, count = struct.unpack_from("<2Q", m, ID_FIELD)
    lens = struct.unpack_from(f"<{count}Q", m, ID_FIELD + 16) if count else ()
    header_len, offsets, _ = layout(payload_len, list(lens))
    payload = view[header_len:header_len + payload_len]
    buffers = [view[off:off + n] if private else view[off:off + n].toreadonly() for off, n in zip(offsets, lens)]
    return payload, buffers


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


def choose_dir(session_dir: str, node_id: str, capacity: int) -> tuple[str, bool]:
    """A directory for the segments: /dev/shm when it has room, else disk (with a warning)."""
    from farpool._private.session import shm_root
    name = f"farpool-{os.path.basename(session_dir)}-{node_id[:8]}"
    try:
        st = os.statvfs(shm_root())
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 0
    if shm_free >= capacity:
        path = os.path.join(shm_root(), name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path, True
    path = os.path.join(session_dir, "store")
    os.makedirs(path, mode=0o700, exist_ok=True)
    log.warning("/dev/shm has %.0f MB free, less than the object store's %.0f MB: the store uses "
                "%s on disk instead (slower). Give the container a larger /dev/shm "
                "(docker run --shm-size=...) or lower object_store_memory.",
                shm_free / 1e6, capacity / 1e6, path)
    return path, False


class MachineShare:
    """The default capacity: DEFAULT_FRACTION of this machine's memory, split evenly among
    the node agents running on it.

    Each agent leaves a file named by its pid in ``directory`` (one per user and machine)
    while it runs, holding the budget it measured; ``capacity()`` divides the smallest
    budget of the live agents by their number, so all agree on their shares, and an agent
    that joins (or leaves) changes every agent's share at its next look (the heartbeat).
    """

    def __init__(self, directory: str):
        import psutil
        memory = psutil.virtual_memory()
        self.budget = int(min(memory.total, memory.available) * DEFAULT_FRACTION)
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, str(os.getpid()))
        with open(self.path, "w") as f:
            f.write(str(self.budget))

    def live_budgets(self) -> list[int]:
        budgets = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            try:
                os.kill(int(name), 0)
            except ValueError:
                continue
            except ProcessLookupError:  # an agent that died without cleaning up
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            except PermissionError:
                pass
            try:
                with open(path) as f:
                    budgets.append(int(f.read() or self.budget))
            except (OSError, ValueError):  # being written or removed right now
                budgets.append(self.budget)
        return budgets or [self.budget]

    def capacity(self) -> int:
        budgets = self.live_budgets()
        return min(budgets) // len(budgets)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


@dataclass
class Segment:
    path: str
    size: int                 # file size (capacity of the segment)
    object_id: bytes | None = None
    used: int = 0             # bytes of the object in it
    owner: str = ""
    spilled_to: str | None = None
    created_at: str = ""
    freed_at: float = 0.0     # time.monotonic() when it went back to the free pool
    copy: bool = False        # a copy of an object stored on another node (see pull.py)
    owner_node: str = ""      # a copy's: the node of its owner (the owner of the others is ours)


class ObjectStore:
    """The agent's side: segments, the free pool, accounting and spilling (one thread)."""

    def __init__(self, directory: str, capacity: int, spill_dir: str):
        self.directory = directory
        self.capacity = capacity
        self.spill_dir = spill_dir
        self.objects: dict[bytes, Segment] = {}
        self.free: list[Segment] = []
        self.bytes_in_shm = 0          # sum of segment file sizes in the store directory
        self._seq = 0
        self.dropped: list[str] = []   # segment paths unlinked since the agent last told writers

    # --- allocation ---
    def allocate(self, object_id: bytes, size: int, owner: str = "", where: str = "",
                 copy: bool = False) -> Segment:
        """A segment for ``size`` bytes, reusing a free one when possible.

        Raises MemoryError (ObjectStoreFullError is raised by the caller) with sizes.
        """
        if size > self.capacity:
            raise MemoryError(f"an object of {size / 1e6:.1f} MB is larger than the whole object store "
                              f"({self.capacity / 1e6:.1f} MB); raise object_store_memory")
        seg = self._reuse(size)
        if seg is None:
            need = _round(size, SIZE_STEP)
            self._make_room(need)
            self._seq += 1
            seg = Segment(os.path.join(self.directory, f"seg-{self._seq}"), need)
            fd = os.open(seg.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, need)
            finally:
                os.close(fd)
            self.bytes_in_shm += need
        seg.object_id = object_id
        seg.used = size
        seg.owner = owner
        seg.created_at = where
        seg.spilled_to = None
        seg.copy = copy
        seg.owner_node = ""
        self.objects[object_id] = seg
        return seg

    def _reuse(self, size: int) -> Segment | None:
        """The smallest free segment that fits and that no reader still maps."""
        for seg in sorted(self.free, key=lambda s: s.size):
            if seg.size >= size and seg.size <= max(2 * size, size + SIZE_STEP) and _unlocked(seg.path):
                self.free.remove(seg)
                return seg
        return None

    def _make_room(self, need: int) -> None:
        """Drop free segments, then spill cold objects, until ``need`` more bytes fit."""
        for seg in sorted(self.free, key=lambda s: -s.size):
            if self.bytes_in_shm + need <= self.capacity:
                return
            if _unlocked(seg.path):
                self.free.remove(seg)
                self._unlink(seg)
        for seg in list(self.objects.values()):  # insertion order: oldest first
            if self.bytes_in_shm + need <= self.capacity:
                return
            if seg.spilled_to is None and seg.used and _unlocked(seg.path):
                self._spill(seg)
        if self.bytes_in_shm + need > self.capacity:
            pinned = sum(s.size for s in self.objects.values() if s.spilled_to is None)
            raise MemoryError(
                f"the object store is full: {need / 1e6:.1f} MB requested, {self.bytes_in_shm / 1e6:.1f} of "
                f"{self.capacity / 1e6:.1f} MB in use ({pinned / 1e6:.1f} MB held by objects still mapped "
                "by readers or not spillable). Free references you no longer need (del ref), or raise "
                "object_store_memory")

    def _spill(self, seg: Segment) -> None:
        os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
        target = os.path.join(self.spill_dir, os.path.basename(seg.path) + "-" + seg.object_id.hex()[:16])
        try:
            shutil.copyfile(seg.path, target)
        except OSError as exc:
            log.warning("could not spill %s to %s: %s", seg.path, target, exc)
            return
        self._unlink(seg)
        seg.spilled_to = target
        log.info("spilled object %s (%.1f MB) to %s", seg.object_id.hex()[:16], seg.used / 1e6, target)

    def restore(self, object_id: bytes) -> Segment | None:
        """Bring a spilled object back into shared memory; returns its segment."""
        seg = self.objects.get(object_id)
        if seg is None or seg.spilled_to is None:
            return seg
        source = seg.spilled_to
        need = _round(seg.used, SIZE_STEP)
        self._make_room(need)
        self._seq += 1
        seg.path = os.path.join(self.directory, f"seg-{self._seq}")
        shutil.copyfile(source, seg.path)
        seg.size = os.path.getsize(seg.path)
        self.bytes_in_shm += seg.size
        os.unlink(source)
        seg.spilled_to = None
        return seg

    def _unlink(self, seg: Segment) -> None:
        try:
            os.unlink(seg.path)
        except OSError:
            pass
        self.bytes_in_shm -= seg.size
        self.dropped.append(seg.path)

    # --- freeing ---
    def free_object(self, object_id: bytes) -> None:
        seg = self.objects.pop(object_id, None)
        if seg is None:
            return
        if seg.spilled_to is not None:
            try:
                os.unlink(seg.spilled_to)
            except OSError:
                pass
            return
        seg.object_id = None
        seg.used = 0
        seg.freed_at = time.monotonic()
        self.free.append(seg)
        # Keep the pool within capacity (objects still use their share).
        if self.bytes_in_shm > self.capacity:
            self._make_room(0)

    def owned_by(self, owner: str) -> list[bytes]:
        """Ids of the objects ``owner`` (a client identity) owns here: freed when it is gone."""
        return [object_id for object_id, seg in self.objects.items() if seg.owner == owner]

    def trim_idle(self, idle_s: float = FREE_IDLE_S) -> float | None:
        """Unlink free segments unused for ``idle_s``; returns when the next one is due (or None)."""
        now = time.monotonic()
        due = []
        for seg in list(self.free):
            if now - seg.freed_at < idle_s:
                due.append(seg.freed_at + idle_s)
            elif _unlocked(seg.path):
                self.free.remove(seg)
                self._unlink(seg)
            else:  # a reader still maps it (a view outlived its ref): look again later
                due.append(now + idle_s)
        return min(due, default=None)

    def stats(self) -> dict:
        used = sum(s.used for s in self.objects.values() if s.spilled_to is None)
        spilled = sum(s.used for s in self.objects.values() if s.spilled_to is not None)
        copies = sum(1 for s in self.objects.values() if s.copy)
        return {"capacity": self.capacity, "used": used, "spilled": spilled, "objects": len(self.objects),
                "copies": copies,
                "shm_bytes": self.bytes_in_shm, "free_segments": len(self.free), "directory": self.directory}

    def listing(self, limit: int = 20) -> list[dict]:
        rows = []
        for object_id, seg in sorted(self.objects.items(), key=lambda kv: -kv[1].used)[:limit]:
            rows.append({"object_id": object_id.hex(), "size": seg.used, "owner": seg.owner,
                         "pinned": not _unlocked(seg.path) if seg.spilled_to is None else False,
                         "spilled": seg.spilled_to is not None, "created_at": seg.created_at,
                         "copy": seg.copy})
        return rows

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def _unlocked(path: str) -> bool:
    """True when no reader holds the segment (we can take its lock exclusively)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
