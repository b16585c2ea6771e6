"""`farpool up` / `farpool down` over SSH against real sshd servers on the namespace hosts.

sshd (Debian's openssh-server; CI installs it) runs on h1 and h2, each with its own
host key and config in the host's private /tmp; h3 is the user's machine: it runs
`farpool up` with an `ssh -F` config (BatchMode, a generated key, known host keys).
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from farpool._private import versions
from farpool_testing import TIMEOUT

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True, timeout=TIMEOUT)
    with open(path + ".pub") as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def ssh_hosts(bed):
    if not os.access(SSHD, os.X_OK):
        pytest.fail("sshd is missing: install Debian's openssh-server (`apt-get install openssh-server`; "
                    ".ci/run does)")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    h1, h2, h3 = bed.hosts
    os.makedirs(h3.path("/tmp/client"), mode=0o700)
    client_pub = _keygen(h3.path("/tmp/client/id_ed25519"))
    known, servers = [], []
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    for host in (h1, h2):
        d = host.path("/tmp/sshd")
        os.makedirs(d, mode=0o700)
        host_pub = _keygen(os.path.join(d, "host_key"))
        known.append(f"{host.address} {' '.join(host_pub.split()[:2])}")
        with open(os.path.join(d, "authorized_keys"), "w") as f:
            f.write(client_pub + "\n")
        with open(os.path.join(d, "sshd_config"), "w") as f:
            f.write(textwrap.dedent(f"""\
                ListenAddress {host.address}
                Port 22
                HostKey /tmp/sshd/host_key
                AuthorizedKeysFile /tmp/sshd/authorized_keys
                PermitRootLogin prohibit-password
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                UsePAM no
                StrictModes no
                PidFile none
                SetEnv PYTHONPATH={src} PATH={os.path.dirname(sys.executable)}:/usr/bin:/bin:/usr/sbin:/sbin
                """))
        proc = host.popen([SSHD, "-D", "-e", "-f", "/tmp/sshd/sshd_config"], stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        assert "Server listening on" in line, line + proc.stderr.read() if proc.poll() is not None else line
        servers.append(proc)
    with open(h3.path("/tmp/client/known_hosts"), "w") as f:
        f.write("\n".join(known) + "\n")
    with open(h3.path("/tmp/client/ssh_config"), "w") as f:
        f.write(textwrap.dedent("""\
            Host *
              User root
              IdentityFile /tmp/client/id_ed25519
              IdentitiesOnly yes
              UserKnownHostsFile /tmp/client/known_hosts
              StrictHostKeyChecking yes
            """))
    yield bed
    for proc in servers:  # nsenter's child sshd dies with its host; here we end what we started
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stderr.close()


def runtime_on(host):
    """Runtime processes (head, node agents, workers) on a host: what `up` starts, `down` ends."""
    found = []
    for pid in host.processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"farpool._private" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def cmdlines(host):
    out = []
    for pid in host.processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read())
        except OSError:
            pass
    return out


def write_yaml(host, text):
    with open(host.path("/tmp/cluster.yaml"), "w") as f:
        f.write(textwrap.dedent(text))


TASKS = textwrap.dedent("""
    import json, farpool
    @farpool.remote
    def where():
        return farpool.get_runtime_context().node_id
    farpool.init()
    nodes = {n["node_id"]: n["address"] for n in farpool.nodes() if n["alive"]}
    ran = {farpool.get(where.options(scheduling_strategy=farpool.NodeAffinity(nid)).remote(), timeout=60)
           for nid in nodes}
    print(json.dumps({"nodes": sorted(nodes.values()), "ran_on_all": ran == set(nodes)}))
    farpool.shutdown()
