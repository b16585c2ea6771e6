"""The node table sent as versioned changes (node_table.py): pure, no processes."""

from farpool._private.node_table import Changes, NodeTable


def record(node_id, cpu=4.0, alive=True, **more):
    return dict({"node_id": node_id, "alive": alive, "total": {"CPU": 4.0}, "available": {"CPU": cpu},
                 "tcp": f"{node_id}:1", "stats": {"object_store": {"used": 0}}}, **more)


def test_a_subscriber_that_starts_whole_follows_every_change():
    head = Changes(epoch=1)
    nodes = {"a": record("a")}
    head.take(nodes)
    sub = NodeTable()
    sub.full(head.version, list(nodes.values()))

    nodes["b"] = record("b")                       # joins: its whole record goes
    nodes["a"]["available"] = {"CPU": 1.0}         # busy: only what changed goes
    base, version, changes = head.take(nodes)
    assert base == (1, 1) and version == (1, 2)
    assert {"node_id": "a", "available": {"CPU": 1.0}} in changes
    joined = next(c for c in changes if c["node_id"] == "b")
    assert joined["tcp"] == "b:1" and "stats" not in joined
    rows = sub.delta(base, version, changes)
    assert [r["node_id"] for r in rows] == ["a", "b"]
    assert rows[0]["available"] == {"CPU": 1.0} and rows[0]["stats"] == {"object_store": {"used": 0}}

    nodes["b"].update(alive=False, death_reason="no heartbeat for 11 s")
    rows = sub.delta(*head.take(nodes))
    assert rows[1]["alive"] is False and rows[1]["death_reason"] == "no heartbeat for 11 s"
    assert sub.version == head.version == (1, 3)


def test_statistics_alone_send_nothing_and_a_change_made_in_place_is_seen():
    head = Changes()
    nodes = {"a": record("a")}
    head.take(nodes)
    nodes["a"]["stats"] = {"object_store": {"used": 123}}
    assert head.take(nodes) is None
    nodes["a"]["available"]["CPU"] = 0.0  # the same dict, changed in place
    _, _, changes = head.take(nodes)
    assert changes == [{"node_id": "a", "available": {"CPU": 0.0}}]


def test_a_field_gone_from_a_record_is_removed_from_the_copies():
    head = Changes()
    nodes = {"a": record("a", death_reason="old")}
    sub = NodeTable()
    head.take(nodes)
    sub.full(head.version, list(nodes.values()))
    del nodes["a"]["death_reason"]
    rows = sub.delta(*head.take(nodes))
    assert "death_reason" not in rows[0]


def test_a_gap_or_another_epoch_asks_for_the_whole_table():
    head = Changes(epoch=3)
    nodes = {"a": record("a")}
    head.take(nodes)
    sub = NodeTable()
    sub.full(head.version, list(nodes.values()))
    nodes["a"]["available"] = {"CPU": 2.0}
    head.take(nodes)                                  # this one is lost on the way
    nodes["a"]["available"] = {"CPU": 3.0}
    assert sub.delta(*head.take(nodes)) is None       # a gap: nothing applied
    assert sub.nodes["a"]["available"] == {"CPU": 4.0}
    assert NodeTable().delta((3, 0), (3, 1), []) is None  # never had it whole
    restarted = Changes(epoch=4)                      # a new head counts from (4, 0)
    sub.full(head.version, list(nodes.values()))
    assert sub.delta(*restarted.take(nodes)) is None
    rows = sub.full(restarted.version, list(nodes.values()))
    assert rows[0]["available"] == {"CPU": 3.0} and sub.version == (4, 1)


def test_a_change_applied_twice_is_harmless():
    """SyncNodes answers the rows as they are now at the version last sent: the next delta
    may carry changes the subscriber has already."""
    head = Changes()
    nodes = {"a": record("a")}
    head.take(nodes)
    nodes["a"]["available"] = {"CPU": 0.5}
    sub = NodeTable()
    sub.full(head.version, [dict(n) for n in nodes.values()])  # already shows 0.5
    rows = sub.delta(*head.take(nodes))
    assert rows[0]["available"] == {"CPU": 0.5} and sub.version == head.version


def test_a_subscriber_that_joins_between_batches_gets_the_table_as_sent_then_the_rest():
    """The head answers a joining node with the rows as last sent (node_table.Changes.rows):
    what changed since, its own record included, comes in the next delta."""
    head = Changes(epoch=2)
    nodes = {"a": record("a")}
    head.take(nodes)
    nodes["b"] = record("b")                  # joins; not sent yet (the batch is still open)
    nodes["a"]["available"] = {"CPU": 2.0}
    sub = NodeTable()
    rows = sub.full(head.version, head.rows())
    assert [r["node_id"] for r in rows] == ["a"] and rows[0]["available"] == {"CPU": 4.0}
    assert all("stats" not in r for r in rows)
    rows = sub.delta(*head.take(nodes))
    assert [r["node_id"] for r in rows] == ["a", "b"] and rows[0]["available"] == {"CPU": 2.0}
