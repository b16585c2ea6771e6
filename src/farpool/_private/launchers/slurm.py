"""``srun farpool slurm -- CMD...``: a cluster made of a SLURM job step; ``farpool slurm sbatch``.

Runs in every task's process (``farpool slurm``, one task per node), on its main
thread.  SLURM only starts the tasks; the rendezvous is a file in the job's
directory (``$SLURM_SUBMIT_DIR``, shared by the nodes as a site's home is), and
the cluster then talks ZeroMQ as always::

    task 0 (node 0):  farpool start --head --block          (child process)
                      writes <job dir>/.farpool-slurm-<job>.<step>  (0600: address, token)
    task on node k:   reads it; farpool start --address A --block  (child process)
    task 0:           waits until the head has a node per node of the step, then runs CMD
                      with FARPOOL_ADDRESS / FARPOOL_TOKEN / FARPOOL_TMPDIR set (init() joins)
                      CMD ends: rewrites the file as {"stopped": code}, stops its part, removes it
    task on node k:   sees "stopped" (or the file gone): stops its part, exits

Roles come from ``SLURM_PROCID`` (0: the head and CMD) and ``SLURM_LOCALID`` (0: a
node agent; a second task on a node has nothing to do and says so).  The token is
made by task 0 and travels in that file and in environment variables, never on a
command line.  Each node's part lives in its own tmp root,
``<tmp root>/slurm-<job>.<step>-n<node>``, so two jobs (or steps) on one node never
share a session, a state file or a store; a root a killed job left is removed by
the next ``farpool slurm`` on that node.

Ending.  SLURM signals every process of a step at once: SIGTERM at the walltime or
on ``scancel``, SIGKILL after ``KillWait``.  The processes started here ignore that
SIGTERM (``session.IGNORE_SIGTERM_VAR``), so the cluster goes on running tasks and
returning their results while CMD, which does get it, finishes: a CMD that catches
SIGTERM can collect what is in flight and save it; one that does not simply ends,
and the cluster ends with it.  SIGKILL ends this process, whose ``farpool start``
dies with it (``PR_SET_PDEATHSIG``), whose head and agent die with that (lifelines).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from farpool._private import addresses, session

# How long a node's task waits for task 0's rendezvous file: task 0 writes it once the
# head runs (seconds), but SLURM may start the tasks of a step some seconds apart.
RENDEZVOUS_TIMEOUT_S = 120.0
# How often a waiting task looks at the rendezvous file and at its own agent.  A shared
# file system offers nothing to block on; this bounds the delay at the start and the end.
POLL_S = 0.1
# How long task 0 waits for every node's agent in the head's node table before running CMD.
JOIN_DEADLINE_S = 60.0
# Seconds a `farpool start --block` may take to stop its processes (3 s per process, then
# it kills them): beyond this it is killed too.
STOP_TIMEOUT_S = 30.0
ROOT_PREFIX = "slurm-"
RENDEZVOUS_PREFIX = ".farpool-slurm-"


@dataclass
class Step:
    """What SLURM tells a task about itself (its environment)."""
    job_id: str
    step_id: str
    proc_id: int
    node_id: int
    local_id: int
    num_nodes: int
    node_name: str
    node_list: str
    job_dir: str
    cpus: float | None

    @classmethod
    def from_env(cls, env=None) -> "Step":
        env = os.environ if env is None else env
        if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
            raise ValueError("not inside a SLURM job step (SLURM_JOB_ID and SLURM_PROCID are not set): run "
                             "`srun --ntasks-per-node=1 farpool slurm -- python job.py` inside an allocation "
                             "(salloc, or an sbatch script: `farpool slurm sbatch` prints one)")

        def num(name, default=0):
            value = env.get(name, "")
            return int(value) if value.isdigit() else default
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
        return cls(job_id=env["SLURM_JOB_ID"], step_id=env.get("SLURM_STEP_ID", "0"),
                   proc_id=num("SLURM_PROCID"), node_id=num("SLURM_NODEID"), local_id=num("SLURM_LOCALID"),
                   num_nodes=num("SLURM_STEP_NUM_NODES") or num("SLURM_NNODES") or num("SLURM_JOB_NUM_NODES", 1),
                   node_name=env.get("SLURMD_NODENAME", ""),
                   node_list=env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""),
                   job_dir=env.get("SLURM_SUBMIT_DIR") or os.getcwd(),
                   cpus=float(cpus) if cpus and cpus.isdigit() else None)

    @property
    def tag(self) -> str:
        return f"{self.job_id}.{self.step_id}"

    def rendezvous_path(self) -> str:
        return os.path.join(self.job_dir, f"{RENDEZVOUS_PREFIX}{self.tag}")

    def root(self) -> str:
        return os.path.join(session.tmp_root(), f"{ROOT_PREFIX}{self.tag}-n{self.node_id}")


@dataclass
class Options:
    command: list
    host: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the rendezvous file
def write_rendezvous(path: str, record: dict) -> None:
    """Replace the rendezvous file whole (never seen half-written), readable by its owner only."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def read_rendezvous(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # a file system that shows a replaced file late: read it again
        return None


