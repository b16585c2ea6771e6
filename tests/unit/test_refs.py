"""The reference table (refs.py) fed events without any process, socket or thread.

Each test checks what the table says to do (its outbox) and calls
``validate_state`` after every event.
"""

import threading

import pytest

from farpool._private import protocol
from farpool._private.refs import FAILED, PENDING, READY, Entry, Location, RefTable

ME = b"c:me"
OWNER = (b"c:owner", "node-o", None, 11)
BORROWER = (b"c:b", "node-b", None, 12)
OTHER = (b"c:other", "node-x", None, 13)


class Ref:
    """What the table reads of an ObjectRef: its id and owner."""

    def __init__(self, oid, owner):
        self._id, self._owner = oid, owner


@pytest.fixture
def table():
    t = RefTable(ME, in_worker=False)
    t.peer_address = (ME, "node-me", None, 10)
    return t


def check(table):
    table.validate_state()


def sent(table):
    """The owner messages queued, as (tag, owner identity, fields), and the queue emptied."""
    out = []
    while table.owner_messages:
        owner, frames = table.owner_messages.popleft()
        tag, fields, _ = protocol.decode(frames)
        out.append((tag, owner[0], fields))
    return out


def own(table, oid, state=READY, location=None):
    table.objects[oid] = Entry(state=state, location=location, size=location[4] if location else 0)
    table.add_ref(Ref(oid, (ME,)))
    check(table)


def test_an_owned_object_goes_with_its_last_local_ref_and_frees_its_segment(table):
    location = Location("seg", "node-me", b"s1", "/dev/shm/x", 4096)
    own(table, b"o1", location=location)
    table.add_ref(Ref(b"o1", (ME,)))
    assert table.release(b"o1") is False
    check(table)
    assert b"o1" in table.objects and not table.frees
    table.release(b"o1")
    check(table)
    assert b"o1" not in table.objects
    assert table.frees == {"node-me": [b"s1"]}


def test_copies_are_freed_with_the_original(table):
    own(table, b"o1", location=Location("seg", "node-me", b"s1", "/p", 10))
    table.objects[b"o1"].copies = {"node-2", "node-3"}
    table.release(b"o1")
    assert table.frees == {"node-me": [b"s1"], "node-2": [b"s1"], "node-3": [b"s1"]}


def test_a_pending_owned_object_stays_until_its_task_ends(table):
    own(table, b"t1", state=PENDING)
    table.release(b"t1")
    check(table)
    assert b"t1" in table.objects  # its result is still to come: the task may need it
    entry = table.objects[b"t1"]
    with table.lock:
        entry.state = FAILED
        table.delete_if_unreferenced(b"t1", entry)
    check(table)
    assert b"t1" not in table.objects


def test_a_release_while_the_lock_is_held_is_queued_and_counted_later(table):
    own(table, b"o1")
    with table.lock:  # e.g. ObjectRef.__del__ run by the GC inside a locked section
        assert table.release(b"o1") is True
        assert b"o1" in table.objects
    check(table)
    table.drain_released()
    check(table)
    assert b"o1" not in table.objects


def test_a_release_from_another_thread_never_waits_for_the_lock(table):
    own(table, b"o1")
    queued = []
    with table.lock:
        t = threading.Thread(target=lambda: queued.append(table.release(b"o1")))
        t.start()
        t.join(timeout=30)
    assert queued == [True]
    table.drain_released()
    assert b"o1" not in table.objects


def test_a_borrowed_ref_is_released_to_its_owner_only_once_registered(table):
    table.add_ref(Ref(b"b1", OWNER))
    check(table)
    table.release(b"b1")
    check(table)
    assert b"b1" not in table.objects and sent(table) == []  # never counted: nothing to say
    table.add_ref(Ref(b"b2", OWNER))
    table.mark_registered([b"b2"])
    table.release(b"b2")
    check(table)
    assert sent(table) == [("BorrowReleased", OWNER[0], (b"b2",))]


def test_a_kept_ref_from_a_caller_that_is_not_its_owner_is_reported_to_the_owner_too(table):
    table.add_ref(Ref(b"b1", OWNER))
    table.mark_registered([b"b1"], caller=OTHER)
    check(table)
    assert sent(table) == [("AddBorrower", OWNER[0], (b"b1", table.peer_address, True))]
    table.mark_registered([b"b1"], caller=OWNER)
    assert sent(table) == []  # the owner is the caller: its reply counts us


