"""Helpers the test suites share: tests/integration and the compat suites.

Importable as ``farpool_testing``: pytest puts this directory on ``sys.path`` for
everything under tests/ (it holds tests/conftest.py, and tests/ is not a
package), and compat/conftest.py puts it there for the compat runs.  The task
functions here travel to workers by reference (``farpool_testing.square``); the
workers get the driver's ``sys.path``, so they import this module as the tests do.

Not ``helpers``: a test of ``runtime_env`` ships a package of that name.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil

# Seconds any one blocking call of a test may take (results, gates, arrivals).
TIMEOUT = 60
# Seconds ``wait_until`` waits by default for cluster state to change.
DEADLINE_S = 30


# ---------------------------------------------------------------------------- task functions
def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def pid_of(_=None):
    return os.getpid()


_value = None


def set_value(v):
    """An initializer: leaves ``v`` in the worker, for ``get_value``."""
    global _value
    _value = v


def get_value(_=None):
    return _value


def crash_once(marker):
    """Kills its worker the first time, succeeds on the retry."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return "survived"


# ---------------------------------------------------------------------------- a gate tasks wait at
def wait_at_gate(path, value=None):
    """A task that shows it runs (it connects) and blocks until the test opens the gate."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.recv(2)
    return value


class Gate:
    """A Unix socket tasks connect to (showing they run) and block on until the test opens it."""

    def __init__(self, path):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.arrived = threading.Semaphore(0)
        self.opened = threading.Event()
        self.conns = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
                if self.opened.is_set():
                    self._release()
            self.arrived.release()

    def _release(self):
        for conn in self.conns:
            try:
                conn.sendall(b"go")
            except OSError:  # that task is gone (killed or cancelled)
                pass
            conn.close()
        self.conns.clear()

    def wait_arrivals(self, n=1, timeout=TIMEOUT):
        for _ in range(n):
            assert self.arrived.acquire(timeout=timeout), "a task never reached the gate"

    def open(self):
        """Let every waiting task go, and any that arrives later."""
        with self.lock:
            self.opened.set()
            self._release()

    def shut(self):
        """Hold the tasks that arrive from now on again (until the next ``open``)."""
        with self.lock:
            self.opened.clear()

    def close(self):
        self.open()
        self.listener.close()


# ---------------------------------------------------------------------------- waiting on files and state
def wait_until(predicate, what, timeout=DEADLINE_S):
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout}s for {what}")
        time.sleep(0.01)


def wait_for_file(path, timeout=60.0):
    """Inside a task: block until ``path`` exists (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def meet(directory, me, n, timeout=30.0):
    """Inside a task: a barrier of ``n`` tasks through files; True when all ``n`` arrived."""
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, me), "w").close()
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------------------- driver scripts
def run_script(tmp_path, body, env=None, timeout=120):
    """Run ``body`` (dedented) as a driver script in ``tmp_path``; returns the ``CompletedProcess``.

    ``env`` is the script's whole environment (None: this process's), as for ``subprocess.run``.
    """
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


# ---------------------------------------------------------------------------- clusters of node agents
def node_ids(cluster):
    """The node ids of a cluster started by tests/cluster's ``started`` fixture, head first."""
    return [n["node_id"] for n in cluster.read_state()["nodes"]]


def three_nodes(cluster, *third_args):
    """A head node (resource "head"), a second node (2 CPUs, "second": 4) and a third ("third"),
    with this process joined by address="auto" (on the head node); their node ids."""
    import farpool
    cluster.start_head("--num-cpus", "1", "--resources", '{"head": 1}')
    cluster.add_node("--num-cpus", "2", "--resources", '{"second": 4}')
    cluster.add_node("--num-cpus", "1", "--resources", '{"third": 1}', *third_args)
    farpool.init(address="auto")
    return node_ids(cluster)


def store_stats_of(node_id):
    """The object store counts of a node's agent (this driver leased there: it has its connection)."""
    import farpool
    client = farpool.api._client()
    stats, _listing = client.agent_request(client.agents[node_id], "StoreStats", ())
    return stats


