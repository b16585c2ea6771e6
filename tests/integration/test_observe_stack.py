"""`farpool stack`'s data: every worker's threads' stacks and the task it runs, from its node agent."""

import ctypes
import socket
import time

import pytest

import farpool
from farpool import cli
from farpool_testing import TIMEOUT


def _arrive(gate_path):
    """Show the test that the task runs (the gate counts it); the gate is never opened."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(gate_path)
    return s


@farpool.remote
def hangs_in_sleep(gate_path):
    conn = _arrive(gate_path)  # noqa: F841 - kept open while the task hangs
    while True:
        time.sleep(600)


@farpool.remote
def hangs_in_c_holding_the_gil(gate_path):
    conn = _arrive(gate_path)  # noqa: F841
    libc = ctypes.PyDLL(None)  # a PyDLL keeps the GIL across the call: no Python thread can run
    while True:
        libc.sleep(600)


def _workers(answers):
    return {w["pid"]: w for a in answers for w in a["workers"]}


def _running(answers, name):
    found = [w for w in _workers(answers).values() if w["task"] and w["task"]["name"] == name]
    assert len(found) == 1, f"no single worker runs {name}: {cli.format_stacks(answers)}"
    return found[0]


def test_stack_names_the_task_and_the_function_where_it_hangs_even_in_c(cluster, gate):
    refs = [hangs_in_sleep.remote(gate.path), hangs_in_c_holding_the_gil.remote(gate.path)]
    try:
        gate.wait_arrivals(2)
        client = farpool.api._client()
        answers = cli.collect_stacks(client)
        assert [a["node_id"] for a in answers] == [client.home.node_id]
        for name in ("hangs_in_sleep", "hangs_in_c_holding_the_gil"):
            worker = _running(answers, name)
            assert worker["status"] == "complete", worker
            assert len(worker["task"]["task_id"]) == 32, worker["task"]
            assert f"in {name}" in worker["stack"], worker["stack"]  # the frame of the task's function
        text = cli.format_stacks(answers)
        assert "running hangs_in_sleep (task " in text and "in hangs_in_c_holding_the_gil" in text, text

        # --pid: only that worker; its node answers, as the only one here
        pid = _running(answers, "hangs_in_c_holding_the_gil")["pid"]
        only = cli.collect_stacks(client, pid=pid)
        assert list(_workers(only)) == [pid]
        assert "in hangs_in_c_holding_the_gil" in _workers(only)[pid]["stack"]
        # --node by id prefix: the same node; a prefix that matches none is refused with advice
        assert set(_workers(cli.collect_stacks(client, node=client.home.node_id[:8]))) == set(_workers(answers))
        with pytest.raises(ValueError, match="no live node has an id starting with 'zz'.*farpool status"):
            cli.collect_stacks(client, node="zz")
    finally:
        for ref in refs:
            farpool.cancel(ref, force=True)
        for ref in refs:
            with pytest.raises(farpool.exceptions.TaskCancelledError):
                farpool.get(ref, timeout=TIMEOUT)


def test_an_idle_worker_is_shown_idle_with_its_stack(cluster):
    @farpool.remote
    def ping():
        return 1
    assert farpool.get(ping.remote(), timeout=TIMEOUT) == 1
    answers = cli.collect_stacks(farpool.api._client())
    workers = list(_workers(answers).values())
    assert workers and all(w["task"] is None for w in workers if w["status"] == "complete"), answers
    assert any("in _run_batches" in w["stack"] or "in run" in w["stack"] for w in workers)
    assert "idle" in cli.format_stacks(answers)
