"""The task queues (task_queues.py) fed events without any process, socket or clock.

Each test drives TaskQueues the way the client does and checks the plan it
returns, calling ``validate_state`` after every event.
"""

import threading
import types

import pytest

from farpool._private.task_queues import (MAX_LEASE_REQUESTS, MAX_PIPELINE_DEPTH, MID_PIPELINE_DEPTH, MID_TASK_S,
                                          MIN_PIPELINE_DEPTH, PIPELINE_BUDGET_S, KeyQueue, LeaseState,
                                          RemoteFunctionInfo, TaskQueues, TaskRecord, TaskState)

FN = RemoteFunctionInfo("f", b"h", b"")
KEY = ((("CPU", 10000),), None, "DEFAULT")
SHAPE = {"CPU": 10000}
CPUS_2 = 2 * 10000
_ids = iter(range(1, 1 << 30))


def task(key=KEY, max_retries=3):
    task_id = next(_ids).to_bytes(16, "little")
    return TaskRecord(task_id, FN, b"", [], [], [task_id], dict(SHAPE), key, max_retries, False, [], "f")


def lease(queues, lease_id=1, key=KEY, direct=True, node="node-a"):
    l = LeaseState(lease_id, f"w{lease_id}", node, channel=None, gpu_ids=[], key=key, direct=direct)
    queues.keys.setdefault(key, KeyQueue(dict(SHAPE), None, "DEFAULT", key=key))  # granted for a key asked for
    queues.add_lease(l)
    queues.validate_state()
    return l


@pytest.fixture
def queues():
    return TaskQueues(threading.Lock())


def submit(queues, n, **kw):
    tasks = [task(**kw) for _ in range(n)]
    for t in tasks:
        queues.tasks[t.task_id] = t
        queues.enqueue(t)
    queues.validate_state()
    return tasks


def dispatch(queues, key=KEY, cpus=CPUS_2):
    plan = queues.dispatch(key, lambda: cpus)
    queues.validate_state()
    return plan


def finish(queues, t, run_s=0.0):
    got = queues.finished(t.task_id, run_s)
    if got is not None:
        queues.done(got)
    queues.validate_state()
    return got


def test_queued_tasks_ask_for_leases_and_then_run_on_them(queues):
    tasks = submit(queues, 3)
    plan = dispatch(queues)
    assert plan.requests == 3 and not plan.sends
    queues.request_sent(KEY, 101, "agent")
    assert dispatch(queues).requests == 2  # one is out already
    kq = queues.answered(101)
    assert kq.key == KEY and not kq.requests
    l1 = lease(queues, 1)
    plan = dispatch(queues)
    assert plan.sends == [(l1, [tasks[0]])]  # depth 1: one task per worker while the queue is short
    assert tasks[0].state == TaskState.RUNNING and tasks[0].lease is l1
    assert plan.requests == 2


def test_a_short_queue_goes_one_task_per_worker_and_a_deep_one_pipelines(queues):
    l1, l2 = lease(queues, 1), lease(queues, 2)
    first = submit(queues, 2)
    plan = dispatch(queues)
    assert sorted(len(b) for _, b in plan.sends) == [1, 1]
    for t in first:
        finish(queues, t, run_s=0.0001)  # short tasks: the key may pipeline now
    depth = queues.keys[KEY].depth
    assert depth == round(PIPELINE_BUDGET_S / 0.0001)  # (as many as run in the budget)
    submit(queues, 3 * depth)
    plan = dispatch(queues)
    sent = {id(l): len(b) for l, b in plan.sends}
    assert sent == {id(l1): depth, id(l2): depth}


@pytest.mark.parametrize("run_s, depth", [(1e-6, MAX_PIPELINE_DEPTH), (0.0005, MIN_PIPELINE_DEPTH),
                                          (0.0019, MIN_PIPELINE_DEPTH), (0.002, MID_PIPELINE_DEPTH),
                                          (MID_TASK_S * 0.99, MID_PIPELINE_DEPTH),
                                          (MID_TASK_S, 1), (0.5, 1)])
