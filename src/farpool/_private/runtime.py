"""This process's runtime: the one ``CoreClient`` and, for an embedded cluster, its processes.

Starts the private embedded cluster (``init()`` with no address: a head and a
node agent as child processes on this machine, on ipc sockets in a fresh
session directory), joins a started one (``init(address=...)``), or, inside a
worker, joins the cluster the worker belongs to.  ``shutdown`` undoes each.

Called from user threads (the public ``farpool.init``/``shutdown``, the
facades, and ``client()`` wherever a call needs the client); one lock
serializes them.  Sits above client.py: it creates clients, and gives
client.py a way to start one on demand (``client.set_connector``) so that the
client need not import it.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
import threading
from typing import TYPE_CHECKING

from farpool import exceptions
from farpool._private import context as context_mod
from farpool._private import object_ref
from farpool._private import protocol, scheduling, session

if TYPE_CHECKING:
    from farpool._private import client as client_mod

_lock = threading.RLock()
_state: dict | None = None  # {"client", "procs", "session_dir", "info", "auto"}

# How long init() waits for a freshly started embedded cluster.
START_DEADLINE_S = 60


def is_initialized() -> bool:
    return _state is not None


def init(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
         resources: dict | None = None, object_store_memory: int | None = None,
         namespace: str | None = None, log_to_driver: bool = True, ignore_reinit_error: bool = False,
         token: str | None = None, spill_dir: str | None = None, _auto: bool = False) -> dict:
    """Start an embedded cluster (``address=None``) or join one ("auto" or "HOST:PORT").

    Returns a dict with at least ``address``, ``node_id`` and ``session_dir``.
    """
    global _state
    with _lock:
        if _state is not None:
            if ignore_reinit_error:
                return dict(_state["info"])
            raise RuntimeError("farpool.init() was already called in this process; call "
                               "farpool.shutdown() first, or pass ignore_reinit_error=True")
        if context_mod.worker_config is not None and address is None:
            _state = _join_from_worker(context_mod.worker_config)
            _shutdown_at_exit()
            return dict(_state["info"])
        if address is None:
            address = os.environ.get("FARPOOL_ADDRESS") or None
        if address is None and context_mod.context.worker_id is not None:
            raise RuntimeError("farpool.init() inside a worker before its job was set up: a task cannot "
                               "start a cluster of its own; it joins the cluster it runs on")
        if address is None:
            _state = _start_embedded(num_cpus, num_gpus, resources, object_store_memory, namespace,
                                     log_to_driver, spill_dir)
        else:
            if any(v is not None for v in (num_cpus, num_gpus, resources, object_store_memory, spill_dir)):
                raise ValueError(
                    "num_cpus, num_gpus, resources, object_store_memory and spill_dir cannot be given when "
                    f"joining an existing cluster ({address!r}): resources belong to the nodes. Pass them "
                    "to `farpool start` on each node, or call init() without an address for a "
                    "private cluster")
            _state = _join(address, token, namespace, log_to_driver)
        _state["auto"] = _auto
        _state["namespace"] = namespace
        _shutdown_at_exit()
        return dict(_state["info"])


def _job_setup(head_address: str | None, namespace) -> dict:
    main = sys.modules.get("__main__")
    main_path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    main_module = spec.name if spec is not None and spec.name not in ("__main__",) else None
    if main_path and (os.path.basename(main_path).startswith("ipython") or main_path.endswith("ipykernel_launcher.py")
                      or not protocol.main_script_importable(main)):
        main_path = None
    return {"sys_path": [p if p else os.getcwd() for p in sys.path], "cwd": os.getcwd(),
            "main_path": os.path.abspath(main_path) if main_path else None,
            "main_module": main_module, "head_address": head_address, "namespace": namespace}


def _start_embedded(num_cpus, num_gpus, resources, object_store_memory, namespace, log_to_driver,
                    spill_dir=None) -> dict:
    # Validate before starting anything; the node agent computes the defaults itself
    # (loky.cpu_count() costs 100 ms of imports we need not wait for here).
    scheduling.make_totals(1 if num_cpus is None else num_cpus, num_gpus or 0, resources)
    if spill_dir is not None:
        _check_spill_dir(spill_dir)
    session.remove_dead_sessions()
    session_dir = session.new_session_dir()
    token = session.new_token()
    node_id = os.urandom(8).hex()
    head_address = session.ipc(session_dir, "head")
    procs = []
    client = None
    head_ready_r, head_ready_w = os.pipe()  # the head's ready pipe (it is forked by the agent's process)
    try:
        node_args = ["--session-dir", session_dir, "--head-address", head_address, "--node-id", node_id,
                     "--resources", json.dumps(resources or {}), "--embedded", "--head-node", "--lifeline"]
        if num_cpus is not None:
            node_args += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            node_args += ["--num-gpus", str(num_gpus)]
        if object_store_memory:
            node_args += ["--object-store-memory", str(object_store_memory)]
        if spill_dir is not None:
            node_args += ["--spill-dir", os.path.abspath(spill_dir)]
        # The node agent's process forks the head (node_main: they share most of their imports)
        # and waits for it to bind before it connects, as we do for both.
        head_spec = {"argv": ["--session-dir", session_dir, "--embedded", "--lifeline"],
                     "log": os.path.join(session_dir, "head.log")}
        try:
            node = session.spawn("farpool._private.node_main", node_args, session_dir, "node.log", token,
                                 lifeline=True, ready_pipe=True,
                                 extra_env={session.EMBEDDED_HEAD_VAR: json.dumps(head_spec)},
                                 pass_fds={session.HEAD_READY_FD_VAR: head_ready_r,
                                           session.HEAD_ANNOUNCE_FD_VAR: head_ready_w})
        finally:
            os.close(head_ready_w)
        procs.append(node)
        try:
            session.wait_ready([node.ready_fd, head_ready_r], START_DEADLINE_S)
        finally:
            os.close(node.ready_fd)
        procs.insert(0, _ForkedHead.of(session_dir))
        cfg = {"head_address": head_address, "agent_address": session.ipc(session_dir, "node"),
               "watch_pids": [(procs[0].pid, "head"), (procs[1].pid, "node agent")],
               "node_id": node_id, "session_dir": session_dir, "token": token, "embedded": True,
               "local": True, "start_deadline_s": START_DEADLINE_S, "log_to_driver": log_to_driver,
               "job_setup": _job_setup(None, namespace)}
        from farpool._private import client as client_mod  # (here: a worker imports this module)
        client = client_mod.CoreClient(cfg)
        object_ref.set_current(client)
        welcome = client.connect()
    except BaseException:
        object_ref.set_current(None)
        if client is not None:
            client.close_unstarted()
        _stop_procs(procs)
        session.remove_session(session_dir)
        raise
    finally:
        os.close(head_ready_r)
    client.job_setup["job_id"] = client.job_id
    info = {"address": None, "node_id": node_id, "session_dir": session_dir, "job_id": client.job_id,
            "dashboard_url": dashboard_url(client), "embedded": True}
    del welcome
    return {"client": client, "procs": procs, "session_dir": session_dir, "info": info}


def _check_spill_dir(spill_dir) -> None:
    if not isinstance(spill_dir, (str, os.PathLike)) or not str(spill_dir):
        raise ValueError(f"`spill_dir` must be a directory path, got {spill_dir!r}")
    try:
        os.makedirs(spill_dir, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"`spill_dir` {str(spill_dir)!r} cannot be created: {exc}") from None
    if not os.access(spill_dir, os.W_OK | os.X_OK):
        raise ValueError(f"`spill_dir` {str(spill_dir)!r} is not writable by this user; pick a directory "
                         "on a disk with room for what does not fit in memory")


def _join(address: str, token: str | None, namespace, log_to_driver) -> dict:
    state = session.read_state()
    local = False
    if address == "auto":
        if not state:
            raise ConnectionError("init(address='auto') found no cluster started on this machine; "
                                  "run `farpool start --head` first, or call init() for a private cluster")
        head_address = session.ipc(state["session_dir"], "head")
        session_dir = state["session_dir"]
        local = True
        token = token or _read_token(state)
        shown = state.get("address")
    else:
        if ":" not in address:
            raise ValueError(f"address must be 'HOST:PORT' or 'auto', got {address!r}")
        head_address = address
        session_dir = None
        shown = address
        if token is None:
            token = os.environ.get("FARPOOL_TOKEN")
        if token is None and state and state.get("address") == address:
            token = _read_token(state)
        if not token:
            raise exceptions.AuthenticationError(
                f"no token to join the cluster at {address}: set FARPOOL_TOKEN or pass "
                "init(token=...) with the token `farpool start --head` printed")
    private_dir = None if local else session.new_session_dir()  # for our owner ipc socket
    cfg = {"head_address": head_address, "session_dir": session_dir if local else private_dir,
           "token": token, "embedded": False, "local": local, "start_deadline_s": 10,
           "log_to_driver": log_to_driver,
           "job_setup": _job_setup(address, namespace)}
    from farpool._private import client as client_mod
    client = client_mod.CoreClient(cfg)
    object_ref.set_current(client)
    try:
        client.connect()
    except BaseException:
        object_ref.set_current(None)
        client.close_unstarted()
        if private_dir:
            session.remove_session(private_dir)
        raise
    client.job_setup["job_id"] = client.job_id
    client.job_setup["head_address"] = client.head_address
    info = {"address": shown, "node_id": client.home.node_id, "session_dir": session_dir,
            "job_id": client.job_id, "dashboard_url": dashboard_url(client), "embedded": False}
    return {"client": client, "procs": [], "session_dir": None, "info": info}


def dashboard_url(client) -> str | None:
    """A new one-time link to the head's dashboard (None when it serves none, or is older)."""
    try:
        answer = client.head_request("GetState", ("dashboard_link", {}), timeout=10)
    except Exception:  # noqa: BLE001 - a cluster without a dashboard is still a cluster
        return None
    return answer.get("ok") if isinstance(answer, dict) else None


