"""The owner's count of a borrower that kept a ref passed on by another borrower.

Such a keep is reported twice: by the borrower itself ("direct") and up the chain of
callers ("chain"), in either order, or once when a caller in the chain died.  The
owner counts the borrower from the first report to its release; a chain report
arriving after the release must not count it again.  A ref returned inside a value
by a worker that does not own it is reported the same two ways: by the worker (chain)
and by the caller that gets the value (direct).  Fed without any process.
"""

import itertools

import pytest

from farpool._private import client as client_mod

B2 = (b"c:b2", "node-b", None, 4242)  # on another node: watched through its agent (not run here)


@pytest.fixture
def owner():
    c = client_mod.CoreClient({})
    c.loop.call_soon = lambda *a: None  # the I/O thread does not run: no watch is sent
    yield c
    c.loop.close()


def put(owner):
    oid = owner.new_object_id()
    owner.objects[oid] = client_mod.Entry(state=client_mod.READY, local_refs=1)
    return oid


def counted(owner, oid):
    entry = owner.objects.get(oid)
    return entry is not None and B2[0] in entry.borrowers


def report(owner, oid, how):
    with owner.lock:
        owner.refs.add_borrower(oid, owner.objects[oid], B2, how)
    owner.refs.validate_state()


def release(owner, oid):
    owner.borrowing.borrow_released(B2[0], oid)
    owner.refs.validate_state()


@pytest.mark.parametrize("order", [("direct", "chain"), ("chain", "direct")])
def test_counted_from_either_report_until_the_release(owner, order):
    oid = put(owner)
    report(owner, oid, order[0])
    assert counted(owner, oid)
    report(owner, oid, order[1])
    assert counted(owner, oid)
    release(owner, oid)
    assert not counted(owner, oid) and not owner.objects[oid].kept_reports


def test_a_chain_report_after_the_release_does_not_count_again(owner):
    oid = put(owner)
    report(owner, oid, "direct")
    release(owner, oid)
    report(owner, oid, "chain")
    assert not counted(owner, oid) and not owner.objects[oid].kept_reports
    owner.objects[oid].local_refs = 0
    with owner.lock:
        owner.refs._release_borrow(b"nobody", oid, owner.objects[oid])
    assert oid not in owner.objects  # nothing holds it: freed


def test_a_lost_chain_report_leaves_later_keeps_counted(owner):
    oid = put(owner)
    report(owner, oid, "direct")  # its chain report is lost: a caller died
    release(owner, oid)
    for first, second in itertools.repeat(("direct", "chain"), 2):
        report(owner, oid, first)
        assert counted(owner, oid)
        report(owner, oid, second)
        assert counted(owner, oid)
        release(owner, oid)
        assert not counted(owner, oid)


def test_reports_of_refs_not_kept_count_as_before(owner):
    oid = put(owner)
    report(owner, oid, None)
    assert counted(owner, oid)
    release(owner, oid)
    report(owner, oid, None)
    assert counted(owner, oid)


# A ref owned by a third party O, returned inside a value by worker W to caller C: W tells
# O (a chain report, lend_returned), C tells O itself when the value arrives (a direct
# report, ahead of its release).  Below, ``owner`` plays O, C is B2, and W is another process.
W = (b"c:w", "node-b", None, 4343)
C = B2


def on_wire(owner, sender, tag, fields):
    owner.object_service.on_request(sender[0], tag, fields, remote=True)
    owner.refs.validate_state()


def lend_from_w(owner, oid):
    on_wire(owner, W, "AddBorrower", (oid, C, True))


def direct_from_c(owner, oid):
    on_wire(owner, C, "AddBorrower", (oid, C, True))


def release_from_c(owner, oid):
    on_wire(owner, C, "BorrowReleased", (oid,))


