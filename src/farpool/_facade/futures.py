"""``DistributedFuture``: a ``concurrent.futures.Future`` completed from a farpool task.

Public as ``farpool.executor.DistributedFuture`` (where pickle and
tracebacks name it).  The dispatcher (dispatcher.py) makes one per work item
and settles it through the ``_``-methods here; users call the stdlib's
methods, which ask the dispatcher to cancel and, inside a task, lend the
worker's CPU back while they wait.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures._base as _futures_base

from farpool._facade.cluster import _blocked_while_waiting, _in_worker

_PENDING = _futures_base.PENDING
_RUNNING = _futures_base.RUNNING
_CANCELLED = _futures_base.CANCELLED
_CANCELLED_AND_NOTIFIED = _futures_base.CANCELLED_AND_NOTIFIED


class DistributedFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` completed from a farpool task.

    ``object_ref`` is the task's ``farpool.ObjectRef`` once the task was handed
    to the runtime (None while it waits behind ``max_workers`` others).
    Thread-safe like the stdlib's futures.
    """

    def __init__(self, dispatcher: "_Dispatcher | None" = None):
        super().__init__()
        self._dispatcher = dispatcher
        self._ref = None
        self._name: str | None = None  # the user's function, for error texts
        self._sent_at = 0.0            # time.monotonic() when handed to the runtime

    @property
    def object_ref(self):
        return self._ref

    def __reduce__(self):
        raise TypeError("a DistributedFuture cannot be pickled: pass it as an argument of submit() or map() "
                        "itself (not inside a container), where farpool gives the function its value, or pass "
                        "future.result() (or future.object_ref to a native farpool task)")

    def result(self, timeout: float | None = None):
        if not self.done() and _in_worker():
            with _blocked_while_waiting():
                return super().result(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        if not self.done() and _in_worker():
            with _blocked_while_waiting():
                return super().exception(timeout)
        return super().exception(timeout)

    def cancel(self) -> bool:
        dispatcher = self._dispatcher
        if dispatcher is None:
            return super().cancel()
        return dispatcher.cancel(self)

    def running(self) -> bool:
        with self._condition:
            state, ref = self._state, self._ref
        if state == _PENDING and ref is not None and self._dispatcher is not None:
            if self._dispatcher.client.task_state(ref) in ("RUNNING", "DONE"):
                self._mark_running()
        return super().running()

    # -- used by the dispatcher ---------------------------------------------
    def _mark_running(self) -> None:
        with self._condition:
            if self._state == _PENDING:
                self._state = _RUNNING

    def _settle_cancelled(self) -> bool:
        """PENDING -> cancelled and notified, in one step; True if it is cancelled now."""
        with self._condition:
            if self._state == _PENDING:
                self._state = _CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
                first = True
            else:
                first = False
            cancelled = self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)
        if first:
            self._invoke_callbacks()
        return cancelled

    def _set_result_safe(self, value) -> None:
        try:
            self.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled or failed (broken) meanwhile

    def _set_exception_safe(self, error: BaseException) -> None:
        try:
            self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass


DistributedFuture.__module__ = "farpool.executor"  # public there, see the docstring
