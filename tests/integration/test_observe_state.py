"""farpool.status(), the list tables and the whole-cluster timeline, from the head's task history."""

import pytest

import farpool
from farpool import observe
from farpool_testing import TIMEOUT, wait_at_gate, wait_until


@farpool.remote
def obs_add(a, b):
    return a + b


@farpool.remote(num_cpus=0.5)
def obs_fail():
    raise KeyError("no such thing")


@farpool.remote
def obs_parent(n):
    return sum(farpool.get([obs_child.remote(i) for i in range(n)]))


@farpool.remote
def obs_child(i):
    return i


@farpool.remote
class ObsCounter:
    def inc(self):
        return 1


def _group(status, name):
    return next((g for g in status["tasks"]["groups"] if g["name"] == name), None)


def test_status_counts_tasks_by_function_and_shape_and_names_failures(cluster):
    assert farpool.get([obs_add.remote(i, 1) for i in range(6)], timeout=TIMEOUT) == list(range(1, 7))
    with pytest.raises(KeyError):
        farpool.get(obs_fail.remote(), timeout=TIMEOUT)
    s = farpool.status()
    assert _group(s, "obs_add") == {"name": "obs_add", "shape": "{CPU: 1}", "PENDING": 0, "RUNNING": 0,
                                    "FINISHED": 6, "FAILED": 0}
    assert _group(s, "obs_fail")["FAILED"] == 1 and _group(s, "obs_fail")["shape"] == "{CPU: 0.5}"
    failed = observe.list_tasks(state="failed")
    assert any(t["name"] == "obs_fail" and t["error_type"] == "KeyError" for t in failed), failed
    node = s["nodes"][0]
    assert node["state"] == "ALIVE" and node["resources_total"]["CPU"] == 2 and node["store_capacity"] > 0
    assert s["nodes_alive"] == 1 and s["placement_groups"] == {}
    assert "obs_add" in observe.format_status(s)


def test_a_running_task_is_listed_with_its_node_and_worker(cluster, gate):
    ref = farpool.remote(wait_at_gate).options(name="obs_waits").remote(gate.path, 5)
    gate.wait_arrivals(1)
    try:
        running = wait_until(lambda: [t for t in observe.list_tasks(state="RUNNING") if t["name"] == "obs_waits"],
                             "the gated task listed as RUNNING")
        node_id = farpool.nodes()[0]["node_id"]
        assert running[0]["node_id"] == node_id and running[0]["worker_id"], running
        assert [t["name"] for t in observe.list_tasks(state="RUNNING", node=node_id[:6])] == ["obs_waits"]
        assert observe.list_tasks(state="RUNNING", node="zzzz") == []
        assert _group(farpool.status(), "obs_waits")["RUNNING"] == 1
    finally:
        gate.open()
    assert farpool.get(ref, timeout=TIMEOUT) == 5
    assert _group(farpool.status(), "obs_waits")["FINISHED"] == 1


def test_nested_tasks_of_a_worker_are_reported_too(cluster):
    assert farpool.get(obs_parent.remote(3), timeout=TIMEOUT) == 3
    # the worker's own client reports its children on its timer: wait for them
    wait_until(lambda: (_group(farpool.status(), "obs_child") or {}).get("FINISHED") == 3,
               "the three nested tasks in the head's history")


def test_actors_by_class_and_state_and_their_calls(cluster):
    c = ObsCounter.remote()
    assert farpool.get(c.inc.remote(), timeout=TIMEOUT) == 1
    s = farpool.status()
    assert {"class_name": "ObsCounter", "ALIVE": 1} in s["actors"], s["actors"]
    rows = observe.list_actors(state="alive")
    assert any(r["class_name"] == "ObsCounter" and r["node_id"] for r in rows), rows
    assert _group(s, "ObsCounter.inc")["FINISHED"] == 1
    farpool.kill(c)
    wait_until(lambda: any(r["class_name"] == "ObsCounter" for r in observe.list_actors(state="DEAD")),
               "the killed actor listed as DEAD")


def test_placement_groups_are_an_empty_table_with_its_columns(cluster):
    assert observe.list_placement_groups() == []
    header = observe.format_table("placement-groups", []).splitlines()[0]
    assert header.split() == ["PLACEMENT_GROUP_ID", "NAME", "STATE", "STRATEGY", "BUNDLES", "NODES"]


def test_objects_are_listed_from_the_stores_largest_first(cluster):
    import numpy as np
    small, large = farpool.put(np.zeros(1 << 17)), farpool.put(np.zeros(3 << 17))  # 1 MB, 3 MB
    rows = {r["object_id"]: r for r in observe.list_objects(limit=1000)}
    assert rows[small.hex()]["size"] >= 1 << 20 and rows[large.hex()]["size"] >= 3 << 20, rows
    assert rows[large.hex()]["state"] == "IN_MEMORY" and rows[large.hex()]["node_id"] == cluster["node_id"]
    ours = [r["object_id"] for r in observe.list_objects(limit=1000) if r["object_id"] in (small.hex(), large.hex())]
    assert ours == [large.hex(), small.hex()]
    assert not [r for r in observe.list_objects(state="spilled") if r["object_id"] in rows]
    assert large.hex()[:16] in observe.format_table("objects", observe.list_objects(limit=1000))
    with pytest.raises(ValueError, match="SPILLED or IN_MEMORY, got 'lost'"):
        observe.list_objects(state="lost")


def test_objects_past_a_stores_twenty_largest_are_listed_up_to_the_limit(cluster):
    import numpy as np
    refs = [farpool.put(np.full(1 << 15, i)) for i in range(30)]  # 256 KB each: in the store
    ids = {r.hex() for r in refs}
    assert ids <= {r["object_id"] for r in observe.list_objects(limit=1000)}
    assert len(observe.list_objects(limit=25)) == 25


def test_list_rejects_a_bad_kind_and_a_bad_limit(cluster):
    with pytest.raises(ValueError, match="farpool list takes one of tasks, actors"):
        observe.list_state("jobs")
    with pytest.raises(ValueError, match="`limit` must be an int >= 1, got 0"):
        observe.list_tasks(limit=0)


def test_the_timeline_has_a_lane_per_worker(cluster, tmp_path):
    import json
    assert farpool.get([obs_add.options(name="obs_lane").remote(i, 0) for i in range(4)], timeout=TIMEOUT)
    path = tmp_path / "trace.json"
    farpool.timeline(str(path))
    events = json.loads(path.read_text())
    runs = [e for e in events if e["ph"] == "X" and e["name"] == "obs_lane"]
    assert len(runs) == 4 and all(e["dur"] >= 0 for e in runs)
    lanes = {(e["pid"], e["tid"]) for e in events if e["ph"] == "X"}
    named = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert lanes <= named
