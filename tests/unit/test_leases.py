"""The node agent's lease state machine, fed events without any process."""

from farpool._private.leases import IDLE, LEASED, LeaseManager, LeaseRequest
from farpool._private.scheduling import UNIT, make_request, make_totals


def ready_all(mgr, acts):
    """Report every spawned worker ready; return the accumulated actions."""
    out = []
    for wid in acts.spawns:
        out.append(mgr.worker_ready(wid, 1000 + int(wid, 16)))
    return out


def grants(actions_list):
    return [g for acts in actions_list for g in acts.grants]


def test_prestart_then_grant_one_per_cpu():
    mgr = LeaseManager("n1", make_totals(2), embedded=True)
    spawn = mgr.prestart()
    assert len(spawn.spawns) == 2
    ready_all(mgr, spawn)
    a = mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1))
    b = mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1))
    c = mgr.request(LeaseRequest("c", 3, make_request(1), job_id=1))
    assert len(a.grants) == 1 and len(b.grants) == 1 and not c.grants
    assert not c.spawns  # no CPU free: no pointless new worker
    lease = a.grants[0][1]
    after = mgr.return_lease(lease.lease_id)
    assert [r.request_id for r, _ in after.grants] == [3]


def test_two_cpu_tasks_on_four_cpus_run_two_at_a_time():
    mgr = LeaseManager("n1", make_totals(4), embedded=True)
    ready_all(mgr, mgr.prestart())
    results = [mgr.request(LeaseRequest("c", i, make_request(2), job_id=1)) for i in range(5)]
    assert sum(len(r.grants) for r in results) == 2
    assert mgr.resources.available["CPU"] == 0


def test_pending_requests_do_not_spawn_a_worker_each():
    mgr = LeaseManager("n1", make_totals(2), embedded=True)
    mgr.prestart()  # two workers STARTING, none ready
    acts = [mgr.request(LeaseRequest("c", i, make_request(1), job_id=1)) for i in range(50)]
    assert sum(len(a.spawns) for a in acts) == 0
    assert len(mgr.workers) == 2


def test_worker_exit_reports_the_lease_and_refills_the_pool():
    mgr = LeaseManager("n1", make_totals(1), embedded=True)
    ready_all(mgr, mgr.prestart())
    granted = mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1)).grants[0][1]
    acts = mgr.worker_exited(granted.worker_id, {"signal": 9})
    assert [(lease.lease_id, info["signal"]) for lease, info in acts.lost] == [(granted.lease_id, 9)]
    assert len(acts.spawns) == 1
    assert mgr.resources.available["CPU"] == UNIT


def test_workers_are_bound_to_one_job():
    mgr = LeaseManager("n1", make_totals(1), embedded=False)
    ready_all(mgr, mgr.prestart())
    lease = mgr.request(LeaseRequest("a", 1, make_request(1), job_id="A")).grants[0][1]
    mgr.return_lease(lease.lease_id)
    acts = mgr.request(LeaseRequest("b", 2, make_request(1), job_id="B"))
    # The only worker belongs to job A: it is replaced, not reused.
    assert not acts.grants and acts.kills == [lease.worker_id] and len(acts.spawns) == 1
    ready = mgr.worker_ready(acts.spawns[0], 4242)
    assert [g[1].worker_id for g in ready.grants] == [acts.spawns[0]]


