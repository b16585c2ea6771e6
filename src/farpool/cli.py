"""``farpool`` command line: start/stop a shared cluster, status, microbenchmark.

``farpool start --head`` starts a head and a node agent on this machine as
daemons (not tied to the terminal) and prints the address and the exact
command other machines run to join; ``farpool start --address`` adds a node.
What was started is recorded in ``<tmp root>/cluster.json`` so that
``farpool stop`` and ``init(address="auto")`` find it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-cpus", type=float, default=None, help="logical CPUs (default: the cores here)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs (default: the ones detected)")
    p.add_argument("--resources", default="{}", help='custom resources as JSON, e.g. \'{"ssd": 1}\'')
    p.add_argument("--object-store-memory", type=float, default=None, help="bytes of object store")
    p.add_argument("--spill-dir", default=None,
                   help="where objects spill when the store is full (default: the session directory)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="farpool", description="farpool: a distributed runtime for Python")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head (--head) or join a node (--address)")
    start.add_argument("--head", action="store_true", help="start the head of a new cluster")
    start.add_argument("--address", help="HOST:PORT of the head to join")
    start.add_argument("--host", default=None,
                       help="address to listen on (a head: default 127.0.0.1; a node: default --node-ip)")
    start.add_argument("--port", type=int, default=0, help="head port (default: any free port, printed)")
    start.add_argument("--node-ip", default=None,
                       help="the address other nodes and drivers reach this node at (default: the local "
                            "address on the route to the head; a head node: --host)")
    start.add_argument("--node-port", type=int, default=0,
                       help="this node agent's TCP port (default: any free port, printed)")
    start.add_argument("--dashboard-host", default=None,
                       help="a head: where its dashboard listens (default 127.0.0.1: this machine only)")
    start.add_argument("--dashboard-port", type=int, default=0, help="a head: the dashboard's port (default: any)")
    start.add_argument("--token-file", help="file holding the cluster token (else FARPOOL_TOKEN)")
    start.add_argument("--token", help="the cluster token (visible to other users in ps: prefer FARPOOL_TOKEN)")
    start.add_argument("--restore", metavar="DIR", default=None,
                       help="with --head: start from the head database saved in DIR (the session directory "
                            "of a head that ran before, or a copy of its head.db): its nodes, actors, "
                            "jobs and keys; its token and port too unless given")
    start.add_argument("--block", action="store_true",
                       help="stay in the foreground until Ctrl-C or SIGTERM, then stop what this started; "
                            "what it started also stops when this command dies (for launchers: MPI, containers)")
    _resource_args(start)
    up = sub.add_parser("up", help="start a cluster over SSH from CLUSTER.yaml (head, then every worker)")
    up.add_argument("config", help="CLUSTER.yaml: cluster_name, ssh, python, setup, head, workers")
    down = sub.add_parser("down", help="stop what `farpool up CLUSTER.yaml` started")
    down.add_argument("config")
    k8s = sub.add_parser("k8s", help="Kubernetes: `farpool k8s render` prints the manifests of a cluster")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    render = k8s_sub.add_parser("render", help="manifests: a Secret with a new token, the head Deployment and "
                                               "Service, the node agents' Deployment")
    render.add_argument("--name", default="farpool", help="name prefix of every object (default: farpool)")
    render.add_argument("--image", default=None,
                        help="the image built from the repository's Dockerfile (default: farpool:VERSION)")
    render.add_argument("--workers", type=int, default=1, help="node agent pods beside the head's (default: 1)")
    render.add_argument("--num-cpus", "--cpus", dest="num_cpus", type=float, default=None,
                        help="CPUs each pod requests and its node offers")
    render.add_argument("--memory", default=None, help="memory each pod requests and is limited to, e.g. 8Gi")
    render.add_argument("--num-gpus", "--gpus", dest="num_gpus", type=float, default=None,
                        help="GPUs (nvidia.com/gpu) each pod requests")
    render.add_argument("--namespace", default="default")
    render.add_argument("-o", "--output", default=None,
                        help="write to this file (made 0600: it holds the token) instead of stdout")
    stop = sub.add_parser("stop", help="stop what `farpool start` started on this machine",
                          description="Stop what `farpool start` started on this machine. A head stops at "
                                      "once with everything here. A node agent that joined a head elsewhere "
                                      "drains first: it takes no new tasks, lets its running tasks finish "
                                      "(up to --drain-timeout seconds), then leaves; the owners of its "
                                      "objects rebuild them on demand.")
    stop.add_argument("--node", default=None, metavar="ID",
                      help="drain and stop only the node agent with this node id (or a prefix of it)")
    stop.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                      help="seconds a draining node waits for its running tasks (default: "
                           "FARPOOL_DRAIN_TIMEOUT_S, else 30)")
    status = sub.add_parser("status", help="nodes, resources, tasks by function, actors, store use")
    status.add_argument("--address", default="auto")
    status.add_argument("--json", action="store_true", help="print farpool.status() as JSON")
    lister = sub.add_parser("list", help="the detail behind status: tasks, actors, objects, nodes, placement groups")
    lister.add_argument("kind", choices=("tasks", "actors", "objects", "nodes", "placement-groups"))
    lister.add_argument("--address", default="auto")
    lister.add_argument("--state", default=None, help="only rows in this state (e.g. RUNNING, FAILED, ALIVE)")
    lister.add_argument("--node", default=None, help="only this node (its id or a prefix of it)")
    lister.add_argument("--limit", type=int, default=100, help="at most this many rows (default: 100)")
    lister.add_argument("--json", action="store_true", help="JSON instead of a table")
    timeline = sub.add_parser("timeline", help="write a Chrome-trace JSON of the whole cluster's recent tasks")
    timeline.add_argument("path", help="the file to write (open it in chrome://tracing or ui.perfetto.dev)")
    timeline.add_argument("--address", default="auto")
    memory = sub.add_parser("memory", help="object store use and the largest live objects")
    memory.add_argument("--address", default="auto")
    memory.add_argument("--limit", type=int, default=20)
    stack = sub.add_parser("stack", help="the Python stack of every thread of every worker, with its task")
    stack.add_argument("--address", default="auto")
    stack.add_argument("--node", default=None, help="only this node (its id or a prefix of it)")
    stack.add_argument("--pid", type=int, default=None, help="only the worker with this pid")
    logs = sub.add_parser("logs", help="worker output kept by each node (stdout and stderr)")
    logs.add_argument("--address", default="auto")
    logs.add_argument("--node", default=None, help="only this node (its id or a prefix of it)")
    logs.add_argument("--pid", type=int, default=None, help="only the worker with this pid")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new output until Ctrl-C")
    bench = sub.add_parser("microbenchmark", help="run the standard micro-benchmarks (under a minute)")
    bench.add_argument("--quick", action="store_true")
    slurm = sub.add_parser("slurm", help="SLURM: `srun --ntasks-per-node=1 farpool slurm -- CMD` runs CMD on a "
                                         "cluster of the step's nodes; `farpool slurm sbatch` prints its script")
    slurm.add_argument("args", nargs=argparse.REMAINDER, help="[sbatch] [options] -- CMD...")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["slurm"]:
        return _slurm(argv[1:])  # its own parsers: options before `--`, the command after
    args = parser.parse_args(argv)
    try:
        return {"start": _start, "up": _up, "down": _down, "k8s": _k8s, "stop": _stop, "status": _status,
                "list": _list, "timeline": _timeline, "memory": _memory, "stack": _stack, "logs": _logs, "microbenchmark": _microbenchmark}[
            args.command](args)
    except (ValueError, ConnectionError, OSError, RuntimeError) as exc:
        print(f"farpool {args.command}: {exc}", file=sys.stderr)
        return 1


def _token(args) -> str | None:
    if args.token:
        return args.token
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip()
    return os.environ.get("FARPOOL_TOKEN")


def _start(args) -> int:
    from farpool._private import addresses, scheduling, session
    resources = json.loads(args.resources or "{}")
    scheduling.make_totals(args.num_cpus or 1, args.num_gpus or 0, resources)  # validate early
    if args.head == bool(args.address):
        raise ValueError("give either --head (a new cluster) or --address HOST:PORT (join one)")
    if args.restore and not args.head:
        raise ValueError("--restore DIR restarts a head: give it with --head")
    state = session.read_state() or {}
    if args.head and state.get("head_pid") and session.pid_alive(state["head_pid"]):
        raise ValueError(f"a farpool head is already running here (pid {state['head_pid']}, "
                         f"address {state.get('address')}); run `farpool stop` first")
    if args.head:
        listen = args.host or "127.0.0.1"
        advertise = addresses.node_ip(None, args.node_ip, listen)
    else:
        head_host = addresses.split(args.address)[0]
        advertise = addresses.node_ip(args.address, args.node_ip, args.host)
        listen = args.host or advertise
        if addresses.is_loopback(advertise) and not addresses.is_loopback(head_host):
            raise ValueError(f"this node would register {advertise}, a loopback address, with the head at "
                             f"{args.address}: no other machine could reach it. Give --node-ip an address "
                             "of this machine that the head's machine can reach (or leave it out)")
    session.remove_dead_sessions()
    lifeline = ["--lifeline"] if args.block else []  # --block: they stop when this command goes
    # --block: a SIGTERM from now on stops what this starts, even one that comes as soon as
    # "started" is printed, before _block waits (it used to kill this command outright).
    early_sigterm: list = []
    if args.block:
        signal.signal(signal.SIGTERM, session.sigterm_handler(lambda *_: early_sigterm.append(True)))
    session_dir = session.new_session_dir()
    os.unlink(os.path.join(session_dir, "owner.pid"))
    node_id = os.urandom(8).hex()
    common = ["--session-dir", session_dir, "--node-id", node_id, "--resources", json.dumps(resources),
              "--host", listen, "--node-ip", advertise, "--port", str(args.node_port)]
    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus),
                        ("--object-store-memory", args.object_store_memory),
                        ("--spill-dir", args.spill_dir and os.path.abspath(args.spill_dir))):
        if value is not None:
            common += [flag, str(value)]
    if args.head:
        from farpool._private import head_store
        db_path = os.path.join(session_dir, head_store.DB_NAME)
        restore = []
        token = _token(args)
        if args.restore:
            try:
                head_store.copy_database(args.restore, session_dir)
            except (ValueError, OSError) as exc:
                session.remove_session(session_dir)
                raise ValueError(str(exc)) from None
            restore = ["--restore"]
            if token is None and os.path.isfile(os.path.join(args.restore, "token")):
                with open(os.path.join(args.restore, "token")) as f:  # the token its peers hold
                    token = f.read().strip()
        token = token or session.new_token()
        token_file = session.write_token(session_dir, token)
        # The supervisor (head_supervisor.py) runs the head and restarts it on its database.
        head_args = ["--session-dir", session_dir, "--host", listen, "--advertise-host", advertise,
                     "--port", str(args.port), "--db", db_path, "--lifeline", *restore,
                     "--dashboard-port", str(args.dashboard_port),
                     *(["--dashboard-host", args.dashboard_host] if args.dashboard_host else [])]
        head = session.spawn("farpool._private.head_supervisor",
                             ["--session-dir", session_dir, *lifeline, "--", *head_args],
                             session_dir, "head.log", token, lifeline=args.block)
        try:
            port = _wait_file(os.path.join(session_dir, "head.port"), head, "head")
        except RuntimeError:
            session.remove_session(session_dir)
            raise
        address = addresses.join(advertise, int(port))
        node = session.spawn("farpool._private.node_main",
                             ["--head-address", session.ipc(session_dir, "head"), "--head-node"] + common
                             + lifeline, session_dir, "node.log", token, lifeline=args.block)
        try:
            node_address = _wait_file(os.path.join(session_dir, "node.address"), node, "node agent")
        except RuntimeError:  # no cluster without its node: stop the head too
            session.terminate([p.pid for p in (node, head)])
            session.remove_session(session_dir)
            raise
        state = {"address": address, "session_dir": session_dir, "token_file": token_file,
                 "head_pid": head.pid, "supervised": True, "nodes": [{"pid": node.pid, "session_dir": session_dir,
                                                   "node_id": node_id}]}
        session.write_state(state)
        print(f"farpool head started at {address} (node {node_id[:8]}, session {session_dir})")
        print(f"Ports to open in a firewall: {port} (head), {addresses.split(node_address)[1]} (this node agent)")
        print("To join another machine to this cluster, run there:")
        print(f"  FARPOOL_TOKEN=$(cat {token_file}) farpool start --address {address}")
        print("  (copy the token file to that machine first; the token never goes on a command line)")
        print(f"To connect a program: farpool.init(address=\"{address}\") with FARPOOL_TOKEN set, "
              "or init(address=\"auto\") on this machine.")
        link = _read_file(os.path.join(session_dir, "dashboard.link"))
        if link:
            print(f"Dashboard (this link logs in one browser, once; init() returns a new one as "
                  f"dashboard_url): {link}")
        if addresses.is_loopback(advertise):
            print("The head listens on loopback only: other machines cannot reach it. To open the "
                  "cluster to them, restart with --host set to an address they can reach.")
    else:
        token = _token(args)
        if not token:
            raise ValueError("no cluster token: set FARPOOL_TOKEN or pass --token-file PATH "
                             "(the token printed by `farpool start --head`)")
        node = session.spawn("farpool._private.node_main", ["--head-address", args.address] + common + lifeline,
                             session_dir, "node.log", token, lifeline=args.block)
        try:
            node_address = _wait_file(os.path.join(session_dir, "node.address"), node, "node agent")
        except RuntimeError:
            session.remove_session(session_dir)
            raise
        state = session.read_state() or {"nodes": []}
        state.setdefault("nodes", []).append({"pid": node.pid, "session_dir": session_dir, "node_id": node_id,
                                              "joined": args.address})
        session.write_state(state)
        print(f"farpool node {node_id[:8]} joined the cluster at {args.address}; other nodes and drivers "
              f"reach it at {node_address} (port {addresses.split(node_address)[1]} must be open to them)")
    if args.block:
        sys.stdout.flush()
        return _block(args, [node, head] if args.head else [node], session_dir, early_sigterm)
    return 0


def _block(args, procs, session_dir: str, early_sigterm: list) -> int:
    """``--block``: wait until Ctrl-C or SIGTERM (0) or until a started process exits (1, saying
    which), then stop them all.  They also hold a lifeline from this process: if it is killed,
    they see EOF and stop themselves."""
    from farpool._private import session

    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, session.sigterm_handler(interrupt))
    code = 0
    try:
        if early_sigterm:  # (one came while they started)
            raise KeyboardInterrupt
        pid, status = os.wait()  # our only children are the processes started above
        gone = next((p for p in procs if p.pid == pid), None)
        if gone is not None:
            gone.returncode = os.waitstatus_to_exitcode(status)
            what, log = ("head", "head.log") if args.head and gone is procs[-1] else ("node agent", "node.log")
            kept = session.keep_logs(session_dir)
            print(f"farpool start: the {what} (pid {pid}) exited with code {gone.returncode}, so this "
                  f"stops the rest; read why in {os.path.join(kept, log)}", file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for proc in procs:  # close the lifelines first: they stop at once, on their own
        try:
            proc.stdin.close()
        except (OSError, AttributeError):
            pass
    _stop(args, drain=False)  # (its own processes: they stop now, as at Ctrl-C)
    for proc in procs:
        if proc.returncode is None:
            proc.wait()
    return code


def _up(args) -> int:
    from farpool._private.launchers import ssh
    cfg = ssh.load(args.config)
    try:
        state = ssh.up(cfg)
    except ssh.HostFailed as exc:
        print(f"farpool up: the head did not start, so nothing did: {exc}", file=sys.stderr)
        return 1
    print(f"farpool cluster {cfg.cluster_name!r} is up at {state['address']} with "
          f"{1 + len(state['workers'])} node(s).")
    print("To connect a program, on a machine that reaches the head:")
    print(f"  FARPOOL_TOKEN=$(cat {state['token_file']}) python -c "
          f"'import farpool; farpool.init(address=\"{state['address']}\")'")
    print(f"  (the token is in {state['token_file']}, readable by you only)")
    print(f"To stop it: farpool down {args.config}")
    if state["failed"]:
        print(f"{len(state['failed'])} host(s) did not start (the others are up and working): "
              + ", ".join(f["host"] for f in state["failed"]), file=sys.stderr)
        return 1
    return 0


def _down(args) -> int:
    from farpool._private.launchers import ssh
    failed = ssh.down(ssh.load(args.config))
    if failed:
        print(f"farpool down: could not stop {', '.join(failed)}; run `farpool stop` there", file=sys.stderr)
        return 1
    return 0


def _slurm(argv: list) -> int:
    from farpool._private.launchers import slurm
    try:
        return slurm.cli_main(argv)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"farpool slurm: {exc}", file=sys.stderr)
        return 1


def _k8s(args) -> int:
    from farpool._private import session
    from farpool._private.launchers import k8s
    from farpool._version import __version__
    docs = k8s.render(args.name, args.image or f"farpool:{__version__}", args.workers, session.new_token(),
                      namespace=args.namespace, num_cpus=args.num_cpus, memory=args.memory,
                      num_gpus=args.num_gpus)
    text = k8s.to_yaml(docs)
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        where = args.output
    else:
        sys.stdout.write(text)
        where = "the manifests above"
    head = f"{args.name}-head.{args.namespace}.svc:{k8s.HEAD_PORT}"
    print(f"farpool k8s: {where} hold a new cluster token in the Secret {args.name}-token: keep them "
          f"private. Apply with `kubectl apply -f`; programs in the cluster connect with "
          f"farpool.init(address=\"{head}\") and FARPOOL_TOKEN from that Secret.", file=sys.stderr)
    return 0


def _read_file(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _wait_file(path: str, proc, what: str, timeout: float = 30) -> str:
    """Wait for a process to publish a file (its port), or report its log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
        try:
            code = proc.wait(timeout=0.05)
        except Exception:
            continue
        log = os.path.join(os.path.dirname(path), f"{'head' if what == 'head' else 'node'}.log")
        try:
            with open(log) as f:
                tail = f.read()[-2000:]
        except OSError:
            tail = ""
        raise RuntimeError(f"the {what} exited with code {code} while starting:\n{tail}")
    raise RuntimeError(f"the {what} did not start within {timeout:.0f} s")


