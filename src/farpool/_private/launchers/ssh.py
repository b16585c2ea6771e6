"""``farpool up CLUSTER.yaml`` / ``farpool down CLUSTER.yaml``: a cluster over SSH.

Runs in the user's process (the CLI), one thread per host while hosts are
started in parallel.  Uses the system ``ssh`` (BatchMode, so it never prompts;
``~/.ssh/config`` applies, or ``ssh.config_file``)::

    farpool up ---ssh: setup, versions---> every host (in parallel)
               ---ssh: farpool start --head (token on stdin)---> head.host
               ---ssh: farpool start --address HEAD (token on stdin)---> every worker (in parallel)
               <--- each prints its node's address; a host that fails is reported by name

The token is made here, sent to each host on ssh's stdin (never in argv, on
either side), and kept in a local 0600 file beside a record of what was
started, which ``down`` reads to stop exactly those hosts' agents.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field

from farpool._private import session, versions

# Seconds one ssh command may take (setup may install packages: longer).
SSH_TIMEOUT_S = 120
SETUP_TIMEOUT_S = 1800
CONNECT_TIMEOUT_S = 10  # ssh's ConnectTimeout: an unreachable host fails this fast


@dataclass
class Host:
    host: str
    python: str
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict = field(default_factory=dict)
    node_ip: str | None = None


@dataclass
class ClusterConfig:
    cluster_name: str
    ssh: dict
    setup: list
    head: Host
    workers: list


def load(path: str) -> ClusterConfig:
    """Read and check CLUSTER.yaml; ValueError names the field that is wrong."""
    try:
        import yaml
    except ImportError:
        raise RuntimeError("farpool up/down read CLUSTER.yaml with PyYAML, which is not installed: "
                           "pip install 'farpool[up]' (or pip install pyyaml)") from None
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with cluster_name, head and workers")
    unknown = set(raw) - {"cluster_name", "ssh", "python", "setup", "head", "workers"}
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; expected cluster_name, ssh, python, "
                         "setup, head, workers")
    name = str(raw.get("cluster_name") or "default")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"{path}: cluster_name must be letters, digits, '_', '.' or '-', got {name!r}")
    python = raw.get("python") or "python3"

    def host(entry, where):
        if not isinstance(entry, dict) or not entry.get("host"):
            raise ValueError(f"{path}: {where} needs a `host`, got {entry!r}")
        extra = set(entry) - {"host", "python", "num_cpus", "num_gpus", "resources", "node_ip"}
        if extra:
            raise ValueError(f"{path}: {where} has unknown field(s) {sorted(extra)}")
        return Host(str(entry["host"]), entry.get("python") or python, entry.get("num_cpus"),
                    entry.get("num_gpus"), dict(entry.get("resources") or {}), entry.get("node_ip"))

    if "head" not in raw:
        raise ValueError(f"{path}: `head: {{host: ...}}` is missing")
    workers = raw.get("workers") or []
    if not isinstance(workers, list):
        raise ValueError(f"{path}: `workers` must be a list of {{host: ...}}")
    setup = raw.get("setup") or []
    if isinstance(setup, str):
        setup = [setup]
    return ClusterConfig(name, dict(raw.get("ssh") or {}), list(setup), host(raw["head"], "head"),
                         [host(w, f"workers[{i}]") for i, w in enumerate(workers)])


def ssh_argv(cfg: ClusterConfig, host: str, command: str) -> list[str]:
    s = cfg.ssh
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
    if s.get("config_file"):
        argv += ["-F", os.path.expanduser(s["config_file"])]
    if s.get("port"):
        argv += ["-p", str(s["port"])]
    if s.get("identity_file"):
        argv += ["-i", os.path.expanduser(s["identity_file"])]
    if s.get("user"):
        argv += ["-l", str(s["user"])]
    return argv + [host, command]


class HostFailed(Exception):
    def __init__(self, host: str, what: str, detail: str):
        super().__init__(f"{host}: {what}: {detail.strip()[-1500:]}")
        self.host = host


def _ssh(cfg, host: str, command: str, stdin: str = "", timeout: float = SSH_TIMEOUT_S, what: str = ""):
    try:
        out = subprocess.run(ssh_argv(cfg, host, command), input=stdin, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HostFailed(host, what, f"ssh did not finish within {timeout:.0f} s") from None
    if out.returncode == 255:
        raise HostFailed(host, "cannot reach it over ssh", out.stderr or "ssh exited with 255")
    if out.returncode != 0:
        raise HostFailed(host, what, out.stderr + out.stdout)
    return out.stdout


# With the token on stdin: read it into the environment, never into argv.
def _with_token(command: str) -> str:
    return f"IFS= read -r FARPOOL_TOKEN && export FARPOOL_TOKEN && exec {command}"


def _start_flags(h: Host) -> str:
    flags = []
    if h.num_cpus is not None:
        flags += ["--num-cpus", str(h.num_cpus)]
    if h.num_gpus is not None:
        flags += ["--num-gpus", str(h.num_gpus)]
    if h.resources:
        flags += ["--resources", json.dumps(h.resources)]
    if h.node_ip:
        flags += ["--node-ip", h.node_ip]
    return " ".join(shlex.quote(f) for f in flags)


VERSION_PROBE = ("import sys, farpool; print('farpool-versions', farpool.__version__, "
                 "'%d.%d' % sys.version_info[:2])")


def _prepare(cfg: ClusterConfig, h: Host) -> None:
    """Run ``setup`` and check that the host runs our farpool and Python minor version."""
    for command in cfg.setup:
        _ssh(cfg, h.host, command, timeout=SETUP_TIMEOUT_S, what=f"setup command {command!r} failed")
    out = _ssh(cfg, h.host, f"{shlex.quote(h.python)} -c {shlex.quote(VERSION_PROBE)}",
               what=f"cannot import farpool with {h.python}")
    m = re.search(r"farpool-versions (\S+) (\S+)", out)
    if not m:
        raise HostFailed(h.host, "cannot tell its farpool version", out)
    why = versions.mismatch({"farpool": m.group(1), "python": m.group(2)}, f"{h.host} ({h.python})",
                            "this machine")
    if why:
        raise HostFailed(h.host, "refused", why)


def state_path(name: str) -> str:
    return os.path.join(session.tmp_root(), f"up-{name}.json")


def up(cfg: ClusterConfig, log=print) -> dict:
    """Start the cluster; returns the state written for ``down``.  Raises HostFailed when the head
    cannot start; workers that fail are reported and left out."""
    token = session.new_token()
    hosts = [cfg.head, *cfg.workers]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts))) as pool:
        prepared = list(pool.map(lambda h: _try(_prepare, cfg, h), hosts))  # an entry per host, in order
    if prepared[0] is not None:
        raise prepared[0]
    head = cfg.head
    out = _ssh(cfg, head.host, _with_token(f"{shlex.quote(head.python)} -m farpool start --head --host "
                                           f"{shlex.quote(head.node_ip or head.host)} {_start_flags(head)}"),
               stdin=token + "\n", what="farpool start --head failed")
    m = re.search(r"farpool head started at (\S+)", out)
    if not m:
        raise HostFailed(head.host, "farpool start --head printed no address", out)
    address = m.group(1)
    log(f"head started on {head.host}: {address}")
    state = {"cluster_name": cfg.cluster_name, "address": address,
             "head": {"host": head.host, "python": head.python}, "workers": [],
             "failed": []}
    token_file = os.path.join(session.tmp_root(), f"up-{cfg.cluster_name}.token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    state["token_file"] = token_file
    _write_state(cfg.cluster_name, state)  # the head is up: `down` must find it even if we fail now

    def join(i: int) -> str:
        h = cfg.workers[i]
        if prepared[1 + i] is not None:
            raise prepared[1 + i]
        text = _ssh(cfg, h.host, _with_token(f"{shlex.quote(h.python)} -m farpool start --address "
                                             f"{shlex.quote(address)} {_start_flags(h)}"),
                    stdin=token + "\n", what="farpool start --address failed")
        m = re.search(r"reach it at (\S+) ", text)
        return m.group(1) if m else "?"

    with concurrent.futures.ThreadPoolExecutor(max(1, len(cfg.workers))) as pool:
        results = list(pool.map(lambda i: _try(join, i), range(len(cfg.workers))))
    for h, result in zip(cfg.workers, results):
        if isinstance(result, Exception):
            state["failed"].append({"host": h.host, "error": str(result)})
            log(f"node on {h.host} did NOT start: {result}")
        else:
            state["workers"].append({"host": h.host, "python": h.python})
            log(f"node started on {h.host}: {result}")
    _write_state(cfg.cluster_name, state)
    return state


def _try(fn, *args):
    try:
        return fn(*args)
    except HostFailed as exc:
        return exc


def _write_state(name: str, state: dict) -> None:
    path = state_path(name)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)


def down(cfg: ClusterConfig, log=print) -> list[str]:
    """Stop what ``up`` started (workers first, then the head); returns the hosts that failed."""
    try:
        with open(state_path(cfg.cluster_name)) as f:
            state = json.load(f)
    except OSError:
        raise ValueError(f"no record of `farpool up` for cluster {cfg.cluster_name!r} on this machine "
                         f"({state_path(cfg.cluster_name)})") from None
    def stop(started: dict):  # with the python that started it (one host may have several)
        return _ssh(cfg, started["host"], f"{shlex.quote(started['python'])} -m farpool stop",
                    what="farpool stop failed")

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max(1, len(state["workers"]))) as pool:
        for started, result in zip(state["workers"], pool.map(lambda h: _try(stop, h), state["workers"])):
            host = started["host"]
            if isinstance(result, Exception):
                failed.append(host)
                log(f"could not stop {host}: {result}")
            else:
                log(f"stopped {host}")
    result = _try(stop, state["head"])
    if isinstance(result, Exception):
        failed.append(state["head"]["host"])
        log(f"could not stop the head on {state['head']['host']}: {result}")
    else:
        log(f"stopped the head on {state['head']['host']}")
    if not failed:
        os.unlink(state_path(cfg.cluster_name))
        try:
            os.unlink(state["token_file"])
        except OSError:
            pass
    return failed
