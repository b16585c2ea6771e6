"""Shared fixtures: an isolated tmp root per test run, and leak checks at the end.

Every test run gets its own FARPOOL_TMPDIR, so it never touches a cluster the
user started, and the session ends by checking that nothing the tests started
is left: no runtime process, no session directory, no /dev/shm file.
"""

import os
import shutil
import tempfile

import psutil
import pytest

import farpool_testing

_ROOT = tempfile.mkdtemp(prefix="fpt-", dir="/tmp")
# Object store segments of this run go to their own directory in /dev/shm.
_SHM = tempfile.mkdtemp(prefix="fpt-", dir="/dev/shm")
os.environ["FARPOOL_SHM_PATH"] = _SHM
os.environ["FARPOOL_TMPDIR"] = _ROOT
os.environ.setdefault("FARPOOL_HELLO_DEADLINE_S", "3")
# What else is in /dev/shm now: peers the tests run (loky, joblib) create files there too.
_SHM_BEFORE = set(os.listdir("/dev/shm"))


def runtime_processes():
    """farpool runtime processes whose session lives under this test run's root."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            env = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if _ROOT in cmdline or env.get("FARPOOL_TMPDIR") == _ROOT and (
                "farpool" in (proc.info["name"] or "") or "farpool._private" in cmdline):
            if proc.pid != os.getpid():
                found.append(proc)
    return found


def pytest_sessionfinish(session, exitstatus):
    import farpool
    farpool.shutdown()
    leftovers = [p for p in runtime_processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    gone, alive = psutil.wait_procs(leftovers, timeout=10)
    sessions = [d for d in os.listdir(_ROOT) if d.startswith("s-")] if os.path.isdir(_ROOT) else []
    shm = os.listdir(_SHM) if os.path.isdir(_SHM) else []
    new_shm = set(os.listdir("/dev/shm")) - _SHM_BEFORE
    shm += [name for name in new_shm
            if name.startswith(("sem.loky-", "joblib_memmapping_folder_")) and _creator_gone(name)]
    shm += [name for name in new_shm if name.startswith("mpich_shm_")]  # MPI jobs' (tests/deploy)
    problems = []
    if alive:
        problems.append("processes left behind: " + ", ".join(f"{p.pid} {p.name()}" for p in alive))
        for p in alive:  # end only what this run started
            p.kill()
    if sessions:
        problems.append(f"session directories left behind in {_ROOT}: {sessions}")
    if shm:
        problems.append(f"/dev/shm files left behind: {shm}")
    shutil.rmtree(_ROOT, ignore_errors=True)
    shutil.rmtree(_SHM, ignore_errors=True)
    if problems:
        print("\nLEAK CHECK FAILED:\n  " + "\n  ".join(problems))
        session.exitstatus = 1
    else:
        print("\nleak check: no process, session directory or /dev/shm file left behind")


def _creator_gone(name: str) -> bool:
    """A loky semaphore or joblib folder (named after the pid that made it) whose maker has exited."""
    digits = name.split("-")[1] if name.startswith("sem.") else name.split("_")[3]
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the tails of the runtime's logs (head, node agents,
    workers) of the sessions alive then: a failure on CI is read from its log alone."""
    report = yield
    if report.failed and os.path.isdir(_ROOT):
        for path, text in farpool_testing.log_tails(_ROOT):
            report.sections.append((f"farpool log {path}", text))
    return report


@pytest.fixture(scope="session")
def tmp_root():
    return _ROOT


@pytest.fixture
def started(tmp_root):
    """A head and its node agent started with the CLI, on loopback TCP (see farpool_testing.Cluster),
    for the cluster and chaos layers; or, when tests/hosts runs this layer on separate hosts,
    the head here and each added node on a host of its own (farpool_testing.HostsCluster).  Everything it started is stopped afterwards, even when
    the test's own shutdown fails."""
    import farpool
    from farpool_testing import Cluster, HostsCluster
    farpool.shutdown()
    if os.environ.get("FARPOOL_TEST_HOSTS_FD"):  # each node on a host of its own (tests/hosts)
        cluster = HostsCluster(tmp_root, int(os.environ["FARPOOL_TEST_HOSTS_FD"]),
                               os.environ["FARPOOL_TEST_HOSTS"].split(","))
    else:
        cluster = Cluster(tmp_root)
    yield cluster
    try:
        farpool.shutdown()
    finally:  # a failing shutdown must not leave the cluster to the next test
        alive = cluster.stop()
    assert not alive, f"farpool stop left {alive} running"
