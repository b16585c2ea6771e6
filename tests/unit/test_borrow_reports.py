"""The owner's count of a borrower that kept a ref passed on by another borrower.

Such a keep is reported twice: by the borrower itself ("direct") and up the chain of
callers ("chain"), in either order, or once when a caller in the chain died.  The
owner counts the borrower from the first report to its release; a chain report
arriving after the release must not count it again.  Fed without any process.
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
        owner._add_borrower(oid, owner.objects[oid], B2, how)


def release(owner, oid):
    owner._borrow_released(B2[0], oid)


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
        owner._release_borrow(b"nobody", oid, owner.objects[oid])
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