def test_the_pipeline_holds_what_runs_in_its_time_budget_within_bounds(queues, run_s, depth):
    lease(queues, 1)
    (t,) = submit(queues, 1)
    dispatch(queues)
    finish(queues, t, run_s=run_s)
    assert queues.keys[KEY].depth == depth


def test_long_tasks_are_never_pipelined(queues):
    lease(queues, 1)
    (t,) = submit(queues, 1)
    dispatch(queues)
    finish(queues, t, run_s=1.0)
    submit(queues, 10)
    plan = dispatch(queues)
    assert [len(b) for _, b in plan.sends] == [1]


def test_a_task_of_a_few_milliseconds_waits_on_its_worker_behind_the_running_one(queues):
    # (not a round trip to the caller after each: a busy caller answers late, up to the 5 ms
    # GIL switch interval; every 3 ms chunk of a Pool.map waited ~1 ms for it)
    l1, l2 = lease(queues, 1), lease(queues, 2)
    first = submit(queues, 2)
    dispatch(queues)
    for t in first:
        finish(queues, t, run_s=0.003)
    assert queues.keys[KEY].depth == MID_PIPELINE_DEPTH == 2
    submit(queues, 2)
    assert sorted(len(b) for _, b in dispatch(queues).sends) == [1, 1]
    # One more task with both workers busy: a backlog (3 tasks, 2 workers) although only one
    # task is queued; it goes behind a running one at once.
    (third,) = submit(queues, 1)
    plan = dispatch(queues)
    assert [b for _, b in plan.sends] == [[third]] and third.lease in (l1, l2)
    # ... and no deeper: with a task behind each running one, the rest wait here.
    fourth, fifth = submit(queues, 2)
    plan = dispatch(queues)
    assert [b for _, b in plan.sends] == [[fourth]] and fourth.lease is not third.lease
    assert [len(l.inflight) for l in (l1, l2)] == [2, 2] and list(queues.keys[KEY].queue) == [fifth]


def test_a_task_starts_now_on_an_idle_worker_or_behind_a_running_one_when_not_short(queues):
    assert not queues.starts_now(KEY)  # no lease yet
    l1, l2 = lease(queues, 1), lease(queues, 2)
    assert queues.starts_now(KEY)  # idle workers
    first = submit(queues, 2)
    dispatch(queues)
    assert not queues.starts_now(KEY)  # both busy, depth 1 (nothing measured yet)
    for t in first:
        finish(queues, t, run_s=0.003)
    running = submit(queues, 2)
    dispatch(queues)
    assert queues.starts_now(KEY)  # tasks of 3 ms: room for one behind each running one
    behind = submit(queues, 2)
    dispatch(queues)
    assert [len(l.inflight) for l in (l1, l2)] == [2, 2]
    assert not queues.starts_now(KEY)  # two on each
    for t in running:
        finish(queues, t, run_s=0.0001)  # short now: a deep pipeline, filled in batches
    assert queues.keys[KEY].depth > MID_PIPELINE_DEPTH
    assert not queues.starts_now(KEY)  # one on each: neither is idle
    for t in behind:
        finish(queues, t, run_s=0.0001)
    assert queues.starts_now(KEY)
    l1.claimed = l2.claimed = True
    assert not queues.starts_now(KEY)  # a claimed lease is a caller's, not free


def test_lease_requests_are_capped_per_shape(queues):
    submit(queues, MAX_LEASE_REQUESTS + 50)
    assert dispatch(queues).requests == MAX_LEASE_REQUESTS


def test_an_idle_direct_lease_is_parked_for_the_next_submit_and_can_be_claimed_once(queues):
    l1 = lease(queues, 1)
    plan = dispatch(queues)
    assert plan.linger == [l1] and queues.parked[KEY] is l1
    t = task()
    assert queues.take_parked(KEY, t) is l1 and l1.claimed
    assert queues.take_parked(KEY, task()) is None
    assert t.state == TaskState.RUNNING and l1.inflight == {t.task_id: t}  # in flight before it is sent
    assert queues.sent_direct(t, l1) is True
    queues.validate_state()
    assert l1.inflight == {t.task_id: t} and not l1.claimed


