"""Streaming generators across node agents: a producer on another node streams items that
live in its node's store; the driver reads them on its own node (copied between stores),
passes them to tasks on a third node; a stream item lost with its node is not rebuilt and
says so (#13: streams are not rebuilt).

Layout: farpool_testing.three_nodes (the driver joined on the head node).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import farpool
from farpool._private import session
from farpool_testing import TIMEOUT, node_ids, store_stats_of, three_nodes, wait_for_file, wait_until
from test_lineage import node_dead

MB = 1 << 20


@farpool.remote
def produce(n, mb):
    here = farpool.get_runtime_context().node_id
    for i in range(n):
        yield here, np.full(mb * MB, i, dtype=np.uint8)


@farpool.remote
def where_and_sum(item):
    node, array = item
    return farpool.get_runtime_context().node_id, node, int(array[:10].sum())


def test_items_made_on_another_node_are_read_here_and_used_on_a_third(started):
    head, second, third = three_nodes(started)
    gen = produce.options(scheduling_strategy=farpool.NodeAffinity(second), max_pending_items=2).remote(5, 4)
    refs = []
    for i, ref in enumerate(gen):
        node, array = farpool.get(ref, timeout=TIMEOUT)  # copied into this node's store
        assert node == second and array.shape == (4 * MB,) and int(array[0]) == i
        refs.append(ref)
    assert len(refs) == 5
    used = farpool.get([where_and_sum.options(scheduling_strategy=farpool.NodeAffinity(third)).remote(r)
                        for r in refs], timeout=TIMEOUT)
    assert used == [(third, second, 10 * i) for i in range(5)]


def test_a_stream_item_lost_with_its_node_is_an_object_lost_error_saying_streams_are_not_rebuilt(
        started, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "5")
    head, second, third = three_nodes(started)
    gen = produce.options(scheduling_strategy=farpool.NodeAffinity(second, soft=True)).remote(2, 4)
    refs = list(gen)
    ready, _ = farpool.wait(refs, num_returns=2, timeout=TIMEOUT, fetch_local=False)
    assert len(ready) == 2
    started.kill_node(second)
    wait_until(lambda: node_dead(second), "the head to declare the killed node dead")
    with pytest.raises(farpool.ObjectLostError) as error:
        farpool.get(refs[1], timeout=TIMEOUT)
    text = str(error.value)
    assert refs[1].hex() in text and second[:8] in text
    assert "item 1 of the streaming generator task produce" in text and "streams are not rebuilt" in text


# ---------------------------------------------------------------------- the owner of a stream dies
# A caller on the head node (attached to its agent, which watches its pid; or, "-here", on the
# second node itself, calling its actor's worker straight) starts a stream on the second node
# (an actor's generator method, or a generator task), reads its first item, writes the marker
# "running", then waits to be SIGKILLed while the producer waits for credit (max_pending_items=1),
# or goes on making items ("task-unbounded").  The items wait in the second node's store (those
# of threaded and async actors travel inline).  argv: the kind of producer, the second node's
# id, the directory of the markers ("running"; "stopped", which the generator's finally writes).
CALLER = textwrap.dedent("""
    import os
    import sys
    import time
    import numpy as np
    import farpool
    from farpool._private import client as client_mod
    from farpool._private import session

    @farpool.remote
    def forever(stopped, pause=0):
        try:
            i = 0
            while True:
                yield np.full(1 << 20, i % 256, dtype=np.uint8)
                i += 1
                time.sleep(pause)
        finally:
            open(stopped, "w").close()

    @farpool.remote
    def here():
        return farpool.get_runtime_context().node_id

    if __name__ == "__main__":
        kind, second, markers = sys.argv[1:4]
        stopped = os.path.join(markers, "stopped")
        if kind.endswith("-here"):  # attached to the second node's agent instead, which watches our pid
            pick = client_mod.CoreClient._wait_for_node
            def on_second(self, welcome):
                pick(self, welcome)
                return next(n for n in welcome["nodes"] if n["node_id"] == second)
            client_mod.CoreClient._wait_for_node = on_second
        farpool.init(address="auto")  # attached to the head node's agent, which watches our pid
        assert farpool.api._client().home.local  # (a store here: the items stay in the second node's)
        if not kind.endswith("-here"):
            # The second node's agent is to see us as from another machine: it cannot watch our
            # pid, and its TCP check (FARPOOL_CLIENT_GRACE_S) comes too late for the test.  Reach
            # it over TCP before the stream starts: the actor's calls are then relayed by it, as
            # they would be from another machine (on one machine they go straight to the worker).
            session.pid_space = lambda: "another-machine"
            assert farpool.get(here.options(scheduling_strategy=farpool.NodeAffinity(second)).remote(),
                               timeout=60) == second
            assert not farpool.api._client().agents[second].local
        if kind == "task":
            gen = forever.options(scheduling_strategy=farpool.NodeAffinity(second),
                                  max_pending_items=1).remote(stopped)
        elif kind == "task-unbounded":  # it never waits for credit: it goes on making items
            gen = forever.options(scheduling_strategy=farpool.NodeAffinity(second)).remote(stopped, 0.01)
        else:
            method = farpool.get_actor("streamer").forever
            if kind != "async":
                method = method.options(num_returns="streaming")
            gen = method.options(max_pending_items=1).remote(stopped)
        assert int(farpool.get(next(gen), timeout=60)[0]) == 0
        open(os.path.join(markers, "running"), "w").close()
        sys.stdin.read()  # until killed
