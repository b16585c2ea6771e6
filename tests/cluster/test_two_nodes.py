"""A head and a second node agent on this machine, joined over CURVE TCP, with real faults."""

import os
import signal
import socket
import time

import psutil
import pytest

import farpool


@farpool.remote(resources={"special": 1})
def where_special():
    return farpool.get_runtime_context().node_id


@farpool.remote
def where_any():
    return farpool.get_runtime_context().node_id


def node_ids(cluster):
    state = cluster.read_state()
    return [n["node_id"] for n in state["nodes"]]


def test_custom_resource_runs_on_the_second_node_through_its_tcp_port(started):
    out = started.start_head()
    assert "FARPOOL_TOKEN=$(cat" in out.stdout and "farpool start --address" in out.stdout
    assert ("loopback" in out.stdout) == (started.host_address == "127.0.0.1")  # (advice to open it)
    started.add_node("--num-cpus", "1", "--resources", '{"special": 2}')
    head_node, second = node_ids(started)
    farpool.init(address=started.address, token=started.token)
    nodes = {n["node_id"]: n for n in farpool.nodes()}
    assert set(nodes) == {head_node, second}
    assert nodes[second]["resources_total"]["special"] == 2.0
    assert nodes[second]["address"].startswith(started.node_address(1) + ":")
    assert farpool.cluster_resources()["CPU"] == 2.0
    assert set(farpool.get([where_special.remote() for _ in range(6)], timeout=60)) == {second}
    assert farpool.get(where_any.remote(), timeout=60) in (head_node, second)
    client = farpool.api._client()
    # Tasks for the second node went through its agent's TCP port (relayed), not ipc.
    assert not client.agents[second].local


def test_auto_address_joins_the_local_cluster(started):
    started.start_head()
    farpool.init(address="auto")
    assert farpool.get(where_any.remote(), timeout=60) == node_ids(started)[0]


def test_wrong_token_fails_fast_with_authentication_error(started):
    started.start_head()
    start = time.monotonic()
    with pytest.raises(farpool.AuthenticationError, match="token is wrong"):
        farpool.init(address=started.address, token="not-the-token")
    assert time.monotonic() - start < 10
    assert not farpool.is_initialized()
    # A node agent with a wrong token is refused too, and says why.
    result = started.add_node(token="not-the-token")
    assert result.returncode != 0
    assert "token is wrong" in result.stdout + result.stderr


def test_wrong_address_fails_with_a_connection_error(started):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionError, match="nothing answered"):
        farpool.init(address=f"127.0.0.1:{port}", token="x")
    assert not farpool.is_initialized()


def test_garbage_on_the_head_port_is_survived(started):
    started.start_head()
    host, port = started.address.split(":")
    for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096)):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(payload)
    farpool.init(address=started.address, token=started.token)
    assert farpool.get(where_any.remote(), timeout=60)


def test_worker_killed_on_the_remote_node_is_retried(started, tmp_path):
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    flag = str(tmp_path / "killed")

    @farpool.remote(resources={"special": 1}, max_retries=1)
    def die_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return farpool.get_runtime_context().node_id
    assert farpool.get(die_once.remote(flag), timeout=60) == node_ids(started)[1]


