"""`mpiexec -n N python -m farpool.mpi job.py`: a cluster made of MPI ranks, on this machine.

MPI comes from the `mpich` and `mpi4py` wheels of the test extra (mpiexec lands
beside the interpreter).  Each run is bounded by a subprocess timeout (a hang
guard, not a measurement); afterwards nothing it started may be left.
"""

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from farpool._private import session
from farpool._private.launchers import mpi as mpi_launcher

pytestmark = pytest.mark.cluster

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
RUN_TIMEOUT_S = 90

JOB = textwrap.dedent("""
    import os, sys
    import farpool

    # joins the MPI job's cluster: FARPOOL_ADDRESS and FARPOOL_TOKEN are set ("auto" works too)
    farpool.init(address=os.environ.get("JOB_ADDRESS"))

    @farpool.remote(num_cpus=0.5)
    def where(x):
        return os.environ["FARPOOL_MPI_RANK"], x * x

    size = int(sys.argv[1])
    refs = [where.options(resources={f"rank{r}": 1}).remote(r) for r in range(size)]
    print("results:", farpool.get(refs, timeout=60))
    print("nodes:", len([n for n in farpool.nodes() if n["alive"]]))
    if sys.argv[2:] == ["fail"]:
        raise ValueError("the job failed on purpose")
    if sys.argv[2:] == ["hang"]:
        @farpool.remote(resources={"rank1": 1})
        def forever():
            import time
            time.sleep(1000)
        ref = forever.remote()
        print("hanging", flush=True)
        farpool.get(ref)
""")


def _mpiexec(job, n, *args, env=None):
    return subprocess.Popen([MPIEXEC, "-launcher", "fork", "-n", str(n), sys.executable, "-m", "farpool.mpi",
                             "--num-cpus", "1", str(job), str(n), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), start_new_session=True)


def _finish(proc, timeout=RUN_TIMEOUT_S):
    """Output of a finished mpiexec; on a hang, its whole process group goes and the test fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec did not finish within {timeout} s:\n{out}\n{err}")
    return out, err


def _leftovers(tmp_root):
    """Processes and directories of MPI runs under this test run's tmp root."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "farpool.mpi" in cmdline or (os.path.join(tmp_root, "mpi-") in cmdline):
            procs.append(p)
    dirs = [d for d in os.listdir(tmp_root) if d.startswith("mpi-")]
    return procs, dirs


def _swept_after_force(family):
    """After a job was ended by force: nothing of it runs, and what ranks killed before they
    could tidy up (their tmp roots) is removed by the sweep the next job's rank 0 does."""
    gone, alive = psutil.wait_procs(family, timeout=30)  # hang guard: lifelines end them at once
    assert not alive, f"still running after the job was ended: {alive}"
    mpi_launcher.remove_dead_roots()
    session.remove_dead_sessions()


def _mpich_segments() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}


@pytest.fixture
def job(tmp_path, tmp_root):
    path = tmp_path / "job.py"
    path.write_text(JOB)
    before = _mpich_segments()
    yield path
    procs, dirs = _leftovers(tmp_root)
    gone, alive = psutil.wait_procs(procs, timeout=15)  # hang guard: they are stopping or not
    for p in alive:
        p.kill()
    # mpich's own shared-memory segments of this job: a rank killed by force (a test here)
    # cannot unlink them, and their names carry no pid; every process of the job is gone now.
    for name in _mpich_segments() - before:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:
            pass
    assert not alive and not dirs, f"left behind: {alive} {dirs}"


def test_three_ranks_run_tasks_pinned_to_each(job, tmp_root):
    proc = _mpiexec(job, 3)
    out, err = _finish(proc)
    assert proc.returncode == 0, f"{out}\n{err}"
    assert "results: [('0', 0), ('1', 1), ('2', 4)]" in out, out + err
    assert "nodes: 3" in out
    procs, dirs = _leftovers(tmp_root)
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], procs
    assert not dirs


def test_a_job_that_raises_exits_non_zero_with_its_traceback(job):
    proc = _mpiexec(job, 2, "fail", env={"JOB_ADDRESS": "auto"})
    out, err = _finish(proc)
    assert proc.returncode != 0
    assert "results: [('0', 0), ('1', 1)]" in out
    assert "Traceback" in err and "ValueError: the job failed on purpose" in err, err


def test_a_rank_that_dies_ends_the_job_without_leftovers(job, tmp_root):
    proc = _mpiexec(job, 2, "hang")
    for line in proc.stdout:  # the task pinned to rank 1 is running
        if line.startswith("hanging"):
            break
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "farpool.mpi" in " ".join(p.cmdline()) and
             any(c.environ().get("FARPOOL_MPI_RANK") == "1" for c in p.children())]
    assert len(rank1) == 1, rank1
    family = psutil.Process(proc.pid).children(recursive=True)
    rank1[0].kill()
    out, err = _finish(proc)
    assert proc.returncode != 0
    _swept_after_force(family)


def test_no_token_on_any_command_line(job, tmp_root):
    proc = _mpiexec(job, 2, "hang")
    for line in proc.stdout:
        if line.startswith("hanging"):
            break
    family = psutil.Process(proc.pid).children(recursive=True)
    tokens = {c.environ().get("FARPOOL_TOKEN") for c in family if c.environ().get("FARPOOL_MPI_RANK")}
    tokens.discard(None)
    assert len(tokens) == 1
    token = tokens.pop()
    assert not [c for c in family if token in " ".join(c.cmdline())]
    proc.send_signal(signal.SIGTERM)  # as a user or a scheduler ends a job: mpiexec passes it on
    _finish(proc)
    _swept_after_force(family)


def test_missing_ranks_are_named():
    nodes = [{"alive": True, "total": {"CPU": 1, "rank0": 1}}, {"alive": False, "total": {"rank1": 1}},
             {"alive": True, "total": {"rank3": 1}}]
    assert mpi_launcher.missing_ranks(nodes, 4) == [1, 2]
