"""An owner asked to copy what a draining node holds (stored.py ``save_from``), fed without
any process: which of its objects it has copied, where, and what it answers the node."""

import types

import pytest

from farpool._private import client as client_mod, protocol, transport
from farpool._private.refs import READY, Entry, Location


@pytest.fixture
def owner(monkeypatch):
    c = client_mod.CoreClient({})
    c.loop.call_soon = lambda *a: None  # the I/O thread does not run
    c.conns.home = types.SimpleNamespace(node_id="home", local=True, socket="home-socket")
    c.nodes = [{"node_id": "home", "alive": True}, {"node_id": "leaving", "alive": True, "draining": True},
               {"node_id": "other", "alive": True}]
    c.asked = []  # (socket, tag, fields, answer)
    c.conns.request_async = lambda sock, tag, fields, answer: c.asked.append((sock, tag, fields, answer))
    c.sent = []
    monkeypatch.setattr(transport, "send", lambda sock, frames: c.sent.append((sock, protocol.decode(frames))))
    yield c
    c.loop.close()


def stored(owner, tag: bytes, node: str, copies=None, owned=True, state=READY):
    oid = tag * 16
    entry = Entry(state=state, owned=owned, location=Location("seg", node, oid + b"\0", "/p", 1 << 20),
                  copies=copies, local_refs=1)
    owner.objects[oid] = entry
    return oid, entry


def test_what_only_the_leaving_node_holds_is_copied_home_and_the_node_is_told(owner):
    only, only_entry = stored(owner, b"a", "leaving")
    copied_elsewhere, _ = stored(owner, b"b", "leaving", copies={"other"})  # a live copy exists
    not_there, _ = stored(owner, b"c", "other")
    borrowed, _ = stored(owner, b"d", "leaving", owned=False)
    leaving = types.SimpleNamespace(socket="leaving-socket")
    ids = [owner.objects[o].location.store_id for o in (only, copied_elsewhere, not_there, borrowed)]
    owner.stored.save_from(leaving, "leaving", ids)
    ((sock, tag, fields, answer),) = owner.asked  # one copy asked, of our agent, from the leaving node
    assert (sock, tag) == ("home-socket", "PullObject") and fields[0] == only_entry.location.store_id
    assert fields[2] == ["leaving"]
    assert owner.sent == []  # the node waits for our answer until the copy is made
    answer(("/dev/shm/copy", None, False))
    assert only_entry.copies == {"home"}  # a copy: freed with the original, read when the node is gone
    ((sock, (tag, fields, _)),) = owner.sent
    assert (sock, tag, tuple(fields)) == ("leaving-socket", "ObjectsSaved", ("leaving", 1, 0))


def test_an_owner_whose_own_node_leaves_answers_at_once_and_copies_nothing(owner):
    owner.conns.home.node_id = "leaving"
    oid, entry = stored(owner, b"a", "leaving")
    owner.stored.save_from(types.SimpleNamespace(socket="s"), "leaving", [entry.location.store_id])
    assert owner.asked == []
    assert [(tag, tuple(fields)) for _, (tag, fields, _) in owner.sent] == [("ObjectsSaved", ("leaving", 0, 1))]
