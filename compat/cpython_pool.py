"""CPython's own multiprocessing.Pool tests, run with farpool.Pool in place of the stdlib pool.

The tests come from this interpreter's installed ``test._test_multiprocessing``
(the classes ``_TestPool``, ``_TestPoolWorkerErrors`` and
``_TestPoolWorkerLifetime``), bound to farpool the way CPython binds them to
its start methods: a mixin whose ``Pool`` is ``farpool.Pool``.  The two
classes that call ``multiprocessing.Pool(...)`` directly see farpool's Pool
through a stand-in ``multiprocessing`` module inside the test module (only
this runner's view changes; nothing of multiprocessing is patched).

Every test not run, or expected to fail, is in ``EXCLUDED`` with its reason.
Interpreters installed without the ``test`` package skip with a message.

    python compat/cpython_pool.py [--quick] [-v]
"""

from __future__ import annotations

import argparse
import sys
import types
import unittest

# test name -> reason it is not run against farpool.
EXCLUDED = {
    "test_pool_worker_lifetime":
        "it reads the pids of the pool's own worker processes from the private `_pool` list and calls the "
        "private `_repopulate_pool()`, which cannot apply to farpool.Pool: its workers are the cluster's "
        "processes, started and replaced by the node agents of any of its machines (the replacement after "
        "maxtasksperchild is tests/integration/test_pool.py::test_initializer_and_maxtasksperchild)",
    "test_unpickleable_result":
        "it expects a task returning a lambda to fail with MaybeEncodingError, which cannot happen with "
        "farpool.Pool: results travel with cloudpickle where plain pickle cannot, so the lambda arrives (a "
        "program that works with the stdlib works the same); a result nothing can pickle is a "
        "MaybeEncodingError and the pool goes on: tests/integration/test_pool.py::"
        "test_a_result_that_cannot_be_pickled_is_a_maybe_encoding_error_and_the_pool_goes_on",
    "test_worker_finalization_via_atexit_handler_of_multiprocessing":
        "it runs `from multiprocessing import Pool` in a child interpreter, so it tests the stdlib's pool and "
        "cannot apply to farpool.Pool",
}
# --quick runs them all too: the whole suite takes seconds.
SLOW: set[str] = set()
# Pool tests outside the classes above, reported as not run.
OTHER_EXCLUDED: dict[str, str] = {}
CLASSES = ("_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime")
# Pool tests in classes that test other things too: class -> the pool tests run from it.
PICKED = {"TestInitializers": ("test_pool_initializer",)}


def _install_classes() -> list[type]:
    """The test classes, bound to farpool.Pool, as globals of this module.

    Built at import (in the workers too, which load this script as
    ``__mp_main__``), so that their methods pickle by reference as the stdlib's do.
    """
    import test._test_multiprocessing as tm

    import farpool

    class _MultiprocessingWithFarpoolPool(types.ModuleType):
        """The test module's view of `multiprocessing`, with farpool's Pool."""

        def __init__(self, real):
            super().__init__(real.__name__, real.__doc__)
            self.__dict__.update({k: v for k, v in vars(real).items() if k != "Pool"})
            self.Pool = farpool.Pool

    if not isinstance(tm.multiprocessing, _MultiprocessingWithFarpoolPool):
        tm.multiprocessing = _MultiprocessingWithFarpoolPool(tm.multiprocessing)

    class FarpoolMixin(tm.ProcessesMixin):
        TYPE = "processes"
        Pool = staticmethod(farpool.Pool)

    made = []
    for name in CLASSES:
        new_name = "WithFarpool" + name[1:]
        cls = type(new_name, (getattr(tm, name), FarpoolMixin, unittest.TestCase), {"__module__": __name__})
        cls.__qualname__ = new_name
        globals()[new_name] = cls
        made.append(cls)
    for name in PICKED:  # they call multiprocessing.Pool(...) itself: the stand-in's
        new_name = "WithFarpool" + name
        cls = type(new_name, (getattr(tm, name),), {"__module__": __name__})
        cls.__qualname__ = new_name
        globals()[new_name] = cls
        made.append(cls)
    return made


try:
    _CLASSES = _install_classes()
    _UNAVAILABLE = None
except ImportError as _exc:  # an interpreter installed without its test package
    _CLASSES = []
    _UNAVAILABLE = _exc


def build_suite(quick: bool) -> tuple[unittest.TestSuite, dict]:
    suite = unittest.TestSuite()
    excluded = {}
    loader = unittest.TestLoader()
    for cls in _CLASSES:
        picked = PICKED.get(cls.__name__.removeprefix("WithFarpool"))
        for method in loader.getTestCaseNames(cls):
            if picked is not None and method not in picked:
                continue  # not a pool test
            if method in EXCLUDED:
                excluded[f"{cls.__name__}.{method}"] = EXCLUDED[method]
                continue
            if quick and method in SLOW:
                excluded[f"{cls.__name__}.{method}"] = "left out of --quick (slow by design)"
                continue
            suite.addTest(cls(method))
    excluded.update(OTHER_EXCLUDED)
    return suite, excluded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the slow tests")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if _UNAVAILABLE is not None:
        print(f"cpython-pool: skipped: this Python has no test._test_multiprocessing ({_UNAVAILABLE}); "
              "install the interpreter's test package (e.g. Debian's libpython3-testsuite) to run it")
        print("COMPAT cpython-pool: 0 passed, 0 failed, 0 skipped (suite unavailable)")
        return 0
    suite, excluded = build_suite(args.quick)
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if args.verbose else 1)
    result = runner.run(suite)
    import farpool
    farpool.shutdown()
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped - len(result.expectedFailures)
    for name, reason in sorted(excluded.items()):
        print(f"  excluded {name}: {reason}")
    for test, reason in result.skipped:
        print(f"  skipped {test.id().rsplit('.', 2)[-2]}.{test._testMethodName}: {reason}")
    import test._test_multiprocessing as tm
    print(f"COMPAT cpython-pool: {passed} passed, {failed} failed, {skipped + len(excluded)} skipped "
          f"(of {result.testsRun + len(excluded)} tests from {tm.__file__})")
    return 1 if failed else 0


if __name__ == "__main__":
    import own_root  # beside this script
    own_root.run(main)
