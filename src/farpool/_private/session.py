"""Session directories, the token, spawning runtime processes, lifelines and names.

Used by the driver (embedded cluster), the CLI (``farpool start``) and the
runtime processes themselves.  A session directory is 0700 under a per-user
0700 root and holds the ipc sockets, the token file, logs and the pid file of
the process that created it, so a later start can remove a dead session's
leftovers.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# shutil and subprocess are imported where they are used: runtime processes that never spawn or
# remove a tree would carry them idle (about 0.9 MB of each one's RSS).

SESSION_PREFIX = "s-"


def tmp_root() -> str:
    """The per-user root directory (FARPOOL_TMPDIR overrides, e.g. for tests)."""
    root = os.environ.get("FARPOOL_TMPDIR") or f"/tmp/farpool-{os.getuid()}"
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.stat(root)
    if st.st_uid != os.getuid():
        raise PermissionError(f"{root} belongs to uid {st.st_uid}, not to us; set FARPOOL_TMPDIR")
    os.chmod(root, 0o700)
    return root


def new_session_dir() -> str:
    path = os.path.join(tmp_root(), SESSION_PREFIX + os.urandom(4).hex())
    os.mkdir(path, 0o700)
    # Written whole at once (rename): a process cleaning up dead sessions meanwhile must
    # never read it empty, or it would take this new session for a dead one.
    with open(os.path.join(path, "owner.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(path, "owner.pid.tmp"), os.path.join(path, "owner.pid"))
    return path


def new_token() -> str:
    return random_text(24)


def random_text(nbytes: int) -> str:
    """``nbytes`` random bytes as URL-safe text, as ``secrets.token_urlsafe`` makes them (secrets
    imports hashlib, whose OpenSSL costs every runtime process about 4 MB of memory)."""
    return base64.urlsafe_b64encode(os.urandom(nbytes)).rstrip(b"=").decode("ascii")


def write_token(session_dir: str, token: str) -> str:
    path = os.path.join(session_dir, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def ipc(session_dir: str, name: str) -> str:
    return f"ipc://{session_dir}/{name}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_space() -> str | None:
    """Names the space our pids live in (the boot and the pid namespace): two processes whose
    ``pid_space`` is equal can watch each other by pid, whatever socket joins them."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def remove_session(session_dir: str) -> None:
    """Remove a session directory and its object store segments in /dev/shm."""
    import shutil
    shutil.rmtree(session_dir, ignore_errors=True)
    prefix = f"farpool-{os.path.basename(session_dir)}-"
    try:
        for name in os.listdir(shm_root()):
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(shm_root(), name), ignore_errors=True)
    except OSError:
        pass


# Logs of failed sessions kept for the user to read (the newest ones; older go).  More
# keeps evidence of older failures, fewer keeps the tmp root small.
KEPT_LOGS = 10
KEPT_PREFIX = "failed-"


def keep_logs(session_dir: str) -> str:
    """Copy a failing session's logs to ``<tmp root>/failed-<session>/`` (outside the session
    directory, which goes at shutdown) and return that directory; errors name its files.

    Idempotent (a later call copies the newer text); only the newest KEPT_LOGS are kept.
    """
    import shutil
    root = os.path.dirname(session_dir.rstrip("/")) or tmp_root()
    kept = os.path.join(root, KEPT_PREFIX + os.path.basename(session_dir.rstrip("/")))
    try:
        os.makedirs(kept, mode=0o700, exist_ok=True)
        for name in os.listdir(session_dir):
            if name.endswith(".log"):
                try:
                    shutil.copyfile(os.path.join(session_dir, name), os.path.join(kept, name))
                except OSError:
                    pass
        failed = sorted((os.path.join(root, n) for n in os.listdir(root) if n.startswith(KEPT_PREFIX)),
                        key=lambda p: os.stat(p).st_mtime)
        for old in failed[:-KEPT_LOGS]:
            if old != kept:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass
    return kept


def shm_root() -> str:
    """Where object store segments live (FARPOOL_SHM_PATH overrides, e.g. for tests)."""
    return os.environ.get("FARPOOL_SHM_PATH", "/dev/shm")


