"""`srun farpool slurm -- CMD` and `farpool slurm sbatch` against a real SLURM on the namespace hosts.

tests/slurm_bed.py starts munged, slurmctld and a slurmd on h1, a slurmd on h2, and
runs the SLURM commands on h3 (the login host) in a job directory every host
shares.  Each job is bounded by a subprocess timeout (a hang guard, not a
measurement).  After each test no farpool process, tmp root or rendezvous file
of its jobs may be left on any host.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import slurm_bed
from farpool_testing import DEADLINE_S, TIMEOUT

RUN_TIMEOUT_S = 90

JOB = textwrap.dedent("""
    import glob, json, os, signal, sys, time
    import farpool

    got_term = []
    if "drain" in sys.argv:  # a job that saves its results when SLURM says stop
        signal.signal(signal.SIGTERM, lambda *_: got_term.append(1))
    farpool.init()  # FARPOOL_ADDRESS and FARPOOL_TOKEN are set ("auto" finds it too)

    @farpool.remote(num_cpus=0.5)
    def where(gate):
        while gate and not os.path.exists(gate):  # a test's gate: released when the test says
            time.sleep(0.05)
        return os.environ.get("SLURMD_NODENAME"), farpool.get_runtime_context().node_id

    tag = os.environ["SLURM_JOB_ID"]
    rendezvous = glob.glob(f".farpool-slurm-{tag}.*")
    nodes = [n for n in farpool.nodes() if n["alive"]]
    gate = f"release-{tag}" if "drain" in sys.argv or "hang" in sys.argv else ""
    refs = [where.options(scheduling_strategy=farpool.NodeAffinity(n["node_id"])).remote(gate) for n in nodes]
    with open(f"running-{tag}", "w") as f:
        f.write("")
    if "drain" in sys.argv:
        while not got_term:
            time.sleep(0.05)
        with open(f"sigterm-{tag}", "w") as f:
            f.write("")
    ran = farpool.get(refs, timeout=60)
    print(json.dumps({"job": tag, "nodes": sorted(n["address"] for n in nodes), "ran": ran,
                      "rendezvous_modes": [oct(os.stat(p).st_mode & 0o777) for p in rendezvous],
                      "got_term": bool(got_term)}), flush=True)
""")


@pytest.fixture(scope="module")
def slurm(bed):
    missing = slurm_bed.missing_tools()
    if missing:
        pytest.fail(f"SLURM is missing ({', '.join(missing)}): install Debian's slurm-wlm and munge "
                    "(`apt-get install slurm-wlm munge`; .ci/run does)")
    cluster = slurm_bed.SlurmBed(bed)
    try:
        cluster.open()
        with open(os.path.join(cluster.jobdir, "job.py"), "w") as f:
            f.write(JOB)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def clean(slurm):
    """After the test: no farpool process on the SLURM nodes, no job's tmp root, no rendezvous file."""
    yield slurm
    deadline = time.monotonic() + DEADLINE_S
    while True:  # srun has returned; the last task of a cancelled job may still be stopping
        left = {h.name: farpool_processes(h) for h in slurm.nodes}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(left.values()), f"farpool processes left: {left}"
    for host in slurm.nodes:
        root = host.path("/tmp/farpool-0")
        assert not os.path.isdir(root) or os.listdir(root) == [], os.listdir(root)
    assert not [n for n in os.listdir(slurm.jobdir) if n.startswith(".farpool-slurm-")]
    for name in os.listdir(slurm.jobdir):
        if name != "job.py":
            os.unlink(os.path.join(slurm.jobdir, name))


def farpool_processes(host):
    found = []
    for pid in host.processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"farpool" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def srun(slurm, *args):
    return slurm.popen("srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "farpool", "slurm",
                       "--", sys.executable, "job.py", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)


def finish(proc, slurm, timeout=RUN_TIMEOUT_S):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"srun did not finish within {timeout} s:\n{out}\n{err}\n{slurm.logs()}")