def test_a_direct_tasks_reply_may_come_before_the_io_thread_hears_it_was_sent(queues):
    # The caller thread sends; the worker answers; the I/O thread reads the answer (it was
    # reading that worker's stream anyway) before it runs sent_direct: the task must be known.
    l1 = lease(queues, 1)
    dispatch(queues)
    t = task()
    queues.take_parked(KEY, t)
    assert finish(queues, t) is t  # the reply: found, not taken for a task that ended already
    queues.park_if_idle(l1)
    assert KEY not in queues.parked  # still claimed: not parked for another caller yet
    assert queues.sent_direct(t, l1) is True
    queues.validate_state()
    assert not l1.inflight and not l1.claimed and t.task_id not in queues.tasks


def test_a_task_sent_on_a_lease_whose_worker_exited_is_queued_again(queues):
    l1 = lease(queues, 1)
    dispatch(queues)
    t = task()
    queues.worker_exited((l1.node_id, l1.lease_id))  # before the caller's task was recorded
    assert queues.take_parked(KEY, t) is None  # the lease went with its worker
    l2 = lease(queues, 2)
    dispatch(queues)
    queues.take_parked(KEY, t)
    gone, lost = queues.worker_exited((l2.node_id, l2.lease_id))  # after: it is among the lost
    assert lost == [t]
    assert queues.sent_direct(t, l2) is True  # worker_exited handled it: nothing more here
    queues.validate_state()


def test_a_task_recorded_after_its_workers_exit_was_handled_is_queued_again(queues):
    l1 = lease(queues, 1)
    dispatch(queues)
    t = task()
    assert queues.take_parked(KEY, t) is l1
    queues.leases.pop((l1.node_id, l1.lease_id))  # the worker's exit dropped the lease...
    queues.keys[KEY].leases.remove(l1)            # ...and the caller's record came after
    assert queues.sent_direct(t, l1) is False
    queues.validate_state()
    assert list(queues.keys[KEY].queue) == [t] and t.attempts == 0


def test_an_idle_busy_pair_takes_back_the_newer_half(queues):
    l1, l2 = lease(queues, 1), lease(queues, 2)
    queues.keys[KEY].depth = MAX_PIPELINE_DEPTH
    tasks = submit(queues, 8)
    TaskQueues.start(l1, tasks)  # all pipelined on l1; l2 idle
    for t in tasks:
        queues.keys[KEY].queue.remove(t)
    queues.validate_state()
    plan = dispatch(queues)
    busy, ids = plan.take_back
    assert busy is l1 and ids == [t.task_id for t in tasks[4:]] and l1.taking_back
    assert dispatch(queues).take_back is None  # one request at a time
    queues.taken_back((l1.node_id, l1.lease_id), ids)
    queues.validate_state()
    assert list(queues.keys[KEY].queue) == tasks[4:]  # in order, first in line
    assert all(t.attempts == 0 for t in tasks)  # handed back unrun: nothing spent
    assert not l1.taking_back


def test_a_take_back_that_got_nothing_is_not_asked_again_before_progress(queues):
    l1, _ = lease(queues, 1), lease(queues, 2)
    tasks = submit(queues, 4)
    TaskQueues.start(l1, tasks)
    for t in tasks:
        queues.keys[KEY].queue.remove(t)
    busy, ids = dispatch(queues).take_back
    queues.taken_back((l1.node_id, l1.lease_id), [])
    assert dispatch(queues).take_back is None
    finish(queues, tasks[0])  # progress: it may have more to give now
    assert dispatch(queues).take_back is not None


