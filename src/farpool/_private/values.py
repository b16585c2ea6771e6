"""Values for user threads: put, wait, get, futures and completion callbacks.

Owns: how a user thread waits for objects of the reference table (waiters on their
entries, woken by ``fire`` on the I/O thread), how a value is unpickled where ``get`` is
called (results stay pickled until then), the errors ``get`` raises for failed objects,
the callback thread that runs user callbacks and worker output (never the I/O thread),
and, inside a worker, telling its agent that the task blocks in ``get`` (so it lends the
CPU: no deadlock).

A caller waiting on one task that runs on a worker of this machine reads that worker's
stream itself (``_read_reply``): it borrows the stream from the I/O thread's loop
(EventLoop.lend), polls it beside a wake-up fd of its own, and runs the loop's handler
for it when the reply comes (EventLoop.run_here): the result is taken in, bookkept and its
waiters fired on the caller's thread, and the I/O thread is not woken in between (one
thread hand-off fewer per round trip).  Anything else that completes the entry (a retry
elsewhere, a cancel, the cluster gone) wakes the caller through that fd.

Who may touch it: user threads (put, wait_entries, get, value_of, future_for,
add_done_callback); the I/O thread calls ``fire`` and ``run_callback``.  Store reads go
through the client's ``stored`` part; a borrowed value is asked of its owner through the
``borrowing`` part, once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import select
import threading
import time

from farpool import exceptions as exc_mod
from farpool._private import protocol
from farpool._private.client_part import ClientPart
from farpool._private.connections import DirectChannel
from farpool._private.object_ref import ObjectRef, arriving, collecting
from farpool._private.refs import FAILED, PENDING, READY, Entry

log = logging.getLogger("farpool.client")


class _WakeFd:
    """A thread's eventfd for _read_reply, and a poll object with it registered.  It goes back to a pool when the thread ends,
    never closed: a late write of a waiter fired as its wait ended lands in an eventfd of
    ours (a spurious wake-up of a later wait), never in another file given its number."""

    _free: list = []  # (pid, fd): a child of a fork takes none of its parent's

    def __init__(self):
        self.pid = os.getpid()
        while self._free:
            pid, fd = self._free.pop()
            if pid == self.pid:
                self.fd = fd
                return
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def poller(self):
        poller = self.__dict__.get("_poller")
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        return poller

    def __del__(self):
        self._free.append((self.pid, self.fd))


_thread_wake = threading.local()


def _wake_fd() -> _WakeFd:
    wake = getattr(_thread_wake, "fd", None)
    if wake is None or wake.pid != os.getpid():  # (not one inherited through a fork)
        wake = _thread_wake.fd = _WakeFd()
    return wake


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class Values(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def __init__(self, c):
        super().__init__(c)
        self.callback_queue: queue.Queue | None = None
        self.callback_thread: threading.Thread | None = None
        self.blocked_depth = 0

    # ------------------------------------------------------------------ put
    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself where it is needed")
        with collecting([]) as collector:
            payload, bufs = protocol.dumps(value, what="the value given to put()")
        c = self.c
        oid = c.new_object_id()
        # put copies the user's buffers now (into the node store when large):
        # later mutation changes nothing put.
        location = c.stored.store_value(oid, payload, bufs, "put")
        if location is not None:
            entry = Entry(state=READY, location=location, size=location.size,
                          no_lineage="it was made by put(), which keeps no lineage: put it again")
        else:
            bufs = [bytes(b.raw()) if isinstance(b, protocol.pickle.PickleBuffer) else b for b in bufs]
            entry = Entry(state=READY, payload=payload, buffers=bufs,
                          size=len(payload) + sum(len(b) for b in bufs))
        with self.lock:
            self.objects[oid] = entry
            for inner in collector:  # refs inside the value live as long as it does
                e = self.objects.get(inner._id)
                if e is not None:
                    e.task_pins += 1
                    if not entry.contains:
                        entry.contains = []
                    entry.contains.append(inner._id)
        return ObjectRef(oid, c.owner_address)

    # ------------------------------------------------------------------ waiting
    def entry_for(self, ref: ObjectRef) -> Entry:
        entry = self.objects.get(ref._id)
        if entry is not None and entry.fetched:
            return entry
        # A borrowed ref: ask its owner for the value (once) and keep a local copy.
        with self.lock:
            entry = self.objects.get(ref._id)
            if entry is None:  # a ref made before this client existed: not counted, kept
                entry = self.objects[ref._id] = Entry(owned=False, fetched=False, owner=protocol.owner_address(ref._owner))
            fetch = not entry.fetched
            entry.fetched = True
        if fetch:
            self.loop.call_soon(self.c.borrowing.fetch, ref._id, ref._owner)
        return entry

    def when_done(self, entry: Entry, fn) -> bool:
        """Call ``fn(entry)`` (on the I/O thread) when ``entry`` is no longer pending; False
        (and no call) when it is done already."""
        with self.lock:
            if entry.state != PENDING:
                return False
            entry.add_waiter(fn)
            return True

    def wait_entries(self, refs: list, num_returns: int, timeout: float | None, streams: tuple = ()) -> list[bool]:
        """Block until ``num_returns`` of ``refs`` are done (or timeout); readiness flags.  A
        stream (a StreamState of an ObjectRefGenerator) in ``streams`` counts as done once its
        ``next`` would not wait (its next item came, or it ended); its flags follow the refs'."""
        entries = [self.entry_for(r) for r in refs]
        done = threading.Lock()  # held until enough are done (a bare lock: cheaper than an Event)
        done.acquire()
        remaining = [num_returns]
        registered = []
        counting = threading.Lock()  # (streams wake us from the thread that made them ready)
        me = threading.get_ident()
        wake_fd = []  # ours while we read a worker's stream ourselves (_read_reply)

        def on_done(_entry):  # on the I/O thread, or ours in _read_reply
            with counting:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.release()
                    if wake_fd and threading.get_ident() != me:
                        os.eventfd_write(wake_fd[0], 1)

        with self.lock:
            for e in entries:
                if e.state != PENDING:
                    remaining[0] -= 1
            if remaining[0] > 0:
                for e in entries:
                    if e.state == PENDING:
                        e.add_waiter(on_done)
                        registered.append(e)
        futures = []
        for state in streams:
            future = self.c.streams.ready_future(state)
            if future is None:
                on_done(None)
            else:
                futures.append((state, future))
                future.add_done_callback(on_done)
        if remaining[0] > 0:
            in_task = self.c.in_worker  # (a task that waits lends its CPU: set_blocked)
            if in_task:
                self.set_blocked(True)
            try:
                if not (len(registered) == 1 and not futures
                        and self._read_reply(registered[0], done, wake_fd, timeout)):
                    done.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
            finally:
                if in_task:
                    self.set_blocked(False)
        if registered:
            with self.lock:
                for e in registered:
                    e.drop_waiter(on_done)
        for state, future in futures:
            self.c.streams.forget_future(state, future)
        return [e.state != PENDING for e in entries] + [state.has_next() for state in streams]

    def _read_reply(self, entry: Entry, done, wake_fd: list, timeout: float | None) -> bool:
        """Wait for ``entry`` (``done`` released when it is done) reading the stream of the
        worker its task runs on ourselves; False (nothing waited) when its task is not on a
        worker of this machine, another thread reads that stream already, or the loop
        thread is busy (it reads the stream then)."""
        loop = self.loop
        lent: list = []
        if not loop.run_here(self._lend_stream, entry, lent) or not lent:
            return False
        stream = lent[0]
        wake = _wake_fd()
        wake_fd.append(wake.fd)
        poller = wake.poller
        poller.register(stream.fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        handed_back, given = False, []
        try:
            while not done.acquire(blocking=False):
                if handed_back or stream.closed:  # the I/O thread takes it from here (closed: the
                    # worker exited, and the I/O thread retries or fails the task)
                    done.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic()))
                    return True
                wait_ms = None if deadline is None else (deadline - time.monotonic()) * 1000
                if wait_ms is not None and wait_ms <= 0:
                    return True
                for fd, _ in poller.poll(wait_ms):
                    if fd != stream.fd:
                        _drain(fd)
                    elif loop.run_here(self._read_stream, stream, entry, given):
                        handed_back = bool(given)  # (given back with the reply read: one hold)
                    else:  # the loop thread is awake: it reads the stream, given back
                        self._give_back(stream)
                        handed_back = True
            return True
        finally:
            poller.unregister(stream.fd)
            if not handed_back:
                self._give_back(stream)

    def _read_stream(self, stream, entry: Entry, given: list) -> None:
        """(as the loop) What came on the lent ``stream``; given back once ``entry`` is done."""
        self.loop.serve_now(stream.fd)
        if entry.state != PENDING:
            self._unlend(stream)
            given.append(stream)

    def _lend_stream(self, entry: Entry, lent: list) -> None:
        """(as the loop) Lend us the stream of the worker ``entry``'s task runs on, if any."""
        lease = entry.task.lease if entry.state == PENDING and entry.task is not None else None
        channel = lease.channel if lease is not None else None
        if isinstance(channel, DirectChannel) and not channel.stream.closed and self.loop.lend(channel.stream.fd):
            lent.append(channel.stream)

    def _give_back(self, stream) -> None:
        """The loop thread reads ``stream`` again (now, or as soon as it can)."""
        if not self.loop.run_here(self._unlend, stream):
            self.loop.call_soon(self._unlend, stream)

    def _unlend(self, stream) -> None:
        if not stream.closed:  # (closed: its fd is no longer ours, nor lent)
            self.loop.unlend(stream.fd)

    def set_blocked(self, blocked: bool) -> None:
        """Inside a worker's task: tell the agent we wait, so it lends our CPU (no deadlock)."""
        c = self.c
        if not c.in_worker or c.worker_id is None:
            return
        if blocked:
            self.blocked_depth += 1
            if self.blocked_depth == 1:
                self.loop.call_soon(c.send_home, "WorkerBlocked", (c.worker_id,))
        else:
            self.blocked_depth -= 1
            if self.blocked_depth == 0:
                self.loop.call_soon(c.send_home, "WorkerUnblocked", (c.worker_id,))

    def fire(self, entry: Entry) -> None:
        """Run the entry's waiters (they wake user threads): on the I/O thread, last thing
        before it sleeps (EventLoop.call_last)."""
        if self.loop.in_loop_thread():
            self.loop.call_last(self._fire_now, entry)
        else:
            self._fire_now(entry)

    def _fire_now(self, entry: Entry) -> None:
        with self.lock:
            waiters, entry.waiters = entry.waiters, ()
        for waiter in waiters:
            try:
                waiter(entry)
            except Exception:
                log.exception("an internal completion waiter failed")

    def fail_pending(self, error: BaseException) -> None:
        """Every pending object fails with ``error`` (the cluster is gone)."""
        with self.lock:
            pending = [e for e in self.objects.values() if e.state == PENDING]
            for entry in pending:
                entry.state = FAILED
                entry.error = error
        for entry in pending:
            self.fire(entry)

    # ------------------------------------------------------------------ values
    def get(self, refs: list, timeout: float | None) -> list:
        ready = self.wait_entries(refs, len(refs), timeout)
        if not all(ready):
            n = ready.count(False)
            first = refs[ready.index(False)]
            raise exc_mod.GetTimeoutError(
                f"get() timed out after {timeout} s with {n} of {len(refs)} object(s) not ready "
                f"(first: {first.hex()}{self.c.where_pending(first)}); raise the timeout, or use "
                "wait() to take results as they come")
        return [self.value_of(r) for r in refs]

    def value_of(self, ref: ObjectRef, writable: bool = False):
        """The value (unpickled here). ``writable``: store-backed arrays come as
        copy-on-write views instead of read-only ones (the facades' stdlib semantics).
        A stored value of ours found lost is rebuilt first when its lineage allows."""
        entry = self.objects.get(ref._id)
        if entry is None:
            raise exc_mod.ObjectLostError(f"object {ref.hex()} is no longer known to this process")
        while True:
            with self.lock:  # (a consistent view: the I/O thread may be making it pending again)
                state, location, payload, buffers = entry.state, entry.location, entry.payload, entry.buffers
            if state == FAILED:
                raise self.error_of(entry)
            if state == PENDING:  # being rebuilt from its lineage
                self.wait_entries([ref], 1, None)
                continue
            if location is None:
                break
            try:
                payload, buffers = self.c.stored.map_location(location, private=writable, oid=ref._id, entry=entry)
                break
            except exc_mod.ObjectLostError as error:
                if not entry.owned or entry.lineage is None:
                    raise
                self._report_lost(ref._id, location, str(error))
        try:
            if entry.owned:  # refs inside our own values are pinned by them (put, RefTable.hold_nested)
                return protocol.loads(payload, buffers)
            with arriving([]) as arrivals:
                value = protocol.loads(payload, buffers)
        except Exception as exc:  # the value's own unpickling code raised: keep its type, say where
            task = getattr(entry.task, "name", None)
            exc.add_note(f"(farpool: while unpickling {f'the result of task {task}' if task else 'the value'} "
                         f"of object {ref.hex()} in get(); the error comes from that value's unpickling code)")
            raise
        if arrivals:
            self.c.borrowing.register_arrivals([r for r in (w() for w in arrivals) if r is not None])
        return value

    def _report_lost(self, oid: bytes, location, why: str) -> None:
        """Tell the I/O thread a stored object of ours is gone, and wait until it has made it
        pending again (a rebuild) or failed."""
        done = threading.Event()

        def report():
            try:
                self.c.completion.object_lost(oid, location, why)
            finally:
                done.set()
        self.loop.call_soon(report)
        done.wait()

    @staticmethod
    def error_of(entry: Entry) -> BaseException:
        """The exception ``get`` raises for a failed object."""
        error = entry.error
        if isinstance(error, BaseException):
            return error
        # A TaskFailure of the task that made it (its exception still pickled: unpickled here)
        cause = None
        if error.payload is not None:
            try:
                cause = protocol.loads(error.payload)
            except Exception:
                cause = None
        return exc_mod.TaskError.wrap(error.function, error.traceback, cause, error.type_name, error.where)

    # ------------------------------------------------------------------ futures and callbacks
    def future_for(self, ref: ObjectRef) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.add_done_callback(ref, lambda ref: self._complete_future(fut, ref))
        return fut

    def _complete_future(self, fut, ref) -> None:
        if fut.done():
            return
        try:
            fut.set_result(self.value_of(ref))
        except BaseException as error:  # noqa: BLE001
            fut.set_exception(error)

    def add_done_callback(self, ref: ObjectRef, fn) -> None:
        """Call ``fn(ref)`` on the callback thread once the object is ready or failed. Any thread."""
        if not self.when_done(self.entry_for(ref), lambda _entry: self.run_callback(fn, ref)):
            self.run_callback(fn, ref)

    def run_callback(self, fn, *args) -> None:
        """Run fn on the one callback thread (never on the I/O thread)."""
        if self.callback_queue is None:
            with self.lock:
                if self.callback_queue is None:
                    self.callback_queue = queue.Queue()
                    self.callback_thread = threading.Thread(
                        target=self._callback_loop, args=(self.callback_queue,), name="farpool-callbacks",
                        daemon=True)
                    self.callback_thread.start()
        self.callback_queue.put((fn, args))

    @staticmethod
    def _callback_loop(q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("a farpool completion callback raised")
            del item, fn, args  # do not keep the last callback (and what it holds) alive

    def stop_callbacks(self, timeout_s: float) -> None:
        """What arrived before now runs, then the callback thread ends (bounded: a callback
        that blocks does not hold the caller up for long)."""
        if self.callback_queue is None:
            return
        self.callback_queue.put(None)
        if self.callback_thread is not None and self.callback_thread is not threading.current_thread():
            self.callback_thread.join(timeout=timeout_s)
