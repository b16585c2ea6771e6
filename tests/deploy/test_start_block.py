"""`farpool start --block`, the foreground form every launcher (MPI ranks, pods) runs:
what it starts stops with it, however it ends."""

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.cluster
TIMEOUT_S = 60


@pytest.fixture
def block(tmp_root):
    root = os.path.join(tmp_root, "block")
    os.makedirs(root, mode=0o700)
    proc = subprocess.Popen([sys.executable, "-m", "farpool", "start", "--head", "--num-cpus", "1", "--block"],
                            env=dict(os.environ, FARPOOL_TMPDIR=root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("farpool head started at")
    family = psutil.Process(proc.pid).children()
    assert len(family) == 2  # the head and its node agent
    yield proc, family
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=TIMEOUT_S)
    gone, alive = psutil.wait_procs(family, timeout=TIMEOUT_S)  # hang guard
    for p in alive:
        p.kill()
    assert not alive
    assert not [d for d in os.listdir(root) if d.startswith("s-")]
    shutil.rmtree(root)


def test_sigterm_stops_it_like_ctrl_c(block):
    proc, family = block
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "farpool stopped" in out
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_what_it_started_stops_when_it_is_killed(block):
    proc, family = block
    proc.kill()  # no chance to clean up: the lifelines close
    proc.wait(timeout=TIMEOUT_S)
    gone, alive = psutil.wait_procs(family, timeout=TIMEOUT_S)  # hang guard
    assert not alive


def test_a_started_process_that_dies_ends_it_saying_which(block):
    proc, family = block
    node = [p for p in family if "farpool._private.node" in " ".join(p.cmdline())][0]
    node.kill()
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 1
    assert f"the node agent (pid {node.pid}) exited with code -9, so this stops the rest" in err
    assert "node.log" in err
