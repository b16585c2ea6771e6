"""Starting and stopping: processes, names, lifelines, cleanup, __main__ handling."""

import os
import subprocess
import sys
import textwrap

import psutil
import pytest

import farpool

PY = sys.executable


def children_of(pid):
    """farpool's runtime processes among ``pid``'s descendants (not, e.g., the resource
    tracker that an earlier test's multiprocessing.Queue left running under pytest)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in children:
        try:
            if p.name().startswith("farpool-") or "farpool._private" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def run_script(tmp_path, body, timeout=120, env=None):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=dict(os.environ, **(env or {})))


def test_the_shutdown_at_exit_can_still_send_large_messages(tmp_path):
    """At exit farpool's shutdown sends the last task events, which can be a large, zero-copy
    message; pyzmq frees those on a helper thread that its own exit hook stops.  When pyzmq
    started that helper after farpool was imported, its hook ran first and the shutdown failed
    ("zmq gc socket requested during shutdown"), losing the last events."""
    result = run_script(tmp_path, """
        import zmq
        import farpool
        from farpool._private import transport

        @farpool.remote
        def one():
            return 1

        farpool.init(num_cpus=1)
        assert farpool.get(one.remote(), timeout=60) == 1
        import zmq.utils.garbage  # (what pyzmq's first zero-copy send after init does)
        real_send = transport.send

        def send(sock, frames):
            zmq.Frame(bytes(100_000), copy=False)  # a large frame, as a big batch of task events is
            return real_send(sock, frames)
        transport.send = send
        print("exiting")
    """)
    assert result.returncode == 0 and result.stdout.split() == ["exiting"], result
    assert "I/O thread failed" not in result.stderr and "during shutdown" not in result.stderr, result.stderr


def test_init_shutdown_init_and_reinit_error():
    farpool.shutdown()
    info = farpool.init(num_cpus=1)
    assert farpool.is_initialized()
    assert os.path.isdir(info["session_dir"])
    with pytest.raises(RuntimeError, match="already called"):
        farpool.init()
    assert farpool.init(ignore_reinit_error=True)["session_dir"] == info["session_dir"]

    @farpool.remote
    def one():
        return 1
    assert farpool.get(one.remote(), timeout=30) == 1  # workers are up by now
    runtime = children_of(os.getpid())
    names = {p.name() for p in runtime}
    assert {"farpool-head", "farpool-node", "farpool-launch", "farpool-worker"} <= names
    farpool.shutdown()
    assert not farpool.is_initialized()
    gone, alive = psutil.wait_procs(runtime, timeout=15)
    assert not alive, alive
    assert not os.path.exists(info["session_dir"])
    info2 = farpool.init(num_cpus=1)
    assert info2["session_dir"] != info["session_dir"]
    assert farpool.get(one.remote(), timeout=30) == 1
    farpool.shutdown()


def test_auto_init_on_first_use():
    farpool.shutdown()

    @farpool.remote
    def one():
        return 1
    assert farpool.get(one.remote(), timeout=60) == 1
    assert farpool.is_initialized()
    farpool.shutdown()


def test_resources_when_joining_are_refused():
    with pytest.raises(ValueError, match="resources belong to the nodes"):
        farpool.init(address="127.0.0.1:1", num_cpus=2)


def test_driver_killed_with_sigkill_leaves_nothing(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time, farpool
        if __name__ == "__main__":
            info = farpool.init(num_cpus=2)
            @farpool.remote
            def f():
                return os.getpid()
            farpool.get([f.remote() for _ in range(4)])
            print(info["session_dir"], flush=True)
            sys.stdin.read()  # wait to be killed
    """))
    proc = subprocess.Popen([PY, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        session_dir = proc.stdout.readline().strip()
        assert session_dir and os.path.isdir(session_dir)
        # Runtime processes live in their own sessions: find them by the session dir they serve.
        runtime = [p for p in psutil.process_iter(["cmdline"])
                   if session_dir in " ".join(p.info["cmdline"] or [])]
        runtime += [c for p in runtime for c in children_of(p.pid)]
        assert len(runtime) >= 4, runtime  # head, node, launcher, workers
        proc.kill()
        proc.wait(10)
        gone, alive = psutil.wait_procs(runtime, timeout=20)
        assert not alive, f"still running after the driver's SIGKILL: {alive}"
        assert not os.path.exists(session_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_functions_by_reference_share_module_globals(tmp_path):
    """A guarded script's functions are pickled by reference; workers load it as __mp_main__."""
    result = run_script(tmp_path, """
        import farpool

        CONFIG = {"scale": 1}

        def configure(scale):
            CONFIG["scale"] = scale
            return scale

        def scaled(x):
            return x * CONFIG["scale"]

        @farpool.remote
        def run_both(x):
            configure(7)          # sets this worker's module global...
            return scaled(x)      # ...which a by-reference function sees

        @farpool.remote
        def module_name():
            return __name__

        if __name__ == "__main__":
            farpool.init(num_cpus=1)
            print(farpool.get(run_both.remote(6), timeout=60))
            print(farpool.get(module_name.remote(), timeout=60))
            farpool.shutdown()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "__mp_main__"]


def test_unguarded_script_travels_by_value_and_is_not_rerun(tmp_path):
    result = run_script(tmp_path, """
        import os, farpool
        print("top-level ran in", os.getpid(), flush=True)

        @farpool.remote
        def f(x):
            return x + 1

        farpool.init(num_cpus=1)
        print(farpool.get(f.remote(1), timeout=60))
        farpool.shutdown()
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "2"
    assert sum("top-level ran" in line for line in lines) == 1


def test_interactive_session_without_file(tmp_path):
    code = textwrap.dedent("""
        import farpool
        farpool.init(num_cpus=1)
        @farpool.remote
        def f(x):
            return x * 3

        print(farpool.get(f.remote(5), timeout=60))
        farpool.shutdown()
    """)
    result = subprocess.run([PY, "-i"], input=code, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "15" in result.stdout, result.stderr


def test_process_names_in_ps():
    farpool.shutdown()
    farpool.init(num_cpus=1)
    try:
        farpool.get(farpool.remote(lambda: 1).remote(), timeout=30)
        comms = {p.name() for p in children_of(os.getpid())}
        cmdlines = [" ".join(p.cmdline()) for p in children_of(os.getpid())]
    finally:
        farpool.shutdown()
    assert {"farpool-head", "farpool-node", "farpool-worker"} <= comms
    assert any("farpool._private.head" in c for c in cmdlines)
    assert not any(os.environ.get("FARPOOL_TOKEN", "\0") in c for c in cmdlines)


def test_token_is_not_on_any_command_line():
    farpool.shutdown()
    info = farpool.init(num_cpus=1)
    try:
        token = farpool.api._client().token
        for p in children_of(os.getpid()):
            assert token not in " ".join(p.cmdline())
    finally:
        farpool.shutdown()
    del info


def test_tasks_do_not_see_the_cluster_token():
    """The agent takes the token out of its environment before it forks the launcher, which
    forks the workers: task code (and what it starts) cannot read it there."""
    farpool.shutdown()
    farpool.init(num_cpus=1)
    try:
        assert farpool.get(farpool.remote(lambda: os.environ.get("FARPOOL_TOKEN")).remote(), timeout=60) is None
    finally:
        farpool.shutdown()


def test_runtime_processes_survive_terminal_sigint():
    """Runtime processes are in their own session: a Ctrl-C reaches only the driver."""
    farpool.shutdown()
    farpool.init(num_cpus=1)
    try:
        for p in children_of(os.getpid()):
            assert os.getsid(p.pid) != os.getsid(0)
    finally:
        farpool.shutdown()


def _never_done(tmp_path):
    """A task that runs until a file appears that no one writes: pending when a process dies."""
    @farpool.remote
    def wait_for(path):
        import time
        while not os.path.exists(path):
            time.sleep(0.01)
    return wait_for.remote(str(tmp_path / "never"))


def test_embedded_node_agent_killed_fails_pending_gets_instead_of_hanging(tmp_path):
    farpool.shutdown()
    info = farpool.init(num_cpus=1)
    try:
        ref = _never_done(tmp_path)
        node_pid = int(open(os.path.join(info["session_dir"], "node.pid")).read())
        os.kill(node_pid, 9)
        with pytest.raises(farpool.FarpoolError, match="node agent .* exited unexpectedly"):
            farpool.get(ref, timeout=60)
    finally:
        farpool.shutdown()


def test_embedded_node_agent_killed_fails_puts_instead_of_waiting_for_its_answer(tmp_path):
    """A put waiting for the agent's AllocateObject answer, and a put after, fail with the
    agent's death; they waited out their 60 s and blamed a silent agent before."""
    import signal
    import threading
    import numpy as np
    farpool.shutdown()
    info = farpool.init(num_cpus=1)
    try:
        node_pid = int(open(os.path.join(info["session_dir"], "node.pid")).read())
        os.kill(node_pid, signal.SIGSTOP)  # the put's request stays unanswered
        errors = []

        def put():
            try:
                farpool.put(np.ones(1 << 17))
            except Exception as error:  # noqa: BLE001
                errors.append(error)
        thread = threading.Thread(target=put, daemon=True)
        thread.start()
        thread.join(0.5)  # most likely waiting for the answer by now (either order is tested)
        os.kill(node_pid, signal.SIGKILL)
        thread.join(90)
        assert not thread.is_alive(), "put() still waits for an agent that is gone"
        assert len(errors) == 1 and isinstance(errors[0], farpool.FarpoolError)
        assert "exited unexpectedly" in str(errors[0]), errors[0]
        with pytest.raises(farpool.FarpoolError, match="node agent .* exited unexpectedly"):
            farpool.put(np.ones(1 << 17))
    finally:
        farpool.shutdown()


def test_embedded_cluster_survives_a_pause_of_its_processes(monkeypatch):
    """Head, agent and workers stopped together for longer than the heartbeat timeouts (a
    frozen or starved machine): on resuming, the head judged the node by heartbeats it had
    not read yet, declared it dead and the agent exited; the next put waited 60 s for it."""
    import signal
    import time
    import numpy as np
    monkeypatch.setenv("FARPOOL_NODE_TIMEOUT_S", "3")
    monkeypatch.setenv("FARPOOL_HEAD_TIMEOUT_S", "4")
    farpool.shutdown()
    farpool.init(num_cpus=1)
    try:
        @farpool.remote
        def total(a):
            return float(a.sum())
        assert farpool.get(total.remote(farpool.put(np.ones(1 << 17)))) == 1 << 17
        runtime = children_of(os.getpid())
        for p in runtime:
            p.send_signal(signal.SIGSTOP)
        try:
            time.sleep(6)  # past both timeouts
        finally:
            for p in runtime:
                p.send_signal(signal.SIGCONT)
        ref = farpool.put(np.ones(1 << 17))
        assert farpool.get(total.remote(ref), timeout=60) == 1 << 17
        assert all(n["alive"] for n in farpool.nodes())
    finally:
        farpool.shutdown()


def test_embedded_head_is_forked_by_the_agents_process_and_reaped_by_it(tmp_path):
    """The embedded head shares the node agent's imports (node_main forks it): its parent is the
    agent, `ps` shows it as the head, and when it dies the agent reaps it (no zombie) while the
    driver fails what is pending, naming the head."""
    import signal
    farpool.shutdown()
    info = farpool.init(num_cpus=1)
    try:
        ref = _never_done(tmp_path)
        head_pid = int(open(os.path.join(info["session_dir"], "head.pid")).read())
        node_pid = int(open(os.path.join(info["session_dir"], "node.pid")).read())
        head = psutil.Process(head_pid)
        assert head.ppid() == node_pid and head.name() == "farpool-head"
        assert head.cmdline()[1:3] == ["-m", "farpool._private.head"], head.cmdline()
        os.kill(head_pid, signal.SIGKILL)
        head.wait(timeout=60)  # returns once reaped: a zombie still "exists"
        # ... by the agent, still running (an agent that left it to init would have exited first)
        assert psutil.Process(node_pid).status() != psutil.STATUS_ZOMBIE
        with pytest.raises(farpool.FarpoolError, match="head .* exited unexpectedly"):
            farpool.get(ref, timeout=60)
    finally:
        farpool.shutdown()


def test_embedded_head_that_never_binds_is_reported_with_its_logs(tmp_path):
    """No head.pid once the head's ready pipe closed (it died before binding): init says so and
    where the logs are, instead of a connection that times out."""
    from farpool._private import runtime
    session_dir = tmp_path / "s"
    session_dir.mkdir()
    (session_dir / "head.log").write_text("the reason it died\n")
    with pytest.raises(RuntimeError, match="head did not start") as err:
        runtime._ForkedHead.of(str(session_dir))
    kept = str(err.value).split("kept in ")[1].split(".")[0]
    try:
        assert open(os.path.join(kept, "head.log")).read() == "the reason it died\n"
    finally:
        import shutil
        shutil.rmtree(kept, ignore_errors=True)
