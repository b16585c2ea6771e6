"""cancel(): which signal reaches a running task's worker, and what the worker does with it.

``recursive=True`` (the default) interrupts the task and cancels the tasks it
submitted; ``recursive=False`` interrupts only the task.  Fed without processes:
the client's agent socket and the worker's nested client are stand-ins.
"""

import signal
import types

import pytest

from farpool._private import client as client_mod
from farpool._private import object_ref, protocol, worker_process
from farpool._private.context import context


class Socket:
    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, copy=True, flags=0):
        self.sent.append(protocol.decode([bytes(f) for f in frames]))


@pytest.fixture
def client():
    c = client_mod.CoreClient({})
    yield c
    c.loop.close()


def running_task(client, socket):
    task_id = client.new_object_id()
    fn = client_mod.RemoteFunctionInfo("f", b"h", b"")
    task = client_mod.TaskRecord(task_id, fn, b"", [], [], [task_id], {}, ("k",), 0, False, [], "f")
    task.state = "RUNNING"
    task.lease = types.SimpleNamespace(node_id="node-a", worker_id="w1")
    client.agents["node-a"] = types.SimpleNamespace(socket=socket)
    client.tasks[task_id] = task
    return task_id


@pytest.mark.parametrize("force, recursive, expected", [
    (False, True, signal.SIGINT), (False, False, signal.SIGUSR2), (True, True, signal.SIGKILL),
    (True, False, signal.SIGKILL)])
def test_the_signal_sent_for_a_running_task(client, force, recursive, expected):
    socket = Socket()
    task_id = running_task(client, socket)
    client._cancel(task_id, force, recursive)
    assert [(tag, fields) for tag, fields, _ in socket.sent] == [("SignalWorker", ("w1", int(expected)))]


class Nested:
    def __init__(self):
        self.cancelled = []

    def cancel_children(self, task_id):
        self.cancelled.append(task_id)


@pytest.fixture
def in_a_task(monkeypatch):
    nested = Nested()
    monkeypatch.setattr(object_ref, "_current_client", nested)
    monkeypatch.setattr(context, "task_id", "t1")
    monkeypatch.setattr(context, "in_user_code", True)
    monkeypatch.setattr(context, "cancel_pending", False)
    return nested


@pytest.mark.parametrize("signum, children_cancelled", [(signal.SIGINT, ["t1"]), (signal.SIGUSR2, [])])
def test_the_worker_interrupts_the_task_and_its_children_only_when_recursive(in_a_task, signum,
                                                                               children_cancelled):
    with pytest.raises(KeyboardInterrupt, match="task t1 was cancelled"):
        worker_process.on_sigint(signum, None)
    assert in_a_task.cancelled == children_cancelled
