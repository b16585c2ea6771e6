"""A forkserver-style launcher of worker processes.

The node agent forks the launcher first thing, before it creates a zmq
context or a thread, so forking from the launcher is safe.  The launcher
preloads the imports every worker needs (zmq, the worker module; cloudpickle and
numpy once the first workers are out: see PRELOAD_LATER), then forks a worker
per request in about a millisecond instead of paying 150-250 ms for a fresh
interpreter.  It reaps its children and reports each exit (code or signal) to
the agent: worker deaths are noticed from the process exit, never from
heartbeats::

    agent --("config", args), ("spawn", id, env), ("started_up",)--> launcher --fork--> worker
    agent --("node_id", new id)--> launcher (the agent joined again as a new node)
    agent <--("started", id, pid) / ("exited", id, pid, code, sig)--

Messages are length-prefixed pickles over a socketpair; EOF on it means the
agent died, and the launcher kills its workers and exits.  Workers hold the
read end of a pipe whose write end only the launcher has: when the launcher
goes, every worker sees EOF on its lifeline and exits.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import sys
from typing import NamedTuple

_LEN = struct.Struct("!I")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Imported by the launcher once the agent's first workers (those it starts ahead of demand)
# are forked, at the first spawn after them, so that every later worker (a replacement, a
# pool's own, a new job's) has them loaded at fork.  The first workers are forked without
# them: an idle cluster does not carry numpy (about 11 MB of each process's RSS here) and the
# first result does not wait for the imports; a first worker whose task uses numpy imports
# it then (about 80 ms once, here).  cloudpickle likewise (with dataclasses and inspect, 14
# ms of the launcher's CPU at every start, here): a worker needs it only to load a function
# or value that travelled by value (a lambda, a closure, a notebook's), and pickle imports
# it then.  Preloading them before the first fork instead costs every idle worker their RSS
# and the start-up their imports.
PRELOAD_LATER = ("cloudpickle", "numpy")

# Imported by the agent's process before it forks the launcher (and the embedded head): what
# the agent, the head and every worker all load (zmq, pickle, logging and farpool's wire
# modules, three quarters of a worker's import time).  Imported once there, not again in each:
# start-up is short of CPU (head, agent, launcher and driver start at once on a machine's
# cores), and none of these creates a thread or a zmq context at import.  The agent's own
# modules (store, leases, the head link) come after the forks: the launcher, the workers and
# the head do not carry them.
SHARED_IMPORTS = ("farpool._private.transport", "farpool._private.protocol",
                  "farpool._private.segments", "farpool._private.scheduling",
                  "farpool._private.placement_groups", "farpool._private.stacks")


def send_msg(sock: socket.socket, msg) -> None:
    """Send one message whole on a non-blocking stream, waiting for room when it is full
    (sendall would raise midway and break the framing: a worker printing fast filled it)."""
    data = pickle.dumps(msg, protocol=5)
    out = memoryview(_LEN.pack(len(data)) + data)
    while out:
        try:
            out = out[sock.send(out):]
        except BlockingIOError:
            select.select([], [sock], [])


class MessageReader:
    """Reassembles length-prefixed messages from a non-blocking stream."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def read(self) -> list | None:
        """Messages now complete; None at EOF."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(pickle.loads(self.buf[4:4 + n]))
            self.buf = self.buf[4 + n:]
        return out


def import_shared() -> None:
    """Import SHARED_IMPORTS (in the agent, before it forks the launcher or a head)."""
    for module in SHARED_IMPORTS:
        __import__(module)


def start(close_in_child=()) -> tuple[int, socket.socket]:
    """Fork the launcher; returns (pid, socket to it).  Call before any thread or zmq context,
    and before argparse (it imports shutil, bz2, lzma and gettext: about 1.5 MB that the launcher
    and every worker would carry); then ``configure`` it.  ``close_in_child``: the agent's fds
    (None skipped) that the launcher must not hold."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        for fd in close_in_child:
            if fd is not None:
                os.close(fd)
        try:
            _run(theirs)
        finally:
            os._exit(0)
    theirs.close()
    ours.setblocking(False)
    return pid, ours


def _settle() -> None:
    """After preloading: every object so far out of the garbage collector's sight
    (``gc.freeze``), so that a collection in a worker does not write to, and so copy, pages it
    shares with the launcher.  (The C heap's free pages are not trimmed: malloc_trim through
    ctypes gave back less than ctypes costs each process.)  No collection first: the imports
    leave no cyclic garbage to find (0 objects, with numpy too), and looking through their
    15,000 objects would cost the first workers' start 8 ms here."""
    import gc
    gc.freeze()