def _read_token(state: dict) -> str | None:
    try:
        with open(state["token_file"]) as f:
            return f.read().strip()
    except (OSError, KeyError):
        return None


def _join_from_worker(cfg: dict) -> dict:
    """Inside a task: a client of the cluster this worker belongs to."""
    setup = _job_setup(None, cfg.get("namespace"))
    setup["job_id"] = cfg.get("job_id")
    setup["runtime_env"] = cfg.get("runtime_env")
    ccfg = {"head_address": cfg["cluster_head"], "agent_address": cfg["agent_address"],
            "node_id": cfg["node_id"], "session_dir": cfg["session_dir"], "token": cfg.get("token"),
            "in_worker": True, "worker_id": cfg["worker_id"], "job_id": cfg.get("job_id"), "local": True,
            "job_setup": setup}
    from farpool._private import client as client_mod  # a worker's first nested call imports it
    client = client_mod.CoreClient(ccfg)
    object_ref.set_current(client)
    client.connect()
    info = {"address": None, "node_id": cfg["node_id"], "session_dir": cfg["session_dir"],
            "job_id": cfg.get("job_id"), "dashboard_url": None, "embedded": False}
    return {"client": client, "procs": [], "session_dir": None, "info": info, "in_worker": True,
            "runtime_env": cfg.get("runtime_env")}


