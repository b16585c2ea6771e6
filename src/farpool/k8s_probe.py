"""``python -m farpool.k8s_probe``: a farpool pod's readiness probe (exit 0: ready).

Ready means: what ``farpool start`` started in this pod (its state file in the
tmp root) is running, and the head's node table lists this pod's node as alive.
It joins the cluster briefly as a driver to ask (the token from
``FARPOOL_TOKEN``, as in the pod).  Not ready: exit 1, saying why on stderr.
"""

from __future__ import annotations

import sys


def check() -> str | None:
    """None when ready, else why not."""
    from farpool._private import session
    state = session.read_state()
    if not state or not state.get("nodes"):
        return f"nothing started yet: no farpool state in {session.tmp_root()}"
    pids = [state.get("head_pid")] + [n["pid"] for n in state["nodes"]]
    dead = [p for p in pids if p and not session.pid_alive(p)]
    if dead:
        return f"process(es) {dead} that `farpool start` started here are gone"
    address = state.get("address") or state["nodes"][0].get("joined")
    import farpool
    try:
        farpool.init(address=address, log_to_driver=False)
        alive = {n["node_id"] for n in farpool.nodes() if n["alive"]}
    except Exception as exc:
        return f"cannot ask the head at {address}: {exc}"
    finally:
        farpool.shutdown()
    missing = [n["node_id"][:8] for n in state["nodes"] if n["node_id"] not in alive]
    if missing:
        return f"the head at {address} does not list node(s) {missing} as alive yet"
    return None


def main() -> int:
    why = check()
    if why:
        print(f"farpool not ready: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
