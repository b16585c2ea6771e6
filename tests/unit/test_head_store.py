"""The head's tables on disk (head_store.py) and what a restarted head makes of them
(head_tables.py, and head.Head started on a database), without any process: the head
is made in this process with its sockets on a temporary session directory, and what
it sends is recorded instead."""

import os
import sqlite3

import pytest

from farpool._private import head as head_mod
from farpool._private import head_store, head_tables, protocol, transport
from farpool._private.actor_table import ALIVE, DEAD, PENDING, RESTARTING, ActorTable


# ---------------------------------------------------------------------------- the store
def test_what_is_put_is_loaded_back_by_a_new_store(tmp_path):
    path = str(tmp_path / "head.db")
    store = head_store.HeadStore(path)
    store.put("meta", "epoch", 3)
    store.put("kv", "pkg", b"\x00zip bytes")
    store.put("nodes", "n1", {"node_id": "n1", "alive": True})
    store.put("jobs", 7, {"job_id": 7, "running": True})
    store.put("placement_groups", "pg1", {"bundles": [{"CPU": 1}]})
    store.put("kv", "gone", b"x")
    store.delete("kv", "gone")
    spec = {"name": "keeper", "namespace": "ns", "detached": True, "job_id": 7, "cls_bytes": b"c" * 100}
    store.put_actor("a1", spec, {"state": PENDING})
    store.put_actor("a1", None, {"state": ALIVE})  # a state change in the same batch keeps the spec
    assert store.flush()
    store.close()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    loaded = head_store.HeadStore(path)
    try:
        tables = loaded.load()
    finally:
        loaded.close()
    assert tables["meta"] == {"epoch": 3}
    assert tables["kv"] == {"pkg": b"\x00zip bytes"}
    assert tables["nodes"]["n1"]["alive"] is True
    assert tables["jobs"] == {"7": {"job_id": 7, "running": True}}
    assert tables["placement_groups"]["pg1"]["bundles"] == [{"CPU": 1}]
    assert tables["actors"] == {"a1": (spec, {"state": ALIVE})}
    with sqlite3.connect(path) as db:  # names and namespaces are columns a person can query
        assert db.execute("SELECT name, namespace, detached FROM actors").fetchall() == [("keeper", "ns", 1)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_store_never_closed_still_has_what_was_flushed(tmp_path):
    """A head killed with kill -9: what its writer committed is in the WAL, and a new head reads it."""
    path = str(tmp_path / "head.db")
    store = head_store.HeadStore(path)
    store.put("meta", "next_job", 12)
    assert store.flush()
    other = head_store.HeadStore(path)  # while the first is still open (its process "died")
    try:
        assert other.load()["meta"] == {"next_job": 12}
    finally:
        other.close()
        store.close()


def test_an_unknown_table_is_refused_naming_the_tables(tmp_path):
    store = head_store.HeadStore(str(tmp_path / "head.db"))
    try:
        with pytest.raises(ValueError, match="no table 'groups'.*placement_groups"):
            store.put("groups", "k", 1)
    finally:
        store.close()


def test_copy_database_copies_a_saved_head_and_names_what_is_missing(tmp_path):
    source, target = tmp_path / "old", tmp_path / "new"
    source.mkdir()
    target.mkdir()
    with pytest.raises(ValueError, match="no head database in .*old"):
        head_store.copy_database(str(source), str(target))
    store = head_store.HeadStore(str(source / "head.db"))
    store.put("kv", "k", b"v")
    assert store.flush()
    head_store.copy_database(str(source), str(target))  # while the old one is open, as a live head's
    store.close()
    copy = head_store.HeadStore(str(target / "head.db"))
    try:
        assert copy.load()["kv"] == {"k": b"v"}
    finally:
        copy.close()


# ---------------------------------------------------------------------------- restore and reconcile (pure)
def _rows(*records):
    return {r.actor_id: (r.spec, head_tables.actor_state(r)) for r in records}


def test_restored_actors_keep_their_names_and_requests_of_a_new_epoch_never_collide():
    old = ActorTable()
    old.register("a1", {"name": "keeper", "namespace": "ns", "max_restarts": 1, "place_shape": {}})
    old.register("a2", {"name": None, "place_shape": {}})
    old.actors["a1"].state, old.actors["a1"].lease_id, old.actors["a1"].node_id = ALIVE, 4, "n1"
    old.actors["a2"].request_id, old.actors["a2"].node_id = 9, "n1"  # its lease request is out
    table = ActorTable()
    requests = head_tables.restore_actors(table, _rows(*old.actors.values()), epoch=2)
    assert table.lookup("keeper", "ns").actor_id == "a1"
    assert table.actors["a1"].restarts_left == 1 and table.actors["a1"].lease_id == 4
    assert requests == {9: "a2"}
    assert table.next_request() == head_tables.first_request_id(2) > 9


def test_a_dead_actor_does_not_take_the_name_from_a_live_one():
    old = ActorTable()
    old.register("dead", {"name": "svc", "namespace": None, "place_shape": {}})
    old.actors["dead"].state = DEAD
    old.register("live", {"name": "svc", "namespace": None, "place_shape": {}})
    for order in (["dead", "live"], ["live", "dead"]):
        table = ActorTable()
        head_tables.restore_actors(table, {a: _rows(old.actors[a])[a] for a in order}, epoch=2)
        assert table.lookup("svc", None).actor_id == "live"


def test_reconcile_keeps_held_actors_and_finds_lost_unconfirmed_and_stray_ones():
    table = ActorTable()
    for actor_id in ("kept", "lost", "unconfirmed", "waiting", "lost_request", "elsewhere"):
        table.register(actor_id, {"name": None, "place_shape": {}})
        table.actors[actor_id].node_id = "n1"
    table.actors["elsewhere"].node_id = "n2"
    table.actors["kept"].state, table.actors["kept"].lease_id = ALIVE, 1
    table.actors["lost"].state, table.actors["lost"].lease_id = ALIVE, 2
    table.actors["unconfirmed"].state, table.actors["unconfirmed"].lease_id = RESTARTING, 3
    table.actors["waiting"].request_id = 10
    table.actors["lost_request"].request_id = 11
    held = {"leases": [(1, "w1", "actor:kept:0"), (3, "w3", "actor:unconfirmed:1"), (5, "w5", "actor:x:0")],
            "requests": [10]}
    found = head_tables.reconcile(table, "n1", held)
    assert [r.actor_id for r in found.lost] == ["lost"]
    assert sorted(r.actor_id for r in found.kept) == ["kept", "waiting"]
    assert sorted(r.actor_id for r in found.recreate) == ["lost_request", "unconfirmed"]
    assert sorted(found.stray) == [3, 5]  # 5: no actor holds it; 3: created again, its worker goes


# ---------------------------------------------------------------------------- a head started on a database
class Recorder:
    def __init__(self, monkeypatch):
        self.sent = []
        monkeypatch.setattr(transport, "send", self.send)

    def send(self, sock, frames):
        self.sent.append(frames)
        return True

    def tags(self):
        out = []
        for frames in self.sent:
            frames = frames[1:]  # the identity
            if frames[0] == b"Relay":
                out.append(("Relay",))
                continue
            tag, fields, _ = protocol.decode(frames)
            out.append((tag, *fields))
        return out


def _head(tmp_path, name="s"):
    session_dir = tmp_path / name
    session_dir.mkdir(exist_ok=True)
    return head_mod.Head(str(session_dir), "token", None, 0, False, db_path=str(tmp_path / "head.db"))


def _actor_spec(name):
    return {"name": name, "namespace": "ns", "detached": True, "job_id": 1, "max_restarts": 1,
            "hold_shape": {}, "place_shape": {"CPU": 10000}, "options": {}, "cls_bytes": b"cls",
            "args_payload": b"", "arg_bufs": [], "ref_values": [], "ref_bufs": [], "job_setup": {},
            "class_name": "Counter", "meta": None}


NODE = {"node_id": "n1", "total": {"CPU": 10000}, "versions": None}


def test_a_head_restarted_on_its_database_knows_its_actors_jobs_and_keys(tmp_path, monkeypatch):
    sent = Recorder(monkeypatch)
    monkeypatch.setattr(head_mod.versions, "mismatch", lambda *a: None)
    first = _head(tmp_path)
    sock = object()
    first._on_Hello(sock, b"c:driver", "driver", {"pid": 1})
    first._on_RegisterNode(sock, b"node:n1", dict(NODE))
    first._on_KVPut(sock, b"c:driver", 1, "pkg", b"zip")
    first._on_CreateActor(sock, b"c:driver", 2, "a1", _actor_spec("keeper"))
    request_id = first.actors.actors["a1"].request_id
    first._on_LeaseGranted(sock, b"node:n1", request_id, 41, "w1", "/s/w-w1", "n1", [])
    first._on_ActorCreated(sock, b"node:n1", "a1", True, None)
    assert first.store.flush()
    first.loop.close()  # as if killed: no goodbye, its sockets and store left as they are
    first.ipc.close(0)

    sent.sent.clear()
    second = _head(tmp_path)
    try:
        assert second.epoch == 2 and second.kv == {"pkg": b"zip"} and second.next_job == 2
        assert second.actors.lookup("keeper", "ns").state == ALIVE
        assert second.unconfirmed == {"n1"} and second.unconfirmed_jobs == {1}
        # The node's heartbeat is answered "register again"; it does, holding the actor's lease.
        second._on_Heartbeat(sock, b"node:n1", "n1", {"CPU": 10000}, {})
        assert sent.tags()[-1][:2] == ("Error", "head-restarted")
        second._on_RegisterNode(sock, b"node:n1", dict(NODE, held={"leases": [(41, "w1", "actor:a1:0")],
                                                                    "requests": []}))
        assert second.unconfirmed == set() and second.actors.actors["a1"].state == ALIVE
        assert not [t for t in sent.tags() if t[0] in ("ReturnLease", "RequestLease")]
        # The driver says Hello again for its job; a new driver gets the next job.
        second._on_Hello(sock, b"c:driver", "driver", {"pid": 1, "job_id": 1, "rejoin": True})
        assert sent.tags()[-1][1]["job_id"] == 1 and second.unconfirmed_jobs == set()
        second._on_Hello(sock, b"c:other", "driver", {"pid": 2})
        assert sent.tags()[-1][1]["job_id"] == 2
        # Asked again to create an actor it has (the answer went with the old head): the same answer.
        second._on_CreateActor(sock, b"c:driver", 3, "a1", _actor_spec("keeper"))
        assert sent.tags()[-1] == ("ActorRegistered", 3, "a1", None, None)
    finally:
        second.close()


def test_an_actor_whose_worker_ended_while_the_head_was_away_is_restarted(tmp_path, monkeypatch):
    sent = Recorder(monkeypatch)
    monkeypatch.setattr(head_mod.versions, "mismatch", lambda *a: None)
    first = _head(tmp_path)
    sock = object()
    first._on_RegisterNode(sock, b"node:n1", dict(NODE))
    first._on_CreateActor(sock, b"c:driver", 2, "a1", _actor_spec("keeper"))
    first._on_LeaseGranted(sock, b"node:n1", first.actors.actors["a1"].request_id, 41, "w1", "/p", "n1", [])
    first._on_ActorCreated(sock, b"node:n1", "a1", True, None)
    assert first.store.flush()
    first.loop.close()
    first.ipc.close(0)
    sent.sent.clear()
    second = _head(tmp_path)
    try:
        second._on_RegisterNode(sock, b"node:n1", dict(NODE, held={"leases": [], "requests": []}))
        record = second.actors.actors["a1"]
        assert record.incarnation == 1 and record.restarts_left == 0
        assert "ended while the head was away" in record.cause
        lease = [t for t in sent.tags() if t[0] == "RequestLease"]
        assert lease and lease[0][1] >= head_tables.first_request_id(2)  # never one of the old head's ids
    finally:
        second.close()


def test_a_node_that_registers_again_twice_is_reconciled_once(tmp_path, monkeypatch):
    """Heartbeats queued while the head was away each get "register again": the second
    RegisterNode must not ask for the actor a second time."""
    sent = Recorder(monkeypatch)
    monkeypatch.setattr(head_mod.versions, "mismatch", lambda *a: None)
    first = _head(tmp_path)
    sock = object()
    first._on_RegisterNode(sock, b"node:n1", dict(NODE))
    first._on_CreateActor(sock, b"c:driver", 2, "a1", _actor_spec("keeper"))  # its lease request is out
    assert first.store.flush()
    first.loop.close()
    first.ipc.close(0)
    sent.sent.clear()
    second = _head(tmp_path)
    try:
        held = {"leases": [], "requests": []}  # the request went with the old head
        second._on_RegisterNode(sock, b"node:n1", dict(NODE, held=held))
        second._on_RegisterNode(sock, b"node:n1", dict(NODE, held=held))
        assert len([t for t in sent.tags() if t[0] == "RequestLease"]) == 1
    finally:
        second.close()