def _stop(args, drain: bool = True) -> int:
    """`farpool stop` (``drain``: node agents that joined a head elsewhere drain first), and the
    end of `farpool start --block` (``args`` are start's: everything it started stops now)."""
    from farpool._private import session
    state = session.read_state()
    if not state:
        print("farpool stop: nothing was started on this machine")
        return 0
    if drain and args.node is not None:
        return _stop_node(args, state)
    head_here = bool(state.get("head_pid")) and session.pid_alive(state["head_pid"])
    nodes = [n for n in state.get("nodes", []) if session.pid_alive(n["pid"])]
    drained = [] if head_here or not drain else \
        _drain([(n["pid"], n["session_dir"]) for n in nodes], args.drain_timeout)
    pids = [n["pid"] for n in state.get("nodes", [])]
    if state.get("head_pid"):
        pids.append(state["head_pid"])
    alive = [p for p in pids if session.pid_alive(p)]
    family = _descendants(alive)  # launchers and workers: they follow their agent out on their own
    session.terminate(alive)
    _wait_gone(family)
    dirs = {n["session_dir"] for n in state.get("nodes", [])}
    if state.get("session_dir"):
        dirs.add(state["session_dir"])
    for d in dirs:
        session.remove_session(d)
    os.unlink(session.state_file())
    print(f"farpool stopped {len(alive) + len(drained)} process(es)"
          + (f" ({len(drained)} node agent(s) drained first)" if drained else ""))
    return 0