def test_a_borrower_is_watched_from_its_first_borrow_to_its_last_release(table):
    own(table, b"o1")
    own(table, b"o2")
    table.borrower_reported(b"o1", BORROWER, None)
    table.borrower_reported(b"o2", BORROWER, None)
    check(table)
    assert list(table.watches) == [("watch", BORROWER)]  # one watch per borrower, not per object
    table.release(b"o1")
    table.release(b"o2")
    assert set(table.objects) == {b"o1", b"o2"}  # borrowed: they stay
    table.borrow_released(BORROWER[0], b"o1")
    check(table)
    assert b"o1" not in table.objects and table.is_watched(BORROWER[0])
    table.borrow_released(BORROWER[0], b"o2")
    check(table)
    assert not table.objects and list(table.watches)[-1] == ("unwatch", BORROWER[0])


def test_a_dead_borrower_releases_everything_it_held(table):
    own(table, b"o1")
    own(table, b"o2")
    for oid in (b"o1", b"o2"):
        table.borrower_reported(oid, BORROWER, None)
        table.release(oid)
    assert table.borrowers_on({"node-b"}) == [BORROWER[0]]
    table.borrower_died(BORROWER[0])
    check(table)
    assert not table.objects and not table.is_watched(BORROWER[0])
    table.borrower_died(BORROWER[0])  # told twice (pidfd and its node's death): nothing more
    check(table)


def test_a_release_that_overtakes_its_add_borrower_cancels_it(table):
    own(table, b"o1")
    table.borrow_released(BORROWER[0], b"o1")  # from the borrower, before the lender's report
    check(table)
    table.borrower_reported(b"o1", BORROWER, None)
    check(table)
    assert BORROWER[0] not in table.objects[b"o1"].borrowers and not table.watches


def test_refs_nested_in_a_result_live_as_long_as_the_result(table):
    own(table, b"r1")
    own(table, b"inner-mine")
    with table.lock:
        table.hold_nested(table.objects[b"r1"], [(b"inner-mine", (ME,)), (b"inner-theirs", OWNER)], OTHER)
    check(table)
    assert sent(table) == [("AddBorrower", OWNER[0], (b"inner-theirs", table.peer_address, True))]
    table.release(b"inner-mine")
    assert b"inner-mine" in table.objects  # pinned by r1
    table.release(b"r1")
    check(table)
    assert not table.objects
    assert sent(table) == [("BorrowReleased", OWNER[0], (b"inner-theirs",))]


def test_a_result_nobody_wants_gives_back_its_memory_and_borrows(table):
    with table.lock:
        table.discard_value(Location("seg", "node-w", b"s9", "/p", 10), [(b"x", OWNER)], OTHER)
    check(table)
    assert table.frees == {"node-w": [b"s9"]}
    assert sent(table) == [("AddBorrower", OWNER[0], (b"x", table.peer_address, True)),
                           ("BorrowReleased", OWNER[0], (b"x",))]


def test_the_last_handle_of_an_actor_ends_it(table):
    own(table, b"token")
    table.objects[b"token"].actor_id = "a1"
    table.release(b"token")
    check(table)
    assert list(table.ended_actors) == ["a1"]


def test_task_pins_keep_arguments_until_the_task_ends(table):
    own(table, b"arg")
    table.objects[b"arg"].task_pins += 1
    table.release(b"arg")
    assert b"arg" in table.objects
    with table.lock:
        table.unpin([b"arg"])
    check(table)
    assert b"arg" not in table.objects


def test_in_a_worker_a_ref_held_through_the_caller_is_reported_with_the_reply():
    table = RefTable(b"c:w", in_worker=True)
    table.peer_address = (b"c:w", "node-w", None, 20)
    table.add_ref(Ref(b"b1", OWNER))  # got in a task's arguments: not registered with the owner
    table.on_borrowers(OTHER, [b"b1"])  # a nested task we ran kept it
    check(table)
    assert sent(table) == []
    assert table.take_sub_borrowed() == [(b"b1", OTHER, OWNER, True)]
    assert table.take_sub_borrowed() == []


