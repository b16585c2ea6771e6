"""Placement groups without processes: the head's table (events in, actions out), the choice
of nodes, the node's bundles in its lease manager, and the translation of a task's options."""

import pytest

from farpool._private import options, placement_groups as pgs
from farpool._private.leases import LeaseManager, LeaseRequest
from farpool._private.placement_groups import COMMITTING, CREATED, PENDING, PREPARING, REMOVED, PlacementGroups
from farpool._private.scheduling import UNIT, make_totals

G1, G2 = "a" * 16, "b" * 16


def cpu(n):
    return {"CPU": int(n * UNIT)}


def node(node_id, cpus, alive=True, free=None, **extra):
    total = dict(cpu(cpus), **{k: int(v * UNIT) for k, v in extra.items()})
    return {"node_id": node_id, "alive": alive, "total": total,
            "available": dict(total) if free is None else dict(cpu(free))}


def table(nodes, embedded=False):
    t = PlacementGroups(embedded)
    t.nodes_changed(nodes)
    return t


def reserve(t, acts):
    """Answer every prepare and commit of ``acts`` (and what they lead to) with ok; the actions."""
    out = []
    while acts.prepare or acts.commit:
        out.append(acts)
        more = pgs.Actions()
        for node_id, pg_id, attempt, _items in acts.prepare:
            more.extend(t.prepared(pg_id, attempt, node_id, True))
            t.validate_state()
        for node_id, pg_id, attempt, _indexes in acts.commit:
            more.extend(t.committed(pg_id, attempt, node_id))
            t.validate_state()
        acts = more
    out.append(acts)
    return out


# ---------------------------------------------------------------------- choosing nodes
CAP = {"n1": cpu(4), "n2": cpu(2), "n3": cpu(1)}


def test_strict_pack_puts_every_bundle_on_one_node_or_none():
    assert pgs.place("STRICT_PACK", [cpu(1), cpu(2)], CAP) == {0: "n1", 1: "n1"}
    assert pgs.place("STRICT_PACK", [cpu(3), cpu(2)], CAP) is None


def test_pack_prefers_one_node_and_spills_over_when_it_must():
    assert set(pgs.place("PACK", [cpu(1), cpu(1)], CAP).values()) == {"n1"}
    spread = pgs.place("PACK", [cpu(4), cpu(2)], CAP)
    assert spread == {0: "n1", 1: "n2"}


def test_spread_uses_as_many_nodes_as_it_can():
    assert sorted(pgs.place("SPREAD", [cpu(1)] * 3, CAP).values()) == ["n1", "n2", "n3"]
    four = pgs.place("SPREAD", [cpu(1)] * 4, CAP)
    assert set(four.values()) == {"n1", "n2", "n3"}


def test_strict_spread_gives_each_bundle_its_own_node_and_searches_past_a_greedy_dead_end():
    # Greedy would put the 1-CPU bundle on the roomiest node (n1), leaving no node for the 3-CPU one.
    assert pgs.place("STRICT_SPREAD", [cpu(1), cpu(3)], {"n1": cpu(4), "n2": cpu(1)}) == {0: "n2", 1: "n1"}
    assert pgs.place("STRICT_SPREAD", [cpu(1)] * 4, CAP) is None


def test_fixed_bundles_bind_the_rest():
    assert pgs.place("STRICT_SPREAD", [cpu(1)] * 2, CAP, fixed={0: "n1"}) == {1: "n2"}
    # (``capacity`` is what is free: the fixed bundles hold theirs already)
    assert pgs.place("STRICT_PACK", [cpu(1)] * 2, dict(CAP, n3=cpu(0)), fixed={0: "n3"}) is None
    assert pgs.place("STRICT_PACK", [cpu(1)] * 2, CAP, fixed={0: "n3"}) == {1: "n3"}


