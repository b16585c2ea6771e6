"""``mpirun -n N python -m farpool.mpi job.py``: a cluster made of an MPI job's ranks.

Runs in every rank's process (the one ``mpirun`` started), on its main thread.
MPI carries only the bootstrap; the cluster then talks ZeroMQ as always, and no
process is spawned through MPI (no ``MPI_Comm_spawn``)::

    rank 0:  farpool start --head --block --resources {"rank0": 1}   (child process)
       |---- bcast (address, token, tag) ---->  every other rank
    rank k:  farpool start --address A --block --resources {"rankK": 1}
       <---- gather (joined or why not) ------
    rank 0:  checks the head's node table (every rank's node there), then runs
             job.py as __main__ with FARPOOL_ADDRESS/FARPOOL_TOKEN set (init() joins)
       |---- "stop" (script's exit code) ---->  every other rank
    all:     stop their `farpool start` (SIGTERM: it stops its head/agent), exit

The token travels by MPI broadcast and environment variables, never on a command
line.  Every rank gets its own tmp root (``<tmp root>/mpi-<tag>-r<rank>``), so
ranks sharing a machine keep separate sessions, state files and stores.  Each
``farpool start --block`` dies with its rank (``PR_SET_PDEATHSIG``) and its
head/agent die with it (lifelines), so a killed rank leaves nothing behind;
when a rank dies, ``mpirun`` ends the job's other ranks, which end theirs.
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from farpool._private import addresses, session

# How long rank 0 waits for every rank's node in the head's node table.  Agents
# that joined over TCP are registered before their `farpool start` returns; only
# the head's own node (over ipc) may lag by a moment.
JOIN_DEADLINE_S = 60.0
JOIN_RECHECK_S = 0.2
# How often a waiting rank looks for rank 0's stop message and at its own agent.
# MPI offers nothing to block on beside other fds, and a blocking receive spins a
# whole core in MPICH: a short sleep between tests costs at most this delay at the end.
STOP_POLL_S = 0.1
STOP_TAG = 16
ROOT_PREFIX = "mpi-"
# Seconds a `farpool start --block` may take to stop its processes (it waits 3 s per
# process, then kills): beyond this it is killed too.
STOP_TIMEOUT_S = 30.0


def rank_resource(rank: int) -> str:
    """The custom resource each rank's node holds one of: pin a task with resources={"rank3": 1}."""
    return f"rank{rank}"


def missing_ranks(nodes: list[dict], size: int) -> list[int]:
    """Ranks with no live node in the head's node table (``nodes`` as ``GetNodes`` returns them)."""
    present = set()
    for node in nodes:
        if not node.get("alive", True):
            continue
        for name in node.get("total", {}):
            if name.startswith("rank") and name[4:].isdigit():
                present.add(int(name[4:]))
    return [rank for rank in range(size) if rank not in present]


def remove_dead_roots(prefix: str = ROOT_PREFIX) -> list[str]:
    """Remove the tmp roots of ranks that were killed (SIGKILL leaves them): those whose state
    file names processes that are all gone.  A root still without one is starting: kept.
    (``prefix``: the SLURM launcher's roots are removed the same way.)"""
    removed = []
    base = session.tmp_root()
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if not name.startswith(prefix) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "cluster.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        pids = [state.get("head_pid")] + [n.get("pid") for n in state.get("nodes", [])]
        if not any(session.pid_alive(p) for p in pids if p):
            for sub in os.listdir(path):
                if sub.startswith(session.SESSION_PREFIX):
                    session.remove_session(os.path.join(path, sub))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass
class Options:
    script: str
    script_args: list
    host: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict | None = None


