"""Actor lifetimes across drivers on a cluster from `farpool start`."""

import os
import subprocess
import sys
import textwrap

import pytest

import farpool

CREATOR = textwrap.dedent("""
    import os, sys, farpool

    @farpool.remote
    class Store:
        def __init__(self):
            self.data = {}

        def put(self, k, v):
            self.data[k] = v
            return len(self.data)

        def get(self, k):
            return self.data.get(k)

    if __name__ == "__main__":
        farpool.init(address=sys.argv[1])
        detached = Store.options(name="kept", lifetime="detached").remote()
        farpool.get(detached.put.remote("a", 1), timeout=60)
        normal = Store.options(name="tied").remote()
        farpool.get(normal.put.remote("b", 2), timeout=60)
        print("created", flush=True)
        farpool.shutdown()
""")


def test_detached_actor_outlives_its_creator_and_others_end_with_it(started, tmp_path):
    started.start_head("--num-cpus", "2")
    script = tmp_path / "creator.py"
    script.write_text(CREATOR)
    result = subprocess.run([sys.executable, str(script), started.address], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=dict(os.environ, FARPOOL_TOKEN=started.token))
    assert result.returncode == 0 and "created" in result.stdout, result.stdout + result.stderr
    farpool.init(address=started.address, token=started.token)
    kept = farpool.get_actor("kept")
    assert farpool.get(kept.get.remote("a"), timeout=60) == 1
    with pytest.raises(ValueError, match="no actor named 'tied'"):
        farpool.get_actor("tied")
    farpool.kill(kept)
    with pytest.raises(farpool.ActorDiedError):
        farpool.get(kept.get.remote("a"), timeout=60)


def test_actor_on_another_node_is_called_through_its_agent(started):
    started.start_head("--num-cpus", "1")
    started.add_node("--num-cpus", "1", "--resources", '{"gpu_box": 1}')
    farpool.init(address=started.address, token=started.token)

    @farpool.remote(resources={"gpu_box": 1})
    class Where:
        def node(self):
            return farpool.get_runtime_context().node_id

        def inc(self, x):
            return x + 1
    w = Where.remote()
    second = started.read_state()["nodes"][1]["node_id"]
    assert farpool.get(w.node.remote(), timeout=60) == second
    assert farpool.get([w.inc.remote(i) for i in range(100)], timeout=60) == list(range(1, 101))