# ---------------------------------------------------------------------- the table
def test_reservation_prepares_on_every_chosen_node_then_commits():
    t = table([node("n1", 2), node("n2", 2)])
    acts, error = t.create(G1, [cpu(2), cpu(2)], "STRICT_SPREAD")
    assert error is None
    assert sorted((n, items) for n, _, _, items in acts.prepare) == [("n1", [(0, cpu(2))]), ("n2", [(1, cpu(2))])] \
        or sorted((n, items) for n, _, _, items in acts.prepare) == [("n1", [(1, cpu(2))]), ("n2", [(0, cpu(2))])]
    assert not acts.commit and t.get(G1).state == PREPARING
    t.validate_state()
    first = acts.prepare[0]
    assert not t.prepared(G1, first[2], first[0], True).commit  # the other has not answered
    second = acts.prepare[1]
    commit = t.prepared(G1, second[2], second[0], True)
    assert sorted(n for n, *_ in commit.commit) == ["n1", "n2"] and t.get(G1).state == COMMITTING
    assert not t.committed(G1, commit.commit[0][2], commit.commit[0][0]).created
    done = t.committed(G1, commit.commit[1][2], commit.commit[1][0])
    assert [g.pg_id for g in done.created] == [G1] and t.get(G1).state == CREATED
    assert sorted(t.table()[G1]["bundles_to_node_id"].values()) == ["n1", "n2"]
    t.validate_state()


def test_a_refusal_aborts_every_node_of_the_attempt_and_waits_for_a_new_view():
    t = table([node("n1", 2), node("n2", 2)])
    acts, _ = t.create(G1, [cpu(2), cpu(2)], "STRICT_SPREAD")
    (n_a, _, attempt, _), (n_b, *_), = acts.prepare
    t.prepared(G1, attempt, n_a, True)
    refused = t.prepared(G1, attempt, n_b, False, "busy")
    assert sorted(n for n, *_ in refused.abort) == ["n1", "n2"]  # the refuser releases too (no harm)
    assert not refused.prepare and t.get(G1).state == PENDING and t.in_flight is None
    t.validate_state()
    # The same view again: not tried (no loop of refusals); a changed one: tried again.
    assert not t.nodes_changed([node("n1", 2), node("n2", 2)]).prepare
    again = t.nodes_changed([node("n1", 2), node("n2", 2, free=1)])
    assert not again.prepare  # does not fit now
    again = t.nodes_changed([node("n1", 2), node("n2", 3)])
    assert {a for _, _, a, _ in again.prepare} == {attempt + 1}
    # A late answer of the old attempt changes nothing.
    assert not t.prepared(G1, attempt, n_a, True).commit
    t.validate_state()


def test_two_competing_groups_never_hold_parts_of_each_other():
    """Two nodes of 1 CPU and two groups of two 1-CPU bundles each: reserving both at once
    could give each group one node and leave both waiting for ever; one at a time cannot."""
    t = table([node("n1", 1), node("n2", 1)])
    a, _ = t.create(G1, [cpu(1), cpu(1)], "STRICT_SPREAD")
    b, _ = t.create(G2, [cpu(1), cpu(1)], "STRICT_SPREAD")
    assert not b.prepare and t.get(G2).state == PENDING  # waits while G1 is in flight
    for node_id, pg_id, attempt, _ in a.prepare:
        acts = t.prepared(pg_id, attempt, node_id, True)
        assert t.get(G2).state == PENDING
        t.validate_state()
    t.nodes_changed([node("n1", 1, free=0), node("n2", 1, free=0)])  # the agents' answers: nothing free
    for node_id, pg_id, attempt, _ in acts.commit:
        assert not t.committed(pg_id, attempt, node_id).prepare  # G1 is done; G2 does not fit
    assert t.get(G1).state == CREATED and t.get(G2).state == PENDING
    freed = t.remove(G1, "removed")
    assert [g.pg_id for g in freed.removed] == [G1]
    back = t.nodes_changed([node("n1", 1), node("n2", 1)])
    reserve(t, back)
    assert t.get(G2).state == CREATED and t.get(G1).state == REMOVED
    t.validate_state()