def wait_for_file(slurm, prefix, proc):
    """The name of the first file in the job directory starting with ``prefix`` (the job wrote it)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        names = [n for n in os.listdir(slurm.jobdir) if n.startswith(prefix)]
        if names:
            return names[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"the job wrote no {prefix}* file (srun exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)


def report(out):
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


def test_srun_runs_tasks_on_both_nodes_and_two_jobs_on_the_same_nodes_never_meet(clean):
    slurm = clean
    h1, h2 = slurm.nodes
    jobs = [srun(slurm), srun(slurm)]  # each takes 1 of each node's 2 CPUs: both run at once
    results = [finish(p, slurm) for p in jobs]
    for proc, (out, err) in zip(jobs, results):
        assert proc.returncode == 0, f"{out}\n{err}"
    one, two = (report(out) for out, _ in results)
    for r in (one, two):
        assert sorted(name for name, _ in r["ran"]) == ["h1", "h2"]  # a task ran on each node
        assert [a.split(":")[0] for a in r["nodes"]] == [h1.address, h2.address]
        assert r["rendezvous_modes"] == ["0o600"]
    assert one["job"] != two["job"]
    assert set(one["nodes"]).isdisjoint(two["nodes"])  # two clusters: no node agent in common
    assert {nid for _, nid in one["ran"]}.isdisjoint(nid for _, nid in two["ran"])


def test_scancel_ends_everything(clean):
    slurm = clean
    proc = srun(slurm, "hang")
    job = wait_for_file(slurm, "running-", proc).split("-", 1)[1]
    assert farpool_processes(slurm.nodes[0]) and farpool_processes(slurm.nodes[1])
    slurm.run("scancel", job)
    # The command died of SIGTERM, then the cluster stopped on its own before KillWait's
    # SIGKILL: the rendezvous file, which only that path removes, is gone (see `clean`).
    out, err = finish(proc, slurm)
    assert proc.returncode != 0
    assert f"farpool slurm: SIGTERM (the walltime, or scancel) for job {job}.0" in err, err


def test_sigterm_from_the_walltime_drains_the_tasks_in_flight(clean):
    slurm = clean
    proc = srun(slurm, "drain")
    job = wait_for_file(slurm, "running-", proc).split("-", 1)[1]
    # What SLURM sends every process of the job at its time limit, before SIGKILL.
    slurm.run("scancel", "--signal=TERM", job)
    wait_for_file(slurm, "sigterm-", proc)
    open(os.path.join(slurm.jobdir, f"release-{job}"), "w").close()  # the tasks in flight finish now
    out, err = finish(proc, slurm)
    assert proc.returncode == 0, f"{out}\n{err}"
    r = report(out)
    assert r["got_term"] and sorted(name for name, _ in r["ran"]) == ["h1", "h2"]


def test_the_sbatch_script_submits_and_runs(clean):
    slurm = clean
    printed = slurm.run(sys.executable, "-m", "farpool", "slurm", "sbatch", "--nodes", "2", "--time", "5",
                        "--output", "out-%j.txt", "--", sys.executable, "job.py").stdout
    assert "#SBATCH --nodes=2" in printed and "#SBATCH --ntasks-per-node=1" in printed
    assert printed.rstrip().splitlines()[-1].startswith("exec srun --ntasks-per-node=1 ")
    submitted = slurm.run(sys.executable, "-m", "farpool", "slurm", "sbatch", "--nodes", "2", "--time", "5",
                          "--output", "out-%j.txt", "--submit", "--", sys.executable, "job.py").stdout
    assert submitted.startswith("Submitted batch job "), submitted
    job = submitted.split()[-1]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while slurm.run("squeue", "-h", "-j", job, check=False).stdout.strip():  # until the job has ended
        assert time.monotonic() < deadline, slurm.run("squeue", check=False).stdout
        time.sleep(0.2)
    with open(os.path.join(slurm.jobdir, f"out-{job}.txt")) as f:
        text = f.read()
    r = report(text)
    assert r["job"] == job and sorted(name for name, _ in r["ran"]) == ["h1", "h2"], text


def test_outside_a_job_it_says_how_to_start_it(slurm):
    out = slurm.login.run([sys.executable, "-m", "farpool", "slurm", "--", "true"], check=False)
    assert out.returncode == 1
    assert "not inside a SLURM job step" in out.stderr and "srun --ntasks-per-node=1 farpool slurm" in out.stderr

