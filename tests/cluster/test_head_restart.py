"""A head that comes back (#13): ``farpool start --head`` supervises the head, which keeps
its tables in SQLite; node agents and drivers reconnect on their own and register again.

- kill -9 of the head under a running workload: it comes back, the workload finishes with
  correct results, a named detached actor is found again by name with its state, and
  ``nodes()`` works after (the time from the kill to the driver registered again is
  printed: the figure in the README);
- ``farpool start --head --restore DIR`` from a copy of the database, after everything
  stopped: the named actor, the keys and the address are back;
- a supervisor that gives up: drivers get a clear error, their executor breaks.
"""

import concurrent.futures as cf
import json
import os
import shutil
import signal
import tempfile
import time

import psutil
import pytest

import farpool
from farpool import DistributedExecutor
from farpool._private import head_store
from farpool_testing import TIMEOUT, Gate, node_ids, square, wait_at_gate, wait_until


class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n

    def where(self):
        return farpool.get_runtime_context().node_id


def chain(x, step):
    return x + step


@pytest.fixture
def gate():
    directory = tempfile.mkdtemp(prefix="g-", dir="/tmp")  # a short path: Unix sockets allow 107 bytes
    g = Gate(os.path.join(directory, "gate"))
    yield g
    g.close()
    shutil.rmtree(directory, ignore_errors=True)


def head_pid(cluster) -> int:
    with open(os.path.join(cluster.read_state()["session_dir"], "head.pid")) as f:
        return int(f.read())


def kill_head(cluster) -> tuple[int, float]:
    pid = head_pid(cluster)
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_a_head_killed_under_load_comes_back_and_the_workload_finishes(started, gate):
    started.start_head("--num-cpus", "2")
    started.add_node("--num-cpus", "2")
    farpool.init(address=started.address, token=started.token)
    client = farpool.api._client()
    nodes_before = node_ids(started)
    agents_before = [n["pid"] for n in started.read_state()["nodes"]]
    keeper = farpool.remote(Counter).options(name="keeper", namespace="ns", lifetime="detached").remote()
    assert farpool.get([keeper.inc.remote() for _ in range(3)], timeout=TIMEOUT) == [1, 2, 3]
    step = farpool.remote(chain)
    with DistributedExecutor(max_workers=4) as ex:
        held = [ex.submit(wait_at_gate, gate.path, i) for i in range(2)]  # running while the head dies
        queued = [ex.submit(square, i) for i in range(200)]                # in the driver and on leases
        refs = [farpool.put(0)] * 20
        for i in range(20):                                               # chains of dependent tasks
            refs = [step.remote(ref, i) for ref in refs]
        gate.wait_arrivals(2)

        old_pid, killed_at = kill_head(started)
        wait_until(lambda: client.head_link.state.outages, "the driver to register again with the new head",
                   timeout=TIMEOUT)
        reconnected_s = client.head_link.state.outages[0]
        print(f"\nhead killed -> driver registered again: {reconnected_s:.2f} s "
              f"(measured here: {time.monotonic() - killed_at:.2f} s)")
        assert head_pid(started) != old_pid and psutil.pid_exists(head_pid(started))

        gate.open()
        assert [f.result(timeout=TIMEOUT) for f in held] == [0, 1]
        assert [f.result(timeout=TIMEOUT) for f in queued] == [i * i for i in range(200)]
        assert farpool.get(refs, timeout=TIMEOUT) == [sum(range(20))] * 20

    again = farpool.get_actor("keeper", namespace="ns")  # found by name, with its state
    assert farpool.get(again.inc.remote(), timeout=TIMEOUT) == 4
    alive = {n["node_id"] for n in farpool.nodes() if n["alive"]}
    assert alive == set(nodes_before)
    assert [n["pid"] for n in started.read_state()["nodes"]] == agents_before
    assert all(psutil.pid_exists(pid) for pid in agents_before)  # the same agents: they never left
    fresh = farpool.remote(Counter).remote()  # the new head places actors too
    assert farpool.get(fresh.inc.remote(), timeout=TIMEOUT) == 1
    farpool.kill(again)


