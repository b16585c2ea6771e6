"""Every public error of farpool.

Errors read like advice: what happened (with the concrete task, node, pid),
the likely cause, and what to do next.  Remote exceptions keep their type:
``TaskError.wrap`` builds an object that is both a ``TaskError`` and an
instance of the user's exception class, so ``except ValueError`` still works.
"""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "FarpoolError",
    "TaskError",
    "WorkerCrashedError",
    "ActorDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "NodeDiedError",
    "GetTimeoutError",
    "TaskCancelledError",
    "ObjectStoreFullError",
    "InfeasibleError",
    "AuthenticationError",
]


class FarpoolError(Exception):
    """Base class of every farpool error."""


class TaskError(FarpoolError):
    """User code raised inside a task.

    Attributes:
        cause: the original exception object when it could be pickled, else None.
        cause_type_name: qualified name of the original exception type.
        traceback_text: the remote traceback, formatted.
        function_name: the name of the task's function.
        where: "node <id> pid <pid>" of the worker that ran it.
    """

    def __init__(self, function_name: str = "", traceback_text: str = "",
                 cause: BaseException | None = None, cause_type_name: str = "",
                 where: str = ""):
        self.function_name = function_name
        self.traceback_text = traceback_text
        self.cause = cause
        self.cause_type_name = cause_type_name or (type(cause).__qualname__ if cause else "")
        self.where = where
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" on {self.where}" if self.where else ""
        return (f"task {self.function_name}{where} raised {self.cause_type_name or 'an exception'}\n\n"
                f"{self.traceback_text.rstrip()}")

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        return (_rebuild_task_error,
                (self.function_name, self.traceback_text, self.cause, self.cause_type_name, self.where))

    @classmethod
    def wrap(cls, function_name: str, traceback_text: str, cause: BaseException | None,
             cause_type_name: str, where: str) -> "TaskError":
        """A TaskError that is also an instance of ``type(cause)`` when possible."""
        if isinstance(cause, TaskError) and isinstance(cause.cause, Exception):
            # Re-raised from a nested task: keep the original user type, one level up too.
            cause_cls = type(cause.cause)
            cause_type_name = cause.cause_type_name or cause_type_name
        elif cause is None or isinstance(cause, TaskError) or not isinstance(cause, Exception):
            return cls(function_name, traceback_text, cause, cause_type_name, where)
        else:
            cause_cls = type(cause)
        dual = _dual_class(cause_cls)
        if dual is None:
            return cls(function_name, traceback_text, cause, cause_type_name, where)
        try:
            err = dual.__new__(dual)
        except TypeError:  # MemoryError (and its subclasses) refuse a __new__ for a class not their own
            err = BaseException.__new__(dual)
        # Fill both halves: the user's type sees its original args, TaskError its fields.
        original = cause.cause if isinstance(cause, TaskError) else cause
        err.args = original.args
        try:
            err.__dict__.update({k: v for k, v in getattr(original, "__dict__", {}).items()})
        except (AttributeError, TypeError):
            pass
        err.function_name = function_name
        err.traceback_text = traceback_text
        err.cause = cause
        err.cause_type_name = cause_type_name or cause_cls.__qualname__
        err.where = where
        return err


_DUAL_CLASSES: dict[type, type | None] = {}


def _dual_class(cause_cls: type) -> type | None:
    if cause_cls in _DUAL_CLASSES:
        return _DUAL_CLASSES[cause_cls]
    try:
        dual = type(f"TaskError({cause_cls.__name__})", (TaskError, cause_cls),
                    {"__module__": "farpool.exceptions",
                     "__str__": TaskError.__str__,
                     "__reduce__": TaskError.__reduce__})
    except TypeError:  # final classes, incompatible layouts (e.g. some OSError subclasses)
        dual = None
    _DUAL_CLASSES[cause_cls] = dual
    return dual


def _rebuild_task_error(function_name, traceback_text, cause, cause_type_name, where):
    return TaskError.wrap(function_name, traceback_text, cause, cause_type_name, where)


class WorkerCrashedError(FarpoolError):
    """The worker process running a task died and the retries are used up."""


class ActorDiedError(FarpoolError):
    """The actor is dead: killed, crashed past ``max_restarts``, or its node was lost."""


class ObjectLostError(FarpoolError):
    """Every copy of an object is gone and it cannot be rebuilt."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object exited."""


class NodeDiedError(FarpoolError):
    """A node stopped answering heartbeats."""


class GetTimeoutError(FarpoolError, TimeoutError):
    """``get(..., timeout=)`` ran out before the value was ready."""


class TaskCancelledError(FarpoolError, concurrent.futures.CancelledError):
    """``get`` on a task that was cancelled."""


class ObjectStoreFullError(FarpoolError, MemoryError):
    """No room in the object store even after spilling."""


class InfeasibleError(FarpoolError, ValueError):
    """No node of the embedded cluster can ever satisfy the task's resources."""


class AuthenticationError(FarpoolError):
    """A peer without the cluster's token tried to join (or we used the wrong token)."""


for _cls in [FarpoolError, TaskError, WorkerCrashedError, ActorDiedError, ObjectLostError,
             OwnerDiedError, NodeDiedError, GetTimeoutError, TaskCancelledError,
             ObjectStoreFullError, InfeasibleError, AuthenticationError]:
    _cls.__module__ = "farpool.exceptions"
del _cls
