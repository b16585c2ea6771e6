"""The node object store: large values in shared-memory segments, read zero-copy.

The segment file format and the helpers every process uses on it are in
segments.py; this module is the node agent's side.

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

import enum
import errno
import fcntl
import logging
import os
import time

from farpool._private.segments import ID_FIELD, id_field, round_up

log = logging.getLogger("farpool.store")

# Default capacity: this fraction of the memory available when the agent starts.
DEFAULT_FRACTION = 0.3

# Segments are sized in these steps so that freed ones fit later objects.
SIZE_STEP = 1 << 20

# A freed segment waits this long for reuse (its pages are touched: reuse is fast), then
# it is unlinked so that the memory really comes back when the program stops using it.
FREE_IDLE_S = float(os.environ.get("FARPOOL_STORE_FREE_IDLE_S", "10"))
# A segment just handed to a reader (asked for, or restored for it) is not spilled for this
# long: the reader maps it after our answer, and until it does, nothing shows it is in use.
# Without it a store short of memory could spill a restored object again before its reader
# mapped it, over and over (the reader gives up after segments.READ_ATTEMPTS).  Handed again
# soon after (a reader that lost that race asks again), it is kept longer: READER_RETRY_GRACE_S.
# Short, or a store read as a stream would put new objects on disk rather than spill old ones.
READER_GRACE_S = 0.25
READER_RETRY_GRACE_S = 2.0
HANDED_AGAIN_S = 10.0

# Objects one store listing names (StoreStats: `farpool memory`, `farpool list objects`, the
# dashboard): by default, and at most (each costs the agent's loop a lock test of its file).
LISTING_DEFAULT = 20
LISTING_MAX = 10_000


def choose_dir(session_dir: str, node_id: str, capacity: int) -> tuple[str, bool]:
    """A directory for the segments: /dev/shm when it has room, else disk (with a warning)."""
    from farpool._private.session import mark_segments_owner, shm_root
    name = f"farpool-{os.path.basename(session_dir)}-{node_id[:8]}"
    try:
        st = os.statvfs(shm_root())
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 0
    if shm_free >= capacity:
        path = os.path.join(shm_root(), name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        mark_segments_owner(path, session_dir)  # how a later sweep knows whose they are (any tmp root)
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
        from farpool._private import host_usage  # (/proc: psutil would cost the agent about 4 MB)
        total, available = host_usage.memory()
        self.budget = int(min(total, available) * DEFAULT_FRACTION)
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


class State(enum.Enum):
    """Where an object's bytes are (see ObjectStore)."""
    IN_MEMORY = "in memory"    # a segment of the store directory; readers map it
    SPILLING = "spilling"      # still in memory (readers map it) while an I/O thread copies it to disk
    SPILLED = "spilled"        # only in its spill file: a reader asks for a restore (RestoreObject)
    RESTORING = "restoring"    # being copied back into a segment: readers wait for it
    ON_DISK = "on disk"        # allocated in the spill directory: pins left no room in memory


class Segment:
    """A segment file and the object in it (a plain class, not a dataclass: see
    scheduling.Allocation)."""

    def __init__(self, path: str, size: int, object_id: bytes | None = None, used: int = 0, owner: str = "",
                 state: State = State.IN_MEMORY, created_at: str = "", copy: bool = False):
        self.path = path
        self.size = size                # file size (capacity of the segment)
        self.object_id = object_id
        self.used = used                # bytes of the object in it
        self.owner = owner
        self.state = state
        self.spilled_to: str | None = None  # the spill file (SPILLED, RESTORING; IN_MEMORY after a
        #                                     restore: a clean copy, so spilling it again writes nothing)
        self.created_at = created_at
        self.freed_at = 0.0             # time.monotonic() when it went back to the free pool
        self.copy = copy                # a copy of an object stored on another node (see pull.py)
        self.owner_node = ""            # a copy's: the node of its owner (the owner of the others is ours)
        self.freed = False              # freed by its owner while its bytes were moving (SPILLING, RESTORING)
        self.unspillable = False        # its spill failed for a reason that would repeat
        self.waiters: list = []         # RESTORING: who waits for it
        self.handed_at = -HANDED_AGAIN_S  # time.monotonic() when last handed to a reader (_touch)
        self.grace = 0.0                # how long from handed_at it is not spilled (READER_GRACE_S ...)

    def __repr__(self) -> str:
        return f"Segment({self.path}, {self.size}, {self.object_id.hex() if self.object_id else None}, {self.state})"

    def read_path(self) -> str:
        """A file holding all of the object's bytes now (for chunks sent to other nodes)."""
        return self.spilled_to if self.state in (State.SPILLED, State.RESTORING) else self.path