def test_arrivals_in_a_borrowed_value_become_counted_borrows(table):
    table.add_ref(Ref(b"a1", OWNER))
    table.register_arrivals([Ref(b"a1", OWNER)], in_task=False)
    check(table)
    assert sent(table) == [("AddBorrower", OWNER[0], (b"a1", table.peer_address))]
    table.register_arrivals([Ref(b"a1", OWNER)], in_task=False)
    assert sent(table) == []  # once


def test_lent_refs_of_a_third_party_are_reported_as_the_chains(table):
    table.lend_returned([Ref(b"x", OWNER)], BORROWER)
    assert sent(table) == [("AddBorrower", OWNER[0], (b"x", BORROWER, True))]
    own(table, b"mine")
    table.lend_returned([Ref(b"mine", (ME,))], BORROWER)
    check(table)
    assert BORROWER[0] in table.objects[b"mine"].borrowers


def test_validate_state_catches_a_borrower_that_is_not_watched(table):
    own(table, b"o1")
    table.objects[b"o1"].borrowers = {b"c:ghost"}  # (injected: not through add_borrower)
    with pytest.raises(AssertionError, match="not watched"):
        table.validate_state()


def test_validate_state_catches_an_unreferenced_object_left_behind(table):
    table.objects[b"o1"] = Entry(state=READY)
    with pytest.raises(AssertionError, match="unreferenced"):
        table.validate_state()


# ---------------------------------------------------------------------------- stored once by content
def stored_arg(table, oid, digest, node="node-me"):
    entry = Entry(state=READY, location=Location("seg", node, oid, "/p", 4 << 20), size=4 << 20, local_refs=1)
    table.add_stored(oid, entry, digest)
    return entry


def test_a_stored_argument_is_reused_while_it_lives(table):
    stored_arg(table, b"o1", b"d1")
    check(table)
    assert table.reuse_stored(b"d1") == b"o1" and table.objects[b"o1"].local_refs == 2
    assert table.reuse_stored(b"d2") is None
    table.release(b"o1")
    table.release(b"o1")
    assert b"o1" not in table.objects and table.by_content == {}
    assert table.frees == {"node-me": [b"o1"]}
    assert table.reuse_stored(b"d1") is None
    check(table)


def test_the_digest_stays_while_a_task_pins_the_argument(table):
    entry = stored_arg(table, b"o1", b"d1")
    entry.task_pins += 1
    table.release(b"o1")
    assert table.reuse_stored(b"d1") == b"o1"
    table.release(b"o1")
    table.unpin([b"o1"])
    assert table.by_content == {} and table.objects == {}
    check(table)


def test_the_content_table_is_bounded(table, monkeypatch):
    from farpool._private import refs
    monkeypatch.setattr(refs, "SHARED_MAX", 2)
    for i in range(3):
        stored_arg(table, b"o%d" % i, b"d%d" % i)
    assert list(table.by_content) == [b"d1", b"d2"]
    assert b"o0" in table.objects  # it lives on, no longer offered
    assert table.reuse_stored(b"d0") is None
    table.release(b"o0")
    assert list(table.by_content) == [b"d1", b"d2"]
    check(table)


def test_lineage_counts_a_stored_once_argument(table):
    class Task:
        task_id, name, state, lineage_kept = b"t1", "f", "DONE", False
        args_payload, arg_bufs, args_location, args_copies = b"", [], None, ()
        return_ids = [b"r1"]
        pinned = [b"o1"]
    entry = stored_arg(table, b"o1", b"d1")
    entry.task_pins += 1
    own(table, b"r1", location=Location("seg", "node-me", b"r1", "/r", 100))
    table.keep_lineage(Task())
    assert table.lineage_bytes >= 4 << 20
    check(table)


def test_a_newer_copy_of_the_same_bytes_keeps_its_digest(table, monkeypatch):
    """Two objects with one digest (the first was forgotten, the bytes stored again): freeing
    the older one leaves the newer one offered."""
    from farpool._private import refs
    monkeypatch.setattr(refs, "SHARED_MAX", 1)
    stored_arg(table, b"o1", b"d1")
    stored_arg(table, b"o3", b"d3")  # d1 forgotten, o1 lives on
    stored_arg(table, b"o2", b"d1")  # the same bytes again: stored again
    table.release(b"o1")
    assert table.reuse_stored(b"d1") == b"o2"
    check(table)