def auto_init() -> None:
    with _lock:
        if _state is None:
            init(_auto=True)


def client() -> client_mod.CoreClient:
    """This process's client, starting the embedded cluster first if nothing was started."""
    state = _state
    if state is None:
        auto_init()
        state = _state
    return state["client"]


def shutdown() -> None:
    """Disconnect; stop the embedded cluster if this process started it.  Idempotent."""
    global _state
    with _lock:
        state, _state = _state, None
        if state is None:
            return
        client = state["client"]
        try:
            client.shutdown()
        finally:
            object_ref.set_current(None)
            _stop_procs(state["procs"])
            if state.get("session_dir"):
                session.remove_session(state["session_dir"])
            elif not state.get("in_worker") and client.session_dir and not state["info"].get("session_dir"):
                session.remove_session(client.session_dir)
            from farpool._private import transport
            if not state.get("in_worker"):
                transport.term_context()


class _ForkedHead:
    """The embedded head as shutdown and the client see it: forked by the node agent's process
    (node_main), so not our child; watched and waited for through a pidfd, like a Popen."""
    stdin = None  # (its lifeline is the agent's stdin: closing that one stops both)

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._fd = os.pidfd_open(pid)
        except OSError:  # gone already
            self._fd = None

    @classmethod
    def of(cls, session_dir: str) -> "_ForkedHead":
        """The head of the session, once its ready pipe closed: it writes head.pid before."""
        try:
            with open(os.path.join(session_dir, "head.pid")) as f:
                return cls(int(f.read()))
        except (OSError, ValueError):
            kept = session.keep_logs(session_dir)
            raise RuntimeError(
                "farpool.init(): the embedded cluster's head did not start; its log and the node "
                f"agent's are kept in {kept}. Report it with them if they do not say why") from None

    def wait(self, timeout: float | None = None) -> None:
        if self._fd is None:
            return
        import select
        if not select.select([self._fd], [], [], timeout)[0]:
            raise TimeoutError(f"the embedded head (pid {self.pid}) did not exit in {timeout} s")
        os.close(self._fd)
        self._fd = None

    def kill(self) -> None:
        if self._fd is not None:
            import signal
            signal.pidfd_send_signal(self._fd, signal.SIGKILL)


