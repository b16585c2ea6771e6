"""CPython's own concurrent.futures tests, run with farpool.DistributedExecutor as the executor.

The tests come from ``test_concurrent_futures.py`` of CPython's test suite:
this interpreter's own when its ``test`` package has it, else the one Debian
ships for the same minor version (``libpython3.11-testsuite``,
``/usr/lib/python3.11/test/``).  The file is loaded by path under the name
``cpython_test_concurrent_futures``; its ``from test import support`` keeps
resolving to this interpreter's own ``test.support`` (Debian's would be
another patch release's).  Its executor test mixins are bound to farpool the
way the file binds them to its start methods (``create_executor_tests``): a
mixin whose ``executor_type`` is ``DistributedExecutor`` (its ``ctx``,
"forkserver", reaches ``mp_context``, which farpool ignores).

Each test class runs in a process of its own, as CPython's runner does.  Every
test not run is in ``EXCLUDED`` with its reason; only two kinds qualify:
tests that read ``ProcessPoolExecutor``'s private attributes, and
subprocess scripts that import the executor by name from
``concurrent.futures``.  ``EXPECTED_DIFFERENCES`` lists what farpool does
differently on purpose.

    python compat/cpython_futures.py [--quick] [--repeat N] [-v] [CLASS ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import time
import unittest

MODULE_NAME = "cpython_test_concurrent_futures"
_CANNOT = "cannot apply to DistributedExecutor"
_PROCESSES = ("it reads ProcessPoolExecutor's private attribute `_processes` (the executor's own child processes), "
              "which " + _CANNOT + ", whose workers are the cluster's processes, started, shared "
              "and replaced by the node agents of any of its machines, not children of the executor")
_MANAGER = ("it reads ProcessPoolExecutor's private attribute `_executor_manager_thread`, which " + _CANNOT
            + ": it has no manager thread (completions arrive on the core client's callback thread)")
_STDLIB = "it builds a concurrent.futures.ProcessPoolExecutor itself (never the executor under test) and "
_SCRIPT = ("it runs a subprocess script that imports the executor by its name from concurrent.futures, where only "
           "the stdlib's executors live, so it " + _CANNOT + "; the same script with farpool's "
           "import passes in tests/integration/test_executor_back_to_back.py::{}")
# test name -> reason it is not run against farpool.
EXCLUDED = {
    "test_killed_child": _PROCESSES + " (farpool retries a killed worker's task: "
                         "tests/integration/test_executor.py::test_worker_crash_is_retried)",
    "test_saturation": _PROCESSES,
    "test_idle_process_reuse_one": _PROCESSES,
    "test_idle_process_reuse_multiple": _PROCESSES,
    "test_max_tasks_per_child": _PROCESSES + " (the worker replacement it checks is "
                                "tests/integration/test_executor.py::test_max_tasks_per_child_replaces_workers)",
    "test_max_tasks_per_child_defaults_to_spawn_context":
        "it reads ProcessPoolExecutor's private attribute `_mp_context`, which " + _CANNOT
        + ": it starts no multiprocessing context (mp_context is accepted and ignored; workers are the "
        "cluster's)",
    "test_processes_terminate": _PROCESSES,
    "test_context_manager_shutdown": _STDLIB + _PROCESSES.removeprefix("it "),
    "test_del_shutdown": _STDLIB + _MANAGER.removeprefix("it "),
    "test_shutdown_no_wait": _STDLIB + _MANAGER.removeprefix("it "),
    "test_shutdown_deadlock_pickle": _MANAGER + " (the rest of it: "
                                     "tests/integration/test_executor_back_to_back.py::"
                                     "test_unpicklable_task_then_shutdown_without_wait)",
    "test_interpreter_shutdown": _SCRIPT.format("test_interpreter_exit_runs_pending_work"),
    "test_submit_after_interpreter_shutdown": _SCRIPT.format("test_submit_at_interpreter_exit_raises"),
    "test_hang_gh83386": _SCRIPT.format("test_shutdown_without_wait_at_exit_finishes_running_work"),
}
# test name -> what farpool does differently, on purpose (not run, reported as such).
EXPECTED_DIFFERENCES = {
    "FailingInitializerTest.test_initializer":
        "passes a multiprocessing.Queue in initargs, which reaches the stdlib's workers only by inheritance "
        "(they are the executor's children); it cannot reach farpool's workers, which may be on other "
        "machines, so the executor refuses it at construction and "
        "names the way out (a Manager().Queue() or farpool.util.Queue); a failing initializer breaking "
        "the executor is tests/integration/test_executor.py::test_initializer_that_raises_breaks_the_executor",
}
# The executor test mixins of the file (create_executor_tests' targets for process pools), by the
# name each bound class gets here.
MIXINS = {
    "InitializerTest": "InitializerMixin",
    "FailingInitializerTest": "FailingInitializerMixin",
    "ShutdownTest": "ProcessPoolShutdownTest",
    "WaitTest": "WaitTests",
    "AsCompletedTest": "AsCompletedTests",
    "ExecutorTest": "ProcessPoolExecutorTest",
    "DeadlockTest": "ExecutorDeadlockTest",
}
# --quick: a bounded subset for CI (about a minute on 2 cores); WaitTest and AsCompletedTest
# spend most of their ~40 s in the sleeps of their tasks.
QUICK = ("InitializerTest", "ShutdownTest", "ExecutorTest", "DeadlockTest")
CLASS_LIMIT_S = 600  # a hung class fails instead of hanging the run


def _test_file() -> str | None:
    """This interpreter's test_concurrent_futures.py, else the distribution's for the same version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.join(sysconfig.get_paths()["stdlib"], "test", "test_concurrent_futures.py"),
                  f"/usr/lib/python{version}/test/test_concurrent_futures.py"]
    override = os.environ.get("FARPOOL_CPYTHON_FUTURES_TESTS")
    if override:
        candidates.insert(0, override)
    return next((path for path in candidates if os.path.exists(path)), None)