def test_a_group_that_does_not_fit_now_does_not_hold_up_those_behind_it():
    t = table([node("n1", 2)])
    big, _ = t.create(G1, [cpu(2)], "PACK")
    reserve(t, big)
    t.nodes_changed([node("n1", 2, free=0)])
    _, error = t.create(G2, [cpu(2)], "PACK")
    assert error is None and t.get(G2).state == PENDING
    small, _ = t.create("c" * 16, [cpu(1)], "PACK")
    assert not small.prepare  # nothing free
    t.nodes_changed([node("n1", 3, free=1)])
    assert t.get("c" * 16).state == PREPARING  # behind G2, but G2 does not fit: it goes first


def test_infeasible_fails_at_once_when_embedded_and_warns_once_then_waits_on_a_cluster():
    t = table([node("n1", 2)], embedded=True)
    acts, error = t.create(G1, [cpu(1)] * 2, "STRICT_SPREAD")
    assert "cannot be placed" in error and "cannot grow" in error and G1 not in t.groups
    t = table([node("n1", 2)])
    acts, error = t.create(G1, [cpu(1)] * 2, "STRICT_SPREAD")
    assert error is None and len(acts.warnings) == 1 and "waits until nodes that fit join" in acts.warnings[0]
    assert not t.nodes_changed([node("n1", 2, free=1)]).warnings  # one warning, not one per change
    joined = t.nodes_changed([node("n1", 2), node("n2", 1)])
    assert sorted(n for n, *_ in joined.prepare) == ["n1", "n2"]
    reserve(t, joined)
    assert t.get(G1).state == CREATED


def test_remove_in_flight_frees_the_way_for_the_next():
    t = table([node("n1", 1)])
    a, _ = t.create(G1, [cpu(1)], "PACK")
    t.create(G2, [cpu(1)], "PACK")
    acts = t.remove(G1, "removed by the user")
    assert [g.pg_id for g in acts.removed] == [G1] and t.get(G1).cause == "removed by the user"
    assert [p[1] for p in acts.prepare] == [G2]
    assert not t.prepared(G1, a.prepare[0][2], "n1", True).commit  # answers for it are ignored
    t.validate_state()
    assert not t.remove(G1, "again").removed  # idempotent


def test_names_are_unique_among_live_groups():
    t = table([node("n1", 2)])
    t.create(G1, [cpu(1)], "PACK", name="x")
    _, error = t.create(G2, [cpu(1)], "PACK", name="x")
    assert "already exists" in error
    t.remove(G1, "gone")
    assert t.create(G2, [cpu(1)], "PACK", name="x")[1] is None
    assert t.create("c" * 16, [cpu(1)], "NOPE")[1].startswith("`strategy` must be one of")


def test_a_dead_node_loses_only_its_bundles_and_they_are_placed_again_elsewhere():
    t = table([node("n1", 1), node("n2", 1), node("n3", 1)])
    reserve(t, t.create(G1, [cpu(1), cpu(1)], "STRICT_SPREAD")[0])
    where = dict(t.get(G1).info()["bundles_to_node_id"])
    lost = next(i for i, n in where.items() if n == "n1") if "n1" in where.values() else None
    dead = "n1" if lost is not None else next(iter(where.values()))
    lost = next(i for i, n in where.items() if n == dead)
    kept = 1 - lost
    nodes = [node(n, 1, alive=n != dead, free=0 if n in where.values() and n != dead else 1)
             for n in ("n1", "n2", "n3")]
    acts = t.nodes_changed(nodes)
    t.validate_state()
    assert [(n, items) for n, _, _, items in acts.prepare] == [
        (next(n for n in ("n1", "n2", "n3") if n not in where.values()), [(lost, cpu(1))])]
    reserve(t, acts)
    group = t.get(G1)
    assert group.state == CREATED and group.nodes[kept] == where[kept] and dead not in group.nodes


def test_a_node_dying_while_preparing_aborts_the_attempt():
    t = table([node("n1", 1), node("n2", 1)])
    acts, _ = t.create(G1, [cpu(1), cpu(1)], "STRICT_SPREAD")
    attempt = acts.prepare[0][2]
    t.prepared(G1, attempt, "n1", True)
    died = t.nodes_changed([node("n1", 1), node("n2", 1, alive=False)])
    assert ("n1", G1, attempt) in died.abort and t.get(G1).state == PENDING
    t.validate_state()