def remove_dead_sessions() -> list[str]:
    """Remove session directories whose every recorded process is gone."""
    import shutil
    removed = []
    root = tmp_root()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(SESSION_PREFIX) or not os.path.isdir(path):
            continue
        pids = []
        for pidfile in ("owner.pid", "head.pid", "node.pid", "headmon.pid"):  # headmon: the head's supervisor
            try:
                with open(os.path.join(path, pidfile)) as f:
                    pids.append(int(f.read().strip() or 0))
            except OSError:
                pass
            except ValueError:  # being written: its process is starting
                pids.append(0)
        # A pid file still empty (0) is a session being made: not dead.
        if pids and all(pids) and not any(pid_alive(p) for p in pids):
            remove_session(path)
            removed.append(path)
    # Object store segments of sessions whose directory is gone (crashed node agents).
    try:
        entries = os.listdir(shm_root())
    except OSError:
        entries = []
    for name in entries:
        if name.startswith("farpool-" + SESSION_PREFIX):
            path = os.path.join(shm_root(), name)
            if _owned_by_us(path) and _segments_orphaned(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed


# In a node agent's directory of segments in /dev/shm (one per machine, shared by every tmp root):
# the absolute path of the agent's session directory, which may be under any FARPOOL_TMPDIR.
SEGMENTS_OWNER_FILE = "session"


def mark_segments_owner(segments_dir: str, session_dir: str) -> None:
    with open(os.path.join(segments_dir, SEGMENTS_OWNER_FILE), "w") as f:
        f.write(os.path.abspath(session_dir))


def _segments_orphaned(segments_dir: str) -> bool:
    """True if the session that made these segments is gone.

    Judged by the session directory the segments name, never by our own tmp root: a live
    session of another root (another user's run, another suite) is not in ours.  Without
    the name (being made this instant, or made by an older farpool) they are left alone.
    """
    try:
        with open(os.path.join(segments_dir, SEGMENTS_OWNER_FILE)) as f:
            owner = f.read().strip()
    except OSError:
        return False
    return bool(owner) and not os.path.isdir(owner)


def _owned_by_us(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return False


def spawn(module: str, args: list[str], session_dir: str, log_name: str,
          token: str | None, lifeline: bool, extra_env: dict | None = None,
          ready_pipe: bool = False, pass_fds: dict | None = None) -> subprocess.Popen:
    """Start ``python -m module args`` in its own session, output to a log file.

    With ``lifeline`` the child's stdin is a pipe from us: EOF tells it we died.
    The token travels in the environment, never on the command line.  With
    ``ready_pipe`` the returned Popen has ``ready_fd``, the read end of a pipe the
    child closes (``announce_ready``) once its sockets are bound, or by exiting: see
    ``wait_ready``.  ``pass_fds`` hands the child more such read ends, each named by
    the environment variable that carries its number.
    """
    import subprocess
    env = dict(os.environ)
    if token is not None:
        env["FARPOOL_TOKEN"] = token
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    fds = dict(pass_fds or {})
    ready_r = ready_w = None
    if ready_pipe:
        ready_r, ready_w = os.pipe()
        fds[READY_FD_VAR] = ready_w
    env.update({var: str(fd) for var, fd in fds.items()})
    out = open(os.path.join(session_dir, log_name), "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE if lifeline else subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            close_fds=True, pass_fds=tuple(fds.values()))
    except BaseException:
        if ready_r is not None:
            os.close(ready_r)
        raise
    finally:
        out.close()
        if ready_w is not None:
            os.close(ready_w)  # the child holds the only write end now
    proc.ready_fd = ready_r
    return proc


# The environment variable that names the write end of a spawned process's ready pipe.
READY_FD_VAR = "FARPOOL_READY_FD"
# ... and the read end of the head's, handed to the node agent the embedded cluster starts
# beside it: the agent connects to the head once the head has bound.
HEAD_READY_FD_VAR = "FARPOOL_HEAD_READY_FD"
# The embedded cluster's head is forked by its node agent's process (node_main), once the
# modules both load are imported: this variable carries the head's arguments and log file
# (JSON), and HEAD_ANNOUNCE_FD_VAR the write end of the head's ready pipe, which the head
# closes once bound (the driver and the agent wait on the read end).
EMBEDDED_HEAD_VAR = "FARPOOL_EMBEDDED_HEAD"
HEAD_ANNOUNCE_FD_VAR = "FARPOOL_HEAD_ANNOUNCE_FD"


def announce_ready(var: str = READY_FD_VAR) -> None:
    """In a spawned process: its sockets are bound, peers may connect now (closes the
    ready pipe; a process started without one, e.g. by `farpool start`, does nothing)."""
    fd = os.environ.pop(var, None)
    if fd is not None:
        try:
            os.close(int(fd))
        except (OSError, ValueError):
            pass


def take_fd(var: str) -> int | None:
    """A pipe read end that ``spawn(pass_fds=...)`` handed this process, or None."""
    fd = os.environ.pop(var, None)
    try:
        return int(fd) if fd is not None else None
    except ValueError:
        return None


def wait_ready(fds: list[int], timeout_s: float) -> None:
    """Wait until each ready pipe in ``fds`` is closed by its process (bound, or exited),
    at most ``timeout_s``.  Connecting before a peer has bound its ipc socket costs a zmq
    reconnect interval (100 ms) or more; this waits for the moment instead.  What the
    process did (bound or died) is for the connection that follows to find out."""
    import select
    deadline = time.monotonic() + timeout_s
    pending = [fd for fd in fds if fd is not None]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            readable, _, _ = select.select(pending, [], [], left)
        except InterruptedError:
            continue
        for fd in readable:
            try:
                data = os.read(fd, 64)
            except OSError:
                data = b""
            if not data:
                pending.remove(fd)


def set_process_name(name: str) -> None:
    """The name `ps -o comm` and `top` show (15 bytes at most).  Written to /proc, not through
    prctl: ctypes would cost each runtime process about 0.3 MB of RSS."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def set_command_line(words: list[str]) -> None:
    """The command line `ps aux` shows (/proc/self/cmdline), rewritten in place, cut to the room
    the original had: a process forked to be another one (the embedded head) says what it is."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5): fields 48, 49)
        text = b"\0".join(os.fsencode(word) for word in words)[:end - start - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(text.ljust(end - start, b"\0"))
    except (OSError, IndexError, ValueError):
        pass


class Option:
    """One option of a runtime process's command line (``parse_options``): ``--flag VALUE``
    converted by ``type`` (str, int, float), or a switch (``type=bool``: present or not)."""
    __slots__ = ("flag", "type", "default", "required", "help")

    def __init__(self, flag: str, type=str, default=None, required: bool = False, help: str | None = None):
        self.flag, self.type, self.default, self.required, self.help = flag, type, default, required, help

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def parse_options(prog: str, options: list, argv: list[str] | None = None):
    """A runtime process's own arguments (the head's, the node agent's), as a namespace with an
    attribute per option.  Our own code writes these command lines (runtime.py, cli.py), so
    the usual ``--flag VALUE``, ``--flag=VALUE`` and switches are read here directly: argparse
    cost each of these processes 12-15 ms of CPU at every start (its import, and gettext
    looking for message catalogs on disk for its headings), on two cores that the head, the
    agent, the launcher and the driver share while they start.  Anything else (``--help``, an
    abbreviation, an unknown option, a missing or bad value) goes to argparse, built from the
    same options, which answers as it always did (the help, or the error and exit status 2)."""
    import types
    argv = sys.argv[1:] if argv is None else list(argv)
    by_flag = {option.flag: option for option in options}
    given = {}
    i = 0
    try:
        while i < len(argv):
            flag, eq, value = argv[i].partition("=")
            option = by_flag[flag]
            if option.type is bool:
                if eq:
                    raise ValueError(argv[i])
                given[option.dest] = True
                i += 1
                continue
            if not eq:
                value = argv[i + 1]
                if value.startswith("--"):
                    raise ValueError(value)
            i += 1 if eq else 2
            given[option.dest] = option.type(value)
        if any(option.required and option.dest not in given for option in options):
            raise ValueError("missing")
    except (KeyError, IndexError, ValueError):
        return argument_parser(prog, options).parse_args(argv)
    return types.SimpleNamespace(**{option.dest: given.get(option.dest, False if option.type is bool else option.default)
                                    for option in options})


def argument_parser(prog: str, options: list = ()):
    """An ``argparse.ArgumentParser`` of ``options`` for a runtime process, whose help is 100
    columns wide: argparse would import shutil (with bz2 and lzma, about 0.6 MB of the
    process's RSS) to ask the terminal, which these processes never have."""
    import argparse
    import functools
    parser = argparse.ArgumentParser(prog=prog, formatter_class=functools.partial(argparse.HelpFormatter, width=100))
    for option in options:
        if option.type is bool:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=option.type, default=option.default, required=option.required,
                                help=option.help)
    return parser


# Set by a launcher whose scheduler signals every process of a job at once (SLURM: SIGTERM at the
# walltime or on scancel, SIGKILL after KillWait): the runtime processes it starts ignore that
# SIGTERM, so tasks in flight still deliver their results to the job's command; the launcher
# stops them through their lifelines once that command has ended.
IGNORE_SIGTERM_VAR = "FARPOOL_IGNORE_SIGTERM"


def sigterm_handler(handler):
    """What a runtime process installs for SIGTERM: ``handler``, or SIG_IGN under such a launcher."""
    return signal.SIG_IGN if os.environ.get(IGNORE_SIGTERM_VAR) == "1" else handler


def terminate(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``grace_s``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while pid_alive(pid) and not _reaped(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid) and not _reaped(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False


def state_file() -> str:
    return os.path.join(tmp_root(), "cluster.json")


def read_state() -> dict | None:
    try:
        with open(state_file()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_state(state: dict) -> None:
    path = state_file()
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def detect_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else the NVIDIA driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