# How long `farpool stop` waits for workers to follow their node agent out before killing them.
FOLLOW_OUT_S = 10.0


def _descendants(pids: list[int]) -> list:
    import psutil
    out = []
    for pid in pids:
        try:
            out.extend(psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return out


def _wait_gone(procs: list) -> None:
    """Return once ``procs`` (psutil processes) have exited: `farpool stop` ends when what it
    stopped is gone, not while workers are still on their way out; the stragglers are killed."""
    import psutil
    _, alive = psutil.wait_procs(procs, timeout=FOLLOW_OUT_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=FOLLOW_OUT_S)


def _stop_node(args, state: dict) -> int:
    """``farpool stop --node ID``: drain one node agent started here, then stop it."""
    from farpool._private import session
    for n in state.get("nodes", []):  # the id it has now: a new one if it joined again after being declared dead
        n["node_id"] = _current_node_id(n)
    match = [n for n in state.get("nodes", []) if n["node_id"].startswith(args.node)]
    if len(match) != 1:
        known = ", ".join(n["node_id"][:8] for n in state.get("nodes", [])) or "none"
        raise ValueError(f"{'no' if not match else 'more than one'} node agent started here has an id "
                         f"starting with {args.node!r} (started here: {known})")
    node = match[0]
    if node["session_dir"] == state.get("session_dir"):
        raise ValueError(f"node {node['node_id'][:8]} is the head's own node: it stops with the head "
                         "(`farpool stop` without --node stops the whole cluster started here)")
    drained = _drain([(node["pid"], node["session_dir"])], args.drain_timeout)
    timed_out = _drain_timeout_said(node["session_dir"])  # (its log goes with its session directory)
    session.remove_session(node["session_dir"])
    state["nodes"] = [n for n in state["nodes"] if n is not node]
    session.write_state(state)
    print(f"farpool node {node['node_id'][:8]} " + ("drained and stopped" if drained else "was not running")
          + (f"; it said: {timed_out}" if timed_out else ""))
    return 0


def _drain_timeout_said(session_dir: str) -> str:
    """What a node agent logged when its drain reached the timeout (what it stopped without
    waiting for: node_drain.py), else ""."""
    try:
        with open(os.path.join(session_dir, "node.log"), errors="replace") as f:
            said = [line for line in f if "at the drain timeout" in line]
    except OSError:
        return ""
    return said[-1].split(" WARNING ", 1)[-1].strip() if said else ""


def _current_node_id(node: dict) -> str:
    """The id of a node agent started here as it is now (node.py write_node_id)."""
    from farpool._private.node import NODE_ID_FILE
    try:
        with open(os.path.join(node["session_dir"], NODE_ID_FILE)) as f:
            return f.read().strip() or node["node_id"]
    except OSError:
        return node["node_id"]


# Seconds past its drain timeout a node agent may take to stop before it is killed.
DRAIN_GRACE_S = 5.0


def _drain(agents: list[tuple[int, str]], timeout_s: float | None) -> list[int]:
    """Ask node agents (pid, session directory) to drain and stop (node.ask_to_drain), wait for
    them (the drain timeout and DRAIN_GRACE_S), and stop the ones still running; returns the
    pids that were running."""
    from farpool._private import node, session
    timeout_s = node.DRAIN_TIMEOUT_S if timeout_s is None else timeout_s
    running = [pid for pid, session_dir in agents if node.ask_to_drain(pid, session_dir, timeout_s)]
    deadline = time.monotonic() + timeout_s + DRAIN_GRACE_S
    for pid in running:
        while session.pid_alive(pid) and not session._reaped(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    session.terminate([p for p in running if session.pid_alive(p)])
    return running


def _status(args) -> int:
    import farpool
    from farpool import observe
    farpool.init(address=args.address)
    try:
        data = observe.status()
    finally:
        farpool.shutdown()
    print(json.dumps(data, indent=1) if args.json else observe.format_status(data))
    return 0


def _list(args) -> int:
    import farpool
    from farpool import observe
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    farpool.init(address=args.address)
    try:
        rows = observe.list_state(args.kind, args.state, args.node, args.limit)
    finally:
        farpool.shutdown()
    print(json.dumps(rows, indent=1) if args.json else observe.format_table(args.kind, rows))
    return 0


def _timeline(args) -> int:
    import farpool
    from farpool import observe
    farpool.init(address=args.address)
    try:
        events = observe.timeline(args.path)
    finally:
        farpool.shutdown()
    runs = sum(1 for e in events if e.get("ph") in ("X", "B") and str(e.get("cat", "")).startswith("task"))
    copies = sum(1 for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("copy in"))
    print(f"wrote {runs} task run(s) and {copies} object copy(ies) between nodes to {args.path}: "
          "open it in chrome://tracing or https://ui.perfetto.dev")
    return 0


def _memory(args) -> int:
    """Each live node's object store: totals and the largest objects (to find leaks)."""
    import farpool
    farpool.init(address=args.address)
    try:
        client = farpool.api._client()
        nodes = [n["node_id"] for n in farpool.nodes() if n["alive"]]
        for node_id in sorted(nodes, key=lambda n: n != client.home.node_id):  # ours first
            try:
                agent = client.home if node_id == client.home.node_id else client.agent_of(node_id)
                _print_store(node_id, *client.agent_request(agent, "StoreStats", (max(1, args.limit),)), args.limit)
            except farpool.FarpoolError as exc:
                print(f"node {node_id[:8]}: {exc}")
    finally:
        farpool.shutdown()
    return 0


def live_agents(client, node: str | None = None) -> list:
    """(node id, agent connection) of each live node (ours first), or of the one whose id
    starts with ``node``."""
    import farpool
    nodes = sorted((n["node_id"] for n in farpool.nodes() if n["alive"]), key=lambda n: n != client.home.node_id)
    if node is not None:
        nodes = [n for n in nodes if n.startswith(node)]
        if not nodes:
            raise ValueError(f"no live node has an id starting with {node!r}; `farpool status` lists the nodes")
    return [(n, client.home if n == client.home.node_id else client.agent_of(n)) for n in nodes]


def collect_stacks(client, node: str | None = None, pid: int | None = None) -> list[dict]:
    """Each node's answer to DumpStacks: {"node_id", "workers": [{"pid", "worker_id", "task",
    "status", "stack"}]} (nodes that did not answer: {"node_id", "error"})."""
    import farpool
    out = []
    for node_id, agent in live_agents(client, node):
        try:
            out.append(client.agent_request(agent, "DumpStacks", (pid,)))
        except farpool.FarpoolError as exc:
            out.append({"node_id": node_id, "error": str(exc)})
    return out


def format_stacks(answers: list[dict]) -> str:
    lines = []
    for answer in answers:
        if "error" in answer:
            lines.append(f"node {answer['node_id'][:8]}: no answer: {answer['error']}")
            continue
        lines.append(f"node {answer['node_id'][:8]}: {len(answer['workers'])} worker(s)")
        for w in answer["workers"]:
            task = w["task"]
            doing = (f"running {task['name']}" + (f" (task {task['task_id']})" if task["task_id"] else "")
                     if task else "idle")
            note = {"complete": "", "incomplete": " [the dump did not finish in time: it may be cut short]",
                    "no answer": " [no stack: the worker did not answer the signal (stopped, or blocking it)]",
                    "starting": " [no stack: the worker is still starting]"}[w["status"]]
            lines.append(f"  worker {w['worker_id']} pid {w['pid']}: {doing}{note}")
            lines.extend("    " + line for line in w["stack"].rstrip("\n").splitlines())
        lines.append("")
    return "\n".join(lines)


def _stack(args) -> int:
    """The stacks of every worker (or of one node's, or of one pid): where a hung task hangs."""
    import farpool
    farpool.init(address=args.address)
    try:
        answers = collect_stacks(farpool.api._client(), args.node, args.pid)
    finally:
        farpool.shutdown()
    if args.pid is not None and not any(a.get("workers") for a in answers):
        raise ValueError(f"no worker has pid {args.pid} on {'node ' + args.node if args.node else 'any live node'}; "
                         "`farpool stack` without --pid lists every worker's pid")
    print(format_stacks(answers))
    return 0


# `farpool logs --follow` asks each node for new output this often, as `tail -f` does
# (it polls every second): shorter shows lines sooner, longer costs the agents less.
FOLLOW_POLL_S = 0.5


class LogReader:
    """Reads the worker output kept by each node, from where it last stopped (any thread but
    the client's I/O one)."""

    def __init__(self, client, node: str | None = None, pid: int | None = None):
        self.client = client
        self.node = node
        self.pid = pid
        self.cursors: dict = {}   # node id -> {worker id: cursor}
        self.partial: dict = {}   # (node id, worker id) -> the start of a line not yet ended
        self.seen_pid = False

    def lines(self) -> list[str]:
        """Every whole line written since the last call, each prefixed with its node and pid."""
        import farpool
        out = []
        for node_id, agent in live_agents(self.client, self.node):
            while True:
                try:
                    answer = self.client.agent_request(agent, "ReadLogs", (self.pid, self.cursors.get(node_id, {})))
                except farpool.FarpoolError as exc:
                    out.append(f"[node {node_id[:8]}] no answer: {exc}")
                    break
                got = 0
                for w in answer["workers"]:
                    self.seen_pid = True
                    self.cursors.setdefault(node_id, {})[w["worker_id"]] = w["cursor"]
                    got += len(w["data"])
                    key = (node_id, w["worker_id"])
                    text = self.partial.pop(key, "") + w["data"].decode("utf-8", "replace")
                    *whole, rest = text.split("\n")
                    if rest:
                        self.partial[key] = rest
                    out.extend(f"[node {node_id[:8]} pid {w['pid']}] {line}" for line in whole)
                if not got:
                    break
        return out


def _logs(args) -> int:
    """Worker output kept by the nodes; with --follow, new output as it comes until Ctrl-C."""
    import threading
    import farpool
    farpool.init(address=args.address)
    # Ctrl-C (SIGINT) ends --follow between two reads: as an exception it could land inside a
    # request to an agent, and the shutdown after it could wait on what it left half done.
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        reader = LogReader(farpool.api._client(), args.node, args.pid)
        for line in reader.lines():
            print(line, flush=True)
        if args.pid is not None and not reader.seen_pid:
            raise ValueError(f"no worker with pid {args.pid} left output on "
                             f"{'node ' + args.node if args.node else 'any live node'}; "
                             "`farpool logs` without --pid shows every worker's")
        while args.follow and not interrupted.wait(FOLLOW_POLL_S):
            for line in reader.lines():
                print(line, flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
        farpool.shutdown()
    return 0


def _disk_part(stats: dict) -> str:
    """What of a store is on disk: spilled bytes are in ``spilled``; this adds the rest."""
    if "spill_dir" not in stats:  # an agent of an older version
        return ""
    return (f", {stats['on_disk'] / 1e6:.1f} MB allocated on disk, in {stats['spill_dir']} "
            f"({stats['spill_dir_free'] / 1e9:.1f} GB free); {stats['spills']} spill(s) "
            f"({stats['spilled_bytes_total'] / 1e6:.1f} MB), {stats['restores']} restore(s) "
            f"({stats['restored_bytes_total'] / 1e6:.1f} MB) so far")


def _print_store(node_id: str, stats: dict, listing: list, limit: int) -> None:
    print(f"node {node_id[:8]} object store ({stats['directory']}): "
          f"{stats['used'] / 1e6:.1f} MB used of {stats['capacity'] / 1e6:.1f} MB, "
          f"{stats['objects']} object(s) ({stats.get('copies', 0)} copied from other nodes), "
          f"{stats['spilled'] / 1e6:.1f} MB spilled{_disk_part(stats)}, "
          f"{stats['free_segments']} free segment(s) kept for reuse, "
          f"{stats.get('pulls_in_progress', 0)} copy(ies) arriving")
    if stats.get("heartbeat_gap_max_s") is not None:
        print(f"liveness: largest heartbeat gap {stats['heartbeat_gap_max_s']:.2f} s, largest agent loop delay "
              f"{stats['loop_lag_max_s']:.2f} s")
    print(f"{'object id':34} {'size MB':>9} {'pinned':>6} {'spilled':>7} {'copy':>5}  owner / created by")
    for row in listing[:limit]:
        print(f"{row['object_id'][:32]:34} {row['size'] / 1e6:9.2f} {str(row['pinned']):>6} "
              f"{str(row['spilled']):>7} {str(row.get('copy', False)):>5}  {row['owner']} / {row['created_at']}")
    print()


def _microbenchmark(args) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.join(here, "..", "..")):
        path = os.path.join(root, "benchmarks")
        if os.path.isfile(os.path.join(path, "farpool_bench.py")):
            sys.path.insert(0, path)
            break
    try:
        import farpool_bench
    except ImportError:
        print("farpool microbenchmark needs the benchmarks/ folder of a farpool checkout "
              "(run it from the project directory)", file=sys.stderr)
        return 1
    results = farpool_bench.main(quick=args.quick)
    if hasattr(farpool_bench, "format_report"):
        print(farpool_bench.format_report(results))
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
