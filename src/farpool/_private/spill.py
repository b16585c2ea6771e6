"""Moving object bytes between the store and the spill directory, off the agent's loop.

Owned by the node agent.  The store (store.ObjectStore, on the agent's thread) decides
what moves (``Move``: a spill to disk, or a restore into a segment); a small pool of
I/O threads here copies the bytes, file to file in the kernel (copy_file_range, else
sendfile: no copy through the Python heap, and the GIL is released meanwhile), and
hands each finished move back to the agent's loop with ``call_soon``::

    agent loop --submit(Move)--> queue --> I/O thread: lock, copy chunk by chunk, unlock
         ^                                         |
         +------ loop.call_soon(done, move, error) +

A spill reads its segment under a shared lock (readers may map it meanwhile; no
writer can start); a restore writes its segment under the exclusive lock, so a
reader given that path early would wait for the whole value, never see half of it.
Only ``submit`` and ``close`` are called from the agent's thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import threading

log = logging.getLogger("farpool.spill")

# Threads moving bytes at once.  More keeps a fast disk (NVMe) busy while one move
# waits on the page cache; fewer leaves more of a small machine's cores to the tasks.
IO_THREADS = 2
# Bytes per copy call: the granularity at which a move notices a failure.  Larger saves
# system calls; the agent's loop is never blocked by a chunk either way (other threads).
CHUNK = 64 << 20

SPILL, RESTORE = "spill", "restore"


class Move:
    """One copy for an I/O thread (a plain class: see scheduling.Allocation)."""

    def __init__(self, kind: str, object_id: bytes, source: str, target: str, length: int,
                 seconds: float = 0.0, token: object = None):
        self.kind = kind            # SPILL (segment -> spill file) or RESTORE (spill file -> segment)
        self.object_id = object_id
        self.source = source
        self.target = target
        self.length = length        # bytes of the object (the rest of a segment is padding)
        self.seconds = seconds      # how long the copy took (set by the I/O thread)
        self.token = token          # the store's own record of the object (Segment)

    def __repr__(self) -> str:
        return f"Move({self.kind}, {self.object_id.hex()}, {self.source} -> {self.target}, {self.length})"


def copy_range(src_fd: int, dst_fd: int, length: int) -> None:
    """Copy ``length`` bytes from the start of one file to the other inside the kernel.

    copy_file_range works within one file system (and across some, since Linux 5.3);
    from tmpfs to a disk it may say EXDEV, then sendfile does it (any readable file to
    any file since Linux 2.6.33).  Raises OSError (ENOSPC when the target's disk is full).
    """
    offset = 0
    use_cfr = hasattr(os, "copy_file_range")
    while offset < length:
        n = min(CHUNK, length - offset)
        if use_cfr:
            try:
                done = os.copy_file_range(src_fd, dst_fd, n, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            os.lseek(dst_fd, offset, os.SEEK_SET)
            done = os.sendfile(dst_fd, src_fd, offset, n)
        if done == 0:
            raise OSError(errno.EIO, f"the source ended at byte {offset} of {length}")
        offset += done


def spill_file(move: Move) -> None:
    """Copy a segment's object into a new spill file (room reserved first: a full disk
    fails here with ENOSPC, before anything is written, and the object stays in memory)."""
    src = os.open(move.source, os.O_RDONLY)
    try:
        try:
            fcntl.flock(src, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EBUSY, "a writer holds the segment") from None
        dst = os.open(move.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(dst, 0, move.length)
            copy_range(src, dst, move.length)
        except BaseException:
            os.close(dst)
            _remove(move.target)
            raise
        os.close(dst)
    finally:
        os.close(src)


def restore_file(move: Move) -> None:
    """Copy a spill file into its (allocated) segment, holding the segment's lock
    exclusively, as writers do."""
    dst = os.open(move.target, os.O_RDWR)
    try:
        fcntl.flock(dst, fcntl.LOCK_EX)
        src = os.open(move.source, os.O_RDONLY)
        try:
            copy_range(src, dst, move.length)
        finally:
            os.close(src)
    finally:
        os.close(dst)  # drops the lock


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Mover:
    """A few named threads that run Moves and report each to ``done(move, error)`` through
    the agent loop's thread-safe ``call_soon`` (error: None, or the OSError's text)."""

    def __init__(self, call_soon, done, threads: int = IO_THREADS):
        self._call_soon = call_soon
        self._done = done
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Seconds during which at least one move of a kind was running: bytes / busy is the
        # rate the disk saw, however many threads shared it.
        self.busy = {SPILL: 0.0, RESTORE: 0.0}
        self._active = {SPILL: 0, RESTORE: 0}
        self._since = {SPILL: 0.0, RESTORE: 0.0}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"farpool-spill-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, move: Move) -> None:
        self._queue.put(move)

    def remove(self, path: str) -> None:
        """Unlink a spill file here: unlinking a large file with pages still being written
        back can block for a while, and the agent's loop must not."""
        self._queue.put(path)

    def _run(self) -> None:
        import time
        while True:
            move = self._queue.get()
            if move is None:
                return
            if isinstance(move, str):
                _remove(move)
                continue
            start = time.perf_counter()
            with self._lock:
                if self._active[move.kind] == 0:
                    self._since[move.kind] = start
                self._active[move.kind] += 1
            error = None
            try:
                (spill_file if move.kind == SPILL else restore_file)(move)
            except OSError as exc:
                error = exc
            except Exception as exc:  # a bug must not lose the move: the store hears of it
                log.exception("moving object %s failed", move.object_id.hex()[:16])
                error = OSError(errno.EIO, repr(exc))
            end = time.perf_counter()
            move.seconds = end - start
            with self._lock:
                self._active[move.kind] -= 1
                if self._active[move.kind] == 0:
                    self.busy[move.kind] += end - self._since[move.kind]
            try:
                self._call_soon(self._done, move, error)
            except OSError:  # the loop is closed: the agent is stopping
                return

    def close(self) -> None:
        """Stop the threads after the moves queued (the agent is stopping)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