def test_a_head_restored_from_a_copied_database_finds_its_named_actor_again(started, monkeypatch, tmp_path):
    # The restored head gives up on the nodes of the old cluster (gone) after 2 s, not 10.
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    started.start_head()
    old_address = started.address
    farpool.init(address="auto")
    client = farpool.api._client()
    keeper = farpool.remote(Counter).options(name="keeper", namespace="ns", lifetime="detached",
                                             max_restarts=1).remote()
    assert farpool.get([keeper.inc.remote() for _ in range(2)], timeout=TIMEOUT) == [1, 2]
    client.head_request("KVPut", ("package", b"zip bytes"))
    old_node = farpool.get(keeper.where.remote(), timeout=TIMEOUT)
    farpool.shutdown()
    saved = tmp_path / "saved"   # what a user keeps across a reboot: the database and the token
    saved.mkdir()
    session_dir = started.read_state()["session_dir"]
    head_store.copy_database(session_dir, str(saved))
    shutil.copy(os.path.join(session_dir, "token"), saved / "token")
    assert not started.stop()    # everything stops, as at a reboot
    assert not os.path.exists(session_dir)

    started.start_head("--restore", str(saved))
    assert started.address == old_address  # its old port was free: the same address
    farpool.init(address="auto")
    client = farpool.api._client()
    again = farpool.get_actor("keeper", namespace="ns")
    # Its node is gone: the restored head restarts it (max_restarts=1) on the new node.
    assert farpool.get(again.inc.remote(), timeout=TIMEOUT) == 1
    new_node = node_ids(started)[0]
    assert farpool.get(again.where.remote(), timeout=TIMEOUT) == new_node
    assert client.head_request("KVGet", ("package",)) == b"zip bytes"
    table = {n["node_id"]: n for n in farpool.nodes()}
    assert table[new_node]["alive"] and not table[old_node]["alive"]
    farpool.kill(again)


def test_restore_from_a_directory_without_a_database_says_what_is_missing(started, tmp_path):
    from farpool_testing import farpool_cli
    out = farpool_cli("start", "--head", "--restore", str(tmp_path), check=False)
    assert out.returncode == 1
    assert f"no head database in {tmp_path} (looked for head.db)" in out.stderr
    assert not [d for d in os.listdir(started.root) if d.startswith("s-")]


def test_when_the_supervisor_gives_up_drivers_and_agents_are_told_at_once(started, monkeypatch, gate):
    monkeypatch.setenv("FARPOOL_HEAD_MAX_RESTARTS", "0")   # the supervisor gives up at the first death
    started.start_head()
    farpool.init(address="auto")
    client = farpool.api._client()
    session_dir = started.read_state()["session_dir"]
    agent = psutil.Process(started.read_state()["nodes"][0]["pid"])
    ex = DistributedExecutor(max_workers=1)
    running = ex.submit(wait_at_gate, gate.path, 1)
    waiting = [ex.submit(square, i) for i in range(4)]  # still in this process (max_workers)
    gate.wait_arrivals(1)
    _, killed_at = kill_head(started)
    # The supervisor answers in the head's place: no one waits out FARPOOL_HEAD_TIMEOUT_S (15 s).
    wait_until(lambda: client.broken is not None, "the driver to learn that the head is gone")
    print(f"\nhead killed, supervisor gave up -> driver failed: {time.monotonic() - killed_at:.2f} s")
    with open(os.path.join(session_dir, "head.gone")) as f:
        assert "so the supervisor gave up (MAX_RESTARTS=0)" in f.read()
    with pytest.raises(farpool.FarpoolError, match="the head at .* is gone and will not come back: the head "
                                                   r"\(pid \d+\) was killed by SIGKILL"):
        farpool.nodes()
    # concurrent.futures.wait must return (a generous bound on the wait itself, not a timed assertion).
    done, not_done = cf.wait([running, *waiting], timeout=TIMEOUT)
    assert not not_done, f"{len(not_done)} futures still pending after the head was lost"
    for fut in waiting:
        assert isinstance(fut.exception(timeout=0), cf.BrokenExecutor)
        assert "is gone and will not come back" in str(fut.exception(timeout=0))
    with pytest.raises(cf.BrokenExecutor, match="the head at"):
        ex.submit(square, 1)
    ex.shutdown()
    gate.open()
    agent.wait(timeout=TIMEOUT)  # the node agent was told too, and exited
    with open(os.path.join(session_dir, "node.log")) as f:
        assert "the head is gone for good" in f.read()


def test_a_driver_waits_for_a_head_away_then_says_so(started, monkeypatch):
    """No supervisor answer (its head restarts too slowly): calls that need the head wait up to
    FARPOOL_HEAD_TIMEOUT_S, then the driver gives up with a clear error."""
    started.start_head()
    farpool.init(address="auto")
    client = farpool.api._client()
    supervisor = psutil.Process(started.read_state()["head_pid"])
    monkeypatch.setattr(client.head_link.state, "timeout_s", 2.0)
    supervisor.suspend()  # it cannot restart the head while stopped
    try:
        kill_head(started)
        with pytest.raises(farpool.FarpoolError, match=r"farpool.nodes\(\) needs the head, and the head at .* "
                                                       r"has been away for \d+ s"):
            client.head_request("GetNodes", (), 1)  # what farpool.nodes() asks, with a short timeout
        wait_until(lambda: client.broken is not None, "the driver to give up on the head")
        assert "has been unreachable for 2 s" in str(client.broken)
    finally:
        supervisor.resume()
