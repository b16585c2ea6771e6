"""The SLURM launcher's pure parts: a task's step from its environment, the rendezvous file,
the batch script, and what `farpool slurm` says when it is used wrong (no SLURM needed;
tests/hosts/test_slurm.py runs it under a real one)."""

import os
import shlex
import signal
import sys

import pytest

from farpool._private import session
from farpool._private.launchers import slurm

ENV = {"SLURM_JOB_ID": "41", "SLURM_STEP_ID": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "1",
       "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "3", "SLURMD_NODENAME": "n2",
       "SLURM_STEP_NODELIST": "n[1-3]", "SLURM_SUBMIT_DIR": "/home/me/run", "SLURM_CPUS_ON_NODE": "8"}


def test_a_step_is_read_from_the_environment():
    step = slurm.Step.from_env(ENV)
    assert (step.job_id, step.step_id, step.proc_id, step.node_id, step.local_id) == ("41", "2", 1, 1, 0)
    assert (step.num_nodes, step.node_name, step.node_list, step.cpus) == (3, "n2", "n[1-3]", 8.0)
    assert step.rendezvous_path() == "/home/me/run/.farpool-slurm-41.2"
    assert os.path.basename(step.root()) == "slurm-41.2-n1"
    assert slurm.Step.from_env(dict(ENV, SLURM_CPUS_PER_TASK="4")).cpus == 4.0


def test_outside_a_job_step_it_says_how_to_start_one():
    with pytest.raises(ValueError, match=r"not inside a SLURM job step .*`srun --ntasks-per-node=1 farpool slurm"):
        slurm.Step.from_env({"SLURM_JOB_ID": "41"})


def test_the_rendezvous_file_is_whole_and_private(tmp_path):
    path = str(tmp_path / ".farpool-slurm-41.2")
    assert slurm.read_rendezvous(path) is None
    slurm.write_rendezvous(path, {"job": "41.2", "address": "10.0.0.1:5000", "token": "t"})
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert slurm.read_rendezvous(path)["address"] == "10.0.0.1:5000"
    slurm.write_rendezvous(path, {"job": "41.2", "stopped": 0})
    assert slurm.read_rendezvous(path) == {"job": "41.2", "stopped": 0}
    assert os.listdir(tmp_path) == [".farpool-slurm-41.2"]  # no temporary file left


def test_the_batch_script_runs_one_task_per_node_with_exec():
    text = slurm.batch_script(["python", "job.py", "a b"], 4, time_limit="1:00:00", partition="gpu",
                              cpus_per_task=16, python="/opt/py/bin/python")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=1:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=16"):
        assert line in lines
    assert shlex.split(lines[-1]) == ["exec", "srun", "--ntasks-per-node=1", "--cpus-per-task=16",
                                      "/opt/py/bin/python", "-m", "farpool", "slurm", "--", "python", "job.py", "a b"]
    assert not any(line.startswith("#SBATCH --account") for line in lines)


def test_the_batch_script_needs_nodes_and_a_command():
    with pytest.raises(ValueError, match="--nodes must be >= 1, got 0"):
        slurm.batch_script(["python", "job.py"], 0)
    with pytest.raises(ValueError, match="give the command after --"):
        slurm.batch_script([], 2)


def test_sbatch_prints_the_script(capsys):
    assert slurm.cli_main(["sbatch", "--nodes", "2", "--", "python", "job.py"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and out.rstrip().endswith("slurm -- python job.py")
    assert shlex.split(out.splitlines()[-1])[3] == sys.executable


def test_a_second_task_on_a_node_has_nothing_to_do(capsys):
    step = slurm.Step.from_env(dict(ENV, SLURM_PROCID="5", SLURM_LOCALID="1"))
    assert slurm.run(slurm.Options(command=["true"]), step) == 0
    assert "second task on node n2" in capsys.readouterr().err


def test_runtime_processes_ignore_sigterm_only_under_such_a_launcher(monkeypatch):
    handler = lambda *_: None  # noqa: E731
    monkeypatch.delenv(session.IGNORE_SIGTERM_VAR, raising=False)
    assert session.sigterm_handler(handler) is handler
    monkeypatch.setenv(session.IGNORE_SIGTERM_VAR, "1")
    assert session.sigterm_handler(handler) is signal.SIG_IGN
