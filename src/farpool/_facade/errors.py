"""Remote errors as the stdlib's facades raise them.

Owns ``BrokenDistributedExecutor`` (public as ``farpool.executor.BrokenDistributedExecutor``),
the translation of a ``TaskError`` into the user's own exception with the
remote traceback as its cause (``_user_error``), pickling errors with farpool's
advice (``_pickling_error``), and, for the executor, the errors
``ProcessPoolExecutor`` code expects where the stdlib's pool would break
(``_process_pool_error``: a crashed worker or a task whose arguments or result
would not unpickle fails that one future with an error that is also a
``BrokenProcessPool``).  Pure functions over exceptions: no state, no thread;
the dispatcher and the facades call them.
"""

from __future__ import annotations

import concurrent.futures
import pickle

from farpool import exceptions as _exc

try:
    from concurrent.futures.process import BrokenProcessPool as _BrokenBase
    from concurrent.futures.process import _RemoteTraceback
except ImportError:  # pragma: no cover - every CPython has them
    _BrokenBase = concurrent.futures.BrokenExecutor

    class _RemoteTraceback(Exception):
        def __init__(self, tb):
            self.tb = tb

        def __str__(self):
            return self.tb


class BrokenDistributedExecutor(_BrokenBase):
    """The executor cannot run anything more: its initializer raised, or the cluster was lost.

    A ``concurrent.futures.BrokenExecutor`` (and a ``BrokenProcessPool``), so
    code written for ``ProcessPoolExecutor`` catches it unchanged.
    """


BrokenDistributedExecutor.__module__ = "farpool.executor"  # public (and pickled) there, see the docstring


def _remote_text(error: _exc.TaskError, name: str | None = None) -> str:
    where = f" on {error.where}" if error.where else ""
    return (f'\n"""\n{error.traceback_text.rstrip()}\n(raised by {name or error.function_name}{where})'
            '\n"""')


def _user_error(error: BaseException, tb_cls=_RemoteTraceback, name: str | None = None) -> BaseException:
    """The user's own exception with the remote traceback as ``__cause__``, as the stdlib gives it."""
    if isinstance(error, _exc.TaskError):
        cause = error.cause
        if cause is not None and cause is not error and not isinstance(cause, _exc.TaskError):
            cause.__cause__ = tb_cls(_remote_text(error, name))
            cause.__traceback__ = None
            return cause
    return error


def _pickling_error(error: BaseException) -> BaseException:
    """A value that cannot be pickled: the original error (as the stdlib raises), with our advice."""
    from farpool._private import protocol
    if isinstance(error, protocol.SerializationError):
        original = error.original if error.original is not None else error.__cause__
        if original is not None:
            original.add_note(str(error))
            if error.__cause__ is not original:  # it came from a worker: keep the remote traceback
                original.__cause__ = error.__cause__
            return original
    return error



# Where the stdlib's process pool breaks (a worker died; a task's arguments or its result would
# not unpickle), the executor retries, then fails only that future, with an error that is
# farpool's (or the pickling error) and also a BrokenProcessPool, so `except BrokenProcessPool`
# keeps working; the executor itself goes on.
_BROKEN_DUALS: dict[type, type | None] = {}


def _broken_dual(cls: type) -> type | None:
    """A class that is both ``cls`` and ``BrokenProcessPool`` (None if they do not combine)."""
    if cls in _BROKEN_DUALS:
        return _BROKEN_DUALS[cls]
    try:
        dual = type(cls.__name__, (cls, _BrokenBase),
                    {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__str__": cls.__str__,
                     "__reduce__": _reduce_broken, "_farpool_base": cls})
    except TypeError:  # incompatible layouts, final classes
        dual = None
    _BROKEN_DUALS[cls] = dual
    return dual


def _reduce_broken(self):
    return (_rebuild_broken, (self._farpool_base, self.args, dict(vars(self))))


def _rebuild_broken(cls: type, args: tuple, state: dict) -> BaseException:
    error = cls.__new__(cls)
    error.args = args
    vars(error).update(state)
    return _as_broken(error)


def _as_broken(error: BaseException) -> BaseException:
    """``error`` as an instance of its own type and of BrokenProcessPool (same args, notes, cause)."""
    if isinstance(error, _BrokenBase):
        return error
    dual = _broken_dual(type(error))
    if dual is None:
        broken = _BrokenBase(str(error))
        broken.__cause__ = error
        return broken
    try:
        new = dual.__new__(dual)
    except TypeError:  # MemoryError and its kind refuse a __new__ for a class not their own
        new = BaseException.__new__(dual)
    new.args = error.args
    vars(new).update(vars(error))
    new.__cause__ = error.__cause__
    new.__traceback__ = error.__traceback__
    return new


def _not_loaded(error: BaseException, what: str, name: str | None) -> BaseException:
    """An error raised while unpickling ``what`` of task ``name``: the task's result or
    arguments never arrived, as when the stdlib's pool breaks: also a BrokenProcessPool."""
    if not isinstance(error, Exception):  # SystemExit, KeyboardInterrupt: unpickling could not finish
        wrapped = pickle.UnpicklingError(f"unpickling {what} of {name} raised {error!r}")
        wrapped.__cause__ = error.__cause__ if error.__cause__ is not None else error
        error = wrapped
    error.add_note(f"(farpool: raised while unpickling {what} of {name}, so the task's result cannot be "
                   "had; this future fails with it and the executor goes on. Check that the objects "
                   "passed and returned unpickle in a fresh process)")
    return _as_broken(error)


def _process_pool_error(error: BaseException, name: str | None) -> BaseException:
    """The error ProcessPoolExecutor code expects for a failed task (``error`` as the user sees it)."""
    from farpool._private import protocol
    if isinstance(error, _exc.WorkerCrashedError):
        return _as_broken(error)
    if isinstance(error, protocol.SerializationError) and error.original is not None:
        return _pickling_error(error)  # a result that would not pickle: its own error, as the stdlib's
    if getattr(error, protocol.PHASE_ATTRIBUTE, None) == protocol.LOADING_ARGUMENTS:
        delattr(error, protocol.PHASE_ATTRIBUTE)
        return _not_loaded(error, "the arguments", name)
    return error


def _is_initializer_error(error: BaseException) -> bool:
    return isinstance(error, _exc.TaskError) and error.cause_type_name == "InitializerError"


def _task_name(fn) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)