def test_a_jobs_groups_end_with_it_except_detached_ones():
    t = table([node("n1", 4)])
    reserve(t, t.create(G1, [cpu(1)], "PACK", job_id=1)[0])
    reserve(t, t.create(G2, [cpu(1)], "PACK", job_id=1, detached=True)[0])
    acts = t.job_ended(1)
    assert [g.pg_id for g in acts.removed] == [G1] and t.get(G2).state == CREATED
    assert "job 1" in t.get(G1).cause


# ---------------------------------------------------------------------- names of a bundle's resources
def test_a_task_in_a_bundle_asks_for_its_resources_by_the_bundles_names():
    shape = pgs.task_shape(G1, 1, cpu(1))
    assert shape == {f"CPU_group_{G1}": UNIT, f"CPU_group_{G1}_1": UNIT, f"bundle_group_{G1}_1": pgs.MARKER_SHARE}
    added = pgs.bundle_resources(G1, 1, cpu(2))
    assert all(added[name] >= amount for name, amount in shape.items())
    anywhere = pgs.task_shape(G1, -1, {}, capture=True)
    assert anywhere == {f"bundle_group_{G1}": pgs.MARKER_SHARE, f"capture_group_{G1}": 0}
    assert pgs.group_of(shape) == G1 and pgs.group_of(cpu(1)) is None
    assert pgs.captured_group(anywhere) == G1 and pgs.captured_group(shape) is None
    assert pgs.plain_resources(shape) == cpu(1) and pgs.plain_resources(anywhere) == {}


