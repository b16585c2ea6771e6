"""Worker output kept by each node, for ``farpool logs``: rotated, bounded files, and reading them.

The launcher (launcher.py, its one thread) writes each worker's stdout and stderr
into ``worker-<id>.log`` in the node's session directory through a ``RotatingLog``;
the node agent (its loop) answers ``ReadLogs`` with ``read`` from a reader's cursor::

    worker --pipes--> launcher: RotatingLog --> worker-<id>.log, .log.1 .. .log.KEEP (oldest)
    farpool logs --ReadLogs(pid, cursors)--> agent: read(files, cursor) --> Reply(data, cursor)

A cursor is (inode, offset) into one of a worker's files: rotation renames files
(the inode stays), so a reader continues where it stopped, across a rotation.
``plan`` is pure; the rest is thin file I/O.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

# A worker's log file is rotated when it grows past this: smaller files lose less
# at once when the oldest goes, larger ones mean fewer renames.
LOG_ROTATE_BYTES = 8 * 1024 * 1024
# Rotated files kept per worker: a worker keeps at most (LOG_KEEP + 1) * LOG_ROTATE_BYTES
# of output on its node's disk; more keeps a longer history of chatty workers.
LOG_KEEP = 2
# Bytes one ReadLogs answer carries at most (a reader asks again for the rest):
# larger means fewer round trips, smaller keeps the agent's loop responsive.
READ_BYTES_PER_REPLY = 1024 * 1024

_NAME = re.compile(r"^worker-(.+)\.log$")


def log_path(session_dir: str, worker_id: str) -> str:
    return os.path.join(session_dir, f"worker-{worker_id}.log")


class RotatingLog:
    """One worker's log file, rotated at LOG_ROTATE_BYTES, LOG_KEEP old files kept."""

    def __init__(self, path: str, rotate_bytes: int = LOG_ROTATE_BYTES, keep: int = LOG_KEEP):
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        if self.size and self.size + len(data) > self.rotate_bytes:
            self._rotate()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def _rotate(self) -> None:
        os.close(self.fd)
        for n in range(self.keep, 0, -1):  # .log.(keep-1) -> .log.keep ... .log -> .log.1
            older = f"{self.path}.{n - 1}" if n > 1 else self.path
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n}")
        if self.keep == 0:
            os.unlink(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = 0

    def close(self) -> None:
        os.close(self.fd)


def worker_logs(session_dir: str) -> dict[str, list[tuple[str, int, int]]]:
    """worker id -> its files, oldest first, as (path, inode, size)."""
    out: dict[str, list] = {}
    for name in os.listdir(session_dir):
        match = _NAME.match(name)
        if not match:
            continue
        base = os.path.join(session_dir, name)
        files = []
        for path in [f"{base}.{n}" for n in range(LOG_KEEP, 0, -1)] + [base]:
            try:
                st = os.stat(path)
            except OSError:
                continue
            files.append((path, st.st_ino, st.st_size))
        out[match.group(1)] = files
    return out


class LogCursor(NamedTuple):
    """Where a reader of a worker's output stopped (it travels as a plain tuple: Reply, ReadLogs)."""
    inode: int                  # of the file it stopped in (kept across a rotation)
    offset: int                 # bytes into that file


def plan(files: list, cursor: tuple | None, budget: int) -> tuple[list, tuple | None]:
    """What to read of one worker's ``files`` (oldest first, (path, inode, size)) after
    ``cursor`` (None: from the oldest kept byte), at most ``budget`` bytes.

    Returns ([(path, start, length)], the cursor after them).  A cursor into a file
    rotated away starts again at the oldest file kept."""
    start_at, offset = 0, 0
    if cursor is not None:
        stopped = LogCursor._make(cursor)
        for i, (_path, inode, size) in enumerate(files):
            if inode == stopped.inode:
                start_at, offset = i, min(stopped.offset, size)
                break
    reads = []
    new_cursor = cursor
    for path, inode, size in files[start_at:]:
        length = min(size - offset, budget)
        if length > 0:
            reads.append((path, offset, length))
            budget -= length
        new_cursor = (inode, offset + max(length, 0))
        if budget <= 0:
            break
        offset = 0
    return reads, new_cursor


def read(files: list, cursor: tuple | None, budget: int) -> tuple[bytes, tuple | None]:
    reads, new_cursor = plan(files, cursor, budget)
    chunks = []
    for path, start, length in reads:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                chunks.append(f.read(length))
        except OSError:  # rotated away meanwhile: the next read starts over from what is kept
            break
    return b"".join(chunks), new_cursor