def _stop_procs(procs) -> None:
    for proc in procs:
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the lifeline: they exit and clean up
        except Exception:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()


_exit_hook = False  # shutdown registered with atexit (_shutdown_at_exit)


def _shutdown_at_exit() -> None:
    """Have ``shutdown`` run at interpreter exit (registered once, by init, the client up).

    Not at import: pyzmq frees the buffers of zero-copy sends on a helper thread that an
    exit hook of its own stops, registered when pyzmq first needs that thread.  atexit runs
    the last hook registered first, so ours must come after pyzmq's, or the last messages
    of our shutdown (a large batch of task events) fail with "zmq gc socket requested during
    shutdown".  (Importing pyzmq's module at our import instead delayed every program's
    cluster start by its 20-30 ms.)
    """
    global _exit_hook
    if not _exit_hook:
        importlib.import_module("zmq.utils.garbage")  # registers pyzmq's hook now, if not already
        atexit.register(shutdown)
        _exit_hook = True


def _disable_in_forked_child() -> None:
    """A user's fork() copies our client but not its I/O thread: the child must not use it."""
    global _state
    _state = None
    object_ref.set_current(None)
    from farpool._private import transport
    transport.forget_context_after_fork()


os.register_at_fork(after_in_child=_disable_in_forked_child)




def set_job_runtime_env(env: dict | None) -> None:
    """init(runtime_env=...): ``env`` (packaged: see runtime_env.canonical) applies to every task
    and actor of this job; workers get it with the job set-up, for the tasks they submit."""
    state = _state
    if state is None:
        raise RuntimeError("set_job_runtime_env() before init()")
    state["runtime_env"] = env
    state["client"].job_setup["runtime_env"] = env


def has_job_runtime_env() -> bool:
    state = _state
    return bool(state and state.get("runtime_env"))


def job_runtime_env() -> dict | None:
    """The job's runtime_env (packaged), or None."""
    state = _state
    return state.get("runtime_env") if state else None


def namespace() -> str | None:
    """The namespace ``init`` was given (None: the job's own)."""
    state = _state
    return state.get("namespace") if state else None


object_ref.set_connector(auto_init)
