"""A worker process: runs tasks sent straight to it by the owners that lease it.

Forked by the launcher (launcher.py); one main thread runs the event loop and
the tasks themselves, so a task can be interrupted with SIGINT
(``KeyboardInterrupt``) and a nested ``get`` inside a task uses the process's
core client (client.py), which has its own I/O thread::

    local owners --ExecuteTask--> <session>/w-<id> (Unix stream) ---+
    remote owners --Relayed(ExecuteTask)--> agent DEALER -----------+--> run --> TaskFinished
    lifeline (launcher) --EOF--> exit

A worker serves one job: the first task of an owner carries the job set-up
(``sys.path``, cwd, the driver's main script, loaded as ``__mp_main__`` the way
multiprocessing's spawn does, so functions defined in the driver's script are
pickled by reference and share one module's globals).  Functions arrive once
per owner and worker and are cached by content hash.

Beside it: task_args.py reads a task's arguments (from the message or the node
stores), worker_process.py sets up the process around the tasks (the driver's
main script, runtime_env packages, output, cancel signals), worker_streams.py runs streaming
generator tasks (items sent as they are yielded, the owner's credit and stop).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from typing import NamedTuple

from farpool._private import object_ref
from farpool._private import context as context_mod
from farpool._private import placement_groups, protocol, scheduling, segments, session, stacks, transport, unix_streams
from farpool._private import runtime  # noqa: F401 - sets the client's connector: a ref used before init joins
from farpool._private.context import context
from farpool._private.task_args import (load_args, load_args_tracked, mark_phase, split_batch, still_held,
                                        store_puller)
from farpool._private.worker_process import (TaskOutput, call_user, limit_thread_pools, on_sigint, setup_main,
                                             unpack)
from farpool._private.worker_streams import WorkerStreams
from farpool._private.protocol import encode

log = logging.getLogger("farpool.worker")


# Status of a task a retiring worker hands back unrun (max_tasks_per_child reached).
RETIRED = "retired"


class InitializerError(RuntimeError):
    """The pool initializer of this worker raised: no task of that pool can run here."""


class _ActorCall(NamedTuple):
    """A call to a threaded or async actor, run off the main thread."""
    task_id: bytes
    fn_hash: bytes
    name: str
    args: object
    arg_bufs: list
    ref_values: list
    ref_bufs: list
    num_returns: int
    caller: tuple | None


def _identity(caller: tuple | None) -> bytes | None:
    """The client identity in ``caller``, a protocol.OwnerAddress kept as the plain tuple it
    came as (it is passed on as one, in AddBorrower); None for no caller.  Unpacked, not
    named with ``_make``: twice per batch on the task path, and unpacking costs a tenth."""
    if not caller:
        return None
    identity, *_ = caller  # an OwnerAddress starts with its identity (and may be only that)
    return identity


class _Batch:
    """An ExecuteTask message being worked through: the tasks not yet run, the results so far
    (not a dataclass: dataclasses and inspect would cost the launcher and idle workers)."""
    __slots__ = ("reply", "caller", "store_results", "direct", "pending", "channel", "results", "out_buffers")

    def __init__(self, reply, caller: tuple | None, store_results: bool, direct: bool, pending: deque, channel=None):
        self.reply, self.caller = reply, caller
        self.store_results = store_results  # large results go into this node's store (the caller maps or copies them)
        self.direct = direct                # from an owner on this machine (not relayed by the agent)
        self.pending = pending              # (TaskSpec, arg buffers, ref buffers): see task_args.split_batch
        self.channel = channel              # the local owner's StreamChannel (None: relayed by the agent)
        self.results, self.out_buffers = [], []


class Worker:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.worker_id = cfg["worker_id"]
        self.node_id = cfg["node_id"]
        self.where = f"node {self.node_id[:8]} worker {self.worker_id} (pid {os.getpid()})"
        self.loop = transport.EventLoop()
        self.listener = unix_streams.listen_unix(os.path.join(cfg["session_dir"], f"w-{self.worker_id}"))
        self.agent = transport.dealer(b"w:" + self.worker_id.encode())
        self.agent.connect(cfg["agent_address"])
        store_puller.address = cfg["agent_address"]
        self.loop.add_reader(self.listener.fileno(), self._on_accept)
        self.loop.add_reader(self.agent, self._on_agent)
        self.loop.add_reader(cfg["lifeline_fd"], self._on_lifeline)
        self.functions: dict[bytes, object] = {}
        self.carried_functions: dict[bytes, bytes] = {}  # code that came with tasks taken back
        self.carried_job: dict | None = None              # a job setup that came with one
        self.job_id = None
        self.pool_key = None
        self.pool_ready = False
        self.pool_error: str | None = None
        self.tasks_left: int | None = None
        self.channels: set = set()
        self._requests = 0
        self.borrowed: dict = {}  # caller identity -> ids of refs from its arguments that outlived their task
        self.batches: deque = deque()  # ExecuteTask messages not done yet, in arrival order
        self.running = False           # inside _run_batches (messages read meanwhile only queue)
        # Reading the channels and changing ``batches``: the main thread holds this lock except
        # while a task runs; then the doorbell thread may (see _on_doorbell).
        self.io_lock = threading.Lock()
        self.io_lock.acquire()
        self.reply_to: dict = {}  # caller identity -> how to answer it (its channel)
        # TakeBack requests from owners on this machine come on a datagram socket of their own,
        # which a thread watches: they are answered even while a long task runs.
        import socket as _socket
        doorbell = os.path.join(cfg["session_dir"], f"w-{self.worker_id}.tb")
        if os.path.exists(doorbell):
            os.unlink(doorbell)
        self.doorbell = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self.doorbell.bind(doorbell)
        os.chmod(doorbell, 0o600)
        self.doorbell.setblocking(False)
        self.loop.add_reader(self.doorbell.fileno(), self._on_doorbell_here)
        threading.Thread(target=self._watch_doorbell, name="farpool-takeback", daemon=True).start()
        self._agent_backlog: list = []
        self.store_results = False  # set per message: for owners that read from a node store
        self.actor = None
        self.actor_executor = None  # None: calls run inline in order; a thread pool; or "async"
        self.gpu_ids: list[int] | None = None
        self.shape: dict | None = None  # the resource shape of the last task's lease
        self.lease_info = None  # the last task's lease (TaskLease fields), as it came
        self.threads = 1
        self.streams = WorkerStreams(self)  # streaming generator tasks running here (worker_streams.py)
        context.node_id = self.node_id
        context.worker_id = self.worker_id

    def start(self) -> None:
        transport.send(self.agent, encode("WorkerReady", (self.worker_id, os.getpid())))

    def _on_lifeline(self) -> None:
        if not os.read(self.cfg["lifeline_fd"], 4096):
            os._exit(0)  # the node is gone; nothing to flush to

    def _on_accept(self) -> None:
        """A local owner connects to send us tasks directly."""
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        channel = unix_streams.StreamChannel(conn, self.loop)
        self.channels.add(channel)
        self.loop.add_reader(channel.fd, lambda: self._on_channel(channel))

    def _on_channel(self, channel) -> None:
        for frames in channel.read():
            self._handle(frames, channel.send, direct=True, channel=channel)  # a local owner: it maps results
        self._run_batches()
        if channel.eof:
            channel.close()
            self.channels.discard(channel)

    def _on_agent(self) -> None:
        for frames in transport.recv_all(self.agent, limit=64):
            self._on_agent_frames(frames)
        self._run_batches()

    def _on_agent_frames(self, frames) -> None:
        if frames[0] == b"Relayed":
            origin = frames[1]
            self._handle(frames[2:], lambda reply, o=origin: transport.send(
                self.agent, [b"Relay", o, *reply]))
        elif frames[0] == b"SegmentsDropped":
            _, (dropped,), _ = protocol.decode(frames)
            segments.forget_written(dropped)
        elif frames[0] == b"Retire":
            self._retire_soon()
        elif frames[0] == b"CallerGone":  # the owner of streams running here is gone (WatchCaller)
            _, (identity,), _ = protocol.decode(frames)
            self.streams.caller_gone(identity)
        else:
            log.warning("unexpected message from the agent: %r", frames[0][:32])

    def _handle(self, frames, reply, direct: bool = False, channel=None) -> None:
        try:
            tag, fields, buffers = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            log.warning("dropped a bad message: %s", exc)
            return
        if tag == "ExecuteTask" and self.actor_executor is not None:
            message = protocol.ExecuteTask._make(fields)
            self._execute_concurrent(message.specs, message.caller, buffers, reply)
        elif tag == "ExecuteTask":  # run by _run_batches, in order
            message = protocol.ExecuteTask._make(fields)
            caller = message.caller
            if caller:
                self.reply_to[_identity(caller)] = reply
            # An owner on another node with a store of its own copies large results from ours
            # (pull.py) when it reads them; one without (a driver joined over TCP) gets them inline.
            store_results = direct or bool(message.store_results)
            self.batches.append(_Batch(reply, caller, store_results, direct,
                                       deque(split_batch(message.specs, buffers)), channel=channel))
        elif tag == "TakeBack":
            message = protocol.TakeBack._make(fields)
            self._take_back(set(message.task_ids), message.token, reply)
        elif tag == "CreateActor":
            reply(encode("ActorCreated", self._create_actor(fields, buffers)))
        elif tag == "StreamCredit":
            self.streams.credit(*protocol.StreamCredit._make(fields))
        elif tag == "StopStream":
            self.streams.stop(fields[0])
        elif tag == "Ping":
            reply(encode("Pong", fields))
        else:
            log.warning("a worker does not handle %s", tag)

    def _create_actor(self, fields, buffers) -> tuple:
        """Become the actor: load its class and run __init__ (once per incarnation)."""
        actor_id, cls_bytes, args_payload, n_arg_bufs, ref_values, job_setup, options = fields
        self._apply_job(job_setup)
        context.actor_id = actor_id
        pos = n_arg_bufs
        ref_bufs = []
        for _slot, _payload, nbuf in ref_values:
            ref_bufs.append(buffers[pos:pos + nbuf])
            pos += nbuf
        try:
            cls = protocol.loads_function(cls_bytes)
            args, kwargs = load_args(args_payload, buffers[:n_arg_bufs], ref_values, ref_bufs)
            context.task_name = f"{cls.__name__}.__init__"
            stacks.board.started(None, context.task_name)
            context.actor_class = cls
            self._apply_lease((options.get("gpu_ids") or [], options.get("num_cpus") or 1,
                               options.get("resources") or {}))
            self.actor = cls(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            error = self._error(exc, f"{getattr(cls_bytes, '__name__', 'actor')}.__init__")
            return (actor_id, False, error[:5])
        finally:
            context.task_name = None
            stacks.board.ended()
        session.set_process_name("farpool-actor")
        concurrency = options.get("max_concurrency") or 1
        if options.get("is_async"):
            import asyncio
            import threading
            self.actor_loop = asyncio.new_event_loop()
            threading.Thread(target=self.actor_loop.run_forever, name="farpool-actor-loop", daemon=True).start()
            self.actor_semaphore = None
            self.actor_concurrency = options.get("max_concurrency") or 1000
            self.actor_executor = "async"
        elif concurrency > 1:
            from concurrent.futures import ThreadPoolExecutor
            self.actor_executor = ThreadPoolExecutor(concurrency, thread_name_prefix="farpool-actor")
        return (actor_id, True, None)

    def _execute_concurrent(self, tasks, caller, buffers, reply) -> None:
        """Threaded or async actor: run each call off the main thread; reply from the loop."""
        for task, arg_bufs, ref_bufs in split_batch(tasks, buffers):
            call = _ActorCall(task.task_id, task.fn_hash, task.name, task.args, arg_bufs, task.ref_values, ref_bufs,
                              task.num_returns, caller)
            if self.actor_executor == "async":
                import asyncio
                asyncio.run_coroutine_threadsafe(self._run_async(call, reply), self.actor_loop)
            else:
                self.actor_executor.submit(self._run_threaded, call, reply)

    def _finish_concurrent(self, result, caller, out_buffers, reply) -> None:
        def send():
            reply(encode("TaskFinished", ([result], False) + self._take_borrowed(caller), out_buffers))
            if context.exit_requested:  # exit_actor() in a threaded or async actor
                self._retire(protocol.ACTOR_EXIT_CODE)
        self.loop.call_soon(send)

    def _run_threaded(self, call: "_ActorCall", reply) -> None:
        started, out_buffers, arrivals = time.time(), [], []
        num_returns = call.num_returns
        try:
            value = self._invoke(call, arrivals)
            if num_returns.__class__ is not int:  # a streaming generator method
                value = self.streams.run_threaded(call.task_id, value, protocol.StreamSpec._make(num_returns),
                                                  call.name, reply, call.caller)
                num_returns = 1
            result = self._package(call.task_id, value, num_returns, call.name, started, out_buffers, call.caller)
        except BaseException as exc:  # noqa: BLE001
            result = (call.task_id, False, self._error(exc, call.name, call.caller), started, time.time())
        value = None
        self._end_call(call, result, out_buffers, arrivals, reply)

    async def _run_async(self, call: "_ActorCall", reply) -> None:
        import inspect
        if self.actor_semaphore is None:
            import asyncio
            self.actor_semaphore = asyncio.Semaphore(self.actor_concurrency)
        started, out_buffers, arrivals = time.time(), [], []
        value = None
        num_returns = call.num_returns
        async with self.actor_semaphore:
            try:
                value = self._invoke(call, arrivals)
                if num_returns.__class__ is not int:  # a streaming generator method (async or not)
                    value = await self.streams.run_async(call.task_id, value, protocol.StreamSpec._make(num_returns),
                                                         call.name, reply, call.caller)
                    num_returns = 1
                elif inspect.isawaitable(value):
                    value = await value
                result = self._package(call.task_id, value, num_returns, call.name, started, out_buffers,
                                       call.caller)
            except BaseException as exc:  # noqa: BLE001
                result = (call.task_id, False, self._error(exc, call.name, call.caller), started, time.time())
        value = None
        self._end_call(call, result, out_buffers, arrivals, reply)

    def _invoke(self, call: "_ActorCall", arrivals: list):
        """Load a threaded or async actor call's arguments (the refs that arrived in them go
        into ``arrivals``, even if the call raises) and call its method."""
        args, kwargs, got = load_args_tracked(call.args, call.arg_bufs, call.ref_values, call.ref_bufs)
        arrivals.extend(got)
        return getattr(self.actor, call.fn_hash[6:].decode())(*args, **kwargs)

    def _end_call(self, call: "_ActorCall", result, out_buffers, arrivals, reply) -> None:
        """Refs from the arguments that the call kept, whether it returned or raised, are
        borrowed; then its result goes back from the loop."""
        if arrivals:
            self.loop.call_soon(self._note_borrowed, call.caller, still_held(arrivals, call.caller))
        self._finish_concurrent(result, call.caller, out_buffers, reply)

    def _allocate(self, store_id: bytes, size: int, what: str, owner: str) -> str:
        """A segment of the node store from the agent (a blocking round trip on our DEALER),
        for a value ``owner`` (a client identity) frees, or the agent when that client is gone."""
        self._requests += 1
        request_id = self._requests
        transport.send(self.agent, encode("AllocateObject", (request_id, store_id, size, owner, what)))
        while True:
            if not self.agent.poll(120_000):
                raise RuntimeError("the node agent did not answer an object store allocation in 120 s")
            frames = self.agent.recv_multipart()
            if frames[0] == b"ObjectAllocated":
                _, (answered, path, error), _ = protocol.decode(frames)
                if answered == request_id:
                    if path is None:
                        from farpool.exceptions import ObjectStoreFullError
                        raise ObjectStoreFullError(error)
                    return path
            self._agent_backlog.append(frames)  # relayed tasks: handled after this call
            self.loop.call_soon(self._drain_agent_backlog)

    def _drain_agent_backlog(self) -> None:
        backlog, self._agent_backlog = self._agent_backlog, []
        for frames in backlog:
            self._on_agent_frames(frames)
        self._run_batches()

    def _note_borrowed(self, caller, ids: list) -> None:
        if ids:
            self.borrowed.setdefault(_identity(caller), []).extend(ids)

    def _take_borrowed(self, caller) -> tuple:
        """For a TaskFinished to ``caller``: (our client's address, ids of refs from its arguments
        we still hold, (id, address) of processes we passed such refs to that keep them)."""
        borrowed = self.borrowed.pop(_identity(caller), None) or ()
        client = object_ref.current()
        if client is None:
            return (None, (), ())
        return (client.peer_address, borrowed, client.take_sub_borrowed() if client.refs.sub_borrowed else ())

    def _retire(self, code: int = 0) -> None:
        """max_tasks_per_child reached: deliver what is queued, then exit (the agent replaces us).
        An actor that called exit_actor() leaves the same way, with ACTOR_EXIT_CODE."""
        for channel in list(self.channels):
            channel.flush_blocking()
        self.agent.setsockopt(transport.LINGER, 2000)
        self.agent.close()
        store_puller.close()
        transport.term_context()
        os._exit(code)

    def _retire_soon(self) -> None:
        """Our node drains: finish the running task, hand back those queued behind it (RETIRED:
        their owners run them elsewhere without spending an attempt), then exit.  Idle, we
        wait: tasks our lease holder sent meanwhile are handed back the same way (exiting now
        would lose them, an attempt spent), else it returns the lease and the node stops us.
        An actor stays: it ends when the node stops, and its head restarts it elsewhere."""
        if self.actor_executor is not None or self.actor is not None:
            return
        self.tasks_left = 0
        if self.batches and not self.running:
            self._run_batches()

    def _apply_pool(self, setup: dict | None) -> str | None:
        """Workers of an executor/pool: run its initializer once; count tasks for retirement.

        Returns an error text when the initializer raised (the task then fails with it).
        """
        if not setup or self.pool_ready:
            return self.pool_error
        self.pool_ready = True
        if setup.get("max_tasks"):  # (a worker already retiring, its node draining, stays so)
            self.tasks_left = setup["max_tasks"] if self.tasks_left is None else min(self.tasks_left, setup["max_tasks"])
        if setup.get("initializer") is not None:
            try:
                fn = protocol.loads_function(setup["initializer"])
                fn(*protocol.loads(setup["initargs"]))
            except BaseException as exc:  # noqa: BLE001
                self.pool_error = protocol.format_exception_text(exc)
        return self.pool_error

    def _run_batches(self) -> None:
        """Run the queued tasks one by one, each batch's results in one TaskFinished.

        Tasks queued behind the running one can be taken back by their owner (a worker of
        theirs fell idle): owners on this machine ring the doorbell, answered even during a
        task; for relayed tasks we read the agent socket between tasks.
        """
        if self.running:
            return
        self.running = True
        try:
            while self.batches:
                batch = self.batches[0]
                while batch.pending:
                    if not batch.direct and (len(batch.pending) > 1 or len(self.batches) > 1):
                        self._absorb()  # relayed tasks: their TakeBack comes through the agent
                        if not batch.pending:
                            break
                    task, arg_bufs, ref_bufs = batch.pending.popleft()
                    self.store_results = batch.store_results
                    self.io_lock.release()  # the doorbell thread may take tasks back meanwhile
                    try:
                        batch.results.append(self._run_one(task, arg_bufs, ref_bufs, batch))
                    finally:
                        self.io_lock.acquire()
                        self.store_results = False
                self.batches.popleft()
                retiring = self.tasks_left is not None and self.tasks_left <= 0
                if batch.results:
                    batch.reply(encode("TaskFinished", (batch.results, retiring) + self._take_borrowed(batch.caller),
                                       batch.out_buffers))
                if retiring:
                    self._retire()
                if context.exit_requested:
                    self._retire(protocol.ACTOR_EXIT_CODE)
        finally:
            self.running = False

    def _on_doorbell(self) -> None:
        """TakeBack requests (the lock is ours: the main loop between tasks, or the doorbell
        thread while a task runs).  Tasks pipelined to us may still wait unread in a channel:
        read those first (only the direct channels: a running task may use the agent socket)."""
        first = True
        while True:
            try:
                data = self.doorbell.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            try:
                task_ids, token, caller = protocol.loads(data)
            except Exception:  # noqa: BLE001 - a bad datagram is dropped, nothing else
                log.warning("dropped a bad take-back request")
                continue
            if first:
                first = False
                for channel in list(self.channels):
                    if not channel.closed:
                        for frames in channel.read():
                            self._handle(frames, channel.send, direct=True, channel=channel)
            reply = self.reply_to.get(caller)
            if reply is not None:
                self._take_back(set(task_ids), token, reply)

    def _on_doorbell_here(self) -> None:
        """The doorbell, seen by the main loop: what _on_doorbell read from the channels runs
        now.  (Those bytes were the channel's last: its poll will not show it readable again.
        A worker's first batch and a TakeBack for its tail can come in the poll that accepts
        its owner's stream, before that stream is watched: the head of the batch then waited
        for ever.)"""
        self._on_doorbell()
        self._run_batches()

    def _watch_doorbell(self) -> None:
        """The doorbell thread: while a task runs (the main thread has let go of the lock),
        it answers TakeBack requests itself; otherwise the main loop does."""
        import select as _select
        poller = _select.poll()
        poller.register(self.doorbell.fileno(), _select.POLLIN)
        while True:
            poller.poll()
            with self.io_lock:
                self._on_doorbell()

    def _run_one(self, task: protocol.TaskSpec, arg_bufs, ref_bufs, batch: _Batch):
        if self.tasks_left is not None and self.tasks_left <= 0:
            return (task.task_id, RETIRED, None, 0.0, 0.0)  # not run (a TaskResult): the owner requeues it
        return self._execute(task.task_id, task.fn_hash, task.fn_bytes, task.name, task.args, arg_bufs,
                             task.ref_values, ref_bufs, task.num_returns, task.job_setup, task.lease,
                             batch.out_buffers, batch.caller, batch)

    def _absorb(self) -> None:
        """Read, without waiting, what the agent relayed meanwhile (new tasks queue behind
        ours; a TakeBack from an owner on another machine).  Owners on this machine ring the
        doorbell instead (_on_doorbell)."""
        backlog, self._agent_backlog = self._agent_backlog, []  # older than what is still unread
        for frames in backlog:
            self._on_agent_frames(frames)
        for frames in transport.recv_all(self.agent, limit=64):
            self._on_agent_frames(frames)

    def _take_back(self, task_ids: set, token, reply) -> None:
        """An owner wants queued tasks back (to run them on an idle worker): hand back those
        not started yet."""
        taken = []
        for batch in self.batches:
            if any(task.task_id in task_ids for task, _, _ in batch.pending):
                keep = deque()
                for item in batch.pending:
                    task, _, _ = item
                    (taken if task.task_id in task_ids else keep).append(item)
                batch.pending = keep
        for task, _, _ in taken:
            # The owner counts what a task carried once per lease (its function's code, the job
            # setup) as delivered: keep it for the tasks that come without it.
            if task.fn_bytes is not None and task.fn_hash not in self.functions:
                self.carried_functions.setdefault(task.fn_hash, task.fn_bytes)
            if task.job_setup is not None and self.carried_job is None:
                self.carried_job = task.job_setup
        reply(encode("TakenBack", ([task.task_id for task, _, _ in taken], token)))

    def _apply_runtime_env(self, pool_key) -> None:
        """A worker dedicated to a runtime_env applies it once, before its first task."""
        if self.pool_key is not None or not isinstance(pool_key, str) or "runtime_env:" not in pool_key:
            return
        self.pool_key = pool_key
        import json
        env = json.loads(pool_key[pool_key.index("runtime_env:") + len("runtime_env:"):])
        for key, value in (env.get("env_vars") or {}).items():
            os.environ[str(key)] = str(value)
        for package in reversed(env.get("py_modules") or []):
            sys.path.insert(0, unpack(package))
        working_dir = env.get("working_dir")
        if working_dir:
            directory = unpack(working_dir)
            os.chdir(directory)
            sys.path.insert(0, directory)

    def _apply_job(self, job_setup: dict) -> None:
        if self.job_id is None:
            self._apply_job_once(job_setup)
        # After the job: unpacking runtime_env code uses this worker's client of the cluster.
        self._apply_runtime_env(job_setup.get("pool_key"))

    def _apply_job_once(self, job_setup: dict) -> None:
        self.job_id = job_setup["job_id"]
        context.job_id = self.job_id
        for path in reversed(job_setup.get("sys_path", [])):
            if path not in sys.path:
                sys.path.insert(0, path)
        cwd = job_setup.get("cwd")
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        for key, value in (job_setup.get("env") or {}).items():
            os.environ[key] = value
        context_mod.worker_config = dict(self.cfg, job_id=self.job_id, namespace=job_setup.get("namespace"),
                                         runtime_env=job_setup.get("runtime_env"))
        context.namespace = job_setup.get("namespace")
        setup_main(job_setup.get("main_path"), job_setup.get("main_module"))

    def _apply_lease(self, lease_info) -> None:
        if lease_info is self.lease_info:  # (one object for a batch's tasks, after unpickling)
            return
        self.lease_info = lease_info
        gpu_ids, num_cpus, shape = protocol.TaskLease._make(lease_info)
        if shape is not self.shape and shape != self.shape:  # (a new dict per batch, mostly equal)
            self.shape = shape
            context.assigned_resources = scheduling.as_floats(placement_groups.plain_resources(shape))
            context.capture_group = placement_groups.captured_group(shape)
        if not num_cpus and shape:  # in a placement group's bundle: its CPUs go by another name
            num_cpus = context.assigned_resources.get("CPU", 0)
        threads = max(1, int(num_cpus))
        if threads != self.threads:
            self.threads = threads
            managed = self.cfg.get("managed_thread_vars", ())
            for var in managed:
                os.environ[var] = str(threads)
            if managed:
                limit_thread_pools(threads)
        if gpu_ids != self.gpu_ids:
            self.gpu_ids = gpu_ids
            context.gpu_ids = list(gpu_ids)
            if gpu_ids or self.cfg.get("num_gpus"):
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)

    def _execute(self, task_id, fn_hash, fn_bytes, fn_name, args_payload, arg_bufs, ref_values,
                 ref_bufs, num_returns, job_setup, lease_info, out_buffers, caller, batch):
        context.task_id = task_id.hex()
        context.task_name = fn_name
        stacks.board.started(task_id, fn_name)  # for `farpool stack` (two slice assignments)
        started = time.time()
        args = kwargs = arrivals = None
        try:
            if job_setup is None:
                job_setup = self.carried_job
            self.carried_job = None
            if job_setup is not None:
                self._apply_job(job_setup)
                self._apply_pool(job_setup.get("pool"))
            if self.actor is None:  # an actor holds what the head leased it (see _create_actor)
                self._apply_lease(lease_info)
            if self.tasks_left is not None:
                self.tasks_left -= 1
            if self.pool_error is not None:
                raise InitializerError(f"the initializer of this worker's pool raised:\n{self.pool_error}")
            if fn_hash.startswith(b"actor:"):
                fn = getattr(self.actor, fn_hash[6:].decode())
            else:
                fn = self.functions.get(fn_hash)
                if fn is None:
                    fn_bytes = fn_bytes or self.carried_functions.pop(fn_hash, None)
                    if fn_bytes is None:
                        raise RuntimeError(f"function {fn_name} was not shipped to this worker")
                    fn = protocol.loads_function(fn_bytes)
                    self.functions[fn_hash] = fn
            try:
                args, kwargs, arrivals = load_args_tracked(args_payload, arg_bufs, ref_values, ref_bufs)
            except BaseException as exc:
                mark_phase(exc, protocol.LOADING_ARGUMENTS)
                raise
            value = call_user(fn, args, kwargs)
            args = kwargs = None
            if num_returns.__class__ is not int:  # a streaming generator task: its items go as they come
                value = self.streams.run_inline(task_id, value, protocol.StreamSpec._make(num_returns), fn_name,
                                                batch, caller)
                num_returns = 1  # (its result: how many items it made)
            if arrivals:
                self._note_borrowed(caller, still_held(arrivals, caller))
                arrivals = None
            return self._package(task_id, value, num_returns, fn_name, started, out_buffers, caller)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the owner
            error = self._error(exc, fn_name, caller)
        finally:
            nested = object_ref.current()
            if nested is not None:
                nested.children.pop(context.task_id, None)
            sys.stdout.flush()
            sys.stderr.flush()
            context.task_id = None
            context.task_name = None
            context.cancel_pending = False
            stacks.board.ended()
        # The call raised (the exception and its frames are gone now): refs from its
        # arguments that it kept anyway (in an actor's state, a global) are borrowed.
        args = kwargs = None
        if arrivals:
            self._note_borrowed(caller, still_held(arrivals, caller))
        return (task_id, False, error, started, time.time())

    def _package(self, task_id, value, num_returns, fn_name, started, out_buffers, caller):
        """The result tuple of a finished call (pickling errors become the call's error)."""
        try:
            if num_returns == 1:  # (most tasks: one value, no list of its own)
                payload = self._pack_one(task_id + b"\0", value, _ResultName(fn_name, None), caller, out_buffers)
                return (task_id, True, [payload], started, time.time())  # a TaskResult
            values = tuple(value) if isinstance(value, (tuple, list)) else None
            if values is None or len(values) != num_returns:
                got = f"{type(value).__name__} of length {len(values)}" if values is not None \
                    else type(value).__name__
                raise ValueError(f"task {fn_name} declared num_returns={num_returns} but returned a {got}")
            payloads = []
            bufs_all: list = []
            for i, v in enumerate(values):
                what = _ResultName(fn_name, i if num_returns > 1 else None)
                payloads.append(self._pack_one(task_id + bytes([i]), v, what, caller, bufs_all))
            out_buffers.extend(bufs_all)
            return (task_id, True, payloads, started, time.time())  # a TaskResult
        except BaseException as exc:  # noqa: BLE001
            return (task_id, False, self._error(exc, fn_name), started, time.time())

    def _pack_one(self, store_id: bytes, v, what, caller, out_buffers: list) -> tuple:
        """One value as a result carries it: (payload or ("loc", ...) when it went into the node
        store as ``store_id``, n buffers (appended to ``out_buffers``), nested refs).  Raises
        when it cannot be pickled or stored."""
        if v.__class__ in _PLAIN:  # (None, a number, a string: no refs, no buffers, the stdlib's pickle)
            return (pickle.dumps(v, protocol=5), 0, ())
        nested: list = []
        refs = object_ref._nested_refs  # (per result: save and restore by hand, cheaper than a with block)
        outer, refs.collector = refs.collector, nested
        try:
            data, bufs = protocol.dumps(v, what=what)
        finally:
            refs.collector = outer
        inner = ()
        if nested and object_ref.current() is not None:
            # Refs in a returned value: the caller borrows them (owners are told first).
            unique = list({r._id: r for r in nested}.values())
            object_ref.current().lend_returned(unique, caller)
            inner = [(r._id, r._owner) for r in unique]
        if bufs and self.store_results and segments.value_size(data, bufs) >= segments.INLINE_MAX:
            owner = _identity(caller).decode() if caller else f"worker {self.worker_id}"
            path = self._allocate(store_id, segments.value_size(data, bufs), str(what), owner)
            size = segments.write_segment(path, data, bufs, store_id)
            return (("loc", path, size, store_id), 0, inner)
        out_buffers.extend(bufs)
        return (data, len(bufs), inner)

    def _error(self, exc: BaseException, fn_name: str, caller=None):
        """The body of a failed call: (the exception pickled, or None when it cannot travel
        (its text does), its type name, text, fn_name, where, refs inside it).  Its buffers
        (a large array) stay in the pickle; refs inside it are lent to ``caller`` as refs
        inside a result are."""
        text = protocol.format_exception_text(exc)
        with object_ref.collecting([]) as nested:
            try:
                payload = protocol.dumps_inband(exc, what="the exception")
            except Exception:
                payload = None
        if payload is not None:
            with object_ref.uncounted():
                try:
                    protocol.loads(payload)  # must also load back, or the owner fails to decode it
                except Exception:
                    payload = None
        inner = ()
        if payload is not None and nested and object_ref.current() is not None:
            unique = list({r._id: r for r in nested}.values())
            object_ref.current().lend_returned(unique, caller)
            inner = [(r._id, r._owner) for r in unique]
        return (payload, type(exc).__qualname__, text, fn_name, self.where, inner)  # a TaskFailure

    def run(self) -> None:
        self.start()
        self.loop.run()

    def close(self) -> None:
        """Close the sockets this worker opened, for one made in-process (tests, benchmarks):
        a worker process never returns from ``run``; it exits."""
        for channel in list(self.channels):
            channel.close()
        self.listener.close()
        self.doorbell.close()
        self.agent.close(linger=0)
        self.loop.close()


def main(cfg: dict) -> int:
    transport.forget_context_after_fork()
    session.set_process_name("farpool-worker")
    # fds 1 and 2 are pipes the launcher drains into the log file and to the driver.
    sys.stdout = TaskOutput(1, "stdout")
    sys.stderr = TaskOutput(2, "stderr")
    for key, value in (cfg.get("env") or {}).items():
        os.environ[key] = value
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")  # the kernel should kill a task, not the node agent
    except OSError:
        pass
    if "numpy.random" in sys.modules:  # forked workers must not share the launcher's RNG state
        sys.modules["numpy.random"].seed()
    # (otherwise numpy.random is imported by the first task that uses it, seeded from the OS
    # then: importing it here would cost every worker about 6 MB, and the time, for nothing)
    import random
    random.seed()
    signal.signal(signal.SIGTERM, session.sigterm_handler(signal.SIG_DFL))
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGUSR2, on_sigint)
    os.environ["FARPOOL_WORKER"] = "1"  # for code that asks whether it runs inside a farpool worker
    stacks.install(cfg["session_dir"], cfg["worker_id"])  # before WorkerReady: the agent may signal then
    worker = Worker(cfg)
    worker.run()
    return 0


# Results of these exact types pickle the same with the stdlib and cloudpickle, hold no refs
# and no out-of-band buffers: _pack_one skips what a general value needs.
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})


class _ResultName:
    """"the result of f (return i)", made only when a message needs it (most results never do)."""
    __slots__ = ("fn_name", "index")

    def __init__(self, fn_name: str, index: int | None):
        self.fn_name, self.index = fn_name, index

    def __str__(self) -> str:
        return f"the result of {self.fn_name}" + (f" (return {self.index})" if self.index is not None else "")
