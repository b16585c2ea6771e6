import concurrent.futures
import pickle

import pytest

import farpool
from farpool.exceptions import TaskError


class CustomError(Exception):
    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code


def test_task_error_is_also_the_users_type():
    err = TaskError.wrap("f", "Traceback...\nValueError: bad", ValueError("bad"), "ValueError", "node ab")
    assert isinstance(err, TaskError) and isinstance(err, ValueError)
    assert err.args == ("bad",)
    assert "task f on node ab raised ValueError" in str(err)
    assert "Traceback" in str(err)
    with pytest.raises(ValueError):
        raise err


def test_task_error_keeps_custom_attributes_and_pickles():
    err = TaskError.wrap("g", "tb", CustomError(7, "x"), "CustomError", "")
    assert isinstance(err, CustomError) and err.code == 7
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, CustomError) and isinstance(back, TaskError)
    assert back.function_name == "g"


def test_task_error_without_cause_keeps_the_text():
    err = TaskError.wrap("h", "the remote text", None, "Unpicklable", "")
    assert type(err) is TaskError
    assert "Unpicklable" in str(err) and "the remote text" in str(err)


def test_bases_of_the_public_errors():
    assert issubclass(farpool.GetTimeoutError, TimeoutError)
    assert issubclass(farpool.TaskCancelledError, concurrent.futures.CancelledError)
    assert issubclass(farpool.ObjectStoreFullError, MemoryError)
    assert issubclass(farpool.InfeasibleError, ValueError)
    assert issubclass(farpool.OwnerDiedError, farpool.ObjectLostError)
    for name in ("TaskError", "WorkerCrashedError", "ActorDiedError", "NodeDiedError", "AuthenticationError"):
        assert issubclass(getattr(farpool, name), farpool.FarpoolError)
        assert getattr(farpool, name).__module__ == "farpool.exceptions"