def test_a_dead_workers_tasks_spend_an_attempt_and_a_retiring_ones_do_not(queues):
    l1 = lease(queues, 1)
    (t,) = submit(queues, 1, max_retries=1)
    dispatch(queues)
    gone, lost = queues.worker_exited((l1.node_id, l1.lease_id))
    queues.validate_state()
    assert gone is l1 and lost == [t]
    assert t.spend_attempt() is True and t.attempts == 1  # may run once more
    queues.enqueue(t, front=True)
    l2 = lease(queues, 2)
    dispatch(queues)
    queues.retire(l2)  # max_tasks_per_child: its worker exits after this batch
    queues.validate_state()
    gone, lost = queues.worker_exited((l2.node_id, l2.lease_id))
    queues.validate_state()
    assert lost == [] and list(queues.keys[KEY].queue) == [t] and t.attempts == 1
    assert t.spend_attempt() is False  # a second crash: out of retries


def test_a_linger_timer_returns_an_idle_lease_or_dispatches_queued_work(queues):
    l1 = lease(queues, 1)
    dispatch(queues)
    l1.linger = "timer"
    submit(queues, 1)
    assert queues.idle(l1) == "dispatch" and l1.linger is None and KEY not in queues.parked
    plan = dispatch(queues)
    finish(queues, plan.sends[0][1][0])
    assert queues.idle(l1) == "return"
    queues.validate_state()
    assert not queues.leases and not queues.keys[KEY].leases


def test_a_claimed_lease_is_kept_when_its_timer_fires(queues):
    l1 = lease(queues, 1)
    dispatch(queues)
    queues.take_parked(KEY, task())
    assert queues.idle(l1) == "keep"


def test_requests_to_a_lost_agent_are_forgotten(queues):
    submit(queues, 2)
    queues.request_sent(KEY, 7, "agent-a")
    queues.request_sent(KEY, 8, "agent-b")
    assert queues.forget_requests_to("agent-a") == [KEY]
    assert queues.forget_requests_to("agent-c") == []
    queues.validate_state()
    assert queues.answered(7) is None and list(queues.keys[KEY].requests) == [8]


def test_cancelled_tasks_at_the_head_of_the_queue_are_dropped(queues):
    lease(queues, 1)
    a, b = submit(queues, 2)
    a.cancelled = True
    plan = dispatch(queues)
    assert plan.sends and plan.sends[0][1] == [b]


def test_validate_state_catches_a_task_in_flight_that_is_not_running(queues):
    l1 = lease(queues, 1)
    (t,) = submit(queues, 1)
    l1.inflight[t.task_id] = t
    with pytest.raises(AssertionError, match="in flight"):
        queues.validate_state()


def test_max_retries_minus_one_never_runs_out():
    t = task(max_retries=-1)
    assert all(t.spend_attempt() for _ in range(1000))  # -1: no limit, as in Ray
    assert t.attempts == 1000


@pytest.mark.parametrize("max_retries, runs", [(0, 1), (1, 2), (3, 4)])
def test_a_limit_of_n_retries_allows_n_plus_one_runs(max_retries, runs):
    t = task(max_retries=max_retries)
    spent = [t.spend_attempt() for _ in range(runs)]
    assert spent == [True] * (runs - 1) + [False]


