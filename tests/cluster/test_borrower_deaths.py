"""Borrowers that die without a Goodbye while their node lives release what they hold.

Their owner is on another node (or reaches them through an agent only), so it
cannot watch their pid itself: the agent the borrower is attached to does
(WatchPeer, PeerGone).  The second driver runs as a script and is SIGKILLed.
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
from farpool_testing import TIMEOUT, node_ids, wait_until

BIG = 200 * 1024 // 8  # float64s: a value above the node store's inline threshold

# A second driver.  argv: head address, the node id to attach to ("" for the usual: the
# head node), and what to borrow: "mailbox" (a ref the named actor "mailbox" hands over)
# or "keeper" (a ref the named actor "keeper" owns).  It prints its identity once it
# holds the ref (counted by the owner), then waits to be killed.
BORROWER = textwrap.dedent("""
    import sys
    import farpool
    from farpool._private import client as client_mod

    address, node_id, what = sys.argv[1:4]
    if node_id:  # attach to that node's agent instead of the head node's
        pick = client_mod.CoreClient._wait_for_node
        def on_node(self, welcome):
            pick(self, welcome)
            return next(n for n in welcome["nodes"] if n["node_id"] == node_id)
        client_mod.CoreClient._wait_for_node = on_node
    farpool.init(address=address)
    [ref] = farpool.get(farpool.get_actor(what).give.remote(), timeout=60)
    farpool.get(ref, timeout=60)
    client = farpool.api._client()
    print(client.identity.decode(), client.home.node_id, flush=True)
    sys.stdin.read()  # until killed
""")


Mailbox = farpool.remote(farpool_testing.Mailbox)


@farpool.remote(resources={"special": 1})
class Keeper:
    """Owns an object on the second node and lends it to whoever asks."""

    def make(self):
        self.mine = farpool.put(np.ones(BIG))
        return self.mine.binary()

    def give(self):
        mine, self.mine = self.mine, None
        return [mine]  # lent to the caller; we keep nothing

    def borrowers(self, oid):
        entry = farpool.api._client().objects.get(oid)
        return None if entry is None else sorted(b.decode() for b in entry.borrowers)


def client():
    return farpool.api._client()


@pytest.fixture
def borrower(started, tmp_path):
    """Start the second driver; yields a function that runs it and returns (proc, identity, node)."""
    procs = []

    def run(node_id, what):
        script = tmp_path / "borrower.py"
        script.write_text(BORROWER)
        proc = subprocess.Popen([sys.executable, str(script), started.address, node_id, what],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path, env=dict(os.environ, FARPOOL_TOKEN=started.token))
        procs.append(proc)
        line = proc.stdout.readline()
        assert line, f"the second driver failed: {proc.stderr.read()}"
        identity, home = line.split()
        return proc, identity, home

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
        # A killed driver leaves its private session directory (its owner socket) behind.
        session.remove_dead_sessions()


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)


def test_a_killed_driver_on_another_node_releases_what_it_borrowed(started, borrower):
    """The owner (this driver, on the head node) watches a borrower attached to node 2."""
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    head_node, second = node_ids(started)
    ref = farpool.put(np.ones(BIG))
    oid = ref.binary()
    mailbox = Mailbox.options(name="mailbox").remote()
    assert farpool.get(mailbox.hold.remote([ref]), timeout=TIMEOUT)
    del ref
    proc, identity, home = borrower(second, "mailbox")
    assert home == second
    # The mailbox let go (its release follows its AddBorrower for the taker): only the taker holds it.
    wait_until(lambda: oid in client().objects and client().objects[oid].borrowers == {identity.encode()},
               "the owner counting the second driver alone")
    kill(proc)  # its node lives on
    wait_until(lambda: oid not in client().objects, "the owner freeing what a killed driver borrowed")


def test_a_killed_driver_releases_what_it_borrowed_from_a_worker_on_another_node(started, borrower):
    """The owner (an actor on node 2) watches a driver attached to the head node."""
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    head_node, second = node_ids(started)
    keeper = Keeper.options(name="keeper").remote()
    oid = farpool.get(keeper.make.remote(), timeout=TIMEOUT)
    proc, identity, home = borrower("", "keeper")
    assert home == head_node
    assert farpool.get(keeper.borrowers.remote(oid), timeout=TIMEOUT) == [identity]
    kill(proc)
    wait_until(lambda: farpool.get(keeper.borrowers.remote(oid), timeout=TIMEOUT) is None,
               "the owner on node 2 freeing what a killed driver on the head node borrowed")
