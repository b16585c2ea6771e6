"""A TaskFinished that carries results of tasks the owner no longer knows (ended already:
the worker's exit was reported first, or the task was cancelled).  Fed without any process."""

import types

import pytest

from farpool._private import client as client_mod


@pytest.fixture
def owner():
    c = client_mod.CoreClient({})
    c.loop.call_soon = lambda *a: None  # the I/O thread does not run
    c.conns.home = types.SimpleNamespace(node_id="node-a", local=True)
    yield c
    c.loop.close()


def known_task(owner):
    task_id = owner.new_object_id()
    fn = client_mod.RemoteFunctionInfo("f", b"h", b"")
    task = client_mod.TaskRecord(task_id, fn, b"", [], [], [task_id], {}, ("k",), 0, False, [], "f")
    owner.tasks[task_id] = task
    owner.objects[task_id] = client_mod.Entry(task=task, local_refs=1)
    return task_id


def test_buffers_of_an_unknown_result_do_not_shift_the_next_results_buffers(owner):
    known = known_task(owner)
    results = [(b"gone" * 4, True, [(b"payload-of-gone", 1, [])], 0.0, 0.0),
               (known, True, [(b"payload", 1, [])], 0.0, 0.0)]
    owner.completion.on_task_finished((results, False, None, (), ()), [b"wrong", b"right"])
    entry = owner.objects[known]
    assert entry.state == client_mod.READY and entry.buffers == [b"right"]


def test_an_unknown_result_in_the_store_is_freed(owner):
    store_id = b"gone" * 4 + b"\x00"
    results = [(b"gone" * 4, True, [(("loc", "/dev/shm/x/seg-1", 1 << 20, store_id), 0, [])], 0.0, 0.0)]
    owner.completion.on_task_finished((results, False, None, (), ()), [])
    assert owner.refs.frees == {"node-a": [store_id]}


def test_refs_inside_an_unknown_result_are_released(owner):
    third = (b"c:third", "node-b", None, 7)
    worker = (b"c:worker", "node-a", "ipc:///w", 8)
    results = [(b"gone" * 4, True, [(b"payload", 0, [(b"r" * 16, third)])], 0.0, 0.0)]
    owner.completion.on_task_finished((results, False, worker, (), ()), [])
    sent = [(o[0], m[0]) for o, m in owner.refs.owner_messages]
    assert (b"c:third", b"BorrowReleased") in sent
