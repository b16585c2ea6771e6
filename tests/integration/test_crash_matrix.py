"""The crash matrix: where x how, as one table (MATRIX); every cell ends in its documented
outcome, and the cluster then serves the next task.

Where it happens:
  caller-pickle    pickling the task's arguments in the caller (``remote()``)
  worker-unpickle  unpickling them in the worker
  run              running the task
  result-pickle    pickling the result in the worker
  owner-unpickle   unpickling the result in the owner (``get()``)
How: an exception (``raise``), ``sys.exit``, ``os._exit``, SIGSEGV (``ctypes.string_at(0)``),
SIGKILL (``os.kill(os.getpid(), 9)``).  Each death in the worker comes twice: going off at
every attempt (``WorkerCrashedError`` once ``max_retries=1`` is spent) and at the first
attempt only (the retry succeeds).

Not cells, and why:
  caller-pickle and owner-unpickle x os._exit, SIGSEGV, SIGKILL: they happen in the test
    process itself (the caller's and the owner's own thread, as DESIGN.md says: results are
    unpickled in the thread that calls ``get``), so they end the test run; there is nothing
    for farpool to report, as for any code of the caller's that kills its own process.
"""

import pytest

import farpool
from crash_matrix_bombs import Bomb, Boom, task
from farpool._private.protocol import SerializationError
from farpool_testing import TIMEOUT, square

DIES = ("os_exit", "sigsegv", "sigkill")
DEATH_TEXT = {"os_exit": "exited with code 9", "sigsegv": "killed by SIGSEGV", "sigkill": "killed by SIGKILL"}


def raises_user_error(info, where):
    """The user's exception, as a TaskError that is also a Boom (native API)."""
    assert isinstance(info.value, farpool.TaskError) and isinstance(info.value, Boom)
    assert "boom in pid" in str(info.value)


def raises_task_error_of_system_exit(info, where):
    """sys.exit in user code on the worker: a TaskError whose cause is the SystemExit (never a
    SystemExit raised in the caller, which would end it)."""
    assert isinstance(info.value, farpool.TaskError) and not isinstance(info.value, SystemExit)
    assert isinstance(info.value.cause, SystemExit) and info.value.cause.code == 7
    assert "raised SystemExit" in str(info.value)


def worker_crashed(how):
    def check(info, where):
        assert isinstance(info.value, farpool.WorkerCrashedError)
        text = str(info.value)
        assert DEATH_TEXT[how] in text and "after 2 attempts" in text and "max_retries=1" in text
        assert "while running task" in text and "pid" in text
    check.__doc__ = f"the worker died ({how}) at both attempts: WorkerCrashedError naming how"
    return check


def pickling_error_naming_the_value(info, where):
    """A SerializationError (a TypeError) raised by remote(), naming the argument and its type."""
    assert isinstance(info.value, SerializationError) and isinstance(info.value, TypeError)
    text = str(info.value)
    assert "argument 0 of task (a Bomb)" in text and "Boom: boom in pid" in text


def result_pickling_error(info, where):
    """The worker could not pickle the result: a TaskError naming the result and the error."""
    assert isinstance(info.value, farpool.TaskError) and isinstance(info.value, SerializationError)
    assert "cannot pickle the result of task" in str(info.value) and "Boom: boom in pid" in str(info.value)


def system_exit_in_the_caller(info, where):
    """sys.exit in the caller's own code (its __reduce__): SystemExit, as any sys.exit there."""
    assert isinstance(info.value, SystemExit) and info.value.code == 7


def raw_user_error_naming_the_result(info, where):
    """get() raises the user's exception from the owner's unpickling, with a note naming the object."""
    assert type(info.value) is Boom
    notes = getattr(info.value, "__notes__", [])
    assert any("while unpickling" in note and "of object" in note and "in get()" in note for note in notes)


# (where, how, once, outcome): outcome checks what get() or remote() raised; "ran" / a value: success
MATRIX = [
    ("caller-pickle", "raise", False, pickling_error_naming_the_value),
    ("caller-pickle", "sys_exit", False, system_exit_in_the_caller),
    ("worker-unpickle", "raise", False, raises_user_error),
    ("worker-unpickle", "sys_exit", False, raises_task_error_of_system_exit),
    *[("worker-unpickle", how, False, worker_crashed(how)) for how in DIES],
    *[("worker-unpickle", how, True, "ran") for how in DIES],
    ("run", "raise", False, raises_user_error),
    ("run", "sys_exit", False, raises_task_error_of_system_exit),
    *[("run", how, False, worker_crashed(how)) for how in DIES],
    *[("run", how, True, "defused") for how in DIES],
    ("result-pickle", "raise", False, result_pickling_error),
    ("result-pickle", "sys_exit", False, raises_task_error_of_system_exit),
    *[("result-pickle", how, False, worker_crashed(how)) for how in DIES],
    *[("result-pickle", how, True, "defused") for how in DIES],
    ("owner-unpickle", "raise", False, raw_user_error_naming_the_result),
    ("owner-unpickle", "sys_exit", False, system_exit_in_the_caller),
]


@pytest.mark.parametrize("where, how, once, outcome", MATRIX,
                         ids=[f"{w}-{h}{'-once' if o else ''}" for w, h, o, _ in MATRIX])
def test_crash_matrix(cluster, tmp_path, where, how, once, outcome):
    marker = str(tmp_path / "went-off") if once else None
    fn = farpool.remote(max_retries=1)(task)
    arg = Bomb("pickle" if where == "caller-pickle" else "unpickle", how, marker) \
        if where in ("caller-pickle", "worker-unpickle") else None
    if callable(outcome):
        with pytest.raises(BaseException) as info:
            farpool.get(fn.remote(arg, where, how, marker), timeout=TIMEOUT)
        outcome(info, where)
    else:
        assert farpool.get(fn.remote(arg, where, how, marker), timeout=TIMEOUT) == outcome
    # The cluster serves the next task.
    assert farpool.get(farpool.remote(square).remote(7), timeout=TIMEOUT) == 49
