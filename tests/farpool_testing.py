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


class HostsCluster(Cluster):
    """``Cluster`` with the head on this host (``--host`` its address) and each node added
    on the next of the other hosts, in turn."""

    def __init__(self, root, fd: int, addresses: list):
        super().__init__(root)
        self.link = socket.socket(fileno=os.dup(fd))
        self.link_file = self.link.makefile("rw")
        self.addresses = addresses
        self.added = 0
        self.used_hosts = []
        self.host_address = addresses[0]

    def node_address(self, i: int) -> str:
        return self.addresses[0 if i == 0 else 1 + (i - 1) % (len(self.addresses) - 1)]

    def on_host(self, host: int, argv: list, env=None, timeout=90) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``host`` (not this one), as the outer run does for us."""
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