def test_killed_node_agent_is_declared_dead_and_its_tasks_fail_over(started, tmp_path, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    started.start_head("--resources", '{"special": 1}')
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    head_node, second = node_ids(started)
    gate = str(tmp_path / "gate")

    @farpool.remote(resources={"special": 1}, max_retries=2,
                    scheduling_strategy="DEFAULT")
    def hold(path):
        while not os.path.exists(path):
            time.sleep(0.01)
        return farpool.get_runtime_context().node_id
    refs = [hold.remote(gate) for _ in range(2)]
    # Wait until one task runs on each node (both 'special' slots taken), then kill the second agent.
    deadline = time.monotonic() + 60
    while farpool.available_resources().get("special", 2) > 0:
        assert time.monotonic() < deadline, "the two tasks never ran at the same time"
        time.sleep(0.05)
    started.kill_node(second)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the head declares it dead after 2 s of silence
        if not [n for n in farpool.nodes() if n["node_id"] == second][0]["alive"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed node was never declared dead")
    open(gate, "w").close()
    # The task that ran on the lost node was retried on the head node.
    assert farpool.get(refs, timeout=60) == [head_node, head_node]


def test_stop_ends_everything(started):
    started.start_head()
    started.add_node("--num-cpus", "1")
    state = started.read_state()
    procs = []
    for pid in started.pids():
        procs.append(psutil.Process(pid))
        procs.extend(psutil.Process(pid).children(recursive=True))
    assert len(procs) >= 5
    alive = started.stop()
    assert not alive
    assert not any(os.path.exists(n["session_dir"]) for n in state["nodes"])


def test_infeasible_task_waits_with_one_warning_until_a_node_that_fits_joins(started):
    started.start_head()
    farpool.init(address=started.address, token=started.token)

    @farpool.remote(resources={"tpu": 1})
    def needs_tpu():
        return farpool.get_runtime_context().node_id
    with pytest.warns(RuntimeWarning, match=r"no node can run a task that needs \{CPU: 1, tpu: 1\}"):
        refs = [needs_tpu.remote() for _ in range(3)]
        ready, _ = farpool.wait(refs, num_returns=1, timeout=2)
    assert ready == []  # waiting, not failed
    started.add_node("--num-cpus", "1", "--resources", '{"tpu": 1}')
    tpu_node = node_ids(started)[1]
    assert farpool.get(refs, timeout=60) == [tpu_node] * 3


@farpool.remote(resources={"special": 1})
class RemoteKeeper:
    def keep(self, box):
        self.kept = box[0]  # a borrowed ref, kept beyond the call
        return farpool.get_runtime_context().node_id


def test_borrows_held_on_a_node_that_dies_are_released(started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "2")
    started.start_head()
    started.add_node("--num-cpus", "1", "--resources", '{"special": 1}')
    farpool.init(address=started.address, token=started.token)
    head_node, second = node_ids(started)
    client = farpool.api._client()
    ref = farpool.put(list(range(1000)))
    oid = ref.binary()
    keeper = RemoteKeeper.remote()
    assert farpool.get(keeper.keep.remote([ref]), timeout=60) == second
    del ref
    farpool.nodes()  # a round trip through the I/O thread: our release has been handled
    assert oid in client.objects  # the actor on the second node still borrows it
    started.kill_node(second)
    deadline = time.monotonic() + 30
    while oid in client.objects:  # freed once the head declares the node dead (2 s of silence)
        assert time.monotonic() < deadline, "a borrow held on a dead node was never released"
        time.sleep(0.05)


def test_node_agents_on_one_machine_share_its_memory_for_their_stores(started):
    started.start_head()
    farpool.init(address=started.address, token=started.token)
    deadline = time.monotonic() + 30
    while not farpool.nodes()[0]["object_store"]:  # store stats come with the first heartbeat
        assert time.monotonic() < deadline, "no heartbeat from the head node"
        time.sleep(0.2)
    alone = farpool.nodes()[0]["object_store"]["capacity"]
    started.add_node("--num-cpus", "1")
    deadline = time.monotonic() + 30
    while True:  # every agent looks again at its heartbeat (each second)
        capacities = [n["object_store"]["capacity"] for n in farpool.nodes() if n["object_store"]]
        if len(capacities) == 2 and capacities[0] == capacities[1]:
            break
        assert time.monotonic() < deadline, f"the stores never shared the machine: {capacities}"
        time.sleep(0.2)
    assert capacities[0] <= alone // 2 + 1  # split, not each taking the whole default
    assert sum(capacities) <= 0.3 * psutil.virtual_memory().total
