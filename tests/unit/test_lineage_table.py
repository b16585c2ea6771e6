"""Lineage in the reference table (refs.py) and the owner's handling of lost objects
(completion.py), fed events without any process or socket.  validate_state after each."""

import types

import pytest

from farpool import exceptions
from farpool._private import client as client_mod
from farpool._private.refs import FAILED, PENDING, READY, Entry, Location, RefTable
from farpool._private.task_queues import RemoteFunctionInfo, TaskRecord, TaskState

ME = b"c:me"
FN = RemoteFunctionInfo("make", b"h", b"")


def task(table, n, args=b"x" * 100, max_retries=1, location=None, pinned=()):
    """A finished task with one result stored on node-a (its entry in ``table``)."""
    t = TaskRecord(bytes([n]) * 16, FN, args, [], [], [bytes([n]) * 16], {}, ("k",), max_retries, False,
                   list(pinned), "make")
    t.state = TaskState.DONE
    t.args_location = location
    table.objects[t.task_id] = Entry(state=READY, local_refs=1,
                                     location=Location("seg", "node-a", t.task_id + b"\0", "/p", 10))
    return t


@pytest.fixture
def table():
    return RefTable(ME, in_worker=False)


def test_kept_while_a_result_lives_and_its_arguments_released_with_the_last(table):
    arg = b"a" * 16
    table.objects[arg] = Entry(state=READY, local_refs=0, task_pins=1)
    t = task(table, 1, pinned=[arg])
    with table.lock:
        table.keep_lineage(t)
    table.validate_state()
    assert table.objects[t.task_id].lineage.task is t and arg in table.objects  # the argument stays
    with table.lock:
        table.objects[t.task_id].local_refs = 0
        table.delete_if_unreferenced(t.task_id, table.objects[t.task_id])
    table.validate_state()
    assert not table.lineage and table.lineage_bytes == 0 and arg not in table.objects


def test_the_oldest_lineage_is_evicted_beyond_the_bound_and_says_so(table):
    table.lineage_max_bytes = 1000
    stored_args = Location("seg", "node-me", b"args", "/args", 600)
    old = task(table, 1, location=stored_args)
    new = task(table, 2)
    with table.lock:
        table.keep_lineage(old)
        table.keep_lineage(new)
    table.validate_state()
    assert list(table.lineage) == [new.task_id]
    entry = table.objects[old.task_id]
    assert entry.lineage is None and "evicted" in entry.no_lineage and "FARPOOL_LINEAGE_MAX_BYTES" in entry.no_lineage
    assert table.frees == {"node-me": [b"args"]}  # its stored arguments are given back


def test_lost_on_names_objects_with_no_copy_left_alive(table):
    gone = task(table, 1)
    copied = task(table, 2)
    table.objects[copied.task_id].copies = {"node-b"}
    with table.lock:
        assert table.lost_on({"node-a"}) == [(gone.task_id, table.objects[gone.task_id])]
        assert len(table.lost_on({"node-a", "node-b"})) == 2


# ---------------------------------------------------------------- the owner (completion.py)
@pytest.fixture
def owner():
    c = client_mod.CoreClient({})
    c.loop.call_soon = lambda *a: None  # the I/O thread does not run
    c.conns.home = types.SimpleNamespace(node_id="node-h", local=True)
    yield c
    c.loop.close()


def finished(owner, max_retries, actor=False):
    """A task that finished with one result stored on node-a."""
    task_id = owner.new_object_id()
    t = TaskRecord(task_id, FN, b"args", [], [], [task_id], {}, ("k",), max_retries, False, [], "make",
                   actor_id="actor" if actor else None)
    owner.tasks[task_id] = t
    owner.objects[task_id] = Entry(task=t, local_refs=1)
    owner.completion.finish_ok([(t, [Location("seg", "node-a", task_id + b"\0", "/p", 1 << 20)], [[]])])
    owner.refs.validate_state()
    return task_id, t


def test_a_lost_result_with_lineage_is_made_pending_and_its_task_submitted_again(owner):
    oid, t = finished(owner, max_retries=1)
    submitted = []
    owner.submitter.on_submit = submitted.append
    owner.completion.objects_lost(owner.refs.lost_on({"node-a"}), {"node-a": "killed"})
    owner.refs.validate_state()
    entry = owner.objects[oid]
    assert entry.state == PENDING and entry.location is None and submitted == [t] and t.attempts == 1
    # Its retries spent, the next loss is final.
    entry.state, entry.location = READY, Location("seg", "node-a", oid + b"\0", "/p", 1 << 20)
    owner.completion.objects_lost(owner.refs.lost_on({"node-a"}), {"node-a": "killed again"})
    assert entry.state == FAILED and "no retries left" in str(entry.error) and submitted == [t]


@pytest.mark.parametrize("max_retries, actor, why", [(0, False, "max_retries=0"), (1, True, "actor results")])
def test_a_lost_result_that_cannot_be_rebuilt_fails_saying_why(owner, max_retries, actor, why):
    oid, _ = finished(owner, max_retries, actor)
    owner.completion.objects_lost(owner.refs.lost_on({"node-a"}), {"node-a": "its agent was killed"})
    entry = owner.objects[oid]
    assert entry.state == FAILED and isinstance(entry.error, exceptions.ObjectLostError)
    text = str(entry.error)
    assert oid.hex() in text and "node-a" in text and "its agent was killed" in text and why in text


def test_a_lost_put_value_fails_saying_put_keeps_no_lineage(owner):
    oid = owner.new_object_id()
    owner.objects[oid] = Entry(state=READY, local_refs=1, location=Location("seg", "node-a", oid, "/p", 1 << 20),
                               no_lineage="it was made by put(), which keeps no lineage: put it again")
    owner.completion.objects_lost(owner.refs.lost_on({"node-a"}), {"node-a": "gone"})
    assert owner.objects[oid].state == FAILED and "put()" in str(owner.objects[oid].error)