def test_bundles_are_checked():
    assert pgs.check_bundles([{"CPU": 1, "GPU": 0.5}]) == [{"CPU": UNIT, "GPU": UNIT // 2}]
    for bad, message in (([], "non-empty list"), ([{"CPU": 0}], "reserves nothing"),
                         ([{"CPU": -1}], "must be a number >= 0"), ([{"GPU": 1.5}], "whole number"),
                         ([{"x_group_y": 1}], "reserved for placement groups")):
        with pytest.raises(ValueError, match=message):
            pgs.check_bundles(bad)


class FakeGroup:
    id, name, bundle_specs, bundle_count = G1, "", [{"CPU": 1}, {"GPU": 1}], 2


def test_options_translate_a_strategy_into_the_bundles_shape_and_refuse_what_cannot_fit():
    strategy = options.PlacementGroupScheduling(FakeGroup(), 0)
    shape, how = options.placement({"scheduling_strategy": strategy}, cpu(1), "f")
    assert how == "DEFAULT" and pgs.group_of(shape) == G1
    with pytest.raises(ValueError, match=r"f needs \{CPU: 1\}, which bundle 1 of placement group .* cannot hold "
                                         r"\(\{GPU: 1\}\); ask for less \(pass num_cpus=0"):
        options.placement({"scheduling_strategy": options.PlacementGroupScheduling(FakeGroup(), 1)}, cpu(1), "f")
    with pytest.raises(ValueError, match="`bundle_index` must be -1"):
        options.PlacementGroupScheduling(FakeGroup(), 2)
    with pytest.raises(TypeError, match="takes the group"):
        options.PlacementGroupScheduling(object())
    assert options.placement({}, cpu(1), "f") == (cpu(1), None)
    assert options.captured(cpu(1), None) == (cpu(1), "DEFAULT")
    assert pgs.captured_group(options.captured(cpu(1), G1)[0]) == G1
    with pytest.raises(ValueError, match=r"g is started inside placement group a+, which captures its children, "
                                         r"and needs \{GPU: 1\}, which no bundle of it can hold \(\{CPU: 1\}\)"):
        options.captured({"GPU": UNIT}, G1, [cpu(1)], "g")


# ---------------------------------------------------------------------- the node's bundles
def agent(cpus=4, gpus=0, embedded=False):
    mgr = LeaseManager("n1", make_totals(cpus, gpus), embedded=embedded)
    for wid in mgr.prestart().spawns:
        mgr.worker_ready(wid, 1000 + int(wid, 16))
    return mgr


def test_a_bundle_is_prepared_all_or_nothing_and_committed_into_resources_of_its_own():
    mgr = agent(4)
    ok, why = mgr.prepare_bundles(G1, 1, [(0, cpu(2)), (1, cpu(3))])
    assert not ok and "bundle 1 needs {CPU: 3}" in why and mgr.resources.available["CPU"] == 4 * UNIT
    assert mgr.prepare_bundles(G1, 1, [(0, cpu(2)), (1, cpu(1))]) == (True, "")
    assert mgr.resources.available["CPU"] == UNIT
    mgr.commit_bundles(G1, 1, [0, 1])
    assert mgr.resources.total[f"CPU_group_{G1}"] == 3 * UNIT and mgr.resources.total["CPU"] == 4 * UNIT
    granted = mgr.request(LeaseRequest("c", 1, pgs.task_shape(G1, 0, cpu(2)), job_id=1)).grants
    assert len(granted) == 1
    assert not mgr.request(LeaseRequest("c", 2, pgs.task_shape(G1, 0, cpu(1)), job_id=1)).grants  # bundle 0 full
    assert len(mgr.request(LeaseRequest("c", 3, pgs.task_shape(G1, 1, cpu(1)), job_id=1)).grants) == 1
    assert not mgr.request(LeaseRequest("c", 4, cpu(2), job_id=1)).grants  # the rest of the node: 1 CPU


def test_removing_a_group_fails_its_waiting_requests_ends_its_leases_and_gives_its_resources_back():
    mgr = agent(2)
    mgr.prepare_bundles(G1, 1, [(0, cpu(1))])
    mgr.commit_bundles(G1, 1, [0])
    lease = mgr.request(LeaseRequest("c", 1, pgs.task_shape(G1, 0, cpu(1)), job_id=1)).grants[0][1]
    mgr.request(LeaseRequest("c", 2, pgs.task_shape(G1, 0, cpu(1)), job_id=1))  # waits
    acts = mgr.release_bundles(G1, None, "placement group x was removed")
    assert [(r.request_id, why) for r, why in acts.refused] == [(2, "placement group x was removed")]
    assert not acts.kills  # a moment later (the shell's timer): an idle lease its client returns is spared
    assert mgr.end_group_leases(G1).kills == [lease.worker_id]
    assert mgr.resources.available["CPU"] == 2 * UNIT and not any("_group_" in k for k in mgr.resources.total)
    mgr.worker_exited(lease.worker_id, {})
    assert not any("_group_" in k for k in mgr.resources.available)  # the ended lease gives back nothing stale
    late = mgr.request(LeaseRequest("c", 3, pgs.task_shape(G1, 0, cpu(1)), job_id=1))
    assert [r.request_id for r, _ in late.refused] == [3]


def test_an_aborted_attempt_releases_only_its_own_bundles():
    mgr = agent(4)
    mgr.prepare_bundles(G1, 1, [(0, cpu(1))])
    mgr.prepare_bundles(G2, 1, [(0, cpu(1))])
    mgr.release_bundles(G1, 1)
    assert mgr.resources.available["CPU"] == 3 * UNIT and (G2, 0) in mgr.bundles and (G1, 0) not in mgr.bundles
    assert G1 not in mgr.removed_groups  # an abort is not a removal: the group may come back


def test_a_request_for_a_bundle_elsewhere_goes_there_or_waits_quietly():
    mgr = agent(2, embedded=True)
    waiting = mgr.request(LeaseRequest("c", 1, pgs.task_shape(G1, 0, cpu(1)), job_id=1))
    assert not (waiting.grants or waiting.infeasible or waiting.refused or waiting.spillbacks)
    mgr.prepare_bundles(G1, 1, [(0, cpu(1))])
    assert [r.request_id for r, _ in mgr.commit_bundles(G1, 1, [0]).grants] == [1]
    other = LeaseManager("n2", make_totals(1), embedded=False)
    other.set_cluster_view([{"node_id": "n1", "alive": True, "total": dict(mgr.resources.total),
                             "available": dict(mgr.resources.available)}])
    acts = other.request(LeaseRequest("c", 2, pgs.task_shape(G1, 0, cpu(1)), job_id=1))
    assert [n for _, n in acts.spillbacks] == ["n1"]


def test_gpus_of_a_bundle_go_to_its_tasks():
    mgr = agent(4, gpus=4)
    mgr.resources.acquire({"GPU": UNIT})  # GPU 0 in use by someone else
    mgr.prepare_bundles(G1, 1, [(0, {"GPU": 2 * UNIT}), (1, {"GPU": UNIT})])
    mgr.commit_bundles(G1, 1, [0, 1])
    reserved = {i for b in mgr.bundles.values() for i in b.alloc.gpu_ids}
    assert reserved == {1, 2, 3}
    one = mgr.request(LeaseRequest("c", 1, pgs.task_shape(G1, 0, {"GPU": UNIT}), job_id=1)).grants[0][1]
    two = mgr.request(LeaseRequest("c", 2, pgs.task_shape(G1, 0, {"GPU": UNIT}), job_id=1)).grants[0][1]
    assert sorted(one.alloc.gpu_ids + two.alloc.gpu_ids) == sorted(mgr.bundles[(G1, 0)].alloc.gpu_ids)
    half = mgr.request(LeaseRequest("c", 3, pgs.task_shape(G1, 1, {"GPU": UNIT // 2}), job_id=1)).grants[0][1]
    assert half.alloc.gpu_ids == mgr.bundles[(G1, 1)].alloc.gpu_ids
    mgr.return_lease(one.lease_id)
    again = mgr.request(LeaseRequest("c", 4, pgs.task_shape(G1, 0, {"GPU": UNIT}), job_id=1)).grants[0][1]
    assert again.alloc.gpu_ids == one.alloc.gpu_ids


def test_a_blocked_worker_in_a_bundle_lends_the_bundles_cpu():
    mgr = agent(2)
    mgr.prepare_bundles(G1, 1, [(0, cpu(1))])
    mgr.commit_bundles(G1, 1, [0])
    parent = mgr.request(LeaseRequest("c", 1, pgs.task_shape(G1, 0, cpu(1)), job_id=1)).grants[0][1]
    child = LeaseRequest("c", 2, pgs.task_shape(G1, -1, cpu(1), capture=True), job_id=1)
    assert not mgr.request(child).grants
    assert [r.request_id for r, _ in mgr.worker_blocked(parent.worker_id).grants] == [2]


def test_the_table_forgets_the_oldest_removed_groups(monkeypatch):
    monkeypatch.setattr(pgs, "REMEMBER_REMOVED", 2)
    t = table([node("n1", 4)])
    ids = [f"{i:016x}" for i in range(4)]
    for pg_id in ids:
        reserve(t, t.create(pg_id, [cpu(1)], "PACK")[0])
        t.remove(pg_id, "done")
    assert list(t.groups) == ids[2:]
    t.validate_state()


# ---------------------------------------------------------------------- a restarted head
def restarted(t, nodes):
    """A new table from the rows ``t`` would write (creation order), as a restarted head builds it."""
    again = PlacementGroups(False)
    again.restore([g.row() for g in t.groups.values()], nodes)
    again.validate_state()
    return again


def test_a_restarted_head_keeps_its_groups_where_they_were_and_the_nodes_keep_their_bundles():
    nodes = [node("n1", 2), node("n2", 2)]
    t = table(nodes)
    reserve(t, t.create(G1, [cpu(1), cpu(1)], "STRICT_SPREAD", name="spread")[0])
    t.create(G2, [cpu(8)], "PACK", name="too big")  # waits for a node that fits
    placed = list(t.get(G1).nodes)
    again = restarted(t, nodes)
    assert again.get(G1).state == CREATED and again.get(G1).nodes == placed
    assert again.get(G2).state == PENDING and again.names == {"spread": G1, "too big": G2}
    for node_id in ("n1", "n2"):  # each holds its committed bundle: nothing to release
        i = placed.index(node_id)
        acts = again.node_back(node_id, [(G1, i, t.get(G1).attempt, True)])
        assert not acts.abort and not acts.prepare
    assert again.get(G1).state == CREATED
    # The too big one is placed when a node that fits joins.
    acts = again.nodes_changed(nodes + [node("n3", 8)])
    assert [(n, g) for n, g, _, _ in acts.prepare] == [("n3", G2)]


def test_a_reservation_in_flight_when_the_head_died_is_released_and_made_again():
    nodes = [node("n1", 2), node("n2", 2)]
    t = table(nodes)
    acts, _ = t.create(G1, [cpu(1), cpu(1)], "STRICT_SPREAD")
    first = acts.prepare[0][2]
    t.prepared(G1, first, acts.prepare[0][0], True)  # one node prepared, the other not yet: the head dies
    again = restarted(t, nodes)
    assert again.get(G1).state == PENDING and again.get(G1).nodes == [None, None]
    back = again.node_back(acts.prepare[0][0], [(G1, 0, first, False)])
    assert back.abort == [(acts.prepare[0][0], G1, first)]   # what it prepared goes back
    assert back.prepare and all(attempt == first + 1 for _, _, attempt, _ in back.prepare)  # a new attempt
    again.validate_state()


def test_a_bundle_a_node_lost_while_the_head_was_away_is_placed_again_and_a_removed_group_released():
    nodes = [node("n1", 2), node("n2", 2)]
    t = table(nodes)
    reserve(t, t.create(G1, [cpu(1)], "PACK")[0])
    reserve(t, t.create(G2, [cpu(1)], "PACK")[0])
    where, attempt2 = t.get(G1).nodes[0], t.get(G2).attempt
    t.remove(G2, "removed by its owner")
    again = restarted(t, nodes)
    assert again.get(G2).state == REMOVED
    acts = again.node_back(where, [(G2, 0, attempt2, True)])  # G1's bundle is gone, G2's stayed
    assert (where, G2, attempt2) in acts.abort
    assert again.get(G1).state == PREPARING and [n for n, g, _, _ in acts.prepare if g == G1]


def test_removed_groups_the_table_lets_go_are_named_so_their_rows_go_too(monkeypatch):
    """The head deletes the database rows of the groups named ``forgotten`` (it kept every
    removed group's row before: the database grew with each); a restarted head on such a
    database lets go of the oldest beyond the limit at once."""
    monkeypatch.setattr(pgs, "REMEMBER_REMOVED", 2)
    t = table([node("n1", 4)])
    ids = [f"{i:016x}" for i in range(4)]
    forgotten = []
    for pg_id in ids:
        reserve(t, t.create(pg_id, [cpu(1)], "PACK")[0])
        forgotten += t.remove(pg_id, "done").forgotten
    assert forgotten == ids[:2] and list(t.groups) == ids[2:]
    rows = [pgs.Group(pg_id, [cpu(1)], "PACK", "", None, False, REMOVED, [None], 1).row() for pg_id in ids]
    again = PlacementGroups(False)
    assert again.restore(rows, [node("n1", 4)]) == ids[:2] and list(again.groups) == ids[2:]
    again.validate_state()


def test_the_head_deletes_the_rows_of_the_groups_its_table_let_go(monkeypatch):
    from farpool._private import head

    class Rows:  # head_store.HeadStore's put/delete, kept in a dict
        def __init__(self):
            self.rows = {}

        def put(self, table, key, value):
            self.rows[(table, key)] = value

        def delete(self, table, key):
            del self.rows[(table, key)]

    monkeypatch.setattr(pgs, "REMEMBER_REMOVED", 2)
    h = head.Head.__new__(head.Head)  # no sockets: only what _apply_groups reads
    h.pgs, h.store, h.pg_rows, h.pg_seq = table([node("n1", 4)]), Rows(), {}, 0
    h.actors = type("Actors", (), {"actors": {}})()
    h.node_peers, h.pg_waiters = {}, {}
    ids = [f"{i:016x}" for i in range(5)]
    for pg_id in ids:
        for acts in reserve(h.pgs, h.pgs.create(pg_id, [cpu(1)], "PACK")[0]):
            h._apply_groups(acts)
        h._apply_groups(h.pgs.remove(pg_id, "done"))
    assert sorted(key for _, key in h.store.rows) == ids[3:] == sorted(h.pg_rows)
    assert [h.pg_rows[i][0] for i in ids[3:]] == [3, 4]  # creation order kept
