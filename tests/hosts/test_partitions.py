"""A network partition (#13): the link of h2, a node agent's host, is cut while tasks and an
actor call run there; the head declares the node dead, the tasks run again on h1 and h3, the
actor is restarted there and its call retried, and every result arrives once; when the link returns, the results of the first attempts (finished while cut
off) are dropped, the driver's results are unchanged, and the agent joins again as a new
node that runs tasks, while the old node stays dead in the table.

Head and driver on h1 (the head node has 1 CPU), node agents on h2 and h3.  The link is cut
at the switch (``ip link set h2 down`` in the bed's switch namespace): nothing extra needed.
"""

import json
import subprocess
import sys
import textwrap
import time

import pytest

import netns

NODE_TIMEOUT_S = "3"  # the head declares a silent node dead after this (short for the test)
TASKS = 3

DRIVER = textwrap.dedent("""
    import json, logging, os, sys, time
    import farpool
    from farpool._private import object_ref
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(name)s %(levelname)s %(message)s")

    @farpool.remote(max_retries=2)
    def long_task(i, h2):
        # Appends to a file of the host it runs on; on h2 (the first attempts) it then holds
        # until the test lets it finish (while h2 is cut off): its result comes late.
        node = farpool.get_runtime_context().node_id
        with open("/tmp/partition-runs", "a") as f:
            f.write(f"run {i} {node}\\n")
        if node == h2:
            while not os.path.exists("/tmp/partition-release"):
                time.sleep(0.05)
            with open("/tmp/partition-runs", "a") as f:
                f.write(f"done {i} {node}\\n")
        return f"token-{i}", node

    @farpool.remote(max_restarts=1, max_task_retries=1)
    class Holder:
        def hold(self, h2):  # as long_task, for an actor call: in flight on h2 when it is cut
            node = farpool.get_runtime_context().node_id
            with open("/tmp/partition-runs", "a") as f:
                f.write(f"actor-run {node}\\n")
            if node == h2:
                while not os.path.exists("/tmp/partition-release"):
                    time.sleep(0.05)
                with open("/tmp/partition-runs", "a") as f:
                    f.write(f"actor-done {node}\\n")
            return "actor-token", node

    @farpool.remote
    def where():
        return farpool.get_runtime_context().node_id

    def say(what):
        print(json.dumps(what), flush=True)

    farpool.init()
    h2_address = sys.argv[1]
    h2 = next(n["node_id"] for n in farpool.nodes() if n["address"].startswith(h2_address + ":"))
    refs = [long_task.options(scheduling_strategy=farpool.NodeAffinity(h2, soft=True)).remote(i, h2)
            for i in range(int(sys.argv[2]))]
    holder = Holder.options(scheduling_strategy=farpool.NodeAffinity(h2, soft=True)).remote()
    refs.append(holder.hold.remote(h2))
    say({"h2": h2})
    first = farpool.get(refs, timeout=90)  # from the attempts run again elsewhere
    say({"results": first})
    sys.stdin.readline()  # the test let the first attempts finish, then healed the link
    deadline = time.monotonic() + 90
    while True:
        rows = farpool.nodes()
        new = [n for n in rows if n["alive"] and n["address"].startswith(h2_address + ":")]
        if new or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    new_id = new[0]["node_id"] if new else None
    ran_on_new = farpool.get(where.options(scheduling_strategy=farpool.NodeAffinity(new_id)).remote(),
                             timeout=60) if new_id else None
    say({"nodes": [{"node_id": n["node_id"], "alive": n["alive"], "address": n["address"]} for n in rows],
         "again": farpool.get(refs, timeout=10), "ran_on_new": ran_on_new,
         "stale_results": object_ref.current().queues.stale_results})
    farpool.shutdown()
""")


def _said(driver) -> dict:
    """The driver's next report (a line of JSON); if it ended instead, why."""
    line = driver.stdout.readline()
    if not line:
        driver.wait(timeout=30)
        raise AssertionError(f"the driver exited with {driver.returncode}:\n{driver.stderr.read()[-3000:]}")
    return json.loads(line)


def _switch(bed, *args):
    subprocess.run(["ip", "-n", bed.switch, "link", "set", *args], check=True, timeout=30)