# --------------------------------------------------------------------------- addresses
def expand_hostlist(node_list: str) -> list[str]:
    """SLURM's compact host list (``n[1-3,7]``) as names, through ``scontrol show hostnames``."""
    if not node_list:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return [] if "[" in node_list else node_list.split(",")
    return out.stdout.split() if out.returncode == 0 else []


def node_addr(name: str) -> str:
    """The address slurmctld reaches node ``name`` at (its NodeAddr), else the name itself."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return name
    for word in out.split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1]
    return name


def head_host(step: Step, opts: Options) -> str:
    """Where task 0's head listens: ``--host``; loopback for a one-node step; else the local
    address on the route to another node of the step (the one its agent will come from)."""
    if opts.host:
        return opts.host
    if step.num_nodes <= 1:
        return "127.0.0.1"
    others = [n for n in expand_hostlist(step.node_list) if n != step.node_name]
    for other in others[:1]:
        try:
            return addresses.route_to(node_addr(other))
        except ValueError:
            pass
    return addresses.default_ip()


# --------------------------------------------------------------------------- one node's part
def _set_pdeathsig() -> None:
    """In the child, before exec: SIGKILL when the task that started it dies (its own SIGTERM
    handler would only drain; its head and agent then stop through their lifelines)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Part:
    """This node's `farpool start --block` (a head and its node, or a node) and its tmp root."""

    def __init__(self, step: Step, opts: Options):
        self.step = step
        self.opts = opts
        self.root = step.root()
        self.proc: subprocess.Popen | None = None

    def start(self, head_address: str | None, token: str, host: str = "") -> str:
        """Start the head (task 0) or a node agent; return the head's address."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        args = ["--block", "--resources", json.dumps(self.opts.resources or {})]
        cpus = self.opts.num_cpus if self.opts.num_cpus is not None else self.step.cpus
        for flag, value in (("--num-cpus", cpus), ("--num-gpus", self.opts.num_gpus)):
            if value is not None:
                args += [flag, str(value)]
        args = (["--head", "--host", host] if head_address is None else ["--address", head_address]) + args
        env = dict(os.environ, FARPOOL_TMPDIR=self.root, FARPOOL_TOKEN=token, PYTHONUNBUFFERED="1")
        env[session.IGNORE_SIGTERM_VAR] = "1"
        self.proc = subprocess.Popen([sys.executable, "-m", "farpool", "start", *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     preexec_fn=_set_pdeathsig)
        first = self.proc.stdout.readline()  # printed once started (or EOF: it failed, stderr says why)
        threading.Thread(target=self._drain, name="farpool-slurm-drain", daemon=True).start()
        if not first:
            code = self.proc.wait()
            raise RuntimeError(f"node {self.step.node_name or self.step.node_id}: `farpool start "
                               f"{' '.join(args[:2])}` exited with code {code} (its error is printed above)")
        with open(os.path.join(self.root, "cluster.json")) as f:
            return json.load(f).get("address") or head_address

    def _drain(self) -> None:
        for _line in self.proc.stdout:  # never an undrained pipe; what it says later is not needed
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop `farpool start --block` (SIGINT: it stops its processes; SIGTERM it ignores)."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def remove_dead_roots() -> list[str]:
    from farpool._private.launchers import mpi
    return mpi.remove_dead_roots(ROOT_PREFIX)


# --------------------------------------------------------------------------- a task's life
def run(opts: Options, step: Step | None = None) -> int:
    """The whole life of one task; returns its exit code (task 0: the command's)."""
    step = step or Step.from_env()
    if step.proc_id != 0 and step.local_id != 0:
        print(f"farpool slurm: task {step.proc_id} is a second task on node {step.node_name}, which already "
              "has its node agent: it has nothing to do and exits (run one task per node: "
              "srun --ntasks-per-node=1)", file=sys.stderr, flush=True)
        return 0
    draining = []

    def on_sigterm(*_):
        if not draining:
            draining.append(time.monotonic())
            if step.proc_id == 0:
                print(f"farpool slurm: SIGTERM (the walltime, or scancel) for job {step.tag}: the cluster keeps "
                      "running so the command's tasks in flight still return their results; it stops when "
                      "the command exits (SLURM kills what is left after KillWait)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, on_sigterm)
    part = Part(step, opts)
    remove_dead_roots()
    session.remove_dead_sessions()
    try:
        if step.proc_id == 0:
            return _run_head(step, opts, part, draining)
        return _run_node(step, part)
    finally:
        part.stop()


def _run_head(step: Step, opts: Options, part: Part, draining: list) -> int:
    path = step.rendezvous_path()
    token = session.new_token()
    try:
        try:
            address = part.start(None, token, head_host(step, opts))
        except (RuntimeError, OSError, ValueError) as exc:
            write_rendezvous(path, {"job": step.tag, "error": str(exc)})
            print(f"farpool slurm: the head did not start on {step.node_name}: {exc}", file=sys.stderr, flush=True)
            return 1
        write_rendezvous(path, {"job": step.tag, "address": address, "token": token, "head": step.node_name})
        # The command's driver session goes in this node's root too (removed with it), and
        # init(address="auto") there finds this cluster as it finds one `farpool start` made.
        os.environ["FARPOOL_TMPDIR"] = part.root
        code = _wait_for_nodes(address, token, step.num_nodes)
        if code == 0 and draining:  # cancelled before it started: it would never hear of it
            print("farpool slurm: the job was signalled before the command started: not starting it",
                  file=sys.stderr, flush=True)
            code = 128 + signal.SIGTERM
        if code == 0:
            code = _run_command(opts.command, address, token, part.root)
        write_rendezvous(path, {"job": step.tag, "stopped": code})
        return code
    finally:
        part.stop()
        try:
            os.unlink(path)
        except OSError:
            pass


def _run_node(step: Step, part: Part) -> int:
    path = step.rendezvous_path()
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while True:
        record = read_rendezvous(path)
        if record and record.get("job") == step.tag:
            break
        if time.monotonic() > deadline:
            print(f"farpool slurm: node {step.node_name} found no rendezvous file {path} after "
                  f"{RENDEZVOUS_TIMEOUT_S:.0f} s: task 0 writes it once its head runs. Is {step.job_dir} "
                  "shared by every node of the job (run srun from a shared directory)?", file=sys.stderr,
                  flush=True)
            return 1
        time.sleep(POLL_S)
    if "address" not in record:  # the head failed (task 0 said why) or the job already ended
        return 1 if record.get("error") else 0
    try:
        part.start(record["address"], record["token"])
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"farpool slurm: {exc}", file=sys.stderr, flush=True)
        return 1
    while True:
        record = read_rendezvous(path)
        if record is None and not os.path.exists(path):
            return 0  # task 0 removed it: the job is over
        if record is not None and "stopped" in record:
            return 0
        if not part.alive():
            print(f"farpool slurm: the node agent on {step.node_name} stopped before the job ended "
                  f"(`farpool start` exited with code {part.proc.returncode})", file=sys.stderr, flush=True)
            return 1
        time.sleep(POLL_S)


def _wait_for_nodes(address: str, token: str, expected: int) -> int:
    """Task 0: 0 once the head has ``expected`` live nodes, else 1 saying how many it has."""
    from farpool._private import runtime
    runtime.init(address=address, token=token, log_to_driver=False)
    try:
        deadline = time.monotonic() + JOIN_DEADLINE_S
        while True:
            alive = [n for n in runtime.client().request_nodes() if n.get("alive", True)]
            if len(alive) >= expected or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
    finally:
        runtime.shutdown()
    if len(alive) < expected:
        print(f"farpool slurm: the head at {address} has {len(alive)} of the step's {expected} node(s) after "
              f"{JOIN_DEADLINE_S:.0f} s; the other nodes' tasks print why above (srun shows every task's "
              "stderr): check that they reach the head's address, or give --host", file=sys.stderr, flush=True)
        return 1
    return 0


def _run_command(command: list, address: str, token: str, root: str) -> int:
    """Task 0: the command, with FARPOOL_ADDRESS/FARPOOL_TOKEN set; its exit code (128+N for
    signal N, as a shell says)."""
    env = dict(os.environ, FARPOOL_ADDRESS=address, FARPOOL_TOKEN=token, FARPOOL_TMPDIR=root)
    env.pop(session.IGNORE_SIGTERM_VAR, None)
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"farpool slurm: cannot run {shlex.join(command)}: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
        return 127
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:
            continue
    return 128 - code if code < 0 else code


# --------------------------------------------------------------------------- sbatch
def batch_script(command: list, nodes: int, time_limit: str | None = None, partition: str | None = None,
                 cpus_per_task: int | None = None, job_name: str = "farpool", output: str | None = None,
                 account: str | None = None, python: str | None = None) -> str:
    """The batch script that runs ``command`` on a cluster of ``nodes`` nodes."""
    from farpool._version import __version__
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    if not command:
        raise ValueError("give the command after --: farpool slurm sbatch --nodes 2 -- python job.py")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1"]
    for flag, value in (("time", time_limit), ("partition", partition), ("cpus-per-task", cpus_per_task),
                        ("output", output), ("account", account)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    srun = ["srun", "--ntasks-per-node=1"] + ([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else [])
    lines += [
        f"# Made by `farpool slurm sbatch` (farpool {__version__}).  One task per node: the first runs the",
        "# head and the command, every node a node agent; all of it ends when the command ends.",
        "# `exec`: SLURM's SIGTERM at the walltime then reaches srun and the tasks, not a shell that would",
        "# end the job before the command has collected its results.",
        "exec " + shlex.join(srun + [python or sys.executable, "-m", "farpool", "slurm", "--", *command]),
    ]
    return "\n".join(lines) + "\n"


def submit(script: str) -> int:
    """``sbatch`` the script (on its stdin); prints what sbatch says; sbatch's exit code."""
    if not shutil.which("sbatch"):
        print("farpool slurm sbatch --submit: `sbatch` is not on PATH here; run it on a SLURM login node, "
              "or leave out --submit and submit the printed script there", file=sys.stderr)
        return 1
    out = subprocess.run(["sbatch"], input=script, text=True, capture_output=True, timeout=120)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode


# --------------------------------------------------------------------------- the command line
def cli_main(argv: list) -> int:
    """``farpool slurm [options] -- CMD...`` and ``farpool slurm sbatch [options] -- CMD...``."""
    argv = list(argv)
    command = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    if argv[:1] == ["sbatch"]:
        p = argparse.ArgumentParser(prog="farpool slurm sbatch",
                                    description="Print (or with --submit submit) a batch script that runs "
                                                "the command on a farpool cluster of the job's nodes.")
        p.add_argument("--nodes", "-N", type=int, required=True)
        p.add_argument("--time", "-t", default=None, help="walltime, as sbatch takes it (e.g. 1:00:00)")
        p.add_argument("--partition", "-p", default=None)
        p.add_argument("--cpus-per-task", "-c", type=int, default=None,
                       help="CPUs of each node for its node agent (default: what SLURM gives one task)")
        p.add_argument("--job-name", "-J", default="farpool")
        p.add_argument("--output", "-o", default=None)
        p.add_argument("--account", "-A", default=None)
        p.add_argument("--submit", action="store_true", help="submit it with sbatch instead of printing it")
        args = p.parse_args(argv[1:])
        script = batch_script(command, args.nodes, args.time, args.partition, args.cpus_per_task,
                              args.job_name, args.output, args.account)
        if args.submit:
            return submit(script)
        sys.stdout.write(script)
        return 0
    p = argparse.ArgumentParser(prog="farpool slurm",
                                description="Inside a SLURM allocation, one task per node "
                                            "(srun --ntasks-per-node=1 farpool slurm -- CMD): task 0 runs the "
                                            "head and CMD, every node a node agent; all of it ends with CMD.")
    p.add_argument("--host", default=None, help="address the head listens on (default: the local address on "
                                                "the route to the other nodes)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="logical CPUs of each node (default: SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs of each node (default: the ones SLURM gave)")
    p.add_argument("--resources", default="{}", help="custom resources of each node, as JSON")
    args = p.parse_args(argv)
    if not command:
        p.error("give the command after --: srun --ntasks-per-node=1 farpool slurm -- python job.py")
    try:
        resources = json.loads(args.resources)
    except ValueError as exc:
        p.error(f"--resources must be JSON such as '{{\"ssd\": 1}}', got {args.resources!r}: {exc}")
    return run(Options(command=command, host=args.host, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                       resources=resources))