""")


class Streamer:
    """Yields 1 MB items until stopped; its finally writes the marker."""

    def forever(self, stopped):
        try:
            i = 0
            while True:
                yield np.full(MB, i % 256, dtype=np.uint8)
                i += 1
        finally:
            open(stopped, "w").close()

    def ping(self):
        return "pong"


class AsyncStreamer:
    async def forever(self, stopped):
        try:
            i = 0
            while True:
                yield np.full(MB, i % 256, dtype=np.uint8)
                i += 1
        finally:
            open(stopped, "w").close()

    async def ping(self):
        return "pong"


@pytest.mark.parametrize("kind", ["in-order", "threaded", "async", "task", "task-unbounded", "threaded-here"])
def test_a_stream_whose_owner_dies_is_stopped_and_its_items_freed(
        started, tmp_path, monkeypatch, kind):
    # The second node's agent would take the killed caller (a client of its over TCP, from
    # "another machine") for dead only after this long: what stops the stream is the caller's
    # own node telling (PeerGone).
    monkeypatch.setenv("FARPOOL_CLIENT_GRACE_S", "600")
    started.start_head("--num-cpus", "1")
    started.add_node("--num-cpus", "2", "--resources", '{"second": 4}')
    farpool.init(address=started.address, token=started.token)
    head, second = node_ids(started)
    used = produce.options(scheduling_strategy=farpool.NodeAffinity(second)).remote(1, 0)
    assert farpool.get(list(used), timeout=TIMEOUT)[0][0] == second  # (leased there: store_stats_of asks it)
    actor = None
    if not kind.startswith("task"):
        cls = farpool.remote(AsyncStreamer if kind == "async" else Streamer)
        options = {"max_concurrency": 2} if kind.startswith("threaded") else {}
        actor = cls.options(name="streamer", resources={"second": 1}, **options).remote()
        assert farpool.get(actor.ping.remote(), timeout=TIMEOUT) == "pong"
    stopped, running = tmp_path / "stopped", tmp_path / "running"
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    proc = subprocess.Popen([sys.executable, str(script), kind, second, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=dict(os.environ, FARPOOL_TOKEN=started.token))
    deadline = time.monotonic() + TIMEOUT
    try:
        while not running.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not running.exists():
            proc.kill()
            raise AssertionError(f"the caller did not start its stream: {proc.communicate(timeout=TIMEOUT)}")
        assert not stopped.exists()
        if kind in ("in-order", "task", "task-unbounded"):  # (threaded and async actors send items inline)
            wait_until(lambda: store_stats_of(second)["objects"] >= 1, "an unread item in the second node's store")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        session.remove_dead_sessions()  # the killed caller's private session directory
    assert wait_for_file(str(stopped), TIMEOUT)  # the producer was stopped: its generator's finally ran
    wait_until(lambda: store_stats_of(second)["objects"] == 0, "the dead caller's items freed on the second node")
    if actor is not None:  # the actor goes on serving others (an in-order one was not left stuck)
        assert farpool.get(actor.ping.remote(), timeout=TIMEOUT) == "pong"
        method = actor.forever if kind == "async" else actor.forever.options(num_returns="streaming")
        gen = method.options(max_pending_items=1).remote(str(tmp_path / "again"))
        assert int(farpool.get(next(gen), timeout=TIMEOUT)[0]) == 0
        farpool.cancel(gen)  # (the cancel path still stops it)
        assert wait_for_file(str(tmp_path / "again"), TIMEOUT)
        farpool.kill(actor)


@farpool.remote
def here():
    return farpool.get_runtime_context().node_id


@farpool.remote(resources={"third": 1}, max_retries=0)
def stream_and_hold(second, markers):
    """On the third node: reads the first item of the actor's stream, then holds it until its
    node is killed (the second node's agent cannot watch our pid: it hears of the death only
    through the head, with the node)."""
    session.pid_space = lambda: "another-machine"
    assert farpool.get(here.options(scheduling_strategy=farpool.NodeAffinity(second)).remote()) == second
    gen = farpool.get_actor("streamer").forever.options(num_returns="streaming", max_pending_items=1).remote(
        os.path.join(markers, "stopped"))
    assert int(farpool.get(next(gen))[0]) == 0
    open(os.path.join(markers, "running"), "w").close()
    time.sleep(3600)  # until our node is killed


def test_a_stream_whose_owner_dies_with_its_node_is_stopped_and_its_items_freed(started, tmp_path, monkeypatch):
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "5")
    monkeypatch.setenv("FARPOOL_CLIENT_GRACE_S", "600")  # (the second node's agent does not notice by itself)
    head, second, third = three_nodes(started)
    on_second = here.options(scheduling_strategy=farpool.NodeAffinity(second)).remote()
    assert farpool.get(on_second, timeout=TIMEOUT) == second  # (leased there: store_stats_of asks it)
    actor = farpool.remote(Streamer).options(name="streamer", resources={"second": 1}).remote()
    assert farpool.get(actor.ping.remote(), timeout=TIMEOUT) == "pong"
    holding = stream_and_hold.remote(second, str(tmp_path))
    wait_until(lambda: (tmp_path / "running").exists(), "the task on the third node to start its stream")
    wait_until(lambda: store_stats_of(second)["objects"] >= 1, "an unread item in the second node's store")
    started.kill_node(third)
    wait_until(lambda: node_dead(third), "the head to declare the killed node dead")
    assert wait_for_file(str(tmp_path / "stopped"), TIMEOUT)  # the generator's finally ran
    wait_until(lambda: store_stats_of(second)["objects"] == 0, "the items made for the dead owner freed")
    assert farpool.get(actor.ping.remote(), timeout=TIMEOUT) == "pong"  # (it was not left stuck)
    with pytest.raises(farpool.FarpoolError):
        farpool.get(holding, timeout=TIMEOUT)
    farpool.kill(actor)
