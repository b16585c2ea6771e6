"""Hosts made of network namespaces (tests/netns.py): the cluster across real addresses.

``bed`` gives each test module three hosts (10.231.0.1-3; a module's ``BED_HOSTS`` asks
for another number) with private /tmp and /dev/shm, and removes them afterwards.  It needs root (CI runs as root): without
it every test here is skipped, saying why.  ``hosts_cluster`` starts a head on
h1 with ``farpool start --head --host``, stops it afterwards, and can join nodes
on the other hosts with the exact command the head printed.
"""

import os
import re
import shlex
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import netns  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
    for item in items:
        if "/hosts/" in str(item.fspath):
            item.add_marker(pytest.mark.hosts)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "separate hosts are network and mount namespaces: making them needs root"
    for tool in ("ip", "nsenter", "unshare"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(":")
                   + ["/usr/sbin", "/sbin", "/usr/bin"]):
            return f"`{tool}` is missing (Debian: iproute2 / util-linux)"
    return None


@pytest.fixture(scope="module")
def bed(request):
    why = _why_not()
    if why:
        pytest.skip(why)
    with netns.HostBed(getattr(request.module, "BED_HOSTS", 3)) as hosts:
        yield hosts
    leftover = [n for n in netns.netns_list() if n.startswith(hosts.tag)]
    assert not leftover, f"network namespaces left behind: {leftover}"


class HostsCluster:
    """A head on bed[0] started with the CLI; nodes on other hosts joined the printed way."""

    def __init__(self, bed):
        self.bed = bed
        self.head_host = bed[0]
        self.joined = []

    def farpool(self, host, *args, env=None, check=True, timeout=60):
        return host.run([sys.executable, "-m", "farpool", *args], env=env, check=check, timeout=timeout)

    def start_head(self, *args, env=None):
        out = self.farpool(self.head_host, "start", "--head", "--host", self.head_host.address,
                           "--num-cpus", "1", *args, env=env)
        self.head_output = out.stdout
        m = re.search(r"^\s*(FARPOOL_TOKEN=\$\(cat (\S+)\) farpool start --address (\S+))\s*$", out.stdout, re.M)
        assert m, f"the head printed no join command:\n{out.stdout}"
        self.join_command, self.token_file, self.address = m.group(1), m.group(2), m.group(3)
        with open(self.head_host.path(self.token_file)) as f:
            self.token = f.read().strip()
        return out

    def copy_token_to(self, host) -> None:
        """What a user does before running the join command: the token file, same path."""
        path = host.path(self.token_file)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def join(self, host, *extra, check=True, env=None):
        """Run the printed join command on ``host`` (plus ``extra`` flags), as a user would."""
        self.copy_token_to(host)
        command = self.join_command + "".join(" " + shlex.quote(a) for a in extra)
        out = host.run(["sh", "-c", command], check=check, env=env)
        if out.returncode == 0:
            self.joined.append(host)
        return out

    def driver(self, host, code, args=(), timeout=90, check=True, env=None):
        """Run ``code`` as a driver program on ``host``; it joins with FARPOOL_ADDRESS/TOKEN."""
        env = dict({"FARPOOL_ADDRESS": self.address, "FARPOOL_TOKEN": self.token}, **(env or {}))
        return host.run([sys.executable, "-c", code, *args], env=env, timeout=timeout, check=check, cwd=TESTS)

    def stop(self):
        for host in [*self.joined, self.head_host]:
            self.farpool(host, "stop", check=False)
        self.joined = []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid}: (gone)"


@pytest.fixture
def hosts_cluster(bed):
    cluster = HostsCluster(bed)
    yield cluster
    cluster.stop()
    for host in bed.hosts:  # `farpool stop` ended every runtime process of every host
        left = host.processes()
        assert left == [], f"processes left on {host.name}: {[_cmdline(pid) for pid in left]}"