def exit_with(main, *args) -> None:
    """In a forked child: run ``main(*args)`` and exit with its code, never returning into the
    parent's code (an exception: its traceback on stderr, code 1; output flushed first)."""
    code = 1
    try:
        code = main(*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def configure(sock: socket.socket, worker_main_args: dict) -> None:
    """What every worker's ``worker.main`` gets (session, node, addresses, token); the first
    message, before any spawn."""
    send_msg(sock, ("config", worker_main_args))


class _Output(NamedTuple):
    """A pipe of a worker's output, as the launcher reads it."""
    worker_id: str
    stream: str                 # "stdout" or "stderr"
    log: object                 # the worker's worker_logs.RotatingLog (both its pipes share it)


def _run(sock: socket.socket) -> None:
    from farpool._private import session, worker_logs
    session.set_process_name("farpool-launch")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, session.sigterm_handler(signal.SIG_DFL))
    # Thread pools of BLAS/OpenMP size themselves when numpy loads, here: start
    # them at 1 thread (a worker's default num_cpus); workers adjust per lease.
    managed = [var for var in THREAD_VARS if var not in os.environ]
    for var in managed:
        os.environ[var] = "1"
    common = None  # the agent's ("config", ...), its first message
    # Preload what every worker imports, once, here (PRELOAD_LATER: see there).
    from farpool._private import worker as worker_module  # noqa: F401
    preload_later = list(PRELOAD_LATER)
    _settle()

    lifeline_r, lifeline_w = os.pipe()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, str] = {}
    outputs: dict[int, _Output] = {}   # pipe read fd -> the worker output it carries
    pipes_of: dict[int, list] = {}   # pid -> its pipe read fds
    reader = MessageReader(sock)
    sock.setblocking(False)
    started_up = False

    def forward(fd: int) -> bool:
        """Pass what a worker wrote on stdout/stderr to its log file and the agent.

        True when data was read (there may be more), False when nothing is left now
        (EAGAIN) or at EOF.  Never waits: a process the worker started may still hold
        the pipe open after the worker exits.
        """
        worker_id, stream, worker_log = outputs[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            os.close(fd)
            del outputs[fd]
            if not any(output.log is worker_log for output in outputs.values()):
                worker_log.close()
            return False
        worker_log.write(data)
        send_msg(sock, ("output", worker_id, stream, data))
        return True

    def reap():
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = children.pop(pid, None)
            # Everything the worker wrote before it died is in its pipes: forward it first.
            for fd in pipes_of.pop(pid, []):
                while fd in outputs and forward(fd):
                    pass
            code = os.waitstatus_to_exitcode(status)
            sig = -code if code < 0 else None
            send_msg(sock, ("exited", worker_id, pid, code if code >= 0 else None, sig))

    while True:
        try:
            ready, _, _ = select.select([sock, wake_r, *outputs], [], [])
        except InterruptedError:
            continue
        for fd in ready:
            if fd in outputs:
                forward(fd)
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            reap()
        if sock in ready:
            msgs = reader.read()
            if msgs is None:  # the agent is gone: end and reap every worker
                for pid in list(children):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                for pid in list(children):
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
                return
            for tag, *fields in msgs:
                if tag == "config":
                    common = dict(fields[0], managed_thread_vars=managed)
                elif tag == "started_up":  # the workers started ahead of demand are forked
                    started_up = True
                elif tag == "spawn":
                    worker_id, env = fields
                    if started_up and preload_later:
                        for module in preload_later:
                            __import__(module)
                        preload_later = []
                        _settle()
                    out_r, out_w = os.pipe()
                    err_r, err_w = os.pipe()
                    log_path = worker_logs.log_path(common["session_dir"], worker_id)
                    pid = os.fork()
                    if pid == 0:
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                        os.dup2(out_w, 1)
                        os.dup2(err_w, 2)
                        for fd in (lifeline_w, wake_r, wake_w, out_r, out_w, err_r, err_w, *outputs,
                                   *{output.log.fd for output in outputs.values()}):
                            try:
                                os.close(fd)
                            except OSError:
                                pass
                        sock.close()
                        exit_with(worker_module.main, dict(common, worker_id=worker_id,
                                                           lifeline_fd=lifeline_r, env=env))
                    os.close(out_w)
                    os.close(err_w)
                    worker_log = worker_logs.RotatingLog(log_path)
                    for fd, stream in ((out_r, "stdout"), (err_r, "stderr")):
                        os.set_blocking(fd, False)
                        outputs[fd] = _Output(worker_id, stream, worker_log)
                    pipes_of[pid] = [out_r, err_r]
                    children[pid] = worker_id
                    send_msg(sock, ("started", worker_id, pid))
                elif tag == "node_id":  # the agent joined again as a new node: workers from now on
                    common["node_id"] = fields[0]
                elif tag == "kill":
                    pid, sig = fields
                    if pid in children:
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            pass