class Mailbox:
    """An actor (``farpool.remote(Mailbox)``) that hands over the refs it was given, keeping
    none: the taker borrows them from their owner."""

    def hold(self, box):
        self.box = box
        return True

    def give(self):
        box, self.box = self.box, None
        return box


# ---------------------------------------------------------------------------- a cluster from the CLI
def farpool_cli(*args, env=None, check=True, timeout=60):
    result = subprocess.run([sys.executable, "-m", "farpool", *args], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"farpool {' '.join(args)} failed: {result.stdout}\n{result.stderr}")
    return result


def log_tails(root: str, lines: int = 30, limit: int = 12) -> list:
    """(path under ``root``, its last ``lines`` lines) of the runtime logs (head, node agents,
    workers) under the tmp root ``root``, the most recently written first."""
    logs = []
    for where, _, files in os.walk(root):
        logs += [os.path.join(where, f) for f in files if f.endswith(".log")]
    logs.sort(key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0, reverse=True)
    out = []
    for path in logs[:limit]:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        tail = "\n".join(text.splitlines()[-lines:])
        if tail.strip():
            out.append((os.path.relpath(path, root), tail))
    return out


class Cluster:
    """A head (with its node) and extra node agents started with the CLI, on loopback."""

    host_address = "127.0.0.1"  # where the head listens

    def __init__(self, root):
        self.root = root
        self.state_path = os.path.join(root, "cluster.json")

    def node_address(self, i: int) -> str:
        """The address of the ``i``-th node added (0: the head's node)."""
        return self.host_address

    def start_head(self, *args):
        out = farpool_cli("start", "--head", "--num-cpus", "1", *args)
        self.state = self.read_state()
        self.address = self.state["address"]
        with open(self.state["token_file"]) as f:
            self.token = f.read().strip()
        return out

    def add_node(self, *args, token=None):
        return farpool_cli("start", "--address", self.address, *args, env={"FARPOOL_TOKEN": token or self.token},
                           check=token is None)

    def stop_node(self, node_id, *args):
        """``farpool stop --node node_id``: drain that node agent, then stop it."""
        return farpool_cli("stop", "--node", node_id, *args, timeout=120)

    def read_state(self):
        with open(self.state_path) as f:
            return json.load(f)

    def pids(self):
        state = self.read_state()
        return [state["head_pid"]] + [n["pid"] for n in state["nodes"]]

    def kill_node(self, node_id):
        """kill -9 a node agent; returns once it and its workers (which follow it through their
        lifelines) are gone."""
        pid = [n["pid"] for n in self.read_state()["nodes"] if n["node_id"] == node_id][0]
        victims = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
        os.kill(pid, signal.SIGKILL)
        psutil.wait_procs(victims, timeout=20)

    def stop(self):
        procs = []
        if os.path.exists(self.state_path):
            for pid in self.pids():
                try:
                    procs.append(psutil.Process(pid))
                    procs.extend(psutil.Process(pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
            farpool_cli("stop")
        gone, alive = psutil.wait_procs(procs, timeout=15)
        return alive

    # ------------------------------------------------------------ faults (tests/chaos)
    # Records of node agents are their cluster.json entries ("pid", "node_id", ...), with
    # "host" (the index of the host their pid belongs to) on a HostsCluster.
    def agents(self) -> list[dict]:
        """Every node agent started, the head's node first, each with "alive" (its process runs)
        and "workers" (the pids of its farpool-worker processes)."""
        return describe_agents(self.read_state()["nodes"])

    def alive_agents(self) -> list[dict]:
        """The node agents alive now besides the head's node, in a stable order (by pid)."""
        return sorted((n for n in self.agents()[1:] if n["alive"]), key=_by_host_and_pid)

    def workers(self) -> list[dict]:
        """The workers of the live node agents (the head's node too), in a stable order (by
        pid): {"pid", "node_id"} and the agent's "host" if it has one."""
        found = [dict({k: n[k] for k in ("node_id", "host") if k in n}, pid=pid)
                 for n in self.agents() if n["alive"] for pid in n["workers"]]
        return sorted(found, key=_by_host_and_pid)

    def kill_worker(self, worker: dict) -> None:
        """SIGKILL a worker (a record of ``workers``); returns at once."""
        os.kill(worker["pid"], signal.SIGKILL)

    def kill_agent(self, agent: dict) -> None:
        """SIGKILL a node agent (a record of ``alive_agents``); returns at once: its workers
        follow it out on their own, the head declares it dead when it misses its beats."""
        os.kill(agent["pid"], signal.SIGKILL)

    def kill_head(self) -> int:
        """SIGKILL the head process (its supervisor starts it again); its pid."""
        with open(os.path.join(self.read_state()["session_dir"], "head.pid")) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGKILL)
        return pid

    def drain_node(self, agent: dict, *args):
        """``farpool stop --node`` for a node agent (a record of ``alive_agents``): drain it, then stop it."""
        return self.stop_node(agent["node_id"], *args)

    def leftovers(self, shm: str) -> list[str]:
        """What the cluster left after ``stop``: session directories in its tmp root, entries
        in its /dev/shm directory ``shm``, runtime processes of its tmp root."""
        return leftovers_here(self.root, shm)


def describe_agents(nodes: list[dict]) -> list[dict]:
    """The cluster.json records ``nodes`` of this host, each with "alive" and "workers" (see
    ``Cluster.agents``)."""
    out = []
    for node in nodes:
        try:
            proc = psutil.Process(node["pid"])
            alive = proc.status() != psutil.STATUS_ZOMBIE
            children = proc.children(recursive=True) if alive else []
        except psutil.Error:
            alive, children = False, []
        out.append(dict(node, alive=alive, workers=[p.pid for p in children if _name(p) == "farpool-worker"]))
    return out


def leftovers_here(root: str, shm: str, shm_prefix: str = "") -> list[str]:
    """On this host: session directories in the tmp root ``root``, entries of ``shm`` (those
    starting with ``shm_prefix``), and farpool runtime processes of ``root`` still alive."""
    out = []
    if os.path.isdir(root):
        out += [f"session directory {d}" for d in os.listdir(root) if d.startswith("s-")]
    if os.path.isdir(shm):
        out += [f"/dev/shm entry {d}" for d in os.listdir(shm) if d.startswith(shm_prefix)]
    for proc in psutil.process_iter(["pid", "name", "cmdline", "environ"]):
        try:
            env = proc.info["environ"] or {}
            cmdline = " ".join(proc.info["cmdline"] or [])
            if (proc.pid != os.getpid() and env.get("FARPOOL_TMPDIR") == root
                    and "farpool" in cmdline + (proc.info["name"] or "") and proc.status() != psutil.STATUS_ZOMBIE):
                out.append(f"process {proc.pid} {proc.info['name']}")
        except psutil.Error:
            continue
    return out


def _by_host_and_pid(record: dict):
    return record.get("host", 0), record["pid"]


def _name(proc) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


# ---------------------------------------------------------------------------- the same cluster on separate hosts
# The cluster as tests/hosts/test_cluster_layer_on_hosts.py runs tests/cluster: this process
# (pytest) runs on the first namespace host, with the head; node agents join from the
# others.  Commands on another host go through a socket the outer run passed us
# (FARPOOL_TEST_HOSTS_FD), which it serves with tests/netns.py hosts.
HOSTS_ROOT = "/tmp/fpt-host"  # FARPOOL_TMPDIR of the agents on the other hosts (each its own /tmp)
KILL_AGENT = ("import os, signal, sys, psutil\n"
              "p = psutil.Process(int(sys.argv[1]))\n"
              "victims = [p] + p.children(recursive=True)\n"
              "os.kill(p.pid, signal.SIGKILL)\n"
              "psutil.wait_procs(victims, timeout=20)\n")
# SIGKILL a pid of the host, without waiting (exits 1 if it is gone already).
KILL_PID = "import os, signal, sys\nos.kill(int(sys.argv[1]), signal.SIGKILL)\n"
# This module's describe_agents and leftovers_here, run on a host (argv: this directory, then
# the host's tmp root); they print JSON.
_ON_HOST = "import json, os, sys\nsys.path.insert(0, sys.argv[1])\nimport farpool_testing as t\n"
AGENTS_ON_HOST = _ON_HOST + ("state = os.path.join(sys.argv[2], 'cluster.json')\n"
                             "nodes = json.load(open(state))['nodes'] if os.path.exists(state) else []\n"
                             "print(json.dumps(t.describe_agents(nodes)))\n")
LEFTOVERS_ON_HOST = _ON_HOST + "print(json.dumps(t.leftovers_here(sys.argv[2], '/dev/shm', 'farpool-')))\n"
_HERE = os.path.dirname(os.path.abspath(__file__))


class HostsCluster(Cluster):
    """``Cluster`` with the head on this host (``--host`` its address) and each node added
    on the next of the other hosts, in turn."""

    def __init__(self, root, fd: int, addresses: list):
        super().__init__(root)
        self.link = socket.socket(fileno=os.dup(fd))
        self.link_file = self.link.makefile("rw")
        self.link_lock = threading.Lock()  # (one command at a time: the chaos harness asks from a thread)
        self.addresses = addresses
        self.added = 0
        self.used_hosts = []
        self.host_address = addresses[0]

    def node_address(self, i: int) -> str:
        return self.addresses[0 if i == 0 else 1 + (i - 1) % (len(self.addresses) - 1)]

    def on_host(self, host: int, argv: list, env=None, timeout=90) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``host`` (not this one), as the outer run does for us."""
        with self.link_lock:
            self.link_file.write(json.dumps({"host": host, "argv": argv, "env": env or {}, "timeout": timeout}) + "\n")
            self.link_file.flush()
            answer = json.loads(self.link_file.readline())
        return subprocess.CompletedProcess(argv, answer["returncode"], answer["stdout"], answer["stderr"])

    def start_head(self, *args):
        return super().start_head("--host", self.addresses[0], *args)

    def add_node(self, *args, token=None):
        host = 1 + self.added % (len(self.addresses) - 1)
        self.added += 1
        env = {k: v for k, v in os.environ.items()  # what the test set for its nodes (FARPOOL_*_S ...)
               if k.startswith("FARPOOL_") and k not in ("FARPOOL_TMPDIR", "FARPOOL_SHM_PATH", "FARPOOL_TEST_HOSTS_FD")}
        env.update(FARPOOL_TMPDIR=HOSTS_ROOT, FARPOOL_TOKEN=token or self.token)
        result = self.on_host(host, [sys.executable, "-m", "farpool", "start", "--address", self.address, *args], env)
        if result.returncode == 0 and host not in self.used_hosts:
            self.used_hosts.append(host)
        if token is None and result.returncode != 0:
            raise AssertionError(f"farpool start on host {host + 1} failed: {result.stdout}\n{result.stderr}")
        return result

    def read_state(self):
        """This host's state (the head and its node), then the nodes of every other host (with
        ``host``: where their pids are)."""
        state = super().read_state()
        for host in self.used_hosts:
            out = self.on_host(host, ["cat", os.path.join(HOSTS_ROOT, "cluster.json")])
            if out.returncode == 0:
                state["nodes"] += [dict(n, host=host) for n in json.loads(out.stdout)["nodes"]]
        return state

    def kill_node(self, node_id):
        node = [n for n in self.read_state()["nodes"] if n["node_id"] == node_id][0]
        if "host" not in node:
            return super().kill_node(node_id)
        out = self.on_host(node["host"], [sys.executable, "-c", KILL_AGENT, str(node["pid"])])
        assert out.returncode == 0, f"killing node {node_id[:8]} on host {node['host'] + 1} failed: {out.stderr}"

    def pids(self):
        raise NotImplementedError("nodes on other hosts have pids this host cannot see")

    def _python_on_host(self, host: int, script: str, *args, what: str):
        out = self.on_host(host, [sys.executable, "-c", script, *map(str, args)])
        if out.returncode != 0:
            raise ProcessLookupError(f"{what} on host h{host + 1} failed: {out.stderr.strip()[-500:]}")
        return out.stdout

    def agents(self):
        """This host's agents (the head's node first), then those of every other host, each
        asked there (its pids are its own)."""
        found = describe_agents(super().read_state()["nodes"])
        for host in self.used_hosts:
            out = self._python_on_host(host, AGENTS_ON_HOST, _HERE, HOSTS_ROOT, what="listing node agents")
            found += [dict(n, host=host) for n in json.loads(out)]
        return found

    def kill_worker(self, worker):
        if "host" not in worker:
            return super().kill_worker(worker)
        self._python_on_host(worker["host"], KILL_PID, worker["pid"], what=f"SIGKILL worker pid {worker['pid']}")

    def kill_agent(self, agent):
        if "host" not in agent:
            return super().kill_agent(agent)
        self._python_on_host(agent["host"], KILL_PID, agent["pid"], what=f"SIGKILL node agent pid {agent['pid']}")

    def drain_node(self, agent, *args):
        if "host" not in agent:
            return super().drain_node(agent, *args)
        out = self.on_host(agent["host"], [sys.executable, "-m", "farpool", "stop", "--node", agent["node_id"], *args],
                           {"FARPOOL_TMPDIR": HOSTS_ROOT}, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"farpool stop --node {agent['node_id'][:8]} on host h{agent['host'] + 1} failed: "
                                 f"{out.stdout}\n{out.stderr}")
        return out

    def leftovers(self, shm):
        """This host's leftovers, then those of every other host (its tmp root HOSTS_ROOT and
        the farpool entries of its /dev/shm), asked there."""
        found = super().leftovers(shm)
        for host in range(1, len(self.addresses)):
            out = self._python_on_host(host, LEFTOVERS_ON_HOST, _HERE, HOSTS_ROOT, what="looking for leftovers")
            found += [f"{what} on host h{host + 1}" for what in json.loads(out)]
        return found

    def stop(self):
        for host in self.used_hosts:
            self.on_host(host, [sys.executable, "-m", "farpool", "stop"], {"FARPOOL_TMPDIR": HOSTS_ROOT})
        self.used_hosts = []
        self.added = 0
        procs = []
        if os.path.exists(self.state_path):
            state = super().read_state()
            for pid in [state["head_pid"]] + [n["pid"] for n in state["nodes"]]:
                try:
                    procs.append(psutil.Process(pid))
                    procs.extend(psutil.Process(pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
            farpool_cli("stop")
        gone, alive = psutil.wait_procs(procs, timeout=15)
        return alive


def serve_hosts(link: socket.socket, bed) -> None:
    """The outer run's end of ``HostsCluster.on_host``: run on the bed's hosts (tests/netns.py)
    what the inner run asks (one JSON line per command, one back), until it closes its end."""
    with link, link.makefile("rw") as f:
        for line in f:
            ask = json.loads(line)
            try:
                out = bed[ask["host"]].run(ask["argv"], env=ask["env"], timeout=ask["timeout"], check=False)
                answer = {"returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr}
            except subprocess.TimeoutExpired as exc:
                answer = {"returncode": -1, "stdout": "", "stderr": f"timed out: {exc}"}
            f.write(json.dumps(answer) + "\n")
            f.flush()


def pytest_on_hosts(bed, name: str, tests: list, env=None, options=(),
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pytest on ``tests`` (node ids under tests/) inside host bed[0], their ``started``
    cluster a HostsCluster over the bed's hosts (its commands served here, ``serve_hosts``);
    ``env`` adds to theirs, ``options`` to pytest's. Returns pytest's exit code and output
    (stdout and stderr together)."""
    ours, theirs = socket.socketpair()
    basetemp = f"/var/tmp/fpt-hosts-{os.getpid()}-{name}"  # tmp_path every host sees (/tmp is theirs)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", f"--basetemp={basetemp}",
            *options, *[f"{_HERE}/{test}" for test in tests]]
    env = dict(env or {}, FARPOOL_TEST_HOSTS_FD=str(theirs.fileno()),
               FARPOOL_TEST_HOSTS=",".join(h.address for h in bed.hosts))
    proc = bed[0].popen(argv, env=env, cwd=os.path.dirname(_HERE), pass_fds=(theirs.fileno(),),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    theirs.close()
    server = threading.Thread(target=serve_hosts, args=(ours, bed), daemon=True)
    server.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.join(timeout=60)
        shutil.rmtree(basetemp, ignore_errors=True)
    return subprocess.CompletedProcess(argv, proc.returncode, output, "")
