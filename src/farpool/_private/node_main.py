"""The node agent's entry point (``python -m farpool._private.node_main``): fork the
worker launcher, parse the arguments, then import the agent and run it.

The launcher is forked first thing, before the agent's own modules (store,
leases, spilling, pulls, the head link) are imported: it must fork before any
zmq context or thread exists (see launcher.py), and forking it here, from a
nearly bare interpreter, means that it and every worker it forks carry none of
the agent's modules, and that it imports what workers need while the agent is
still importing what the agent needs (two cores start up at once)::

    exec --> fork launcher --+--> parse args --> configure launcher --> import node --> NodeAgent --> loop
                             +--> (launcher) import worker --> (config) --> fork workers

Run by the embedded cluster (runtime.py) and ``farpool start`` (cli.py), in
the node agent's process, on its main thread.
"""

from __future__ import annotations

import os
import sys

from farpool._private import launcher, session


def parser():
    parser = session.argument_parser("farpool-node")  # (argparse: after the launcher is forked)
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--head-address", required=True, help="ipc://... or HOST:PORT")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--num-cpus", type=float, default=None,
                        help="default: the CPUs this process may use, as loky.cpu_count() counts them")
    parser.add_argument("--num-gpus", type=float, default=None, help="default: the GPUs detected")
    parser.add_argument("--resources", default="{}")
    parser.add_argument("--object-store-memory", type=float, default=None)
    parser.add_argument("--memory", type=float, default=None, help="bytes of memory tasks may reserve")
    parser.add_argument("--spill-dir", default=None,
                        help="where objects spill when the store is full (default: the session directory)")
    parser.add_argument("--host", default=None, help="also listen on TCP at this address")
    parser.add_argument("--node-ip", default=None,
                        help="the address registered for others to connect to (default: --host)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--embedded", action="store_true")
    parser.add_argument("--head-node", action="store_true")
    parser.add_argument("--lifeline", action="store_true")
    return parser


def main(argv=None) -> int:
    ready_fd = session.take_fd(session.READY_FD_VAR)  # closed (announced) once our sockets are bound
    head_ready_fd = session.take_fd(session.HEAD_READY_FD_VAR)
    # Fork the launcher before any zmq context or thread exists, and before argparse (see start).
    launcher_pid, launcher_sock = launcher.start(close_in_child=(ready_fd, head_ready_fd))
    args = parser().parse_args(argv)  # (on an error it exits: the launcher sees EOF and exits too)
    token = os.environ.pop("FARPOOL_TOKEN", "")
    launcher.configure(launcher_sock, {
        "session_dir": args.session_dir, "node_id": args.node_id,
        "agent_address": session.ipc(args.session_dir, "node"),
        "cluster_head": args.head_address, "token": token,
        "embedded": args.embedded, "num_gpus": args.num_gpus})
    from farpool._private import node
    return node.run(args, token, launcher_pid, launcher_sock, ready_fd, head_ready_fd)


if __name__ == "__main__":
    sys.exit(main())
