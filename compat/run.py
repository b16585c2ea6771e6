"""Run the four conformance suites and print their pass counts.

    python compat/run.py            # everything (several minutes on 2 cores)
    python compat/run.py --quick    # a bounded subset for CI (about two minutes on 2 cores)

1. ``futures``: the concurrent.futures behaviour suite (test_futures_behaviour.py),
   the same tests against ProcessPoolExecutor and farpool.DistributedExecutor.
2. ``cpython-pool``: CPython's installed ``test._test_multiprocessing`` pool tests
   with farpool.Pool (cpython_pool.py); skipped with a message where the
   interpreter has no test package.
3. ``cpython-futures``: CPython's ``test_concurrent_futures.py`` executor tests
   with farpool.DistributedExecutor (cpython_futures.py; the interpreter's own
   file, else Debian's ``libpython3.11-testsuite``), each class in a process
   of its own.  ``python compat/cpython_futures.py --repeat 20`` loops it.
4. ``joblib``: joblib's installed ``joblib/test/test_parallel.py`` against the
   backend "farpool" where its tests are parametrized by backend (joblib_plugin.py).

Each suite prints its counts and every test it leaves out, with the reason.
The last line sums them up; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COUNTS = re.compile(r"^COMPAT (?P<suite>[\w-]+): (?P<passed>\d+) passed, (?P<failed>\d+) failed, "
                    r"(?P<skipped>\d+) skipped", re.M)
# Per-suite time limits (s): a hung suite fails instead of hanging CI.
QUICK_LIMIT_S = 600
FULL_LIMIT_S = 2400


def _joblib_tests() -> str | None:
    try:
        import joblib.test
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(joblib.test.__file__), "test_parallel.py")
    return path if os.path.exists(path) else None


def _remove_leftover_semaphores(before: set) -> int:
    """loky semaphores (/dev/shm/sem.loky-<pid>-...) that the suite's processes left behind.

    joblib's own tests kill loky workers on purpose; a killed process cannot unlink its
    named semaphores. Only entries new since ``before`` whose creating process is gone
    are removed: they are this suite's, and nobody can use them any more.
    """
    removed = 0
    for name in set(os.listdir("/dev/shm")) - before:
        match = re.match(r"sem\.loky-(\d+)-", name)
        if match is None:
            continue
        try:
            os.kill(int(match[1]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join("/dev/shm", name))
            removed += 1
        except OSError:
            pass
    return removed


def suites(quick: bool) -> list[tuple[str, list[str]]]:
    py = sys.executable
    pytest_common = [py, "-m", "pytest", "-c", os.path.join(HERE, "pytest.ini"), "-p", "count_plugin", "-q",
                     "-p", "no:warnings", "--timeout", "300"]
    out = [("futures", pytest_common + [os.path.join(HERE, "test_futures_behaviour.py")]),
           ("cpython-pool", [py, os.path.join(HERE, "cpython_pool.py")] + (["--quick"] if quick else [])),
           ("cpython-futures", [py, os.path.join(HERE, "cpython_futures.py")] + (["--quick"] if quick else []))]
    joblib_tests = _joblib_tests()
    if joblib_tests:
        out.append(("joblib", pytest_common + ["-p", "joblib_plugin", joblib_tests]))
    else:
        out.append(("joblib", []))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="farpool's conformance suites")
    parser.add_argument("--quick", action="store_true", help="a bounded subset (for CI)")
    parser.add_argument("suite", nargs="*", help="only these suites (futures, cpython-pool, cpython-futures, joblib)")
    args = parser.parse_args(argv)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    lines = []
    for name, cmd in suites(args.quick):
        if args.suite and name not in args.suite:
            continue
        if not cmd:
            print(f"COMPAT {name}: 0 passed, 0 failed, 0 skipped (joblib's tests are not installed)")
            lines.append(f"{name}: not installed")
            continue
        tmp_root = tempfile.mkdtemp(prefix="fpc-", dir="/tmp")  # this suite's sessions, removed after it
        shm_before = set(os.listdir("/dev/shm"))
        env = dict(os.environ, FARPOOL_COMPAT_SUITE=name, FARPOOL_COMPAT_QUICK="1" if args.quick else "0",
                   FARPOOL_TMPDIR=tmp_root, JOBLIB_TEMP_FOLDER=tmp_root,  # joblib's memmaps go there too
                   PYTHONPATH=os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
        print(f"==== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True,
                                  timeout=QUICK_LIMIT_S if args.quick else FULL_LIMIT_S)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code = None
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
            leftovers = _remove_leftover_semaphores(shm_before)
            if leftovers:
                print(f"  removed {leftovers} loky semaphore(s) that processes of the {name} suite left in "
                      "/dev/shm when they were killed", flush=True)
        # Worker output (lines prefixed "(task pid=...)") is noise here; keep the suite's own report.
        report = "\n".join(line for line in output.splitlines() if not line.startswith("("))
        match = None
        for match in COUNTS.finditer(report):
            pass
        if code is None:
            print(report[-5000:])
            print(f"COMPAT {name}: did not finish within its time limit")
            totals["failed"] += 1
            lines.append(f"{name}: TIMED OUT")
            continue
        if match is None:
            print(report[-5000:])
            print(f"COMPAT {name}: no counts found (exit status {code})")
            totals["failed"] += 1
            lines.append(f"{name}: broken run")
            continue
        if int(match["failed"]) or code:
            print(report[-20000:])
        else:
            print("\n".join(line for line in report.splitlines()
                            if line.startswith(("  excluded", "  expected difference", "  skipped", "COMPAT"))))
        for key in totals:
            totals[key] += int(match[key])
        if code and not int(match["failed"]):
            totals["failed"] += 1
        lines.append(f"{name}: {match['passed']} passed, {match['failed']} failed, {match['skipped']} skipped "
                     f"({time.monotonic() - started:.0f} s)")
    print("\n==== summary" + (" (--quick)" if args.quick else ""))
    for line in lines:
        print("  " + line)
    print(f"compat: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
