"""A TaskFinished that carries results of tasks the owner no longer knows (ended already:
the worker's exit was reported first, or the task was cancelled).  Fed without any process."""

import types

import pytest

from farpool._private import client as client_mod
from farpool._private.refs import PENDING
from farpool._private.task_queues import LeaseState, TaskQueues


@pytest.fixture
def owner():
    c = client_mod.CoreClient({})
    c.loop.call_soon = lambda *a: None  # the I/O thread does not run
    c.conns.home = types.SimpleNamespace(node_id="node-a", local=True)
    yield c
    c.loop.close()


def known_task(owner, channel=None, lease_id=1):
    """A task of ours running on a lease (whose results come over ``channel``'s agent or stream)."""
    task_id = owner.new_object_id()
    fn = client_mod.RemoteFunctionInfo("f", b"h", b"")
    task = client_mod.TaskRecord(task_id, fn, b"", [], [], [task_id], {}, ("k",), 0, False, [], "f")
    owner.tasks[task_id] = task
    owner.objects[task_id] = client_mod.Entry(task=task, local_refs=1)
    lease = LeaseState(lease_id, f"w{lease_id}", "node-a", channel, [], ("k",), actor_id="an actor")
    TaskQueues.start(lease, [task])
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


def test_a_late_result_of_an_attempt_given_up_on_is_dropped_and_the_next_attempt_delivers(owner):
    """The partition healed: the cut-off worker's result for a task that runs again elsewhere
    comes back.  It is not taken (nor its stored value kept), the task stays running, and
    the result of the attempt it runs now is the one delivered."""
    old_agent, new_agent = object(), object()
    known = known_task(owner, types.SimpleNamespace(agent=old_agent, carrier=old_agent))
    task = owner.tasks[known]
    task.lease.inflight.clear()
    owner.queues.enqueue(task, front=True)  # its node was declared dead: queued again
    store_id = b"late" * 4 + b"\x00"
    late = [(known, True, [(("loc", "/dev/shm/x/seg-1", 1 << 20, store_id), 0, [])], 0.0, 0.0)]
    owner.completion.on_task_finished((late, False, (b"c:cut-off", "node-a", None, 9), (), ()), [], old_agent)
    assert owner.objects[known].state == PENDING and owner.queues.stale_results == 1
    assert owner.refs.frees == {"node-a": [store_id]}  # its copy there is not ours to keep
    owner.queues.remove_queued(task)
    TaskQueues.start(LeaseState(2, "w2", "node-b", types.SimpleNamespace(agent=new_agent, carrier=new_agent), [], ("k",),
                                actor_id="an actor"), [task])
    owner.completion.on_task_finished((late, False, (b"c:cut-off", "node-a", None, 9), (), ()), [], old_agent)
    assert owner.objects[known].state == PENDING and owner.queues.stale_results == 2
    fresh = [(known, True, [(b"payload", 1, [])], 0.0, 0.0)]
    owner.completion.on_task_finished((fresh, False, (b"c:w2", "node-b", None, 10), (), ()), [b"right"], new_agent)
    entry = owner.objects[known]
    assert entry.state == client_mod.READY and entry.buffers == [b"right"]
    assert owner.queues.stale_results == 2