# C's release always follows its own report (one FIFO); W's lend may come at any point.
@pytest.mark.parametrize("already_counted", [False, True])
@pytest.mark.parametrize("lend_at", [0, 1, 2])
def test_a_lend_for_a_returned_ref_never_outlives_the_callers_release(owner, already_counted, lend_at):
    oid = put(owner)
    if already_counted:  # C borrowed it before (e.g. in a task's arguments, from us)
        report(owner, oid, None)
    steps = [direct_from_c, release_from_c]
    steps.insert(lend_at, lend_from_w)
    released = False
    for step in steps:
        step(owner, oid)
        released = released or step is release_from_c
        assert counted(owner, oid) is not released
    assert not owner.objects[oid].kept_reports


def test_a_returned_ref_whose_lender_died_first_is_counted_from_the_callers_report(owner):
    oid = put(owner)
    direct_from_c(owner, oid)  # W's lend never left
    assert counted(owner, oid)
    release_from_c(owner, oid)
    assert not counted(owner, oid)


# ------------------------------------------------------------ the caller's and the lender's side
O = (b"c:o", "node-o", None, 4444)


@pytest.fixture
def caller():
    c = client_mod.CoreClient({})
    c.loop.call_soon = lambda *a: None
    c.peer_address = c.refs.peer_address = (c.identity, "node-c", None, 4545)
    yield c
    c.loop.close()


def sent(client):
    """(tag, destination identity, fields) of the messages queued for owners, in order."""
    out = []
    for owner, frames in client.refs.owner_messages:
        tag, fields, _ = client_mod.protocol.decode(frames)
        out.append((tag, owner[0], fields))
    return out


def finish(client, inner, wanted=True):
    """A task's result that came from W with refs ``inner`` ((id, owner) pairs) nested in it."""
    task_id = client.new_object_id()
    task = client_mod.TaskRecord(task_id, None, b"", [], [], [task_id], {}, (), 0, False, [], "t")
    if wanted:
        client.objects[task_id] = client_mod.Entry(task=task, local_refs=1)
    client.completion.finish_ok([(task, [(b"payload", [])], [inner])], W)
    return task_id


def test_the_caller_reports_a_returned_ref_it_now_borrows_unless_the_lender_owns_it(caller):
    from_o, from_w, ours = b"o-ref", b"w-ref", caller.new_object_id()
    caller.objects[ours] = client_mod.Entry(state=client_mod.READY, local_refs=1)
    result = finish(caller, [(from_o, O), (from_w, W), (ours, caller.owner_address or (caller.identity,))])
    assert sent(caller) == [("AddBorrower", O[0], (from_o, caller.peer_address, True))]
    assert caller.objects[from_o].registered and caller.objects[from_w].registered
    caller.refs.owner_messages.clear()
    caller.release_ref(result)  # the result goes, and our borrows with it: releases follow
    assert sent(caller) == [("BorrowReleased", O[0], (from_o,)), ("BorrowReleased", W[0], (from_w,))]


def test_refs_in_a_result_nobody_wants_are_reported_then_released(caller):
    from_o, from_w = b"o-ref", b"w-ref"
    finish(caller, [(from_o, O), (from_w, W)], wanted=False)
    assert sent(caller) == [("AddBorrower", O[0], (from_o, caller.peer_address, True)),
                            ("BorrowReleased", O[0], (from_o,)),
                            ("BorrowReleased", W[0], (from_w,))]


def test_a_ref_in_an_unwanted_result_that_the_caller_holds_itself_stays_counted(caller):
    held = b"o-ref"
    caller.objects[held] = client_mod.Entry(owned=False, owner=O, registered=True, local_refs=1)
    finish(caller, [(held, O)], wanted=False)
    assert sent(caller) == [("AddBorrower", O[0], (held, caller.peer_address, True))]  # no release
    caller.refs.owner_messages.clear()
    caller.release_ref(held)
    assert sent(caller) == [("BorrowReleased", O[0], (held,))]


def test_the_lender_flags_its_report_as_the_chains(caller):
    lender = caller  # a worker returning refs owned by O
    refs = [client_mod.ObjectRef(b"o-ref", O, _register=False)]
    lender.lend_returned(refs, C)
    lender.lend_returned(refs, lender.peer_address)  # to itself: no report of its own will follow
    assert sent(lender) == [("AddBorrower", O[0], (b"o-ref", C, True)),
                            ("AddBorrower", O[0], (b"o-ref", lender.peer_address, False))]
