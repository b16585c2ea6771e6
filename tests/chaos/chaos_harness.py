"""The chaos harness (#13): a mixed workload on a head and several node agents while faults
are injected at random times drawn from a seed; then it checks what came back.

Used by tests/chaos/test_chaos.py (a bounded run) and by hand for a long run::

    python -m tests.chaos.run --seed 7 --minutes 10

Layout: a head (started with the CLI, supervised, so a killed head comes back) with its
node, and NODES more node agents, on loopback (farpool_testing.Cluster) or each on a host of
its own (farpool_testing.HostsCluster, run by tests/hosts/test_chaos_on_hosts.py); this
process is the driver, on the head's host. The cluster object reaches the victims. Threads::

    faults ----- plan (times, kinds, picks from the seed) --> SIGKILL a worker / a node
                 agent (and start a new one in its place) / the head (once); drain a
                 node (farpool stop --node, and start a new one in its place)
    chains ----- rounds of dependent task chains (max_retries=-1): every sum checked
    mapping ---- DistributedExecutor.map (default max_retries=3): squares checked
    actor ------ calls to an actor with max_restarts=-1, max_task_retries=-1
    arrays ----- 4 MB arrays made on one node and summed on another; one more made there
                 each round and read by the driver KEPT_ARRAYS rounds later (its only
                 copy on that node: rebuilt by lineage if the node died meanwhile)

Every call either returns the right value or raises one of the documented errors
(DOCUMENTED); a wrong value, another error or a call that outlives CALL_TIMEOUT_S is a
failure. The same seed gives the same fault plan (times, kinds and which of the victims
alive then, by index); what the workload does around it depends on timing.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures as cf
import dataclasses
import logging
import os
import random
import threading
import time
import traceback

import numpy as np

import farpool
import farpool_testing
from farpool import exceptions

# Seconds any one call may take before it counts as a hang. Long enough for a head to come
# back (its supervisor, then agents and drivers registering again) and a node to be declared
# dead (NODE_TIMEOUT_S) while the machine is loaded.
CALL_TIMEOUT_S = 120.0
# Seconds a node agent may go unheard before the head declares it dead (the cluster's
# FARPOOL_NODE_TIMEOUT_S). Shorter finds a killed node sooner; too short and a loaded machine
# has live nodes declared dead.
NODE_TIMEOUT_S = 4.0
# A call that takes longer than this many seconds is logged as it ends (with the faults
# around it, the log shows what held it up).
SLOW_S = 10.0
# Seconds a drained node waits for its running tasks (farpool stop --drain-timeout).
DRAIN_TIMEOUT_S = 10.0
# Seconds without faults at the start (the cluster warms up) and after the last fault (the
# last results come in, so the recovery from it is seen).
QUIET_S = 3.0
# Node agents besides the head's node; a killed one is replaced by a new one.
NODES = 3
# Elements of the arrays moved between nodes (8 bytes each): 4 MB, over the size kept inline.
ARRAY_N = 512 * 1024
# Arrays kept to be read later (each a lineage to rebuild when its node is lost meanwhile).
KEPT_ARRAYS = 4
# Seconds between rounds of actor calls: without a pause one actor's calls take most of the
# machine from the other workloads.
ACTOR_PAUSE_S = 0.1
# The workloads whose results time the recovery from a fault.
WORKLOADS = ("chains", "map", "actor", "arrays")
# What a call may raise besides returning its value: the errors API.md documents for lost
# workers, nodes, actors and objects.
DOCUMENTED = (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ActorDiedError,
              exceptions.ObjectLostError)


# ---------------------------------------------------------------------------- task functions
def step(x, i):
    return x + i


def square(x):
    return x * x


def make_array(n, value):
    return np.full(n, value, dtype=np.float64)


def total(array):
    return float(array.sum())


class Echo:
    def twice(self, x):
        return 2 * x


# ---------------------------------------------------------------------------- the fault plan
@dataclasses.dataclass(frozen=True)
class Fault:
    at_s: float   # seconds after the workload started
    kind: str     # "worker", "node", "drain" or "head"
    pick: int     # which victim, as an index into those alive then (sorted)


def fault_plan(seed: int, seconds: float, worker_every_s: float = 6.0, node_every_s: float = 20.0,
               drain_every_s: float = 30.0, quiet_s: float = QUIET_S) -> list[Fault]:
    """Faults for a run of ``seconds``: worker kills, node kills and node drains at exponential
    intervals of the given means, and one head kill in the middle half; none in the first and
    last ``quiet_s`` seconds (the cluster warms up; the last results come in)."""
    rng = random.Random(seed)
    faults = []
    for kind, mean in (("worker", worker_every_s), ("node", node_every_s), ("drain", drain_every_s)):
        t = quiet_s + rng.expovariate(1 / mean)
        while t < seconds - quiet_s:
            faults.append(Fault(round(t, 2), kind, rng.randrange(1 << 16)))
            t += max(1.0, rng.expovariate(1 / mean))
    faults.append(Fault(round(rng.uniform(seconds / 4, 3 * seconds / 4), 2), "head", 0))
    return sorted(faults, key=lambda f: f.at_s)


# ---------------------------------------------------------------------------- counting
class RetryCounter(logging.Handler):
    """Counts the driver's warnings of tasks retried and objects rebuilt (completion.py)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.retried = 0
        self.rebuilt = 0

    def emit(self, record):
        if "re-running the task" in record.msg:
            self.rebuilt += 1
        elif "; retrying (" in record.msg:
            self.retried += 1


