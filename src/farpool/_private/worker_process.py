"""The worker process's surroundings: the driver's main script, runtime_env packages, thread
pools, the task's stdout and stderr, and the signals that cancel a task.

Called by the worker's main thread (worker.py) as it sets up a job and runs tasks; the
signal handler runs on the main thread between bytecodes.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys

from farpool._private import object_ref, runtime, session
from farpool._private.context import context

log = logging.getLogger("farpool.worker")


def setup_main(main_path: str | None, main_module: str | None) -> None:
    """Load the driver's script as __mp_main__ (and alias __main__), like spawn does."""
    if main_module and main_module not in ("__main__", "__mp_main__"):
        try:
            module = __import__(main_module, fromlist=["*"])
        except ImportError:
            return
        except BaseException as exc:  # code outside a __main__ guard (sys.exit, a crash): keep going
            log.warning("importing the driver's main module %s failed: %r", main_module, exc)
            return
    elif main_path and os.path.exists(main_path):
        # Loaded as an import is (not runpy.run_path, as spawn does): its bytecode is cached in
        # __pycache__ beside it and read from there by the next workers.  Compiling the script
        # in every worker cost each one its CPU and about 1 MB of RSS the compiler left behind.
        from importlib.machinery import SourceFileLoader
        from importlib.util import module_from_spec, spec_from_loader
        spec = spec_from_loader("__mp_main__", SourceFileLoader("__mp_main__", main_path))
        module = module_from_spec(spec)
        sys.modules["__mp_main__"] = module
        sys.modules["__main__"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # the script may fail outside __main__ guard; keep going
            log.warning("loading the driver's script %s as __mp_main__ failed: %r", main_path, exc)
        return
    else:
        return
    sys.modules["__mp_main__"] = module
    sys.modules["__main__"] = module


def unpack(package: str) -> str:
    """The directory where a runtime_env package ("pkg:<hash>:<name>") is unpacked on this node."""
    import io
    import zipfile
    digest = package.split(":")[1]
    target = os.path.join(session.tmp_root(), "pkgs", digest)
    if os.path.isdir(target):
        return target
    client = runtime.client()  # this worker's own client: fetch the package from the head
    data = client.head_request("KVGet", (package,))
    if data is None:
        raise RuntimeError(f"runtime_env package {package} is not known to the head")
    staging = f"{target}.{os.getpid()}.tmp"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another worker unpacked it first
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
    return target


def limit_thread_pools(threads: int) -> None:
    """Resize BLAS/OpenMP pools already loaded (env vars alone act only at load time)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


class TaskOutput(io.TextIOBase):
    """sys.stdout/stderr of a worker: each line prefixed with the task, pid and node, unbuffered.

    Written straight to the fd (a pipe to the launcher), so output printed just
    before a crash is not lost in a buffer.
    """

    def __init__(self, fd: int, name: str):
        self._fd = fd
        self._name = name
        self._at_line_start = True
        self._pending = ""

    @property
    def encoding(self):
        return "utf-8"

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not text:
            return 0
        # A partial line waits for its end (print() writes the text and "\n" separately),
        # so lines reach the driver whole; flush() sends it anyway.
        self._pending += text
        if "\n" in self._pending:
            complete, _, self._pending = self._pending.rpartition("\n")
            self._emit(complete + "\n")
        return len(text)

    def _emit(self, text: str) -> None:
        prefix = f"({context.task_name or 'worker'} pid={os.getpid()}, node={(context.node_id or '')[:8]}) "
        out = []
        for line in text.splitlines(keepends=True):
            out.append(prefix + line if self._at_line_start else line)
            self._at_line_start = line.endswith("\n")
        data = "".join(out).encode("utf-8", "replace")
        while data:
            try:
                n = os.write(self._fd, data)
            except InterruptedError:
                continue
            data = data[n:]

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            self._emit(pending)


def on_sigint(signum, frame):
    """cancel(force=False): interrupt the task's own code, never the worker's machinery, and
    cancel the tasks it submitted (recursive=True, the default; SIGUSR2 is recursive=False).

    Arriving while arguments load, it is held and raised as the function starts;
    arriving after the function returned, it is dropped (the task is done).
    """
    if context.task_id is None:
        return
    nested = object_ref.current()
    if nested is not None and signum == signal.SIGINT:
        nested.cancel_children(context.task_id)
    if context.in_user_code:
        raise KeyboardInterrupt(f"task {context.task_id} was cancelled")
    context.cancel_pending = True


def call_user(fn, args, kwargs):
    """Run the task's function where a cancel may interrupt it."""
    if context.cancel_pending:
        context.cancel_pending = False
        raise KeyboardInterrupt(f"task {context.task_id} was cancelled")
    context.in_user_code = True
    try:
        return fn(*args, **kwargs)
    finally:
        context.in_user_code = False