def _load_module(path: str):
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # workers unpickle its functions by this name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return module


def _install_classes(cf) -> dict[str, type]:
    """The test classes bound to DistributedExecutor, as globals of this module.

    Built at import (in the workers too, which load this script as
    ``__mp_main__``), so that classes and their methods pickle by reference.
    """
    import farpool

    class DistributedExecutorMixin(cf.ExecutorMixin):
        executor_type = farpool.DistributedExecutor
        ctx = "forkserver"

    made = {}
    for name, mixin in MIXINS.items():
        cls = type(name, (getattr(cf, mixin), DistributedExecutorMixin, cf.BaseTestCase),
                   {"__module__": __name__})
        globals()[name] = cls
        made[name] = cls
    return made


TEST_FILE = _test_file()
try:
    if TEST_FILE is None:
        raise ImportError("no test_concurrent_futures.py for this Python")
    _CLASSES = _install_classes(_load_module(TEST_FILE))
    _UNAVAILABLE = None
except ImportError as _exc:  # neither the interpreter's test package nor the distribution's
    _CLASSES = {}
    _UNAVAILABLE = _exc


def build_suite(names) -> tuple[unittest.TestSuite, dict, dict]:
    suite = unittest.TestSuite()
    excluded, different = {}, {}
    loader = unittest.TestLoader()
    for name in names:
        cls = _CLASSES[name]
        for method in loader.getTestCaseNames(cls):
            full = f"{name}.{method}"
            if method in EXCLUDED:
                excluded[full] = EXCLUDED[method]
            elif full in EXPECTED_DIFFERENCES:
                different[full] = EXPECTED_DIFFERENCES[full]
            else:
                suite.addTest(cls(method))
    return suite, excluded, different


# -------------------------------------------------------------------------- one class, in its own process
def run_class(name: str, verbose: bool) -> int:
    suite, _, _ = build_suite([name])
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if verbose else 1).run(suite)
    import farpool
    farpool.shutdown()
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    for test, reason in result.skipped:
        print(f"  skipped {name}.{test._testMethodName}: {reason}")
    print(f"CLASS {name}: {result.testsRun - failed - skipped} passed, {failed} failed, {skipped} skipped",
          flush=True)
    return 1 if failed else 0


_CLASS_COUNTS = re.compile(r"^CLASS (\w+): (\d+) passed, (\d+) failed, (\d+) skipped$", re.M)


def run_all(names: list[str], verbose: bool) -> tuple[dict, list[str], list[str]]:
    """Each class in a child process; returns the summed counts, the skip lines and the failures."""
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    skips, failures = [], []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--class", name] + (["-v"] if verbose else [])
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLASS_LIMIT_S)
            out, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code = None
        match = _CLASS_COUNTS.search(out)
        if match is None or code:
            why = "did not finish within its time limit" if code is None else f"exit status {code}"
            failures.append(f"{name}: {why}\n{out[-6000:]}")
            totals["failed"] += 1 if match is None or not int(match[3]) else int(match[3])
            if match is not None:
                totals["passed"] += int(match[2])
                totals["skipped"] += int(match[4])
            continue
        totals["passed"] += int(match[2])
        totals["skipped"] += int(match[4])
        skips += [line for line in out.splitlines() if line.startswith("  skipped ")]
        print(f"  {name}: {match[2]} passed, {match[3]} failed, {match[4]} skipped "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    return totals, skips, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="run it N times in a row")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--class", dest="one_class", help=argparse.SUPPRESS)  # a child: one class
    parser.add_argument("classes", nargs="*", help=f"only these classes ({', '.join(MIXINS)})")
    args = parser.parse_args(argv)
    if _UNAVAILABLE is not None:
        print(f"cpython-futures: skipped: no test_concurrent_futures.py for this Python ({_UNAVAILABLE}); "
              f"install the interpreter's test package (Debian: libpython{sys.version_info.major}."
              f"{sys.version_info.minor}-testsuite) to run it")
        print("COMPAT cpython-futures: 0 passed, 0 failed, 0 skipped (suite unavailable)")
        return 0
    if args.one_class:
        return run_class(args.one_class, args.verbose)
    unknown = sorted(set(args.classes) - set(MIXINS))
    if unknown:
        parser.error(f"unknown class(es) {', '.join(unknown)}; the classes are {', '.join(MIXINS)}")
    names = args.classes or list(QUICK if args.quick else MIXINS)
    _, excluded, different = build_suite(names)
    clean_runs = 0
    for run in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"---- run {run} of {args.repeat}", flush=True)
        totals, skips, failures = run_all(names, args.verbose)
        for failure in failures:
            print(f"  FAILED {failure}")
        clean_runs += not totals["failed"]
    for name, reason in sorted(excluded.items()):
        print(f"  excluded {name}: {reason}")
    for name, reason in sorted(different.items()):
        print(f"  expected difference {name}: {reason}")
    for line in skips:
        print(line)
    if args.repeat > 1:
        print(f"cpython-futures: {clean_runs} of {args.repeat} runs without a failure")
    n_left_out = len(excluded) + len(different)
    print(f"COMPAT cpython-futures: {totals['passed']} passed, {totals['failed']} failed, "
          f"{totals['skipped'] + n_left_out} skipped (of {totals['passed'] + totals['failed'] + totals['skipped'] + n_left_out} "
          f"tests from {TEST_FILE}; the last run's counts)")
    return 0 if clean_runs == args.repeat else 1


if __name__ == "__main__":
    import own_root  # beside this script
    own_root.run(main)
