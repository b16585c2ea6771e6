"""`farpool status`, `farpool list` and `farpool timeline` against a cluster from `farpool start`:
the whole cluster's tasks, every driver's, from the head's history."""

import json
import re

import pytest

import farpool
from farpool_testing import TIMEOUT, farpool_cli, run_script, wait_until


@farpool.remote
def from_this_driver():
    return 1


def test_list_status_and_timeline_show_every_drivers_tasks(started, tmp_path):
    out = started.start_head("--num-cpus", "2").stdout
    link = re.search(r"Dashboard \(.*\): (http://127\.0\.0\.1:\d+/\?login=\S+)", out)
    assert link, out
    # another driver, gone by now: its tasks stay in the head's history
    other = run_script(tmp_path, """
        import farpool
        farpool.init(address="auto")
        @farpool.remote
        def from_other_driver(i):
            return i
        @farpool.remote
        def fails_in_other_driver():
            raise OSError("disk on fire")
        assert farpool.get([from_other_driver.remote(i) for i in range(5)]) == list(range(5))
        try:
            farpool.get(fails_in_other_driver.remote())
        except OSError:
            pass
        farpool.shutdown()
    """)
    assert other.returncode == 0, other.stderr
    farpool.init(address="auto")
    assert farpool.get(from_this_driver.remote(), timeout=TIMEOUT) == 1
    farpool.shutdown()

    rows = json.loads(farpool_cli("list", "tasks", "--json", "--limit", "50").stdout)
    names = [r["name"] for r in rows]
    assert names.count("from_other_driver") == 5 and "from_this_driver" in names, names
    failed = farpool_cli("list", "tasks", "--state", "failed").stdout
    assert "fails_in_other_driver" in failed and "OSError" in failed and "from_other_driver" not in failed, failed
    node_id = started.read_state()["nodes"][0]["node_id"]
    assert len(json.loads(farpool_cli("list", "tasks", "--json", "--node", node_id[:6], "--limit", "3").stdout)) == 3

    status = farpool_cli("status").stdout
    assert re.search(r"from_other_driver\s+\{CPU: 1\}\s+0\s+0\s+5\s+0", status), status
    assert "1 live node(s), 0 dead" in status and "placement groups: none" in status, status
    assert farpool_cli("list", "placement-groups").stdout.split() == [
        "PLACEMENT_GROUP_ID", "NAME", "STATE", "STRATEGY", "BUNDLES", "NODES", "(no", "placement", "groups)"]
    bad = farpool_cli("list", "tasks", "--limit", "0", check=False)
    assert bad.returncode == 1 and "--limit must be >= 1, got 0" in bad.stderr

    trace = tmp_path / "trace.json"
    assert "wrote" in farpool_cli("timeline", str(trace)).stdout
    events = json.loads(trace.read_text())
    assert sum(e["name"] == "from_other_driver" and e["ph"] == "X" for e in events) == 5


@farpool.remote(resources={"tpu": 1})
def needs_tpu():
    return 1


def test_status_names_the_tasks_no_node_can_run_and_why(started):
    started.start_head("--num-cpus", "1")
    farpool.init(address="auto")
    with pytest.warns(RuntimeWarning, match="no node can run"):
        refs = [needs_tpu.remote() for _ in range(2)]
        assert farpool.wait(refs, num_returns=1, timeout=0.5) == ([], refs)  # waiting, not failed

    def waiting():
        return [w for w in farpool.status()["tasks"]["infeasible"] if w["name"] == "needs_tpu"]
    (row,) = wait_until(waiting, "the waiting tasks in farpool.status()")
    assert row["tasks"] == 2 and "tpu" in row["shape"] and row["reason"], row
    said = farpool_cli("status").stdout
    assert re.search(r"waiting, no node can run it: 2 x needs_tpu \{CPU: 1, tpu: 1\}: \S", said), said
    rows = json.loads(farpool_cli("list", "tasks", "--state", "pending", "--json").stdout)
    assert [r["waiting_for"] for r in rows if r["name"] == "needs_tpu"] == [row["reason"]] * 2, rows
    for ref in refs:
        farpool.cancel(ref)
