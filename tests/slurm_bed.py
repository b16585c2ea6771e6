"""A real SLURM on the network-namespace hosts of tests/netns.py (needs root).

Debian's ``slurm-wlm`` and ``munge`` (.ci/run installs them)::

    h1 (10.231.0.1): munged, slurmctld, slurmd (node h1)
    h2 (10.231.0.2): slurmd (node h2)
    h3 (10.231.0.3): the login host: srun, sbatch, scancel run there

One ``munged`` (on h1) serves every host: its socket lives in a directory outside
/tmp (hosts share everything but /tmp and /dev/shm, as a site's machines share
its NFS), beside the munge key, slurm.conf and the jobs' working directory.
Each daemon's spool, state and logs are in its host's private /tmp.  ``close``
stops the daemons this started (by pid) and removes the shared directory; the
rest goes with the hosts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SLURM_TOOLS = ("slurmctld", "slurmd", "srun", "sbatch", "scancel", "squeue", "scontrol", "munged")
READY_TIMEOUT_S = 60
KILL_WAIT_S = 30  # slurm.conf KillWait: SIGTERM ... SIGKILL; a test that ends before it proves a clean end


def missing_tools() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in SLURM_TOOLS if not shutil.which(t, path=path)]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _which(tool: str) -> str:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class SlurmBed:
    def __init__(self, bed, nodes: int = 2):
        self.bed = bed
        self.nodes = bed.hosts[:nodes]
        self.login = bed.hosts[nodes]
        # Outside /tmp, so every host sees it (a site's shared file system).
        self.shared = tempfile.mkdtemp(prefix=f"fp-slurm-{os.getpid()}-", dir="/var/tmp")
        os.chmod(self.shared, 0o755)  # munged: its socket's directory must be searchable by all
        self.conf = os.path.join(self.shared, "slurm.conf")
        self.jobdir = os.path.join(self.shared, "job")
        os.mkdir(self.jobdir, 0o700)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": self.conf}

    def write_conf(self) -> None:
        control = socket.gethostname().split(".")[0]  # slurmctld checks it runs on SlurmctldHost
        sock = os.path.join(self.shared, "munge.socket")
        lines = [
            "ClusterName=fpt",
            f"SlurmctldHost={control}({self.nodes[0].address})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            "StateSaveLocation=/tmp/slurmctld", "SlurmdSpoolDir=/tmp/slurmd",
            "SlurmctldPidFile=/tmp/slurmctld.pid", "SlurmdPidFile=/tmp/slurmd.pid",
            "SlurmctldLogFile=/tmp/slurmctld.log", "SlurmdLogFile=/tmp/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "MpiDefault=none",
            "SchedulerType=sched/builtin", f"KillWait={KILL_WAIT_S}", "InactiveLimit=0",
            "MinJobAge=2", "SlurmdTimeout=30", "SlurmctldTimeout=30",
        ]
        for host in self.nodes:
            lines.append(f"NodeName={host.name} NodeAddr={host.address} CPUs=2 State=UNKNOWN")
        lines.append(f"PartitionName=fpt Nodes={','.join(h.name for h in self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        # slurmd always loads a cgroup plugin; the hosts' /sys (ip netns exec mounts a fresh one)
        # has no cgroup file system, and with proctrack/linuxproc and task/none none is needed.
        with open(os.path.join(self.shared, "cgroup.conf"), "w") as f:
            f.write("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nIgnoreSystemd=yes\n")

    def _start(self, host, name: str, argv: list[str], ready: str) -> subprocess.Popen:
        """Start a daemon in the foreground on ``host``; return once it printed ``ready``."""
        log = os.path.join(self.shared, f"{name}.out")
        out = open(log, "wb")
        try:
            proc = host.popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        self.procs.append((name, proc))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            with open(log, errors="replace") as f:
                text = f.read()
            if ready in text:
                return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} on {host.name} did not start (exit {proc.poll()}):\n{text}")
            time.sleep(0.05)

    def open(self) -> None:
        self.write_conf()
        key = os.path.join(self.shared, "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        h1 = self.nodes[0]
        self._start(h1, "munged", [_which("munged"), "-F", "--force", f"--socket={self.shared}/munge.socket",
                                   f"--key-file={key}", "--pid-file=/tmp/munged.pid",
                                   "--log-file=/dev/stderr", "--seed-file=/tmp/munged.seed", "--num-threads=2"],
                    "Starting")
        self._start(h1, "slurmctld", [_which("slurmctld"), "-D", "-i", "-v", "-f", self.conf], "Running as primary")
        for host in self.nodes:
            os.makedirs(host.path("/tmp/slurmd"), mode=0o700, exist_ok=True)
            self._start(host, f"slurmd-{host.name}", [_which("slurmd"), "-D", "-v", "-f", self.conf,
                                                      "-N", host.name], "slurmd started")
        self.wait_idle()

    def wait_idle(self) -> None:
        """Until slurmctld has every node idle (registered): a job submitted then starts at once."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(h.name) == "idle" for h in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurm nodes not idle: {out}\n{self.logs()}")
            time.sleep(0.1)

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None,
            host=None) -> subprocess.CompletedProcess:
        """A SLURM client command on the login host, in the jobs' directory."""
        return (host or self.login).run(list(argv), env=self.env, check=check, timeout=timeout,
                                        cwd=self.jobdir, input=input)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return self.login.popen(list(argv), env=self.env, cwd=self.jobdir, **kw)

    def logs(self) -> str:
        text = []
        for name, _proc in self.procs:
            try:
                with open(os.path.join(self.shared, f"{name}.out"), errors="replace") as f:
                    text.append(f"--- {name}\n{f.read()[-4000:]}")
            except OSError:
                pass
        return "\n".join(text)

    def close(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:  # nsenter forwards no signal: its child is the daemon
                for pid in _children(proc.pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
        self.procs = []
        shutil.rmtree(self.shared, ignore_errors=True)
