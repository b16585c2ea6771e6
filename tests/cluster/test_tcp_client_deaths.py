"""A client on another machine that dies without a Goodbye is noticed by its TCP connection.

The agent cannot watch such a client's pid (it lives in another pid space), so it
learns of the death from the client's TCP connection closing (ZMTP heartbeats close
it when no FIN or RST comes) and staying closed for FARPOOL_CLIENT_GRACE_S.  On one
machine, the second driver claims another pid space to look remote; it joins over
TCP like a driver on another machine, leases a worker and borrows an object from this
test's driver, then is SIGKILLed.
"""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import farpool
import farpool_testing
from farpool._private import session
from farpool_testing import TIMEOUT, wait_until

BIG = 200 * 1024 // 8  # float64s: a value above the node store's inline threshold

# argv: head address, a marker path.  Prints its identity once it borrows the ref and its
# task holds the node's one "slot", then waits to be killed.
REMOTE_DRIVER = textwrap.dedent("""
    import os
    import sys
    import time
    import farpool
    from farpool._private import session

    session.pid_space = lambda: "another-machine"  # the agent cannot watch our pid
    address, marker = sys.argv[1:3]

    @farpool.remote(resources={"slot": 1})
    def hold(marker):
        open(marker, "w").close()
        time.sleep(3600)  # until its driver is gone and the agent ends it

    farpool.init(address=address)
    client = farpool.api._client()
    assert not client.home.local, "expected a driver joined over TCP"
    [ref] = farpool.get(farpool.get_actor("mailbox").give.remote(), timeout=60)
    farpool.get(ref, timeout=60)
    running = hold.remote(marker)
    deadline = time.monotonic() + 60
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(client.identity.decode(), flush=True)
    sys.stdin.read()  # until killed
""")


Mailbox = farpool.remote(farpool_testing.Mailbox)


@farpool.remote(resources={"slot": 1})
def use_slot():
    return True


def client():
    return farpool.api._client()


@pytest.fixture
def remote_driver(started, tmp_path):
    procs = []

    def run():
        script = tmp_path / "remote_driver.py"
        script.write_text(REMOTE_DRIVER)
        proc = subprocess.Popen([sys.executable, str(script), started.address, str(tmp_path / "running")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path, env=dict(os.environ, FARPOOL_TOKEN=started.token))
        procs.append(proc)
        line = proc.stdout.readline()
        assert line, f"the second driver failed: {proc.stderr.read()}"
        return proc, line.strip()

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    session.remove_dead_sessions()  # a killed driver leaves its private session directory


def test_a_killed_driver_over_tcp_gives_back_its_lease_and_borrows(started, remote_driver, monkeypatch):
    monkeypatch.setenv("FARPOOL_CLIENT_GRACE_S", "1")
    started.start_head("--resources", '{"slot": 1}')
    farpool.init(address=started.address, token=started.token)
    ref = farpool.put(np.ones(BIG))
    oid = ref.binary()
    mailbox = Mailbox.options(name="mailbox").remote()
    assert farpool.get(mailbox.hold.remote([ref]), timeout=TIMEOUT)
    del ref
    proc, identity = remote_driver()
    wait_until(lambda: oid in client().objects and client().objects[oid].borrowers == {identity.encode()},
               "the owner counting the second driver alone")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    wait_until(lambda: oid not in client().objects, "the owner freeing what a killed TCP driver borrowed")
    # Its task held the only slot: the lease came back (the task was ended with its driver).
    assert farpool.get(use_slot.remote(), timeout=TIMEOUT)