def test_infeasible_on_embedded_spillback_on_cluster():
    emb = LeaseManager("n1", make_totals(2), embedded=True)
    acts = emb.request(LeaseRequest("c", 1, make_request(1, 0, None, {"ssd": 1}), job_id=1))
    assert acts.infeasible and "ssd: 1" in acts.infeasible[0][1]
    assert "cannot grow" in acts.infeasible[0][1]
    assert not emb.pending

    node = LeaseManager("n1", make_totals(2), embedded=False)
    node.set_cluster_view([
        {"node_id": "n1", "alive": True, "total": make_totals(2), "available": make_totals(2)},
        {"node_id": "n2", "alive": True, "total": make_totals(1, 0, {"ssd": 1}),
         "available": make_totals(1, 0, {"ssd": 1})},
    ])
    acts = node.request(LeaseRequest("c", 2, make_request(1, 0, None, {"ssd": 1}), job_id=1))
    assert [(r.request_id, n) for r, n in acts.spillbacks] == [(2, "n2")]
    # A shape no node has waits (with a warning) for a node that may join...
    acts = node.request(LeaseRequest("c", 3, make_request(1, 0, None, {"tpu": 1}), job_id=1))
    assert acts.infeasible and len(node.pending) == 1
    # ...and goes there once it does.
    acts = node.set_cluster_view(node.cluster_view + [
        {"node_id": "n3", "alive": True, "total": make_totals(1, 0, {"tpu": 1}),
         "available": make_totals(1, 0, {"tpu": 1})}])
    assert [(r.request_id, n) for r, n in acts.spillbacks] == [(3, "n3")]


def test_blocked_worker_lends_its_cpu():
    mgr = LeaseManager("n1", make_totals(1), embedded=True)
    ready_all(mgr, mgr.prestart())
    parent = mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1)).grants[0][1]
    child = mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1))
    assert not child.grants
    acts = mgr.worker_blocked(parent.worker_id)
    assert len(acts.spawns) == 1  # a new worker for the child: the parent lent its CPU
    acts = mgr.worker_ready(acts.spawns[0], 99)
    assert [r.request_id for r, _ in acts.grants] == [2]
    mgr.worker_unblocked(parent.worker_id)
    assert mgr.resources.available["CPU"] == -UNIT  # briefly oversubscribed until the child returns
    child_lease = acts.grants[0][1]
    mgr.return_lease(child_lease.lease_id)
    mgr.return_lease(parent.lease_id)
    assert mgr.resources.available["CPU"] == UNIT


def test_client_gone_returns_its_leases():
    mgr = LeaseManager("n1", make_totals(2), embedded=True)
    ready_all(mgr, mgr.prestart())
    mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1))
    mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1))
    mgr.request(LeaseRequest("c", 3, make_request(1), job_id=1))
    mgr.client_gone("c")
    assert not mgr.pending and not mgr.leases
    assert all(w.state == IDLE for w in mgr.workers.values())
    assert LEASED not in {w.state for w in mgr.workers.values()}


# ---------------------------------------------------------------------------- draining
def _view(*nodes):
    """A head's node table: (node id, free CPUs, draining) each, 2 CPUs in total."""
    return [{"node_id": n, "alive": True, "draining": d, "total": make_totals(2), "available": make_totals(free)}
            for n, free, d in nodes]


def test_a_draining_node_grants_nothing_and_sends_what_waits_to_a_node_that_fits():
    mgr = LeaseManager("n1", make_totals(1), embedded=False)
    ready_all(mgr, mgr.prestart())
    mgr.set_cluster_view(_view(("n1", 0, False), ("n2", 2, False), ("n3", 2, True)))
    held = mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1)).grants[0][1]
    waiting = mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1, spillback_ok=False))
    assert not waiting.grants and not waiting.spillbacks
    acts = mgr.drain("head")
    # A request that may not be sent on waits here (its client asks elsewhere once we are gone).
    assert not acts.spillbacks and [r.request_id for r in mgr.pending] == [2]
    assert acts.yields == [held] and held.asked_back  # its client is asked for it back
    arriving = mgr.request(LeaseRequest("d", 3, make_request(1), job_id=2))
    assert [(r.request_id, node) for r, node in arriving.spillbacks] == [(3, "n2")]  # never n3: it drains too
    assert mgr.client_leases("head") == [held]
    after = mgr.return_lease(held.lease_id)
    assert not after.grants and mgr.client_leases("head") == []  # the freed worker goes to nobody
    assert not mgr.worker_exited(held.worker_id, {}).spawns     # and no worker replaces it


