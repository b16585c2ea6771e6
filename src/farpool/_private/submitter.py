"""Submission: from ``remote()`` to a task on a leased worker.

Owns the task path up to the worker: pickling a call and its arguments on the caller's
thread (large arguments into the node store once per call, or once for as long as the
same bytes are passed again: shared_args.py), waiting for argument
objects, the queues per resource shape (task_queues.py, pure, decides; this part applies
its Plan), lease requests and their answers (granted, spilled back to another node,
infeasible), sending batches of tasks (``ExecuteTask``), taking queued tasks back from a
busy worker, returning idle leases, and the fast path of a sequential submit-then-get
(``submit_direct``: the caller's thread sends to a parked lease, sparing the I/O thread's
wake-up).  Actor calls share the pickling and argument waiting; their order and channels
are the ``actor_client`` part's.

Dispatch is batched: anything that may let tasks go marks its queue dirty, and one
``dispatch_dirty`` per loop turn serves every dirty queue.

Who may touch it: ``submit`` from any user thread; everything else on the I/O thread.
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings

from farpool import exceptions as exc_mod
from farpool._private import context as context_mod
from farpool._private import protocol, scheduling, transport
from farpool._private.client_part import ClientPart
from farpool._private.connections import AgentConn, DirectChannel, RelayChannel
from farpool._private.object_ref import ObjectRef, _nested_refs
from farpool._private.protocol import encode
from farpool._private.refs import FAILED, PENDING, Entry
from farpool._private.shared_args import has_large_buffer
from farpool._private.task_queues import KeyQueue, LeaseState, RemoteFunctionInfo, TaskRecord

log = logging.getLogger("farpool.client")

# An idle lease is kept this long before it is returned to the agent: a
# sequential submit/get loop reuses its worker without a lease round trip,
# while another owner waits at most this long for the worker.
LEASE_LINGER_S = 0.05
# Queue keys remembered for sharing (submit); past this many the table starts again.
_MAX_KEYS = 1024


class Submitter(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def __init__(self, c):
        super().__init__(c)
        self.tasks = c.queues.tasks
        self.children: dict[str, list] = {}  # in a worker: task id (hex) -> tasks it submitted
        self.pools: dict[str, dict] = {}     # pool_key -> {"initializer", "initargs", "max_tasks"}
        self._dispatch_scheduled = False
        self._dirty_keys: set = set()
        self._dirty_actors: set = set()
        self._cpus_of, self._cpus = None, 0  # (_cluster_cpus: the node table counted, and its count)
        self._keys: dict = {}                # queue key -> itself (submit: one object per key)

    def bind(self) -> None:
        """The sibling parts' calls this one makes (after the shell made them all)."""
        c = self.c
        self.store_value = c.stored.store_value
        self.stored_for = c.stored.stored_for
        self.entry_for = c.values.entry_for

    # ------------------------------------------------------------------ submit (user threads)
    def submit(self, fn: RemoteFunctionInfo, args: tuple, kwargs: dict, num_returns: int, shape: dict,
               max_retries: int, retry_exceptions, name: str, strategy="DEFAULT", pool_key=None,
               actor_id: str | None = None, token=None, stream=None) -> list:
        """The task's return refs.  ``stream``: a streams.StreamState for a streaming generator
        task (its items go there as they come; its one return object is their count)."""
        c = self.c
        if c.broken is not None:
            raise c.broken
        ref_slots = []
        if any(isinstance(a, ObjectRef) for a in args):
            args = list(args)
            for i, a in enumerate(args):
                if isinstance(a, ObjectRef):
                    ref_slots.append((i, a))
                    args[i] = None
            args = tuple(args)
        if kwargs and any(isinstance(v, ObjectRef) for v in kwargs.values()):
            kwargs = dict(kwargs)
            for k, v in list(kwargs.items()):
                if isinstance(v, ObjectRef):
                    ref_slots.append((k, v))
                    kwargs[k] = None
        collector: list = []
        nested = _nested_refs  # (on the task path: save and restore by hand, cheaper than a with block)
        outer, nested.collector = nested.collector, collector
        shared = ()
        try:
            payload, bufs = protocol.dumps_call(args, kwargs, name)
            if bufs and has_large_buffer(bufs):  # stored once by content, passed as refs
                args, kwargs, shared = c.shared_args.share(args, kwargs, ref_slots, name)
                if shared:
                    collector.clear()
                    payload, bufs = protocol.dumps_call(args, kwargs, name)
        finally:
            nested.collector = outer
        task_id = c.new_object_id()
        # Copy out-of-band buffers now: the caller may mutate its arrays after remote() returns.
        # Large arguments go into the node store once per call; workers map them.
        args_location = self.store_value(task_id + b"args", payload, bufs, f"arguments of {name}") \
            if bufs else None
        if args_location is not None:
            payload, bufs = b"", []
        elif bufs:
            bufs = [bytes(b.raw()) for b in bufs]
        # (Empty lists as the shared empty tuple, one return id in a tuple: a burst of tasks in
        # flight is that many fewer containers for the cyclic GC to walk, and it walks them all.)
        return_ids = [task_id] + [c.new_object_id() for _ in range(num_returns - 1)] if num_returns != 1 \
            else (task_id,)
        pinned = [r._id for _, r in ref_slots] + [r._id for r in collector] if ref_slots or collector else ()
        if token is not None:  # an actor call keeps its actor alive (the handles' token) until it ends
            pinned = [*pinned, token._id]
        if not isinstance(strategy, str):  # NodeAffinity(node_id, soft)
            strategy = ("affinity", strategy.node_id, bool(strategy.soft))
        if actor_id is not None:
            key = ("actor", actor_id)
        else:  # one key object per queue, shared by its tasks (not three tuples per task for the GC to walk)
            key = (tuple(sorted(shape.items())), pool_key, strategy)
            key = self._keys.get(key) or self._known_key(key)
        task = TaskRecord(task_id, fn, payload, bufs or (), ref_slots or (), return_ids, shape, key, max_retries,
                          retry_exceptions, pinned, name, strategy, pool_key, actor_id=actor_id)
        task.args_location = args_location
        owner = c.owner_address
        # The refs are counted here, under the lock taken anyway (not one take each as they
        # are made: the I/O thread holds it while it takes results in).
        refs = [ObjectRef(oid, owner, _register=False) for oid in return_ids]
        with self.lock:
            c.events.submitted(task)
            for oid in return_ids:
                self.objects[oid] = Entry(task=task, local_refs=1)
            for oid in pinned:
                e = self.objects.get(oid)
                if e is not None:
                    e.task_pins += 1
        for ref in refs:
            ref._counted_by = c
        if shared:  # the task's pins hold them now (not its record's refs: they go when the pins do)
            c.shared_args.held_by_task(shared)
        if stream is not None:
            task.stream = stream
            c.streams.opened(task)  # (before it can be dispatched: its end must find the stream)
        # Borrowed top-level refs need the owner's value: ask for it unless asked already
        # (a ref that arrived inside a value has an entry, not yet fetched).
        for _, ref in ref_slots:
            self.entry_for(ref)
        if c.in_worker and context_mod.context.task_id is not None:
            # remember children, for cancel(recursive=True)
            self.children.setdefault(context_mod.context.task_id, []).append(task_id)
        if not (ref_slots or actor_id) and key in self.queues.parked and self.submit_direct(task):
            return refs
        # A call to an actor with nothing in flight goes out from this thread when the loop
        # thread sleeps (a caller's round trip); calls behind others go through the loop
        # thread, in batches.  (The look at the actor is not under its lock: a stale one
        # only picks the other way, and both keep the calls' order.)
        if actor_id is not None and self.c.actor_calls.idle(actor_id) and self.loop.run_here(self.on_submit, task):
            return refs
        # A task that goes to a worker at once is handed over by this thread when the loop thread
        # sleeps (see TaskQueues.starts_now); the rest are queued for the loop thread, in batches.
        if actor_id is None and self.queues.starts_now(key) and self.loop.run_here(self.on_submit, task):
            return refs
        self.loop.call_soon(self.on_submit, task)
        return refs

    def _known_key(self, key: tuple) -> tuple:
        if len(self._keys) >= _MAX_KEYS:  # (shapes made afresh per call: the table stays small)
            self._keys.clear()
        return self._keys.setdefault(key, key)

    def submit_direct(self, task: TaskRecord) -> bool:
        """The fast path of a sequential submit-then-get: send the task from this thread
        straight to an idle leased worker on this node, sparing the I/O thread's wake-up.

        Whoever takes a parked lease (TaskQueues.take_parked, under the lock) owns it: a
        caller here, or the I/O thread to dispatch queued tasks or to return it.  The task
        is recorded in flight here, before it leaves: its reply can reach the I/O thread
        before ``_sent_direct`` does (the loop may be reading that worker's stream for
        an earlier reply when this one arrives), and a reply for a task not yet recorded
        was taken for one already ended, leaving the task in flight for ever.

        When the loop thread sleeps, all of it happens here as the loop (``_send_parked``):
        the lease is the loop's again before its reply can be read, so that reply parks it
        for the caller's next task (a caller preempted between its send and its hand-back
        left the lease claimed when the I/O thread read the reply: its next task took the
        slow way).
        """
        sent = []
        if self.loop.run_here(self._send_parked, task, sent):
            return bool(sent)
        lease = self.queues.take_parked(task.key, task)  # (recorded in flight there already)
        if lease is None:
            return False
        frames = self.task_frames(lease, [task])
        # Send, then hand the lease back: once _sent_direct runs, the I/O thread may send on this
        # worker's stream again (a batch dispatched from its queue), so every byte of ours must
        # be in the socket or in the stream's queue first.  (Handed back first, the loop could
        # run _sent_direct while sendmsg had the GIL released, and dispatch a batch whose bytes
        # went in before the rest of ours: a garbled message, a task lost.)
        lease.channel.stream.send_from_thread(frames)
        self.loop.call_soon_lazy(self._sent_direct, task, lease)
        return True

    def _send_parked(self, task: TaskRecord, sent: list) -> None:
        """(as the loop, from the caller's thread) submit_direct with the loop held."""
        lease = self.queues.take_parked(task.key, task)
        if lease is not None:
            lease.channel.send(self.task_frames(lease, [task]))
            self._sent_direct(task, lease)
            sent.append(lease)

    def _sent_direct(self, task: TaskRecord, lease: LeaseState) -> None:
        lease.uses += 1
        if not self.queues.sent_direct(task, lease):  # its worker exited before the task reached it
            self.mark_dirty(task.key)
        elif lease.yielding:  # asked back meanwhile (its reply may have come already)
            self.return_yielded(lease)
        else:  # (its reply, if it came already, found it claimed: not parked then)
            self.queues.park_if_idle(lease)

    # ------------------------------------------------------------------ arguments (I/O thread)
    def on_submit(self, task: TaskRecord) -> None:
        self.tasks[task.task_id] = task
        waiting = 0
        with self.lock:
            for _, ref in task.ref_slots:
                entry = self.objects.get(ref._id)
                if entry is None:
                    continue
                if entry.state == PENDING:
                    waiting += 1
                    entry.add_waiter(lambda _e, t=task: self._dep_ready(t))
        task.deps_left = waiting
        if task.actor_id is not None:
            # Actor calls keep submission order: queued now, sent when first in line and ready.
            self.c.actor_calls.add(task)
            self.mark_actor_dirty(task.actor_id)
        elif waiting == 0:
            self.enqueue(task)

    def _dep_ready(self, task: TaskRecord) -> None:
        task.deps_left -= 1
        if task.actor_id is not None:
            self.mark_actor_dirty(task.actor_id)
        elif task.deps_left == 0:
            self.enqueue(task)

    def failed_argument(self, task: TaskRecord) -> Entry | None:
        """The entry of a top-level argument that failed: the task fails without running."""
        for _, ref in task.ref_slots:
            entry = self.objects.get(ref._id)
            if entry is not None and entry.state == FAILED:
                return entry
        return None

    def enqueue(self, task: TaskRecord, front: bool = False) -> None:
        if task.cancelled:
            return
        failed = self.failed_argument(task)
        if failed is not None:
            self.c.completion.finish_failed(task, self.c.values.error_of(failed))
            return
        self.queues.enqueue(task, front)
        self.mark_dirty(task.key)

    # ------------------------------------------------------------------ dispatch (I/O thread)
    def mark_dirty(self, key) -> None:
        self._dirty_keys.add(key)
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch_dirty)

    def mark_actor_dirty(self, actor_id: str) -> None:
        self._dirty_actors.add(actor_id)
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch_dirty)

    def after_results(self, key) -> None:
        """A lease of ``key`` reported results.  A caller's round trip (nothing queued, one
        lease) lets its lease linger now, sparing a pass through the loop; otherwise the key
        is dispatched once the loop has read what else came (one dispatch for many results,
        and take-backs judged on all of them: dispatching per result slowed Pool.map)."""
        kq = self.queues.keys.get(key)
        if kq is None:
            return
        if not kq.queue and len(kq.leases) <= 1:
            self.dispatch(key)
        else:
            self.mark_dirty(key)

    def _dispatch_dirty(self) -> None:
        self._dispatch_scheduled = False
        keys, self._dirty_keys = self._dirty_keys, set()
        for key in keys:
            if key in self.queues.keys:
                self.dispatch(key)
        actors, self._dirty_actors = self._dirty_actors, set()
        if actors:
            actor_client = self.c.actor_client
            for actor_id in actors:
                actor_client.dispatch(actor_id)

    def dispatch(self, key) -> None:
        plan = self.queues.dispatch(key, self._cluster_cpus)
        for lease, batch in plan.sends:
            self.send_tasks(lease, batch)
        if plan.requests:
            kq = self.queues.keys[key]
            agent, spillback_ok = self._agent_for(kq, key)
            if agent is None:
                return
            for _ in range(plan.requests):
                self._request_lease(kq, key, agent, spillback_ok)
        if plan.take_back is not None:
            self._send_take_back(*plan.take_back)
        for lease in plan.linger:
            self._linger(lease)

    def _cluster_cpus(self) -> int:
        """CPU units of the live nodes (counted again when the client gets a new node table)."""
        nodes = self.c.nodes
        if nodes is not self._cpus_of:
            self._cpus_of = nodes
            self._cpus = sum(n["total"].get("CPU", 0) for n in nodes if n.get("alive"))
        return self._cpus

    def _send_take_back(self, busy: LeaseState, ids: list) -> None:
        token = (busy.node_id, busy.lease_id)
        if isinstance(busy.channel, DirectChannel):
            # Its worker may be deep in a long task: the doorbell is answered even then.
            data = pickle.dumps((ids, token, self.c.identity), protocol=5)
            if not self.conns.send_doorbell(data, busy.channel.doorbell):
                busy.taking_back = False  # gone, or its queue is full: try again at the next chance
        else:  # on another machine: its agent relays it, answered between tasks
            busy.channel.send(encode("TakeBack", (ids, token)))

    def on_taken_back(self, task_ids, lease_key) -> None:
        """Tasks a worker handed back unstarted: first in line again (not an attempt)."""
        lease = self.queues.taken_back(tuple(lease_key), task_ids)
        if lease is not None:
            self.mark_dirty(lease.key)

    def _agent_for(self, kq: KeyQueue, key) -> tuple:
        """Where to ask for leases: the home agent, or the node a NodeAffinity names."""
        home = self.conns.home
        if not isinstance(kq.strategy, tuple):
            return home, True
        _, node_id, soft = kq.strategy
        nodes = self.c.nodes
        node = next((n for n in nodes if n["node_id"] == node_id), None)
        if node is not None and node["alive"] and not (soft and node.get("draining")):
            agent, why = self.conns.agent_conn(node_id, nodes)
            if agent is None:
                if not soft:
                    self.fail_key(key, exc_mod.NodeDiedError(
                        f"NodeAffinity: cannot reach node {node_id} ({why}); use soft=True to "
                        "let the task run elsewhere"))
                    return None, False
                return home, True
            return agent, False
        if soft:
            return home, True
        state = "is dead" if node is not None else "is not part of this cluster"
        self.fail_key(key, exc_mod.InfeasibleError(
            f"NodeAffinity: node {node_id} {state} (live nodes: "
            f"{', '.join(n['node_id'] for n in nodes if n['alive'])}); pick a live node from "
            "farpool.nodes(), or use NodeAffinity(node_id, soft=True) to allow any node"))
        return None, False

    def _request_lease(self, kq: KeyQueue, key, agent: AgentConn, spillback_ok: bool = True) -> None:
        request_id = self.conns.next_request_id()
        self.queues.request_sent(key, request_id, agent)
        # (a NodeAffinity queue is placed as DEFAULT, but named apart: the agent tells its
        # requests from the same shape's default queue, whose leases it may ask back for them)
        strategy = kq.strategy if isinstance(kq.strategy, str) else ":".join(map(str, kq.strategy))
        transport.send(agent.socket, encode("RequestLease", (request_id, kq.shape, self.c.job_id, kq.pool_key,
                                                             strategy, spillback_ok)))

    def send_tasks(self, lease: LeaseState, batch: list) -> None:
        """Send a batch the queues already marked RUNNING on ``lease``."""
        lease.uses += 1
        lease.channel.send(self.task_frames(lease, batch))

    def task_frames(self, lease: LeaseState, batch: list) -> list:
        """The ExecuteTask message for a batch of tasks sent on this lease."""
        wire = []
        buffers: list = []
        now = time.perf_counter()
        objects = self.objects
        shape = lease_info = None  # one TaskLease per shape in a batch (one object: the worker sees it is the same)
        for task in batch:
            if task.shape is not shape:
                shape = task.shape
                lease_info = (lease.gpu_ids, shape.get("CPU", 0) / scheduling.UNIT, shape)
            fn = task.fn
            fn_bytes = None
            if fn.fn_hash not in lease.shipped:
                fn_bytes = fn.fn_bytes
                lease.shipped.add(fn.fn_hash)
            ref_values = []
            ref_bufs = []
            for slot, ref in task.ref_slots:
                entry = objects[ref._id]
                if entry.location is not None:
                    spec = self.stored_for(lease.node_id, ref._id, entry, f"an argument of {task.name}")
                    ref_values.append((slot, tuple(spec), 0))  # (plain on the wire)
                else:
                    ref_values.append((slot, entry.payload, len(entry.buffers)))
                    ref_bufs.extend(entry.buffers)
            args_payload, arg_bufs = task.args_payload, task.arg_bufs
            if task.args_location is not None:
                spec = self.c.stored.read_on(lease.node_id, task.args_location, f"the arguments of {task.name}")
                if isinstance(spec, protocol.PullFrom):
                    task.args_copies = (task.args_copies or set()) | {lease.node_id}
                args_payload = tuple(spec)
            job_setup = None
            if not lease.job_sent:
                job_setup = dict(self.c.job_setup, pool_key=task.pool_key, pool=self.pools.get(task.pool_key))
                lease.job_sent = True
            wire.append((task.task_id, fn.fn_hash, fn_bytes, task.name, args_payload, len(arg_bufs),  # a TaskSpec
                         ref_values, len(task.return_ids) if task.stream is None else self.c.streams.spec(task.stream),
                         job_setup, lease_info))
            buffers.extend(arg_bufs)
            buffers.extend(ref_bufs)
            task.submitted_at = now
        self.c.events.sent(batch, lease, now)
        # Large results into the worker's node store when we can read them from there (a
        # store of our own to copy them into, or the worker on our node); else inline.
        home = self.conns.home
        return encode("ExecuteTask", (wire, self.c.peer_address, home is not None and home.local), buffers)

    def _linger(self, lease: LeaseState) -> None:
        """An idle lease goes back in LEASE_LINGER_S unless used meanwhile.  The timer is not
        cancelled when the lease is used (a round trip would cancel and set one each time):
        it finds out when it fires, and lingers again from then."""
        lease.linger_uses = lease.uses
        lease.linger = self.loop.call_later(LEASE_LINGER_S, self._return_idle, lease)

    def _return_idle(self, lease: LeaseState) -> None:
        """Its linger timer fired (see TaskQueues.idle)."""
        if lease.uses != lease.linger_uses and not (lease.inflight or lease.claimed):
            self._linger(lease)  # (a busy one lingers again once idle: TaskQueues.dispatch)
            return
        what = self.queues.idle(lease)
        if what == "dispatch":
            self.dispatch(lease.key)
        elif what == "return":
            agent = self.conns.agents.get(lease.node_id)
            if agent is not None:
                transport.send(agent.socket, encode("ReturnLease", (lease.lease_id, False)))

    def on_yield_lease(self, conn: AgentConn, lease_id: int) -> None:
        """Its agent wants this lease back for a request that waits behind it (leases.tick):
        no more tasks go to it; it goes back now if idle, else when its tasks end (yielded)."""
        lease = self.queues.leases.get((conn.node_id, lease_id))
        if lease is None:
            return
        if lease.linger is not None:
            self.loop.cancel_timer(lease.linger)
            lease.linger = None
        if self.queues.yield_lease((conn.node_id, lease_id)) is not None:
            transport.send(conn.socket, encode("ReturnLease", (lease_id, False)))
        self.mark_dirty(lease.key)  # (its key asks for another lease if it still has work)

    def return_yielded(self, lease: LeaseState) -> None:
        """A lease asked back whose tasks ended goes back to its agent."""
        if self.queues.yielded(lease):
            agent = self.conns.agents.get(lease.node_id)
            if agent is not None:
                transport.send(agent.socket, encode("ReturnLease", (lease.lease_id, False)))

    # ------------------------------------------------------------------ lease answers (I/O thread)
    def on_lease_granted(self, conn: AgentConn, request_id, lease_id, worker_id, address, node_id, gpu_ids):
        kq = self.queues.answered(request_id)
        if kq is None or not kq.queue:
            # Nothing left to run: give the worker straight back.
            transport.send(conn.socket, encode("ReturnLease", (lease_id, False)))
            return
        key = kq.key
        if address is not None:
            try:
                channel = self.conns.worker_channel(address)
            except OSError as error:
                log.warning("cannot connect to worker %s at %s: %s", worker_id, address, error)
                transport.send(conn.socket, encode("ReturnLease", (lease_id, True)))
                self.mark_dirty(key)
                return
        else:
            channel = RelayChannel(conn, worker_id)
        lease = LeaseState(lease_id, worker_id, node_id, channel, gpu_ids, key,
                           direct=isinstance(channel, DirectChannel))
        self.queues.add_lease(lease)
        self.dispatch(key)

    def on_lease_spillback(self, request_id, node_id, tcp_address, ipc_address):
        kq = self.queues.answered(request_id)
        if kq is None:
            return
        agent, why = self.conns.agent_conn(node_id, self.c.nodes, tcp_address, ipc_address)
        if agent is None:
            self.fail_key(kq.key, exc_mod.NodeDiedError(
                f"cannot reach node {node_id[:8]} at {tcp_address or ipc_address} that could run these "
                f"tasks: {why}"))
            return
        if kq.queue:
            self._request_lease(kq, kq.key, agent, spillback_ok=False)

    def on_lease_infeasible(self, request_id, message, fatal):
        kq = self.queues.answered(request_id, final=fatal)
        if kq is None:
            return
        if fatal:
            self.fail_key(kq.key, exc_mod.InfeasibleError(message))
        elif not kq.warned_infeasible:
            kq.warned_infeasible = True
            self.c.events.waiting(kq.queue, message)
            log.warning("%s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=1)

    def fail_key(self, key, error: BaseException) -> None:
        for task in self.queues.drain(key):
            self.c.completion.finish_failed(task, error)

    def nodes_draining(self, node_ids: set) -> None:
        """Nodes ``node_ids`` drain: they grant nothing more.  Our lease requests waiting there
        (not from our home agent: NodeAffinity, or sent on by a spillback) are withdrawn and
        asked again, elsewhere, unless NodeAffinity(soft=False) pins them there (those wait for
        the node to stop, and fail then)."""
        home = self.conns.home
        for key, request_id, agent in self.queues.requests_on(node_ids):
            strategy = self.queues.keys[key].strategy
            if agent is home or (isinstance(strategy, tuple) and not strategy[2]):
                continue
            self.queues.answered(request_id)
            transport.send(agent.socket, encode("CancelLease", (request_id,)))
            self.mark_dirty(key)

    def agent_closed(self, conn: AgentConn) -> None:
        """An agent connection closed: lease requests made on it are asked again."""
        for key in self.queues.forget_requests_to(conn):
            self.mark_dirty(key)

    # ------------------------------------------------------------------ pools
    def register_pool(self, pool_key: str, initializer=None, initargs=(), max_tasks: int | None = None) -> None:
        """Tasks submitted with ``pool_key`` get workers of their own that first run
        ``initializer(*initargs)`` and retire after ``max_tasks`` tasks (facades' hooks)."""
        setup = {"max_tasks": max_tasks, "initializer": None, "initargs": None}
        if initializer is not None:
            setup["initializer"] = protocol.dumps_function(initializer)
            import cloudpickle
            try:
                setup["initargs"] = cloudpickle.dumps(tuple(initargs), protocol=5)
            except Exception as exc:
                raise protocol.SerializationError(f"cannot pickle initargs: {exc}") from exc
        self.pools[pool_key] = setup
