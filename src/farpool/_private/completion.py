"""Completion: what comes back from workers, and what it does to tasks and objects.

Owns: ``TaskFinished`` (results inline or in the worker's node store, errors, tasks a
retiring worker did not run; a late result of an attempt given up on is dropped:
TaskQueues.stale_result), ``WorkerExited`` (the tasks its worker had in flight: an
attempt spent and retried first in line, or failed with why the worker died), the
retry decision (``retry_exceptions``, ``max_retries``; -1 is no limit: TaskRecord counts
an attempt when it is spent), and finishing a task: its return objects become READY or
FAILED, their waiters fire, its arguments are unpinned, refs nested in results or
errors are held (or released when nobody wants the value: a result for a task already
ended, an error nobody will see).  (What the timeline shows comes from task_events.py.)

Who may touch it: the I/O thread only.
"""

from __future__ import annotations

import logging
import signal

from farpool import exceptions as exc_mod
from farpool._private import protocol
from farpool._private.client_part import ClientPart
from farpool._private.refs import FAILED, PENDING, READY, Location
from farpool._private.task_queues import TaskRecord, TaskState

log = logging.getLogger("farpool.client")

class Completion(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def __init__(self, c):
        super().__init__(c)

    def bind(self) -> None:
        """The sibling parts' calls this one makes (after the shell made them all)."""
        c = self.c
        self.mark_dirty = c.submitter.mark_dirty
        self.after_results = c.submitter.after_results
        self.mark_actor_dirty = c.submitter.mark_actor_dirty
        self.enqueue = c.submitter.enqueue
        self.schedule_frees = c.borrowing.schedule_frees

    # ------------------------------------------------------------------ TaskFinished
    def on_task_finished(self, fields, buffers, came_over=None) -> None:
        """``came_over``: the agent connection that relayed it, or the worker's own stream."""
        results, retiring, sender, borrowed, pairs = fields
        if sender is not None:
            sender = protocol.owner_address(sender)
        if borrowed or pairs:
            self.c.borrowing.on_borrowers(sender, borrowed, pairs)
        pos = 0
        lease = None
        completed = []
        queues = self.queues
        for task_id, ok, body, started, ended in results:  # TaskResults
            stale = queues.stale_result(task_id, came_over)
            if stale is not None:  # a late result of an attempt given up on (a partition healed)
                log.warning("dropped a late result of task %s from node %s: %s (late results dropped: %d)",
                            queues.tasks[task_id].name, sender.node_id[:8] if sender and sender.node_id else "?",
                            stale, queues.stale_results)
            task = None if stale is not None else queues.finished(task_id, ended - started)
            if task is None:  # ended already (its worker's exit was reported first, or cancelled), or stale
                if ok is True:
                    pos = self._discard_result(body, buffers, pos, sender)
                elif ok is False:
                    self._discard_error(protocol.TaskFailure._make(body).inner, sender)
                continue
            lease = task.lease
            if ok == "retired":  # the worker retired before running it: not an attempt
                self.requeue(task)
                continue
            if lease is not None:
                self.c.events.ran(task, lease, started, ended, ok or body[1])
            if ok:
                values = []
                nested = []
                for payload, nbuf, inner in body:
                    if isinstance(payload, tuple):  # in the worker's node store
                        at = protocol.StoredAt._make(payload)
                        values.append(Location("seg", lease.node_id if lease else "", at.store_id, at.path, at.size))
                    else:
                        values.append((payload, buffers[pos:pos + nbuf]))
                    nested.append(inner)
                    pos += nbuf
                completed.append((task, values, nested))
            else:
                failure = protocol.TaskFailure._make(body)
                inner = failure.inner  # refs inside the exception (lent to us)
                if task.cancelled:
                    self._discard_error(inner, sender)
                    self.finish_failed(task, exc_mod.TaskCancelledError(f"task {task.name} was cancelled"))
                    continue
                unread = self._unreadable_argument(task, failure)
                if unread is not None and task.spend_attempt():
                    self._discard_error(inner, sender)
                    self._wait_for_lost_arguments(task, unread)
                    continue
                retry = task.retry_exceptions
                if retry and self._retryable(retry, failure.payload) and task.spend_attempt():
                    self._discard_error(inner, sender)
                    self.requeue(task)
                    continue
                self.finish_failed(task, failure, inner, sender)
        if lease is not None and not retiring:
            queues.park_if_idle(lease)
        if completed:
            self.finish_ok(completed, sender)
        if lease is not None:
            if retiring:  # it exits now (max_tasks_per_child): lease no more tasks to it
                queues.retire(lease)
            elif lease.yielding:  # its agent wants it back: once its tasks have ended
                self.c.submitter.return_yielded(lease)
            if lease.actor_id is None:
                self.after_results(lease.key)
            elif self.c.actor_calls.has_queued(lease.actor_id):  # (calls held back by the pipeline's depth)
                self.mark_actor_dirty(lease.actor_id)

    def requeue(self, task: TaskRecord) -> None:
        """Run ``task`` again, first in line: on its actor, or on any worker of its shape."""
        if task.actor_id is not None:
            self.c.actor_calls.requeue(task)
            self.mark_actor_dirty(task.actor_id)
        else:
            self.enqueue(task, front=True)

    def _discard_error(self, inner: list, sender) -> None:
        """Refs inside an exception nobody will see: our borrow of them ends."""
        if inner:
            with self.lock:
                self.refs.discard_value((), inner, sender)
            self.schedule_frees()

    def _discard_result(self, body, buffers, pos: int, sender) -> int:
        """The values of a finished task we no longer know, freed; returns the next buffer position."""
        with self.lock:
            for payload, nbuf, inner in body:
                if isinstance(payload, tuple):
                    # (in the worker's node store: ours, or for a remote worker with a client of its
                    # own, its node; else the copy stays until we leave: its agent frees it then)
                    node_id = sender.node_id if sender else self.conns.home.node_id
                    at = protocol.StoredAt._make(payload)
                    self.refs.discard_value(Location("seg", node_id, at.store_id, at.path, at.size), inner, sender)
                else:
                    self.refs.discard_value((payload, None), inner, sender)
                pos += nbuf
        self.schedule_frees()
        return pos

    @staticmethod
    def _unreadable_argument(task: TaskRecord, failure) -> str | None:
        """The text of the ObjectLostError a worker raised reading ``task``'s stored arguments
        (every copy it was told of was gone: their node died), else None."""
        if task.actor_id is not None or failure.type_name != "ObjectLostError" or failure.payload is None:
            return None
        try:
            error = protocol.loads(failure.payload)
        except Exception:
            return None
        if getattr(error, protocol.PHASE_ATTRIBUTE, None) != protocol.LOADING_ARGUMENTS:
            return None
        return str(error)

    def _wait_for_lost_arguments(self, task: TaskRecord, why: str) -> None:
        """A worker could not read a stored argument of ``task`` (its node died, maybe before
        the head said so): our arguments the error names are rebuilt as lost (lineage), and
        the task runs again once they are ready (an attempt spent, as for a lost worker)."""
        lost = []
        with self.lock:
            for _, ref in task.ref_slots:
                entry = self.objects.get(ref._id)
                location = entry.location if entry is not None and entry.state == READY else None
                if isinstance(location, Location) and location.store_id.hex()[:16] in why:
                    lost.append((ref._id, location))
            task.state = TaskState.WAITING
            task.lease = None
        log.warning("task %s could not read its arguments (%s); running it again once they are ready (%s)",
                    task.name, why, task.attempt_text())
        for oid, location in lost:
            self.object_lost(oid, location, f"a worker reading it found: {why}")
        self.c.submitter.on_submit(task)

    @staticmethod
    def _retryable(retry, payload) -> bool:
        if retry is True:
            return True
        try:
            error = protocol.loads(payload) if payload is not None else None
        except Exception:
            return False
        return error is not None and isinstance(error, tuple(retry))

    # ------------------------------------------------------------------ WorkerExited
    def on_worker_exited(self, lease_id, info) -> None:
        lease, lost = self.queues.worker_exited((info["node_id"], lease_id))
        if lease is None:
            return
        self.conns.close_worker_channel(info["node_id"], info["worker_id"])
        how = _how_it_died(info)
        for task in lost:
            what = (f"worker {info['worker_id']} on node {info['node_id'][:8]} (pid {info['pid']}) "
                    f"{how} while running {task.name}")
            if task.cancelled:
                self.finish_failed(task, exc_mod.TaskCancelledError(f"task {task.name} was cancelled"))
            elif task.spend_attempt():
                log.warning("%s; retrying (%s)", what, task.attempt_text())
                self.enqueue(task, front=True)
            else:
                retries = f" after {task.attempts} attempts" if task.attempts > 1 else ""
                error_cls = exc_mod.NodeDiedError if info.get("node_died") is not None else exc_mod.WorkerCrashedError
                self.finish_failed(task, error_cls(
                    f"{what}{retries}; no retries left (max_retries={task.max_retries}). "
                    "Raise max_retries if the crash is transient, or find why the process died "
                    f"(its log: worker-{info['worker_id']}.log in the session directory)."))
        self.mark_dirty(lease.key)

    # ------------------------------------------------------------------ finishing
    def finish_ok(self, completed, sender: tuple | None = None) -> None:
        """Results of tasks that ran on ``sender`` (the worker's client address)."""
        fire = []
        refs = self.refs
        with self.lock:
            for task, values, nested in completed:
                self.queues.done(task)
                stored = False
                for oid, value, inner in zip(task.return_ids, values, nested):
                    entry = self.objects.get(oid)
                    if entry is None:
                        refs.discard_value(value, inner, sender)
                        continue
                    if inner:
                        refs.hold_nested(entry, inner, sender)
                    if isinstance(value, Location):
                        entry.location = value
                        entry.size = value.size
                        stored = True
                    else:
                        entry.payload, entry.buffers = value
                        entry.size = len(value[0]) + sum(len(b) for b in value[1])
                    entry.state = READY
                    entry.task = None
                    if entry.waiters:
                        fire.append(entry)
                    else:
                        refs.delete_if_unreferenced(oid, entry)
                self._ended(task, stored)
        if refs.has_output():  # (frees, borrow releases: most results leave none)
            self.schedule_frees()
        for entry in fire:
            self.c.values.fire(entry)

    def finish_failed(self, task: TaskRecord, error, inner=(), sender=None) -> None:
        """``inner``: refs inside the exception (lent to us by the worker, ``sender``): they
        live as long as the failed objects, as refs inside a result do."""
        self.c.events.failed(task, error)
        fire = []
        with self.lock:
            self.queues.done(task)
            held = False
            for oid in task.return_ids:
                entry = self.objects.get(oid)
                if entry is None:
                    continue
                if inner:
                    self.refs.hold_nested(entry, inner, sender)
                    held = True
                entry.state = FAILED
                entry.error = error
                entry.task = None
                if entry.waiters:
                    fire.append(entry)
            if inner and not held:  # nobody wants the error
                self.refs.discard_value((), inner, sender)
            self._ended(task)
        self.schedule_frees()
        for entry in fire:
            self.c.values.fire(entry)

    def fail_all(self, failed: list) -> None:
        """Finish each (task, error) of ``failed`` as failed."""
        for task, error in failed:
            self.finish_failed(task, error)

    def _ended(self, task: TaskRecord, stored: bool = False) -> None:
        """(lock held) The run of ``task`` ended.  Its arguments stay pinned while it is kept as
        the lineage of results in a node store (``stored``), which could be lost with their
        node; else they are released now."""
        if task.lineage_kept:
            return
        if stored and task.actor_id is None and task.max_retries != 0:
            self.refs.keep_lineage(task)
            return
        if stored:
            why = (f"it is a result of the actor call {task.name}: actor results are not rebuilt"
                   if task.actor_id is not None else
                   f"the task {task.name} that made it has max_retries=0; give it retries to let farpool "
                   "re-run it when its result is lost")
            for oid in task.return_ids:
                entry = self.objects.get(oid)
                if entry is not None:
                    entry.no_lineage = why
        self.refs.release_task(task)

    # ------------------------------------------------------------------ lost objects (lineage)
    def objects_lost(self, lost: list, reasons: dict) -> None:
        """Objects of ours whose every copy is gone (``lost``: (id, entry); ``reasons``: node id
        -> why it is gone): their tasks run again when they may (lineage, ``max_retries``),
        recursively for lost arguments; else they fail with ObjectLostError saying why."""
        rerun, fire = [], []
        with self.lock:
            for oid, entry in lost:
                location = entry.location
                if entry.state != READY or location is None:
                    continue  # handled already (a result of a task already re-running)
                node = location.node_id
                where = (f"object {oid.hex()} was lost: its only copy was in the store of node {node[:8]}, "
                         f"which is gone ({reasons.get(node) or 'no reason given'})")
                record = entry.lineage
                task = record.task if record is not None else None
                if task is not None and task.spend_attempt():
                    self._rerun(task, reasons)
                    rerun.append(task)
                    log.warning("%s; re-running the task %s that made it (%s)", where, task.name, task.attempt_text())
                    continue
                if task is not None:
                    why = (f"the task {task.name} that made it has no retries left (max_retries={task.max_retries}, "
                           f"{task.attempts} runs spent)")
                else:
                    why = entry.no_lineage or "no lineage was kept for it"
                entry.state = FAILED
                entry.location = None
                entry.error = exc_mod.ObjectLostError(f"{where}; it cannot be rebuilt: {why}.")
                if entry.waiters:
                    fire.append(entry)
        for entry in fire:
            self.c.values.fire(entry)
        if rerun:
            self._wait_again({oid for task in rerun for oid in task.return_ids})
        for task in rerun:
            self.c.submitter.on_submit(task)

    def _wait_again(self, rebuilt: set) -> None:
        """Tasks queued for a worker with an argument that is being rebuilt now wait for it
        again (sent now, they would carry nothing for it)."""
        again = []
        with self.queues.lock:
            for kq in self.queues.keys.values():
                if not any(ref._id in rebuilt for task in kq.queue for _, ref in task.ref_slots):
                    continue
                keep = []
                for task in kq.queue:
                    (again if any(ref._id in rebuilt for _, ref in task.ref_slots) else keep).append(task)
                kq.queue.clear()
                kq.queue.extend(keep)
        for task in again:
            task.state = TaskState.WAITING
            self.c.submitter.on_submit(task)

    def _rerun(self, task: TaskRecord, reasons: dict) -> None:
        """(lock held) Make ``task``'s results pending again, for a new run."""
        task.state = TaskState.WAITING
        task.lease = None
        for oid in task.return_ids:
            entry = self.objects.get(oid)
            if entry is None:
                continue
            if entry.location is not None and entry.location.node_id not in reasons:
                self.refs.free_location(entry.location, entry.copies)  # a copy that survived: replaced
            self.refs.unpin(entry.contains)
            entry.contains = ()
            entry.state = PENDING
            entry.location = None
            entry.copies = None
            entry.payload = None
            entry.buffers = []
            entry.error = None
            entry.task = task

    def object_lost(self, oid: bytes, location, why: str) -> None:
        """A reader found our stored object gone (``why``), maybe before the head said its node
        died: rebuilt as if it were (once: a later report of the same copy does nothing)."""
        entry = self.objects.get(oid)
        if entry is not None and entry.state == READY and entry.location is location:
            self.objects_lost([(oid, entry)], {location.node_id: why})


def _how_it_died(info: dict) -> str:
    """How a worker ended, in words, from the agent's WorkerExited."""
    if info.get("node_died") is not None:
        return f"was lost with its node ({info['node_died']})"
    if info.get("signal"):
        try:
            how = f"killed by {signal.Signals(info['signal']).name}"
        except ValueError:
            how = f"killed by signal {info['signal']}"
        if info["signal"] == 9:
            how += " (if nobody killed it, this is usually the out-of-memory killer)"
        return how
    return f"exited with code {info.get('exitcode')}"