""")


def test_up_starts_head_and_workers_over_ssh_reports_bad_hosts_and_down_stops_them(ssh_hosts):
    import json
    h1, h2, h3 = ssh_hosts.hosts
    write_yaml(h3, f"""\
        cluster_name: lab
        ssh: {{config_file: /tmp/client/ssh_config}}
        python: {sys.executable}
        setup: ["mkdir -p /tmp/setup-ran"]
        head: {{host: {h1.address}, num_cpus: 1}}
        workers:
          - {{host: {h2.address}, num_cpus: 1, resources: {{on_h2: 1}}}}
          - {{host: {h3.address}, num_cpus: 1}}
          - {{host: {h2.address}, python: /nonexistent/python3}}
          - {{host: {h2.address}, python: /tmp/oldpy}}
        """)
    with open(h2.path("/tmp/oldpy"), "w") as f:  # a Python with another farpool on it
        f.write("#!/bin/sh\necho farpool-versions 0.0.1 3.10\n")
    os.chmod(h2.path("/tmp/oldpy"), 0o755)
    up = h3.run([sys.executable, "-m", "farpool", "up", "/tmp/cluster.yaml"], check=False, timeout=110)
    text = up.stdout + up.stderr
    assert up.returncode == 1, text  # some hosts failed ...
    assert f"{h3.address}: cannot reach it over ssh" in text and "Connection refused" in text
    assert f"{h2.address}: cannot import farpool with /nonexistent/python3" in text
    assert f"{h2.address}: refused: {h2.address} (/tmp/oldpy) runs farpool 0.0.1 on Python 3.10, but this " \
           f"machine runs farpool {versions.FARPOOL_VERSION} on Python {versions.PYTHON_VERSION}" in text
    assert f"3 host(s) did not start (the others are up and working): {h3.address}, {h2.address}, " \
           f"{h2.address}" in text
    assert os.path.isdir(h1.path("/tmp/setup-ran")) and os.path.isdir(h2.path("/tmp/setup-ran"))
    m = re.search(r"is up at (\S+) with 2 node\(s\)", text)
    assert m, text
    address = m.group(1)
    assert address.startswith(h1.address + ":")
    token_file = re.search(r"FARPOOL_TOKEN=\$\(cat (\S+)\)", text).group(1)
    assert os.stat(h3.path(token_file)).st_mode & 0o777 == 0o600
    with open(h3.path(token_file)) as f:
        token = f.read()
    # ... and the ones that came up work, and the token is on no command line of any host.
    report = json.loads(h3.run([sys.executable, "-c", TASKS], timeout=110,
                               env={"FARPOOL_ADDRESS": address, "FARPOOL_TOKEN": token}).stdout.splitlines()[-1])
    assert len(report["nodes"]) == 2 and report["ran_on_all"]
    assert {a.split(":")[0] for a in report["nodes"]} == {h1.address, h2.address}
    for host in ssh_hosts.hosts:
        assert not [c for c in cmdlines(host) if token.encode() in c]
    assert runtime_on(h1) and runtime_on(h2)

    down = h3.run([sys.executable, "-m", "farpool", "down", "/tmp/cluster.yaml"], timeout=110)
    assert f"stopped {h2.address}" in down.stdout and f"stopped the head on {h1.address}" in down.stdout
    assert runtime_on(h1) == [] and runtime_on(h2) == []
    assert not os.path.exists(h3.path(token_file))


def test_an_unreachable_head_is_reported_by_name_and_nothing_starts(ssh_hosts):
    h1, h2, h3 = ssh_hosts.hosts
    write_yaml(h3, f"""\
        cluster_name: nohead
        ssh: {{config_file: /tmp/client/ssh_config}}
        python: {sys.executable}
        head: {{host: 10.231.0.99}}
        workers: [{{host: {h2.address}}}]
        """)
    up = h3.run([sys.executable, "-m", "farpool", "up", "/tmp/cluster.yaml"], check=False, timeout=110)
    assert up.returncode == 1
    assert "the head did not start, so nothing did: 10.231.0.99: cannot reach it over ssh" in up.stderr
    assert runtime_on(h2) == []


def test_a_bad_cluster_file_names_the_field(ssh_hosts):
    h3 = ssh_hosts.hosts[2]
    write_yaml(h3, "cluster_name: x\nhead: {host: a}\nworkers: [{hots: b}]\n")
    out = h3.run([sys.executable, "-m", "farpool", "up", "/tmp/cluster.yaml"], check=False)
    assert out.returncode == 1
    assert "workers[0] needs a `host`, got {'hots': 'b'}" in out.stderr
