"""``python -m farpool.k8s_entrypoint``: a farpool pod's entrypoint (the Dockerfile's ENTRYPOINT).

Configured by the environment that ``farpool k8s render`` writes into each pod,
it runs ``farpool start ... --block`` in the foreground (SIGTERM from Kubernetes
stops the head or node agent cleanly; if either exits, so does the pod, and
Kubernetes restarts it):

- ``FARPOOL_ROLE``: ``head`` (the head and a node agent) or ``worker`` (a node agent);
- ``FARPOOL_TOKEN``: the cluster token (from the Secret; never on a command line);
- ``FARPOOL_POD_IP``: the address this node registers (the pod IP, downward API);
- ``FARPOOL_HEAD_HOST``, ``FARPOOL_HEAD_PORT``: where a worker joins (the head Service);
- ``FARPOOL_NODE_PORT``: this node agent's port;
- optional: ``FARPOOL_LISTEN_HOST`` (default 0.0.0.0), ``FARPOOL_NUM_CPUS``,
  ``FARPOOL_NUM_GPUS``, ``FARPOOL_OBJECT_STORE_MEMORY`` (bytes), ``FARPOOL_RESOURCES`` (JSON).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ROLES = ("head", "worker")


def start_args(env: Mapping[str, str]) -> list[str]:
    """The ``farpool`` arguments for this pod; ValueError says which variable is wrong."""
    role = env.get("FARPOOL_ROLE", "")
    if role not in ROLES:
        raise ValueError(f"FARPOOL_ROLE must be 'head' or 'worker', got {role!r}; the manifests of "
                         "`farpool k8s render` set it")
    missing = [k for k in ("FARPOOL_TOKEN", "FARPOOL_POD_IP", "FARPOOL_HEAD_PORT", "FARPOOL_NODE_PORT")
               + (("FARPOOL_HEAD_HOST",) if role == "worker" else ()) if not env.get(k)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set in this {role} pod; the manifests of "
                         "`farpool k8s render` set them (the token from the Secret)")
    listen = env.get("FARPOOL_LISTEN_HOST") or "0.0.0.0"
    args = ["start", "--host", listen, "--node-ip", env["FARPOOL_POD_IP"], "--node-port", env["FARPOOL_NODE_PORT"]]
    if role == "head":
        args += ["--head", "--port", env["FARPOOL_HEAD_PORT"]]
    else:
        host = env["FARPOOL_HEAD_HOST"]
        args += ["--address", f"[{host}]:{env['FARPOOL_HEAD_PORT']}" if ":" in host
                 else f"{host}:{env['FARPOOL_HEAD_PORT']}"]
    for flag, var in (("--num-cpus", "FARPOOL_NUM_CPUS"), ("--num-gpus", "FARPOOL_NUM_GPUS"),
                      ("--object-store-memory", "FARPOOL_OBJECT_STORE_MEMORY"),
                      ("--resources", "FARPOOL_RESOURCES")):
        if env.get(var):
            args += [flag, env[var]]
    return args + ["--block"]


def main() -> int:
    try:
        args = start_args(os.environ)
    except ValueError as exc:
        print(f"farpool k8s entrypoint: {exc}", file=sys.stderr)
        return 2
    print(f"farpool k8s entrypoint ({os.environ['FARPOOL_ROLE']}): farpool {' '.join(args)}", flush=True)
    from farpool import cli
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
