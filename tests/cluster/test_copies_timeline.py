"""Copies of objects between nodes on the whole cluster's timeline (copy_events.py).

The reader's agent records each copy it made; its heartbeat takes them to the head,
whose timeline shows them on lanes of their own: a "copy in" bar on the reader's node
and a "copy out" bar on the node that sent the bytes.
"""

import json

import numpy as np

import farpool
from farpool_testing import farpool_cli, node_ids, wait_until

N = (12 << 20) // 8  # float64s: three chunks of pull.CHUNK


@farpool.remote
def total(array):
    return farpool.get_runtime_context().node_id, float(array.sum())


def copies(events):
    return [e for e in events if str(e.get("cat", "")).startswith("copy")]


def test_a_large_object_read_on_another_node_is_a_copy_on_the_timeline(started, tmp_path):
    started.start_head("--num-cpus", "1", "--resources", '{"head": 1}')
    started.add_node("--num-cpus", "1", "--resources", '{"second": 1}')
    farpool.init(address="auto")
    head, second = node_ids(started)
    array = np.ones(N)
    ref = farpool.put(array)  # in the head node's store (this driver is on the head node)
    assert farpool.get(total.options(resources={"second": 1}).remote(ref), timeout=120) == (second, float(N))

    def copied():
        return [e for e in copies(farpool.timeline()) if e["name"].startswith("copy in")]
    bars = wait_until(copied, "the copy to the second node on the timeline")
    assert len(bars) == 1, bars
    bar = bars[0]
    args = bar["args"]
    assert args["object_id"] == ref.hex() and args["what"] == "an argument of total"
    assert args["bytes"] >= array.nbytes and args["to"] == second and args["from"] == {head: args["bytes"]}
    assert bar["ph"] == "X" and bar["dur"] > 0 and bar["cat"] == "copy"
    events = farpool.timeline()
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert processes[bar["pid"]] == f"node {second[:8]}"
    assert threads[(bar["pid"], bar["tid"])] == "object copies"
    out = [e for e in copies(events) if e["name"].startswith("copy out")]
    assert [(processes[e["pid"]], e["args"]["object_id"]) for e in out] == [(f"node {head[:8]}", ref.hex())]
    # the task that read it ran on the second node, on the same timeline
    runs = [e for e in events if e.get("cat") == "task" and e["name"] == "total"]
    assert [processes[e["pid"]] for e in runs] == [f"node {second[:8]}"]

    status = farpool.status()["object_copies"]
    assert (status["copies"], status["failed"]) == (1, 0) and status["bytes"] == args["bytes"], status
    assert "object copies between nodes: 1 (12.6 MB" in farpool_cli("status").stdout

    trace = tmp_path / "trace.json"
    said = farpool_cli("timeline", str(trace)).stdout
    assert "1 task run(s)" in said and "1 object copy(ies) between nodes" in said, said
    assert ref.hex() in {e["args"].get("object_id") for e in copies(json.loads(trace.read_text()))}