def _set_pdeathsig() -> None:
    """In the child, before exec: SIGTERM when the rank that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Rank:
    """One rank's part: its `farpool start --block` process and its tmp root."""

    def __init__(self, comm, opts: Options):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.root: str | None = None

    # --- starting ---
    def head_host(self) -> str:
        """Where rank 0's head listens: loopback when every rank is on this machine, else the
        local address on the route to the first other machine (--host overrides)."""
        hosts = self.comm.gather(socket.gethostname(), root=0)
        if self.rank != 0:
            return ""
        if self.opts.host:
            return self.opts.host
        others = [h for h in hosts if h != hosts[0]]
        if not others:
            return "127.0.0.1"
        try:
            return addresses.route_to(others[0])
        except ValueError:
            return addresses.default_ip()

    def start(self, head_address: str | None, token: str, tag: str, host: str = "") -> str:
        """Start this rank's head (rank 0) or node agent; return the head's address."""
        self.root = os.path.join(session.tmp_root(), f"{ROOT_PREFIX}{tag}-r{self.rank}")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        resources = dict(self.opts.resources or {})
        resources[rank_resource(self.rank)] = 1
        args = ["--block", "--resources", json.dumps(resources)]
        for flag, value in (("--num-cpus", self.opts.num_cpus), ("--num-gpus", self.opts.num_gpus)):
            if value is not None:
                args += [flag, str(value)]
        if head_address is None:
            args = ["--head", "--host", host] + args
        else:
            args = ["--address", head_address] + args
        env = dict(os.environ, FARPOOL_TMPDIR=self.root, FARPOOL_TOKEN=token,
                   FARPOOL_MPI_RANK=str(self.rank), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "farpool", "start", *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     preexec_fn=_set_pdeathsig)
        first = self.proc.stdout.readline()  # printed once started (or EOF: it failed, stderr says why)
        threading.Thread(target=self._drain, name="farpool-mpi-drain", daemon=True).start()
        if not first:
            code = self.proc.wait()
            raise RuntimeError(f"rank {self.rank}: `farpool start {' '.join(args[:2])}` exited with code "
                               f"{code} (its error is printed above)")
        state = self._state()
        return state.get("address") or head_address

    def _drain(self) -> None:
        for _line in self.proc.stdout:  # never an undrained pipe; what it says later is not needed
            pass

    def _state(self) -> dict:
        with open(os.path.join(self.root, "cluster.json")) as f:
            return json.load(f)

    # --- stopping ---
    def stop(self) -> None:
        """Stop this rank's `farpool start` (it stops its processes) and remove the tmp root."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    def agent_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def run(comm, opts: Options) -> int:
    """The whole life of one rank; returns its exit code (rank 0: the script's)."""
    me = Rank(comm, opts)
    # mpirun ends the other ranks with SIGTERM when one fails: unwind, so this rank's
    # `farpool start`, the script's driver and the tmp root go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return _run(me, me.head_host())
    finally:
        me.stop()


def _run(me: Rank, host: str) -> int:
    comm = me.comm
    # 1. rank 0 starts the head; every rank learns (address, token) or why not.
    started = None
    if me.rank == 0:
        session.remove_dead_sessions()  # what killed jobs left: their drivers' sessions, ranks' roots
        remove_dead_roots()
        token, tag = session.new_token(), secrets.token_hex(4)
        try:
            address = me.start(None, token, tag, host)
            started = (address, token, tag)
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"farpool.mpi: the head did not start on rank 0: {exc}", file=sys.stderr, flush=True)
    started = comm.bcast(started, root=0)
    if started is None:
        return 1
    address, token, tag = started
    # 2. every other rank joins its node agent; rank 0 hears who did.
    error = None
    if me.rank != 0:
        try:
            me.start(address, token, tag)
        except (RuntimeError, OSError, ValueError) as exc:
            error = str(exc)
    errors = comm.gather(error, root=0)
    code = 0
    if me.rank == 0:
        # The driver's session goes in rank 0's root too (removed with it), and there
        # init(address="auto") finds this cluster as it finds one `farpool start` made.
        os.environ["FARPOOL_TMPDIR"] = me.root
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            print("farpool.mpi: these ranks' node agents did not join the head at "
                  f"{address}: " + "; ".join(f"rank {r}: {e}" for r, e in failed), file=sys.stderr, flush=True)
            code = 1
        else:
            code = _wait_for_ranks(address, token, me.size)
        if code == 0:
            code = _run_script(me.opts, address, token)
        for rank in range(1, me.size):  # 3. the end, for everyone
            comm.send(code, dest=rank, tag=STOP_TAG)
        return code
    return _wait_for_stop(me)


def _wait_for_ranks(address: str, token: str, size: int) -> int:
    """Rank 0: 0 once every rank's node is in the head's node table, else 1 naming the missing."""
    from farpool._private import runtime
    runtime.init(address=address, token=token, log_to_driver=False)
    try:
        deadline = time.monotonic() + JOIN_DEADLINE_S
        while True:
            missing = missing_ranks(runtime.client().request_nodes(), size)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(JOIN_RECHECK_S)
    finally:
        runtime.shutdown()
    if missing:
        print(f"farpool.mpi: the head at {address} has no node for rank(s) {missing} after "
              f"{JOIN_DEADLINE_S:.0f} s, though their `farpool start` reported joining; read their "
              "node.log (kept under failed-* in each rank's tmp root) and check that those "
              "machines reach the head's address", file=sys.stderr, flush=True)
        return 1
    return 0


def _run_script(opts: Options, address: str, token: str) -> int:
    """Rank 0: the user's script as ``__main__``; ``farpool.init()`` (or ``init("auto")``) in it
    joins this cluster."""
    from farpool._private import runtime
    os.environ["FARPOOL_ADDRESS"] = address
    os.environ["FARPOOL_TOKEN"] = token
    saved_argv = sys.argv
    sys.argv = [opts.script, *opts.script_args]
    code = 0
    try:
        runpy.run_path(opts.script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.argv = saved_argv
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            runtime.shutdown()  # the script's driver, before its cluster goes
        except Exception:
            traceback.print_exc()
    return code


def _wait_for_stop(me: Rank) -> int:
    """Ranks > 0: keep the node agent until rank 0 says stop; 1 if the agent died first."""
    request = me.comm.irecv(source=0, tag=STOP_TAG)
    while True:
        done, _code = request.test()
        if done:
            return 0
        if not me.agent_alive():
            print(f"farpool.mpi: rank {me.rank}'s node agent stopped before the job ended "
                  f"(`farpool start` exited with code {me.proc.returncode})", file=sys.stderr, flush=True)
            return 1
        time.sleep(STOP_POLL_S)
