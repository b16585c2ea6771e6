"""The node agent's entry point (``python -m farpool._private.node_main``): fork the
worker launcher (and, for the embedded cluster, the head), parse the arguments, then
import the agent and run it.

Start-up is short of CPU, not of cores: the head, the agent, the launcher and the driver
all start at once, and most of each one's start is importing the same modules (zmq,
pickle, logging, farpool's wire modules: launcher.SHARED_IMPORTS).  So this process
imports those once, then forks the processes that need them, before any zmq context or
thread exists (see launcher.py); each imports only its own modules after the fork.  The
agent's own (store, leases, spilling, the head link) come last, so that the launcher and
every worker it forks carry none of them::

    exec --> import shared --+--> fork head (embedded) --> import head --> bind --> loop
                             +--> fork launcher --> import worker --> (config) --> fork workers
                             +--> parse args --> configure launcher --> import node --> NodeAgent --> loop

The embedded head runs ``head.main`` in a process of its own, as it would when spawned:
own session, its log file, the same lifeline (stdin) as the agent, its ready pipe from the
driver (session.EMBEDDED_HEAD_VAR).  The agent reaps it; the driver watches and waits for
it by its pid (runtime.py).

Run by the embedded cluster (runtime.py) and ``farpool start`` (cli.py), in
the node agent's process, on its main thread.
"""

from __future__ import annotations

import json
import os
import sys

from farpool._private import launcher, session


OPTIONS = [
    session.Option("--session-dir", required=True),
    session.Option("--head-address", required=True, help="ipc://... or HOST:PORT"),
    session.Option("--node-id", required=True),
    session.Option("--num-cpus", float, help="default: the CPUs this process may use, as loky.cpu_count() counts them"),
    session.Option("--num-gpus", float, help="default: the GPUs detected"),
    session.Option("--resources", default="{}"),
    session.Option("--object-store-memory", float),
    session.Option("--memory", float, help="bytes of memory tasks may reserve"),
    session.Option("--spill-dir", help="where objects spill when the store is full (default: the session directory)"),
    session.Option("--host", help="also listen on TCP at this address"),
    session.Option("--node-ip", help="the address registered for others to connect to (default: --host)"),
    session.Option("--port", int, default=0),
    session.Option("--embedded", bool),
    session.Option("--head-node", bool),
    session.Option("--lifeline", bool),
]


def main(argv=None) -> int:
    ready_fd = session.take_fd(session.READY_FD_VAR)  # closed (announced) once our sockets are bound
    head_ready_fd = session.take_fd(session.HEAD_READY_FD_VAR)
    head_announce_fd = session.take_fd(session.HEAD_ANNOUNCE_FD_VAR)
    embedded_head = os.environ.pop(session.EMBEDDED_HEAD_VAR, None)
    # Ours and the head's, never in the environment of the launcher and its workers (task code):
    # the launcher gets it in its configuration.
    token = os.environ.pop("FARPOOL_TOKEN", "")
    launcher.import_shared()
    head_pid = None
    if embedded_head is not None:
        head_pid = _fork_head(json.loads(embedded_head), token, head_announce_fd,
                              close_in_child=(ready_fd, head_ready_fd))
    if head_announce_fd is not None:
        os.close(head_announce_fd)  # the head's: it closes its own once bound
    # Fork the launcher before any zmq context or thread exists, and before argparse might be
    # imported (see start).
    launcher_pid, launcher_sock = launcher.start(close_in_child=(ready_fd, head_ready_fd))
    # (after the launcher is forked: on an error argparse answers and we exit, the launcher
    # sees EOF and exits too)
    args = session.parse_options("farpool-node", OPTIONS, argv)
    launcher.configure(launcher_sock, {
        "session_dir": args.session_dir, "node_id": args.node_id,
        "agent_address": session.ipc(args.session_dir, "node"),
        "cluster_head": args.head_address, "token": token,
        "embedded": args.embedded, "num_gpus": args.num_gpus})
    from farpool._private import node
    return node.run(args, token, launcher_pid, launcher_sock, ready_fd, head_ready_fd, head_pid)


def _fork_head(spec: dict, token: str, announce_fd: int | None, close_in_child=()) -> int:
    """Fork the embedded head (``spec``: its "argv" and "log" file); returns its pid.  The
    child is what ``python -m farpool._private.head`` would be: a session of its own, its
    output to its log, the token in its environment, ``announce_fd`` its ready pipe; it exits
    with ``head.main``'s code."""
    def run_head() -> int:
        os.setsid()
        for fd in close_in_child:
            if fd is not None:
                os.close(fd)
        log_fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.environ["FARPOOL_TOKEN"] = token
        if announce_fd is not None:
            os.environ[session.READY_FD_VAR] = str(announce_fd)
        session.set_command_line([sys.executable, "-m", "farpool._private.head", *spec["argv"]])
        from farpool._private import head
        return head.main(spec["argv"])

    pid = os.fork()
    if pid == 0:
        launcher.exit_with(run_head)
    return pid


if __name__ == "__main__":
    sys.exit(main())