def test_a_draining_node_asks_clients_for_their_leases_back_but_not_the_heads():
    mgr = LeaseManager("n1", make_totals(3), embedded=False)
    ready_all(mgr, mgr.prestart())
    client = mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1)).grants[0][1]
    actor = mgr.request(LeaseRequest("head", 2, make_request(1), job_id=1)).grants[0][1]
    asked = mgr.request(LeaseRequest("d", 3, make_request(1), job_id=2)).grants[0][1]
    asked.asked_back = True  # (asked already, for a request that waited: not asked twice)
    assert mgr.drain("head").yields == [client]
    assert not actor.asked_back
    assert mgr.drain("head").yields == []  # (once)


def test_what_waits_at_a_draining_node_moves_to_a_node_that_joins():
    mgr = LeaseManager("n1", make_totals(1), embedded=False)
    ready_all(mgr, mgr.prestart())
    mgr.set_cluster_view(_view(("n1", 0, False)))
    mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1))
    mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1))
    assert not mgr.drain("head").spillbacks and [r.request_id for r in mgr.pending] == [2]  # nowhere to go yet
    moved = mgr.set_cluster_view(_view(("n1", 0, True), ("n2", 0, False)))  # busy, but it will run there
    assert [(r.request_id, node) for r, node in moved.spillbacks] == [(2, "n2")] and not mgr.pending


# ---------------------------------------------------------------------------- spilling a burst
def test_a_burst_is_spread_over_the_room_other_nodes_have_not_sent_to_one_node():
    mgr = LeaseManager("n1", make_totals(1), embedded=False)
    ready_all(mgr, mgr.prestart())
    mgr.set_cluster_view(_view(("n1", 0, False), ("n2", 2, False), ("n3", 1, False)))
    acts = [mgr.request(LeaseRequest("c", i, make_request(1), job_id=1)) for i in range(6)]
    assert len(acts[0].grants) == 1
    spilled = [node for a in acts for _, node in a.spillbacks]
    assert sorted(spilled) == ["n2", "n2", "n3"]  # as much as each has free, no more
    assert [r.request_id for r in mgr.pending] == [4, 5]  # the rest waits here for the next table
    later = mgr.set_cluster_view(_view(("n1", 0, False), ("n2", 0, False), ("n3", 1, False)))
    assert [(r.request_id, node) for r, node in later.spillbacks] == [(4, "n3")]
    assert [r.request_id for r in mgr.pending] == [5]


def test_joining_again_as_a_new_node_ends_every_worker_and_forgets_the_heads_requests():
    """The head declared the node dead; it joins again with a new id: the workers of the old
    one end (idle ones too: they name the old id), fresh ones start for the new id, the
    head's waiting requests go (it placed those actors elsewhere), a client's stay."""
    mgr = LeaseManager("old", make_totals(2), embedded=False)
    ready_all(mgr, mgr.prestart())
    held = mgr.request(LeaseRequest("c", 1, make_request(1), job_id=1)).grants[0][1]
    mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1))
    mgr.request(LeaseRequest("head", 3, make_request(1), job_id=1, pool_key="actor:a"))
    mgr.request(LeaseRequest("c", 4, make_request(1), job_id=1))
    mgr.return_lease(held.lease_id, kill=True)
    mgr.return_lease(next(iter(mgr.leases)), kill=True)
    old_workers = set(mgr.workers)  # (one starting for the head's request, too)
    acts = mgr.renamed("new", "head")
    assert mgr.node_id == "new" and set(acts.kills) == old_workers
    assert len(acts.spawns) == 2 and set(mgr.workers) == set(acts.spawns)
    assert [r.request_id for r in mgr.pending] == [4] and not mgr.leases
    granted = grants(ready_all(mgr, acts))
    assert [r.request_id for r, _ in granted] == [4]  # on a fresh worker
    assert mgr.worker_ready(sorted(old_workers)[0], 1).kills == [sorted(old_workers)[0]]  # a late one of the old: ended