@dataclasses.dataclass
class Report:
    seed: int
    seconds: float = 0.0
    started: float = 0.0  # monotonic time the workload started
    faults: list = dataclasses.field(default_factory=list)        # (Fault, monotonic time, what)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tasks: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list = dataclasses.field(default_factory=list)      # wrong values, other errors, hangs
    results_at: list = dataclasses.field(default_factory=list)    # (monotonic time, workload) of right results
    slowest: dict = dataclasses.field(default_factory=dict)       # workload -> longest call (s)
    retried: int = 0
    rebuilt: int = 0
    head_outages: list = dataclasses.field(default_factory=list)  # s from losing the head to registered again
    leftovers: list = dataclasses.field(default_factory=list)
    logs: list = dataclasses.field(default_factory=list)          # (path, tail) of the runtime's logs, on failure

    def recovery_times(self) -> list[tuple[str, float | None, float | None]]:
        """For each fault: its kind, the seconds from it to the first right result after it (any
        workload), and to the time every workload had a right result after it (None: never)."""
        by_workload = collections.defaultdict(list)
        for at, what in self.results_at:
            if what in WORKLOADS:  # (the arrays read later count as their own, "after" comes last)
                by_workload[what].append(at)
        for times in by_workload.values():
            times.sort()
        out = []
        for fault, at, _ in self.faults:
            firsts = []
            for times in by_workload.values():
                i = bisect.bisect_right(times, at)
                firsts.append(times[i] - at if i < len(times) else None)
            known = [t for t in firsts if t is not None]
            out.append((fault.kind, min(known) if known else None,
                        max(firsts) if known and len(known) == len(firsts) else None))
        return out

    def text(self) -> str:
        kinds = collections.Counter(f.kind for f, _, _ in self.faults)
        lines = [f"chaos seed={self.seed}: {self.seconds:.0f} s of workload, {len(self.faults)} faults injected "
                 f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})",
                 f"  tasks run: {self.tasks} ({', '.join(f'{k} {n}' for k, n in sorted(self.calls.items()))} "
                 f"checks); retried: {self.retried}; objects rebuilt: {self.rebuilt}",
                 f"  errors by type (documented): {dict(self.errors) or 'none'}",
                 f"  wrong results, other errors, hangs: {len(self.failures)}"]
        lines += [f"    {f}" for f in self.failures[:10]]
        lines.append("  longest call by workload: "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.slowest.items())))
        lines.append("  faults (s after start; what; s to the first right result after it, any workload / "
                     "every workload):")
        recovery = self.recovery_times()
        for (fault, at, what), (_, first, every) in zip(self.faults, recovery):
            lines.append(f"    {at - self.started:7.2f} {fault.kind:6} {what}: {_secs(first)} / {_secs(every)}")
        by_kind = collections.defaultdict(list)
        for kind, _, every in recovery:
            by_kind[kind].append(every)
        lines.append("  every workload answering again after a fault, worst by kind: "
                     + ", ".join(f"{k} {_secs(None if None in v else max(v))}" for k, v in sorted(by_kind.items())))
        lines.append("  head away (the driver lost it until it registered again with the next): "
                     + (", ".join(f"{t:.2f} s" for t in self.head_outages) or "never"))
        lines.append(f"  left behind: {self.leftovers or 'nothing'}")
        for path, tail in self.logs:  # (only when something failed: read before the cluster stopped)
            lines += [f"  --- {path} (its end)", *(f"    {line}" for line in tail.splitlines())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the run
class Chaos:
    """One run: ``Chaos(cluster, seed, seconds).run()`` -> Report. ``cluster`` is a
    farpool_testing.Cluster (or HostsCluster) on an empty tmp root; the run starts and stops it."""

    def __init__(self, cluster, seed: int, seconds: float, log=print):
        self.cluster = cluster
        self.seed = seed
        self.seconds = seconds
        self.log = log
        self.report = Report(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.rng = random.Random(seed)  # the workload's own choices (sizes, nodes)
        self.last_fault_done = 0.0  # (monotonic) when the last fault injected so far was done

    # ------------------------------------------------------------------ checks
    def check(self, what: str, call, expected, tasks: int = 1):
        """Run ``call()``; count a right value, a documented error, or a failure."""
        with self.lock:
            self.report.tasks += tasks
            self.report.calls[what] += 1
        began = time.monotonic()
        try:
            value = call()
        except exceptions.TaskError as exc:  # (our functions never raise: a runtime error in disguise)
            self.fail(f"{what}: {type(exc).__name__}: {exc}")
            return None
        except DOCUMENTED as exc:
            with self.lock:
                self.report.errors[type(exc).__name__] += 1
            self.log(f"  [{what}] documented error {type(exc).__name__}: {str(exc)[:300]}")
            return None
        except (exceptions.GetTimeoutError, cf.TimeoutError) as exc:
            self.fail(f"{what}: no answer within {CALL_TIMEOUT_S:.0f} s (a hang): {exc!r}")
            return None
        except Exception as exc:
            self.fail(f"{what}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            return None
        finally:
            took = time.monotonic() - began
            with self.lock:
                self.report.slowest[what] = max(took, self.report.slowest.get(what, 0.0))
            if took > SLOW_S:
                self.log(f"  [{what}] a call took {took:.1f} s")
        if not _same(value, expected):
            self.fail(f"{what}: wrong result {str(value)[:200]}, expected {str(expected)[:200]}")
            return None
        with self.lock:
            self.report.results_at.append((time.monotonic(), what))
        return value

    def fail(self, text: str) -> None:
        self.log(f"  FAILURE {text}")
        with self.lock:
            self.report.failures.append(text.splitlines()[0])

    # ------------------------------------------------------------------ workloads
    def chains(self):
        stepper = farpool.remote(step).options(max_retries=-1, name="chaos-step")
        while not self.stop.is_set():
            width, depth = 20, self.rng.randint(10, 30)
            refs = [farpool.put(k) for k in range(width)]
            for i in range(depth):
                refs = [stepper.remote(ref, i) for ref in refs]
            expected = [k + depth * (depth - 1) // 2 for k in range(width)]
            self.check("chains", lambda: farpool.get(refs, timeout=CALL_TIMEOUT_S), expected, width * depth)

    def mapping(self):
        with farpool.DistributedExecutor(max_workers=4) as ex:
            while not self.stop.is_set():
                n = self.rng.randint(100, 300)
                self.check("map", lambda: list(ex.map(square, range(n), timeout=CALL_TIMEOUT_S)),
                           [i * i for i in range(n)], n)

    def actor(self):
        echo = farpool.remote(Echo).options(max_restarts=-1, max_task_retries=-1).remote()
        while not self.stop.is_set():
            base = self.rng.randrange(1000)
            refs = [echo.twice.remote(base + i) for i in range(50)]
            self.check("actor", lambda: farpool.get(refs, timeout=CALL_TIMEOUT_S),
                       [2 * (base + i) for i in range(50)], 50)
            self.stop.wait(ACTOR_PAUSE_S)
        farpool.kill(echo)

    def arrays(self):
        maker = farpool.remote(make_array).options(max_retries=-1, name="chaos-make")
        summer = farpool.remote(total).options(max_retries=-1, name="chaos-total")
        kept = collections.deque()
        while not self.stop.is_set():
            nodes = self.alive_node_ids()
            if len(nodes) < 2:
                self.stop.wait(0.5)
                continue
            here, there = self.rng.sample(nodes, 2)
            value = float(self.rng.randrange(1, 100))
            ref = maker.options(scheduling_strategy=farpool.NodeAffinity(here, soft=True)).remote(ARRAY_N, value)
            summed = summer.options(scheduling_strategy=farpool.NodeAffinity(there, soft=True)).remote(ref)
            self.check("arrays", lambda: farpool.get(summed, timeout=CALL_TIMEOUT_S), ARRAY_N * value, 3)
            # One more made there and left alone (its only copy on that node) to read later.
            lone = maker.options(scheduling_strategy=farpool.NodeAffinity(here, soft=True)).remote(ARRAY_N, value + 1)
            kept.append((lone, value + 1))
            if len(kept) > KEPT_ARRAYS:  # read for the first time some rounds later: rebuilt if its node is gone
                old, old_value = kept.popleft()
                self.check("arrays-later", lambda: float(farpool.get(old, timeout=CALL_TIMEOUT_S).sum()),
                           ARRAY_N * old_value, 0)
        for old, old_value in kept:  # and those still kept, at the end (after the last faults)
            self.check("arrays-later", lambda: float(farpool.get(old, timeout=CALL_TIMEOUT_S).sum()),
                       ARRAY_N * old_value, 0)

    def alive_node_ids(self) -> list[str]:
        try:
            return sorted(n["node_id"] for n in farpool.nodes() if n["alive"])
        except exceptions.FarpoolError:  # the head is away: no placement hints this round
            return []

    # ------------------------------------------------------------------ faults
    def inject(self, plan: list[Fault], started: float):
        for fault in plan:
            if self.stop.wait(max(0.0, started + fault.at_s - time.monotonic())):
                return
            at = time.monotonic()
            try:
                what = getattr(self, "_kill_" + fault.kind)(fault.pick)
            except Exception as exc:  # a victim that left meanwhile: say so, go on
                what = f"not injected ({type(exc).__name__}: {exc})"
            self.log(f"  fault at {at - started:6.2f} s: {fault.kind}: {what}")
            with self.lock:
                self.report.faults.append((fault, at, what))
            self.last_fault_done = time.monotonic()

    # (The cluster reaches the victims: on loopback by pid, on hosts of their own
    # (farpool_testing.HostsCluster) by a command run on the victim's host.)
    def _kill_worker(self, pick: int) -> str:
        workers = self.cluster.workers()
        if not workers:
            return "no worker alive"
        worker = workers[pick % len(workers)]
        self.cluster.kill_worker(worker)
        return f"SIGKILL worker pid {worker['pid']} on node {worker['node_id'][:8]}{_on(worker)}"

    def _kill_node(self, pick: int) -> str:
        agents = self.cluster.alive_agents()
        agent = agents[pick % len(agents)]
        self.cluster.kill_agent(agent)
        self.cluster.add_node(*self.node_args)  # a node in its place (a new node id)
        return f"SIGKILL node agent pid {agent['pid']} (node {agent['node_id'][:8]}{_on(agent)}); a new node joined"

    def _kill_drain(self, pick: int) -> str:
        agents = self.cluster.alive_agents()
        agent = agents[pick % len(agents)]
        started = time.monotonic()
        out = self.cluster.drain_node(agent, "--drain-timeout", str(DRAIN_TIMEOUT_S))
        took = time.monotonic() - started
        self.cluster.add_node(*self.node_args)
        said = out.stdout.partition("; it said: ")[2].strip()  # (a drain that reached its timeout: why)
        return (f"drained node {agent['node_id'][:8]} (pid {agent['pid']}{_on(agent)}) in {took:.1f} s; "
                f"a new node joined" + (f" (the node said: {said})" if said else ""))

    def _kill_head(self, pick: int) -> str:
        pid = self.cluster.kill_head()
        return f"SIGKILL head pid {pid} (its supervisor starts it again)"

    # ------------------------------------------------------------------ start, run, stop
    node_args = ("--num-cpus", "2", "--object-store-memory", str(256 << 20))

    def run(self) -> Report:
        os.environ["FARPOOL_NODE_TIMEOUT_S"] = str(NODE_TIMEOUT_S)
        plan = fault_plan(self.seed, self.seconds)
        self.log(f"chaos seed={self.seed}, {self.seconds:.0f} s, fault plan: "
                 + ", ".join(f"{f.at_s:.1f} {f.kind}" for f in plan))
        counter = RetryCounter()
        logger = logging.getLogger("farpool")
        logger.addHandler(counter)
        self.cluster.start_head("--object-store-memory", str(256 << 20))
        try:
            for _ in range(NODES):
                self.cluster.add_node(*self.node_args)
            farpool.init(address="auto")  # (on the head node: results stay in the node stores, as lineage needs)
            self._run(plan)
            self.report.head_outages = list(farpool.api._client().head_link.state.outages)
            # Afterwards the cluster still answers.
            self.check("after", lambda: farpool.get(farpool.remote(square).remote(12), timeout=CALL_TIMEOUT_S), 144)
        finally:
            logger.removeHandler(counter)
            self.report.retried, self.report.rebuilt = counter.retried, counter.rebuilt
            if self.report.failures:
                self.report.logs = farpool_testing.log_tails(self.cluster.root, lines=40)
            try:
                farpool.shutdown()
            finally:
                alive = self.cluster.stop()
                if alive:
                    self.report.leftovers.append(f"processes {[p.pid for p in alive]} outlived farpool stop")
        return self.report

    def _run(self, plan):
        workloads = [threading.Thread(target=self._guard, args=(fn,), name=f"chaos-{fn.__name__}", daemon=True)
                     for fn in (self.chains, self.mapping, self.actor, self.arrays)]
        started = self.report.started = time.monotonic()
        for t in workloads:
            t.start()
        injector = threading.Thread(target=self.inject, args=(plan, started), name="chaos-faults", daemon=True)
        injector.start()
        self.stop.wait(self.seconds)
        # The whole plan lands under load: faults that started late (one before them took long,
        # as a drain may, up to its timeout) still run, and the workload goes on QUIET_S after
        # the last of them.
        injector.join(timeout=CALL_TIMEOUT_S)
        if injector.is_alive():
            self.fail(f"the fault injector did not finish its plan within {CALL_TIMEOUT_S:.0f} s of the end (a hang)")
        else:
            self.stop.wait(max(0.0, self.last_fault_done + QUIET_S - time.monotonic()))
        self.stop.set()
        for t in workloads:
            t.join(timeout=CALL_TIMEOUT_S + 10)
            if t.is_alive():
                self.fail(f"{t.name} did not finish within {CALL_TIMEOUT_S + 10:.0f} s of the end (a hang)")
        self.report.seconds = time.monotonic() - started

    def _guard(self, fn):
        try:
            fn()
        except Exception as exc:
            self.fail(f"{fn.__name__} stopped: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _secs(value) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _on(record: dict) -> str:
    """Where a victim's pid is, when the cluster's agents are on hosts of their own."""
    return f" on host h{record['host'] + 1}" if "host" in record else ""


def _same(value, expected) -> bool:
    if isinstance(expected, float):
        return isinstance(value, float) and value == expected
    return value == expected
