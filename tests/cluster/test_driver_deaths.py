"""A driver of a shared cluster that dies without a Goodbye ends its job: its actors end
too, except detached ones, and its objects go, as when it shuts down.  The agent it is attached to notices
(its pid here; its connection, for a driver on another machine) and tells the head."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import farpool
from farpool._private import session
from farpool_testing import TIMEOUT, wait_until

# argv: head address, "pid" or "connection" (how the agent is to notice its death: as
# if on another machine, the agent cannot watch its pid).  Prints the pids of its two
# actors, then waits to be killed.
DRIVER = textwrap.dedent("""
    import os, sys
    import numpy as np
    import farpool
    from farpool._private import session

    if sys.argv[2] == "connection":
        session.pid_space = lambda: "another-machine"

    @farpool.remote
    class Pid:
        def pid(self):
            return os.getpid()

    # "pid": attached to this machine's node (its objects in the store); "connection": over TCP
    farpool.init(address="auto" if sys.argv[2] == "pid" else sys.argv[1])
    if farpool.api._client().home.local:
        kept_object = farpool.put(np.ones(1 << 20))
    mine = Pid.options(name="mine").remote()
    kept = Pid.options(name="kept", lifetime="detached").remote()
    print(farpool.get(mine.pid.remote(), timeout=60), farpool.get(kept.pid.remote(), timeout=60), flush=True)
    sys.stdin.read()  # until killed
""")


@pytest.fixture(params=["pid", "connection"])
def driver(request, started, tmp_path, monkeypatch):
    monkeypatch.setenv("FARPOOL_CLIENT_GRACE_S", "1")  # read by the agents started here
    started.start_head("--num-cpus", "2")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), started.address, request.param], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=dict(os.environ, FARPOOL_TOKEN=started.token))
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TIMEOUT)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    session.remove_dead_sessions()  # the killed driver's private session directory


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def named(name):
    try:
        farpool.get_actor(name)
    except ValueError:
        return False
    return True


def test_a_killed_driver_ends_its_actors_but_not_detached_ones(started, driver):
    line = driver.stdout.readline()
    assert line, f"the second driver failed: {driver.stderr.read()}"
    mine, kept = map(int, line.split())
    farpool.init(address=started.address, token=started.token)
    client = farpool.api._client()
    stats, _ = client.agent_request(client.home, "StoreStats", ())
    assert stats["objects"] == (1 if driver.args[-1] == "pid" else 0)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=TIMEOUT)
    wait_until(lambda: gone(mine), "the actor of the killed driver ending")
    wait_until(lambda: not named("mine"), "the name of the killed driver's actor freed")
    wait_until(lambda: client.agent_request(client.home, "StoreStats", ())[0]["objects"] == 0,
               "the objects of the killed driver freed")
    survivor = farpool.get_actor("kept")
    assert farpool.get(survivor.pid.remote(), timeout=TIMEOUT) == kept
    farpool.kill(survivor)