def test_a_late_result_of_an_attempt_given_up_on_is_stale_and_counted(queues):
    """A partition: the node of l1 is declared dead, its task runs again on l2 (another node);
    when the link returns, l1's worker's result comes over l1's agent connection: stale, while
    the task is queued again and after it runs on l2; only l2's result counts."""
    agent_a, agent_b = object(), object()
    l1 = lease(queues, 1, node="node-a")
    l1.channel = types.SimpleNamespace(agent=agent_a, carrier=agent_a)
    (t,) = submit(queues, 1)
    assert dispatch(queues).sends == [(l1, [t])]
    assert queues.stale_result(t.task_id, agent_a) is None  # the attempt on l1 is the current one
    gone, lost = queues.worker_exited(("node-a", 1))  # node-a declared dead
    assert lost == [t] and t.spend_attempt()
    queues.enqueue(t, front=True)
    queues.validate_state()
    assert queues.stale_result(t.task_id, agent_a) == "it was given up on and is queued to run again"
    l2 = lease(queues, 2, node="node-b")
    l2.channel = types.SimpleNamespace(agent=agent_b, carrier=agent_b)
    assert dispatch(queues).sends == [(l2, [t])]
    assert queues.stale_result(t.task_id, agent_a) == "it runs again on worker w2 of node node-b"
    assert queues.stale_results == 2
    assert queues.stale_result(t.task_id, agent_b) is None
    assert finish(queues, t) is t
    assert queues.stale_result(t.task_id, agent_a) is None  # ended: finished() tells (None), not stale
    assert queues.stale_results == 2


def test_a_result_over_another_workers_stream_is_stale_and_one_over_its_own_is_not(queues):
    stream_1, stream_2 = object(), object()
    l1, l2 = lease(queues, 1), lease(queues, 2)
    l1.channel, l2.channel = types.SimpleNamespace(stream=stream_1, carrier=stream_1), types.SimpleNamespace(stream=stream_2, carrier=stream_2)
    (t,) = submit(queues, 1)
    ((on, _),) = dispatch(queues).sends
    other = stream_2 if on is l1 else stream_1
    assert queues.stale_result(t.task_id, other).startswith(f"it runs again on worker {on.worker_id}")
    assert queues.stale_result(t.task_id, on.channel.stream) is None
    assert queues.stale_result(t.task_id, None) is None  # where it came from unknown: its state decides


def test_where_says_what_a_pending_task_waits_for(queues):
    """The words a get() that timed out adds: arguments, the queue, the worker it runs on."""
    waiting = task()
    waiting.state, waiting.deps_left = TaskState.WAITING, 2
    assert queues.where(waiting) == "waits for 2 of its arguments"
    first, second = submit(queues, 2)
    assert queues.where(second) == ("is queued for a worker of {CPU: 1} behind 1 task(s), with 0 worker(s) "
                                    "leased and 0 lease request(s) out to the node agents")
    plan = dispatch(queues)
    assert plan.requests >= 1
    assert "and 0 lease request(s)" in queues.where(first)  # (the shell records the requests it sends)
    l = lease(queues)
    plan = dispatch(queues)
    assert plan.sends and plan.sends[0][0] is l
    assert queues.where(first) == "runs on worker w1 of node node-a"


def test_a_lease_asked_back_takes_no_more_tasks_and_goes_back_when_its_tasks_end(queues):
    """YieldLease (its agent wants it for a request that waits behind it): dispatch no longer
    feeds it; it goes back at once when idle, else when its last task ends; the key asks for
    another lease while it has work."""
    l1, l2 = lease(queues, 1), lease(queues, 2)
    tasks = submit(queues, 40)
    plan = dispatch(queues)
    assert sorted(l.lease_id for l, _ in plan.sends) == [1, 2]
    assert queues.yield_lease(("node-a", 1)) is None  # busy: it goes back when its tasks end
    queues.validate_state()
    assert l1.yielding and l1 not in queues.keys[KEY].leases
    for t in list(l1.inflight.values()):
        finish(queues, t)
        if l1.inflight:
            assert not queues.yielded(l1)
    assert queues.yielded(l1) and ("node-a", 1) not in queues.leases
    queues.validate_state()
    plan = dispatch(queues)
    assert all(l is l2 for l, _ in plan.sends)  # never l1 again
    assert plan.requests >= 1 or not queues.keys[KEY].queue
    # an idle lease goes back at once, and is never parked
    for t in list(l2.inflight.values()):
        finish(queues, t)
    assert queues.yield_lease(("node-a", 2)) is l2 and not queues.parked
    queues.validate_state()
    assert queues.yield_lease(("node-a", 2)) is None  # (unknown now: nothing to do)
    assert len(tasks) == 40