def _lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _wait(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _agent_of(host):
    """(session directory, TCP port) of the one node agent started on ``host``."""
    with open(host.path("/tmp/farpool-0/cluster.json")) as f:
        (node,) = json.load(f)["nodes"]
    with open(host.path(node["session_dir"] + "/node.address")) as f:
        return node["session_dir"], int(f.read().rsplit(":", 1)[1])


def _agent_connections_from(host, peer, port):
    out = host.run(["ss", "-tnH", "state", "established", f"( sport = :{port} and dst {peer.address} )"]).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.timeout(300)
def test_a_cut_node_is_declared_dead_its_late_results_are_dropped_and_it_joins_as_a_new_node(hosts_cluster, bed):
    h1, h2, h3 = bed.hosts
    hosts_cluster.start_head(env={"FARPOOL_NODE_TIMEOUT_S": NODE_TIMEOUT_S})
    # While cut off, the agent on h2 must neither take the driver for dead (it would end the
    # tasks) nor the cluster for gone (it would exit), however long a loaded machine takes.
    hosts_cluster.join(h2, "--num-cpus", str(TASKS + 1),
                       env={"FARPOOL_CLIENT_GRACE_S": "120", "FARPOOL_HEAD_TIMEOUT_S": "120"})
    hosts_cluster.join(h3, "--num-cpus", "2")
    runs_h2 = h2.path("/tmp/partition-runs")
    driver = h1.popen([sys.executable, "-c", DRIVER, h2.address, str(TASKS)], cwd=netns.__file__.rsplit("/", 1)[0],
                      env={"FARPOOL_ADDRESS": hosts_cluster.address, "FARPOOL_TOKEN": hosts_cluster.token},
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cut = False
    try:
        h2_id = _said(driver)["h2"]
        _wait(lambda: len(_lines(runs_h2)) == TASKS + 1, f"the {TASKS} tasks and the actor call to start on h2")
        h2_session, h2_port = _agent_of(h2)
        h2_log = h2.path(h2_session + "/node.log")
        _switch(bed, h2.name, "down")
        cut = True
        results = _said(driver)["results"]
        # Every result once, from the attempts run again on h1 or h3 (the actor restarted
        # there), never from h2.
        assert sorted(token for token, _ in results) == ["actor-token"] + [f"token-{i}" for i in range(TASKS)]
        assert all(node != h2_id for _, node in results)
        # The driver closed its connection to the dead node; once h2's agent sees it gone too,
        # the first attempts finish there: their results have nowhere to go.
        _wait(lambda: not _agent_connections_from(h2, h1, h2_port), "h2's agent to lose the driver's connection")
        with open(h2.path("/tmp/partition-release"), "w"):
            pass
        _wait(lambda: sum(line.startswith(("done", "actor-done")) for line in _lines(runs_h2)) == TASKS + 1,
              "the first attempts to finish on h2")
        _wait(lambda: sum("TaskFinished from worker" in line and "was not delivered" in line
                          for line in _lines(h2_log)) == TASKS + 1, "h2's agent to drop the late results")
        _switch(bed, h2.name, "up")
        cut = False
        driver.stdin.write("healed\n")
        driver.stdin.flush()
        report = _said(driver)
        assert driver.wait(timeout=60) == 0
    finally:
        if cut:
            _switch(bed, h2.name, "up")
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        stderr = driver.stderr.read()
        for stream in (driver.stdin, driver.stdout, driver.stderr):
            stream.close()
    runs = _lines(runs_h2)
    # The first attempts ran on h2 (and finished there, cut off); nothing ran there twice.
    assert sorted(runs) == sorted([f"run {i} {h2_id}" for i in range(TASKS)] + [f"done {i} {h2_id}" for i in range(TASKS)]
                                  + [f"actor-run {h2_id}", f"actor-done {h2_id}"])
    assert report["again"] == results, "the driver's results changed after the link returned"
    rows = {n["node_id"]: n for n in report["nodes"]}
    assert rows[h2_id]["alive"] is False
    new = [n for n in report["nodes"] if n["alive"] and n["address"].startswith(h2.address + ":")]
    assert len(new) == 1, f"h2 did not join again: {report['nodes']}; its log:\n{open(h2_log).read()[-4000:]}"
    (new,) = new
    assert new["node_id"] != h2_id and report["ran_on_new"] == new["node_id"]
    with open(h2_log) as f:
        assert f.read().count("joining again as a new node") == 1  # once: the new node is not taken for dead
    print("late results dropped by h2's agent:", TASKS + 1, "by the owner:", report["stale_results"], "\n", stderr[-2000:])
