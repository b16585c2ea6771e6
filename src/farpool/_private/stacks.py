"""Stacks of workers, for ``farpool stack``: what each worker runs and where it is.

Two files per worker in the node's session directory, both written by the worker
and read by its node agent::

    worker (at start)  faulthandler.register(SIGUSR1) --> w-<id>.stack   (the dump, on a signal)
    worker (per task)  TaskBoard.started/ended ---------> w-<id>.task    (mmap: the task now running)
    agent  DumpStacks: truncate .stack, SIGUSR1 each worker, StackCollection waits, read both

``faulthandler`` writes from its C signal handler without the GIL, so a worker stuck
in C code (even holding the GIL) still dumps every thread; the task board is a
fixed-size shared mapping the agent reads without asking the worker anything.
Writing it is two slice assignments per task (about 0.3 us), cheap enough for the task
path; a file write per task would not be.

The worker side (``install``, ``TaskBoard``) runs on the worker's main thread; the
agent side (``StackCollection``, ``read_task``, ``read_dump``) on the agent's loop.
``StackCollection`` is pure: the agent feeds it file sizes and times.
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import signal

# The signal that makes a worker dump its threads' stacks (faulthandler, in C).
DUMP_SIGNAL = signal.SIGUSR1
# Bytes of the task board: a state byte, a task id (16 bytes) and a function name; longer
# names are cut.
TASK_BOARD_BYTES = 256
# A dump is taken as complete when its file has been non-empty and unchanged for this long.
# faulthandler writes the whole dump inside one signal handler, in well under a millisecond
# on an idle machine: shorter answers sooner, longer tolerates a worker descheduled in the
# middle of its dump (on a loaded machine) without returning half a stack.
DUMP_SETTLE_S = 0.05
# The longest the agent waits for a worker's dump: a worker that never answers (it
# blocks the signal, or it is stopped) is reported with what it wrote by then.  There
# is no end marker in faulthandler's output, hence this bounded wait.
DUMP_CAP_S = 2.0


def stack_path(session_dir: str, worker_id: str) -> str:
    return os.path.join(session_dir, f"w-{worker_id}.stack")


def task_path(session_dir: str, worker_id: str) -> str:
    return os.path.join(session_dir, f"w-{worker_id}.task")


class TaskBoard:
    """The worker's task now running, in a small shared mapping the node agent reads:
    byte 0 says running (1) or idle (0), bytes 1-16 hold the task id (zeros: none, an
    actor's constructor), the rest the function name, NUL-terminated.  A task writes its
    id and the state byte; the name only when it differs from the last one (a batch's
    tasks share theirs), so a reader may pair an id with the name before it for the
    instant between the two writes."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, TASK_BOARD_BYTES)
            self._map = mmap.mmap(fd, TASK_BOARD_BYTES)
        finally:
            os.close(fd)
        self._name = None

    def started(self, task_id: bytes | None, name: str | None) -> None:
        """A task (or actor call) started. Main thread."""
        if name is not self._name:
            self._name = name
            raw = (name or "?").encode("utf-8", "replace")[:TASK_BOARD_BYTES - _NAME_AT - 1]
            self._map[_NAME_AT:_NAME_AT + len(raw) + 1] = raw + b"\0"
        raw = task_id or _NO_ID
        if len(raw) != _ID_BYTES:  # (ids are 16 bytes; anything else is cut or padded)
            raw = (raw + _NO_ID)[:_ID_BYTES]
        self._map[1:_NAME_AT] = raw
        self._map[0] = 1

    def ended(self) -> None:
        self._map[0] = 0


_ID_BYTES = 16
_NAME_AT = 1 + _ID_BYTES  # (after the state byte and the task id)
_NO_ID = bytes(_ID_BYTES)


class _NoBoard:
    def started(self, task_id, name) -> None:
        pass

    def ended(self) -> None:
        pass


board: TaskBoard | _NoBoard = _NoBoard()  # the worker's, once ``install`` ran
_dump_file = None  # kept open for faulthandler (it holds the file descriptor only)


def install(session_dir: str, worker_id: str) -> None:
    """In a worker, before it says it is ready: dump every thread's stack on DUMP_SIGNAL
    into its stack file, and open its task board."""
    global board, _dump_file
    # O_APPEND: the agent truncates the file before each request; the dump starts at 0.
    _dump_file = open(stack_path(session_dir, worker_id), "ab", buffering=0)
    os.chmod(_dump_file.name, 0o600)
    faulthandler.register(DUMP_SIGNAL, file=_dump_file, all_threads=True, chain=False)
    board = TaskBoard(task_path(session_dir, worker_id))


def read_task(path: str) -> dict | None:
    """The task a worker runs now, from its board: {"task_id", "name"}, or None when idle."""
    try:
        with open(path, "rb") as f:
            data = f.read(TASK_BOARD_BYTES)
    except OSError:
        return None
    if len(data) <= _NAME_AT or data[0] != 1:
        return None
    raw_id = data[1:_NAME_AT]
    name = data[_NAME_AT:].split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"task_id": None if raw_id == _NO_ID else raw_id.hex(), "name": name}


def size_of(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_dump(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class StackCollection:
    """One DumpStacks request: which dumps are complete. Pure (sizes and times come in)."""

    def __init__(self, pids: list, now: float):
        self.started = now
        self.last: dict = {pid: (0, now) for pid in pids}  # pid -> (size, when it last changed)
        self.done: dict = {}  # pid -> "complete" | "incomplete" | "no answer"

    def observe(self, sizes: dict, now: float) -> bool:
        """Feed the current size of each pending dump; True when every dump is settled."""
        for pid, size in sizes.items():
            if pid in self.done:
                continue
            before, since = self.last[pid]
            if size != before:
                self.last[pid] = (size, now)
            elif size > 0 and now - since >= DUMP_SETTLE_S:
                self.done[pid] = "complete"
            if pid not in self.done and now - self.started >= DUMP_CAP_S:
                self.done[pid] = "incomplete" if size else "no answer"
        return len(self.done) == len(self.last)

    def pending(self) -> list:
        return [pid for pid in self.last if pid not in self.done]
