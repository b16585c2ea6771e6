"""A node agent or driver with another farpool or Python version is refused at join, by a real
head, with a message naming both versions (the joining process patches its own versions)."""

import os
import subprocess
import sys

import farpool
from farpool._private import versions

from farpool_testing import TIMEOUT


def run_patched(patch: str, body: str, env: dict) -> subprocess.CompletedProcess:
    code = f"from farpool._private import versions\n{patch}\n{body}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, **env))


def test_a_node_agent_of_another_farpool_version_is_refused_naming_both(started, tmp_root):
    started.start_head()
    session_dir = os.path.join(tmp_root, "s-fakever")
    os.mkdir(session_dir, 0o700)
    try:
        out = run_patched(
            "versions.FARPOOL_VERSION = '0.0.7'",
            "import sys\nfrom farpool._private import node_main\n"
            f"sys.exit(node_main.main(['--session-dir', {session_dir!r}, '--head-address', {started.address!r},"
            " '--node-id', 'fa4e0000fa4e0000', '--host', '127.0.0.1', '--num-cpus', '1']))",
            {"FARPOOL_TOKEN": started.token})
    finally:
        from farpool._private import session
        session.remove_session(session_dir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the head refused this node: node agent fa4e0000 on" in out.stdout
    assert f"runs farpool 0.0.7 on Python {versions.PYTHON_VERSION}, but the head at {started.address} runs " \
           f"farpool {versions.FARPOOL_VERSION} on Python {versions.PYTHON_VERSION}" in out.stdout
    # It never joined; the cluster runs on.
    farpool.init(address=started.address, token=started.token)
    assert [n["node_id"] for n in farpool.nodes()] == [started.read_state()["nodes"][0]["node_id"]]


def test_a_driver_of_another_python_minor_version_is_refused_naming_both(started):
    started.start_head()
    out = run_patched("versions.PYTHON_VERSION = '3.99'",
                      f"import farpool\nfarpool.init(address={started.address!r})",
                      {"FARPOOL_TOKEN": started.token})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError: the head refused this program: this driver (pid ")
    assert f"runs farpool {versions.FARPOOL_VERSION} on Python 3.99, but the head at {started.address} " \
           f"runs farpool {versions.FARPOOL_VERSION} on Python {versions.PYTHON_VERSION}" in last