ALLOCATE, RESTORE = "allocate", "restore"


class Want:
    """Room asked for that is not there yet: it waits for spills to finish (FIFO)."""

    def __init__(self, kind: str, object_id: bytes, size: int, waiters: list, owner: str = "",
                 where: str = "", copy: bool = False):
        self.kind = kind          # ALLOCATE (a new object) or RESTORE (a spilled one)
        self.object_id = object_id
        self.size = size
        self.waiters = waiters
        self.owner = owner
        self.where = where
        self.copy = copy


class StoreActions:
    """What the agent does after a store event: start moves, answer waiters."""

    def __init__(self):
        self.moves: list = []     # spill.Move, for the I/O threads
        self.answers: list = []   # (waiter, Segment | None, error | None, no room)
        self.removals: list = []  # spill files to unlink (on the I/O threads)


NOW, WAIT, NO_ROOM = "now", "wait", "no room"
# Room left free on the spill directory's disk when choosing what to spill: a disk
# filled to the last byte makes every other program on it fail too.
DISK_RESERVE = 64 << 20


class ObjectStore:
    """The agent's side: segments, the free pool, accounting, spilling (the agent's thread only).

    Every object is in one State.  Room is asked for by ``allocate`` (a new object) and
    ``restore`` (a spilled one); when it is not there, the request waits in ``wants``
    while cold objects spill (Moves for the I/O threads, see spill.py), and is granted
    as ``move_done`` reports them, in order.  Where readers pin so much that spilling
    cannot make room, the object goes ON_DISK: a file in the spill directory, mapped
    like a segment (Ray's fallback allocation).  Methods return StoreActions::

        IN_MEMORY --spill--> SPILLING --done, unmapped--> SPILLED --restore--> RESTORING --done--> IN_MEMORY
                                 |  mapped by a reader meanwhile: stays IN_MEMORY        no room: ON_DISK
        freed while SPILLING/RESTORING: marked, and dropped when its move is done

    A reader gets a path only for a complete object: SPILLING still has its segment,
    RESTORING answers when done.  A spill that ends gives its segment to the free pool
    only if no reader maps it (else the object stays in memory); a reader holding the
    old location then finds another object's id in it, or no file (read_segment checks
    both under its lock), and asks for a restore.
    """

    def __init__(self, directory: str, capacity: int, spill_dir: str):
        self.directory = directory
        self.capacity = capacity
        self.spill_dir = spill_dir
        self.objects: dict[bytes, Segment] = {}
        self.free: list[Segment] = []
        self.wants: list[Want] = []
        self.spilling: set = set()       # segments being spilled (also those freed meanwhile)
        self.restoring = 0
        self.bytes_in_shm = 0            # sum of segment file sizes in the store directory
        self.bytes_on_disk = 0           # ON_DISK objects' files in the spill directory
        self._seq = 0
        self.dropped: list[str] = []     # segment paths unlinked since the agent last told writers
        self.counts = {"spills": 0, "spilled_bytes_total": 0, "spill_seconds": 0.0, "restores": 0,
                       "restored_bytes_total": 0, "restore_seconds": 0.0, "spill_failures": 0,
                       "on_disk_allocations": 0}

    # --- room ---
    def allocate(self, waiter, object_id: bytes, size: int, owner: str = "", where: str = "",
                 copy: bool = False) -> StoreActions:
        """A segment for ``size`` bytes for ``waiter``: now, or once spills made room."""
        acts = StoreActions()
        if size > self.capacity:
            acts.answers.append((waiter, None, self._too_large(size), True))
            return acts
        self.wants.append(Want(ALLOCATE, object_id, size, [waiter], owner, where, copy))
        self._serve_wants(acts)
        return acts

    def restore(self, waiter, object_id: bytes) -> StoreActions:
        """The segment of an object, for ``waiter``: brought back first if it was spilled."""
        acts = StoreActions()
        seg = self.objects.get(object_id)
        if seg is None:
            acts.answers.append((waiter, None, "it was freed", False))
        elif seg.state is State.RESTORING:
            seg.waiters.append(waiter)
        elif seg.state is State.SPILLED:
            want = next((w for w in self.wants if w.kind == RESTORE and w.object_id == object_id), None)
            if want is not None:
                want.waiters.append(waiter)
            else:
                self.wants.append(Want(RESTORE, object_id, round_up(seg.used, SIZE_STEP), [waiter]))
                self._serve_wants(acts)
        else:
            self._touch(object_id)
            acts.answers.append((waiter, seg, None, False))
        return acts

    def _touch(self, object_id: bytes) -> None:
        """An object just asked for goes last in line to spill (``objects`` is oldest first),
        and is not spilled for a while (READER_GRACE_S): its reader maps it after our answer,
        and must find it still there."""
        seg = self.objects[object_id] = self.objects.pop(object_id)
        now = time.monotonic()
        seg.grace = READER_RETRY_GRACE_S if now - seg.handed_at < HANDED_AGAIN_S else READER_GRACE_S
        seg.handed_at = now

    @staticmethod
    def _handed_lately(seg: Segment) -> bool:
        return time.monotonic() - seg.handed_at < seg.grace

    def _serve_wants(self, acts: StoreActions) -> None:
        """Grant the requests that fit now, in order; start spills for the others; put on
        disk those for which spilling cannot make room."""
        reserved = 0  # bytes earlier requests still wait for: later ones do not take them
        for want in list(self.wants):
            room = self._room(want.size, reserved, acts)
            if room == WAIT:
                reserved += want.size
                continue
            self.wants.remove(want)
            try:
                if room == NOW:
                    self._grant(want, acts)
                else:
                    self._on_disk(want, acts)
            except OSError as exc:  # (the store directory was removed under us, ...): say so, no hang
                log.warning("no segment for object %s: %s", want.object_id.hex()[:16], exc)
                acts.answers.extend((w, None, f"the node's object store failed: {exc}", False)
                                    for w in want.waiters)

    def _room(self, need: int, reserved: int, acts: StoreActions) -> str:
        if self._fits(need, reserved):
            return NOW
        for seg in list(self.objects.values()):  # restored objects whose copy on disk is whole
            if (seg.spilled_to is not None and seg.state is State.IN_MEMORY and not self._handed_lately(seg)
                    and _idle_and_sealed(seg.path, seg.object_id)):
                self._to_free_pool(Segment(seg.path, seg.size))  # spilled again, nothing written
                seg.state = State.SPILLED
                if self._fits(need, reserved):
                    return NOW
        over = self.bytes_in_shm + reserved + need - self.capacity
        coming = sum(s.size for s in self.spilling)
        for seg in list(self.objects.values()):  # insertion order: oldest first
            if coming >= over:
                break
            if self._spillable(seg):
                self._start_spill(seg, acts)
                coming += seg.size
        return WAIT if coming >= over else NO_ROOM

    def _fits(self, need: int, reserved: int) -> bool:
        """Room for ``need`` more bytes after what earlier requests wait for, once free
        segments nobody maps are dropped (a free segment that fits is reused instead)."""
        over = self.bytes_in_shm + reserved + need - self.capacity
        if over <= 0 or (not reserved and self._reusable(need) is not None):
            return True
        for seg in sorted(self.free, key=lambda s: -s.size):
            if over <= 0:
                break
            if _unlocked(seg.path):
                self.free.remove(seg)
                self._unlink(seg)
                over -= seg.size
        return over <= 0

    def _spillable(self, seg: Segment) -> bool:
        return (seg.state is State.IN_MEMORY and seg.spilled_to is None and seg.used > 0 and not seg.unspillable
                and not self._handed_lately(seg) and self.disk_free() >= seg.used + DISK_RESERVE
                and _idle_and_sealed(seg.path, seg.object_id))

    def _start_spill(self, seg: Segment, acts: StoreActions) -> None:
        from farpool._private import spill
        seg.state = State.SPILLING
        self.spilling.add(seg)
        target = os.path.join(self.spill_dir, seg.object_id.hex())
        acts.moves.append(spill.Move(spill.SPILL, seg.object_id, seg.path, target, seg.used, token=seg))

    def _grant(self, want: Want, acts: StoreActions) -> None:
        from farpool._private import spill
        if want.kind == ALLOCATE:
            path, size = self._take_segment(want.size)
            seg = Segment(path, size, want.object_id, want.size, want.owner, created_at=want.where,
                          copy=want.copy)
            self.objects[want.object_id] = seg
            acts.answers.extend((w, seg, None, False) for w in want.waiters)
            return
        seg = self.objects.get(want.object_id)
        if seg is None or seg.state is not State.SPILLED:  # (freed: answered by free_object)
            acts.answers.extend((w, seg, None if seg else "it was freed", False) for w in want.waiters)
            return
        seg.path, seg.size = self._take_segment(want.size)
        seg.state = State.RESTORING
        seg.waiters = list(want.waiters)
        self.restoring += 1
        acts.moves.append(spill.Move(spill.RESTORE, seg.object_id, seg.spilled_to, seg.path, seg.used, token=seg))

    def _on_disk(self, want: Want, acts: StoreActions) -> None:
        """Spilling cannot make room (readers pin the rest): the object lives in a file of
        the spill directory instead (slower to read, but nothing fails)."""
        if want.kind == RESTORE:  # its spill file is that file already
            seg = self.objects.get(want.object_id)
            if seg is not None and seg.state is State.SPILLED:
                seg.path, seg.spilled_to, seg.size, seg.state = seg.spilled_to, None, seg.used, State.ON_DISK
                self.bytes_on_disk += seg.size
            acts.answers.extend((w, seg, None if seg else "it was freed", False) for w in want.waiters)
            return
        path = os.path.join(self.spill_dir, "fallback-" + want.object_id.hex())
        try:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
            if self.disk_free() < want.size + DISK_RESERVE:
                raise OSError(errno.ENOSPC, f"less than {DISK_RESERVE >> 20} MB would be left on its disk")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:  # reserve the blocks now: a full disk fails here, not with SIGBUS in the writer
                os.posix_fallocate(fd, 0, want.size)
            finally:
                os.close(fd)
        except OSError as exc:
            _remove(path)
            acts.answers.extend((w, None, self._no_room(want.size, exc), True) for w in want.waiters)
            return
        seg = Segment(path, want.size, want.object_id, want.size, want.owner, State.ON_DISK,
                      created_at=want.where, copy=want.copy)
        self.objects[want.object_id] = seg
        self.bytes_on_disk += want.size
        self.counts["on_disk_allocations"] += 1
        log.info("object %s (%.1f MB) allocated on disk in %s: readers pin the memory store",
                 want.object_id.hex()[:16], want.size / 1e6, self.spill_dir)
        acts.answers.extend((w, seg, None, False) for w in want.waiters)

    def _reusable(self, size: int) -> Segment | None:
        """The smallest free segment that fits ``size`` (not much larger) and no reader maps."""
        for seg in sorted(self.free, key=lambda s: s.size):
            if seg.size >= size and seg.size <= max(2 * size, size + SIZE_STEP) and _unlocked(seg.path):
                return seg
        return None

    def _take_segment(self, size: int) -> tuple[str, int]:
        """(path, size) of a free segment that fits and that no reader maps, or of a new one."""
        seg = self._reusable(size)
        if seg is not None:
            self.free.remove(seg)
            return seg.path, seg.size
        need = round_up(size, SIZE_STEP)
        self._seq += 1
        path = os.path.join(self.directory, f"seg-{self._seq}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, need)
        finally:
            os.close(fd)
        self.bytes_in_shm += need
        return path, need

    # --- moves done (spill.Mover, through the agent's loop) ---
    def move_done(self, move, error: OSError | None) -> StoreActions:
        from farpool._private import spill
        acts = StoreActions()
        seg = move.token
        if move.kind == spill.SPILL:
            self.spilling.discard(seg)
            if error is not None:
                self.counts["spill_failures"] += 1
                # Not tried again (a full disk would fail it again and again); a request
                # that needs its room goes on disk instead, or fails naming the directory.
                seg.unspillable = error.errno != errno.EBUSY
                log.warning("could not spill object %s (%.1f MB) to %s: %s; it stays in memory",
                            move.object_id.hex()[:16], move.length / 1e6, move.target, error)
                seg.state = State.IN_MEMORY
                if seg.freed:
                    self._to_free_pool(seg)
            elif seg.freed:
                acts.removals.append(move.target)
                self._to_free_pool(seg)
            elif not _unlocked(seg.path):  # a reader mapped it meanwhile: it stays (with a clean copy)
                seg.state, seg.spilled_to = State.IN_MEMORY, move.target
            else:
                # Its memory goes back to the free pool, to be reused at once by what waits
                # for room (its pages are touched: reuse is fast); a reader with the old
                # location finds another object's id there and asks for a restore.
                path, size = seg.path, seg.size
                self._to_free_pool(Segment(path, size))
                seg.state, seg.spilled_to = State.SPILLED, move.target
                self.counts["spills"] += 1
                self.counts["spilled_bytes_total"] += move.length
                self.counts["spill_seconds"] += move.seconds
                log.info("spilled object %s (%.1f MB) to %s in %.2f s", move.object_id.hex()[:16],
                         move.length / 1e6, move.target, move.seconds)
        else:
            self.restoring -= 1
            waiters, seg.waiters = seg.waiters, []
            source = seg.spilled_to
            if error is not None:  # the segment goes; the object stays safe on disk
                self._unlink(seg)
                seg.state = State.SPILLED
                why = f"restoring it from {source} failed: {error}"
                acts.answers.extend((w, None, why, False) for w in waiters)
            else:
                self.counts["restores"] += 1
                self.counts["restored_bytes_total"] += move.length
                self.counts["restore_seconds"] += move.seconds
                if seg.freed:
                    acts.removals.append(source)
                    self._to_free_pool(seg)
                    acts.answers.extend((w, None, "it was freed", False) for w in waiters)
                else:
                    seg.state = State.IN_MEMORY
                    self._touch(seg.object_id)
                    acts.answers.extend((w, seg, None, False) for w in waiters)
        self._serve_wants(acts)
        return acts

    def _unlink(self, seg: Segment) -> None:
        try:
            os.unlink(seg.path)
        except OSError:
            pass
        self.bytes_in_shm -= seg.size
        self.dropped.append(seg.path)

    # --- freeing ---
    def free_object(self, object_id: bytes) -> StoreActions:
        acts = StoreActions()
        seg = self.objects.pop(object_id, None)
        for want in [w for w in self.wants if w.kind == RESTORE and w.object_id == object_id]:
            self.wants.remove(want)
            acts.answers.extend((w, None, "it was freed", False) for w in want.waiters)
        if seg is None:
            return acts
        if seg.state in (State.SPILLING, State.RESTORING):
            seg.freed = True  # dropped when its move is done
        elif seg.state is State.SPILLED:
            acts.removals.append(seg.spilled_to)
        elif seg.state is State.ON_DISK:
            acts.removals.append(seg.path)
            self.bytes_on_disk -= seg.size
            self.dropped.append(seg.path)
        else:
            if seg.spilled_to is not None:  # its clean copy
                acts.removals.append(seg.spilled_to)
            self._to_free_pool(seg)
        self._serve_wants(acts)
        return acts

    def _to_free_pool(self, seg: Segment) -> None:
        seg.object_id = seg.spilled_to = None
        seg.used = 0
        seg.state = State.IN_MEMORY
        seg.freed = seg.copy = False
        seg.freed_at = time.monotonic()
        self.free.append(seg)
        # Keep the pool within capacity (objects still use their share).
        for other in sorted(self.free, key=lambda s: -s.size):
            if self.bytes_in_shm <= self.capacity:
                break
            if _unlocked(other.path):
                self.free.remove(other)
                self._unlink(other)

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

    # --- messages for the user ---
    def disk_free(self) -> int:
        try:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
            st = os.statvfs(self.spill_dir)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _too_large(self, size: int) -> str:
        return (f"an object of {size / 1e6:.1f} MB is larger than the whole object store "
                f"({self.capacity / 1e6:.1f} MB); raise object_store_memory above it "
                "(farpool.init(object_store_memory=...), or `farpool start --object-store-memory` "
                "on each node), or split the value into smaller ones")

    def _no_room(self, size: int, exc: OSError) -> str:
        pinned = sum(s.size for s in self.objects.values()
                     if s.state is State.IN_MEMORY and not _unlocked(s.path))
        return (f"no room for an object of {size / 1e6:.1f} MB: the object store holds "
                f"{self.bytes_in_shm / 1e6:.1f} of {self.capacity / 1e6:.1f} MB in memory "
                f"({pinned / 1e6:.1f} MB mapped by readers), and the spill directory {self.spill_dir} "
                f"has {self.disk_free() / 1e6:.1f} MB free ({exc.strerror or exc}). Nothing was lost. "
                "Free references you no longer need (del ref), give the spill directory more room "
                "(farpool.init(spill_dir=...) or `farpool start --spill-dir`), or raise object_store_memory")

    def stats(self) -> dict:
        by_state = {state: 0 for state in State}
        for seg in self.objects.values():
            by_state[seg.state] += seg.used
        copies = sum(1 for s in self.objects.values() if s.copy)
        return {"capacity": self.capacity, "objects": len(self.objects), "copies": copies,
                "used": by_state[State.IN_MEMORY] + by_state[State.SPILLING] + by_state[State.RESTORING],
                "spilled": by_state[State.SPILLED], "on_disk": by_state[State.ON_DISK],
                "spilling": len(self.spilling), "restoring": self.restoring,
                "waiting_for_room": sum(len(w.waiters) for w in self.wants),
                "shm_bytes": self.bytes_in_shm, "free_segments": len(self.free), "directory": self.directory,
                "spill_dir": self.spill_dir, "spill_dir_free": self.disk_free(), **self.counts}

    def listing(self, limit: int = LISTING_DEFAULT, spilled: bool | None = None) -> list[dict]:
        """The largest ``limit`` objects (only the spilled, or only those in memory, when
        ``spilled`` is True or False)."""
        rows = []
        objects = self.objects.items()
        if spilled is not None:
            objects = [(i, seg) for i, seg in objects if (seg.state in (State.SPILLED, State.RESTORING)) == spilled]
        for object_id, seg in sorted(objects, key=lambda kv: -kv[1].used)[:limit]:
            rows.append({"object_id": object_id.hex(), "size": seg.used, "owner": seg.owner,
                         "pinned": seg.state is State.IN_MEMORY and not _unlocked(seg.path),
                         "spilled": seg.state in (State.SPILLED, State.RESTORING), "state": seg.state.value,
                         "created_at": seg.created_at, "copy": seg.copy})
        return rows

    def close(self) -> None:
        import shutil  # (here: an idle agent need not carry it)
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


def _idle_and_sealed(path: str, store_id: bytes) -> bool:
    """True when nobody maps or writes the segment and its writer finished (the header
    names the object: a segment allocated but not written yet must not be spilled)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.pread(fd, ID_FIELD, 0) == id_field(store_id)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _remove(path: str | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