def test_a_worker_killed_with_its_lease_is_never_granted_again():
    """Its lease returned with kill (its client died, the node was declared dead): a request
    waiting meanwhile gets another worker, not the one about to be SIGKILLed."""
    mgr = LeaseManager("n1", make_totals(1), embedded=False)
    ready_all(mgr, mgr.prestart())
    lease = mgr.request(LeaseRequest("gone", 1, make_request(1), job_id=1)).grants[0][1]
    assert not mgr.request(LeaseRequest("c", 2, make_request(1), job_id=1)).grants
    acts = mgr.return_lease(lease.lease_id, kill=True)
    assert acts.kills == [lease.worker_id] and not acts.grants and len(acts.spawns) == 1
    (granted,) = grants(ready_all(mgr, acts))
    assert granted[1].worker_id != lease.worker_id
    assert not mgr.worker_exited(lease.worker_id, {}).spawns  # (its exit: nothing more to do)


def test_a_lease_held_past_an_interval_is_asked_back_for_a_request_of_another_shape():
    """A client feeds its lease while its queue of one shape has work; a request of another
    shape (or client) behind it would wait for ever.  tick() asks back the leases held
    through a whole interval that stand in its way, enough for it, once each; never the
    leases of the waiting request's own queue."""
    mgr = LeaseManager("n1", make_totals(2), embedded=True)
    ready_all(mgr, mgr.prestart())
    busy = [mgr.request(LeaseRequest("a", i, make_request(1), job_id=1)).grants[0][1] for i in (1, 2)]
    same_queue = mgr.request(LeaseRequest("a", 3, make_request(1), job_id=1))
    assert not same_queue.grants and mgr.waiting()
    assert mgr.tick().yields == []          # held for less than a whole interval
    assert mgr.tick().yields == []          # the only one waiting is of their own queue
    other = mgr.request(LeaseRequest("a", 4, make_request(0.5), job_id=1))  # another shape
    assert not other.grants
    asked = mgr.tick().yields
    assert [lease.lease_id for lease in asked] == [busy[0].lease_id]  # one frees enough
    assert mgr.tick().yields == []          # asked once
    after = mgr.return_lease(busy[0].lease_id)  # the client gives it back when its tasks end
    assert [req.request_id for req, _ in after.grants] == [3]  # FIFO: the older request first
    # request 4 still waits: the other old lease is asked back (not the new one, held too briefly)
    assert [lease.lease_id for lease in mgr.tick().yields] == [busy[1].lease_id]
    assert [req.request_id for req, _ in mgr.return_lease(busy[1].lease_id).grants] == [4]


def test_actor_and_blocked_leases_are_never_asked_back():
    mgr = LeaseManager("n1", make_totals(1), embedded=True)
    ready_all(mgr, mgr.prestart())
    acts = mgr.request(LeaseRequest("a", 1, make_request(1), job_id=1, pool_key="actor:x"))
    ready_all(mgr, acts)
    (lease,) = [l for l in mgr.leases.values()]
    mgr.request(LeaseRequest("b", 2, make_request(1), job_id=1))
    for _ in range(3):
        assert mgr.tick().yields == []
    assert mgr.leases[lease.lease_id].worker_id


def test_what_leases_asked_back_free_is_kept_for_the_request_they_were_asked_for():
    """A request for 1.5 CPUs behind two 1-CPU leases of a busy queue that keeps asking for
    more: the CPU the first returned lease frees is not handed to the busy queue's next
    request (it would never end), but kept until the second returns."""
    mgr = LeaseManager("n1", make_totals(2), embedded=True)
    ready_all(mgr, mgr.prestart())
    a, b = [mgr.request(LeaseRequest("busy", i, make_request(1), job_id=1)).grants[0][1] for i in (1, 2)]
    mgr.request(LeaseRequest("busy", 3, make_request(1), job_id=1))   # older than the big one
    mgr.request(LeaseRequest("other", 4, make_request(1.5), job_id=1))
    mgr.request(LeaseRequest("busy", 5, make_request(1), job_id=1))
    mgr.tick()
    asked = mgr.tick().yields
    assert sorted(l.lease_id for l in asked) == [a.lease_id, b.lease_id]
    assert mgr.return_lease(a.lease_id).grants == []        # kept for request 4
    acts = mgr.return_lease(b.lease_id)
    assert [r.request_id for r, _ in acts.grants] == [4]
    assert [r.request_id for r in mgr.pending] == [3, 5]    # the rest wait in their order
