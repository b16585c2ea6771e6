"""What the crash matrix (test_crash_matrix.py) sends: values that go off when pickled or
rebuilt, in the process where that happens.  A module of its own so that workers import
it by reference (they get the driver's sys.path), as they do farpool_testing."""

import ctypes
import os
import signal
import sys


class Boom(Exception):
    pass


def go_off(how: str, once: str | None = None):
    """Raise, exit or die by ``how``; with ``once`` (a path) only the first time."""
    if once is not None:
        if os.path.exists(once):
            return "defused"
        open(once, "w").close()
    if how == "raise":
        raise Boom(f"boom in pid {os.getpid()}")
    if how == "sys_exit":
        sys.exit(7)
    if how == "os_exit":
        os._exit(9)
    if how == "sigsegv":
        ctypes.string_at(0)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(f"no such way to go off: {how}")


class Bomb:
    """Goes off when pickled (``when="pickle"``) or when rebuilt from its pickle (``"unpickle"``)."""

    def __init__(self, when: str, how: str, once: str | None = None):
        self.when, self.how, self.once = when, how, once

    def __reduce__(self):
        if self.when == "pickle":
            go_off(self.how, self.once)
            return (str, ("defused",))
        return (go_off, (self.how, self.once))


def task(arg, where: str, how: str, once: str | None = None):
    """The task of every cell: goes off in ``where`` (the argument's Bomb went off already, if any)."""
    if where == "run":
        return go_off(how, once)
    if where == "result-pickle":
        return Bomb("pickle", how, once)
    if where == "owner-unpickle":
        return Bomb("unpickle", how, once)
    return "ran"
