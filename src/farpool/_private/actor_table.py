"""The head's actor table: placement, lifecycle and names.  Pure state, no sockets.

Actor lifecycle (one record per actor, driven by the head's I/O shell)::

    PENDING --lease granted, __init__ ok--> ALIVE --worker exited--> RESTARTING --> ALIVE ...
       \\--__init__ raised / no restarts left / killed / creator's job ended--> DEAD

The head leases a worker for the actor from the chosen node's agent (holding
the actor's explicit resources, or nothing), sends it the creation through
that agent, and tells every subscribed caller each state change: callers send
method calls straight to the actor's worker, never through the head.
"""

from __future__ import annotations

import itertools

from farpool._private import protocol, scheduling

PENDING, ALIVE, RESTARTING, DEAD = "PENDING", "ALIVE", "RESTARTING", "DEAD"

# Why an actor was ended for good, as its callers' ActorDiedError says it.
KILLED = "it was killed with farpool.kill()"
RELEASED = ("all its handles were released (the last handle went out of scope and no call was "
            "pending), so it ended; keep a handle, or give it a name or lifetime='detached', to keep it")
EXITED = "it exited by calling farpool.actor.exit_actor() and is not restarted"
# KillActor's reasons (sent by clients): the text each stands for.
KILL_REASONS = {"kill": KILLED, "released": RELEASED}


class ActorRecord:
    """An actor as the head knows it (a plain class: see scheduling.Allocation)."""

    def __init__(self, actor_id: str, spec: dict, state: str = PENDING, incarnation: int = 0,
                 restarts_left: int = 0, node_id: str | None = None, worker_id: str | None = None,
                 path: str | None = None, lease_id: int | None = None, request_id: int | None = None,
                 cause: str = "", killed: bool = False, kill_cause: str = ""):
        self.actor_id = actor_id
        self.spec = spec
        self.state = state
        self.incarnation = incarnation
        self.restarts_left = restarts_left
        self.node_id = node_id
        self.worker_id = worker_id
        self.path = path
        self.lease_id = lease_id
        self.request_id = request_id
        self.cause = cause
        self.killed = killed
        self.kill_cause = kill_cause  # why it was ended for good (killed, released, exited, its job ended)
        self.subscribers: set = set()

    def __repr__(self) -> str:
        return f"ActorRecord({self.actor_id}, {self.state}, incarnation={self.incarnation}, node={self.node_id})"

    def info(self) -> dict:
        return {"state": self.state, "incarnation": self.incarnation, "node_id": self.node_id,
                "worker_id": self.worker_id, "path": self.path, "cause": self.cause}


class ActorTable:
    def __init__(self):
        self.actors: dict[str, ActorRecord] = {}
        self.names: dict[tuple, str] = {}   # (namespace, name) -> actor_id
        self._requests = itertools.count(1)

    def register(self, actor_id: str, spec: dict) -> tuple[str | None, str | None]:
        """(actor_id to use, error). get_if_exists returns the existing actor's id."""
        name = spec.get("name")
        if name is not None:
            key = (spec.get("namespace"), name)
            existing = self.names.get(key)
            if existing is not None and self.actors[existing].state != DEAD:
                if spec.get("get_if_exists"):
                    return existing, None
                return None, (f"an actor named {name!r} already exists in namespace "
                              f"{spec.get('namespace')!r}; use get_if_exists=True or "
                              "farpool.get_actor(name) to get it, or choose another name")
            self.names[key] = actor_id
        self.actors[actor_id] = ActorRecord(actor_id, spec, restarts_left=spec.get("max_restarts", 0))
        return actor_id, None

    def lookup(self, name: str, namespace) -> ActorRecord | None:
        actor_id = self.names.get((namespace, name))
        record = self.actors.get(actor_id) if actor_id else None
        return record if record is not None and record.state != DEAD else None

    def place(self, record: ActorRecord, nodes: list[dict]) -> str | None:
        """A node for the actor: feasible for what it holds and counts, fewest actors first."""
        spec = record.spec
        place_shape = spec["place_shape"]
        live = [n for n in nodes if n["alive"] and not n.get("draining") and scheduling.fits(n["total"], place_shape)]
        if not live:
            return None
        if spec.get("node_affinity"):
            affinity = protocol.NodeAffinity._make(spec["node_affinity"])
            match = [n["node_id"] for n in live if n["node_id"] == affinity.node_id]
            if match or not affinity.soft:
                return affinity.node_id if match else None
        counts = {n["node_id"]: 0 for n in live}
        for other in self.actors.values():
            if other.state in (ALIVE, PENDING, RESTARTING) and other.node_id in counts:
                counts[other.node_id] += 1

        def key(n):
            cpu_total = n["total"].get("CPU", 0) or 1
            free = n["available"].get("CPU", 0) / cpu_total
            return (counts[n["node_id"]] / cpu_total, -free, n["node_id"])
        return min(live, key=key)["node_id"]

    def next_request(self) -> int:
        return next(self._requests)

    def died(self, record: ActorRecord, why: str) -> bool:
        """The actor's process is gone; True when it should be restarted."""
        record.worker_id = record.path = record.lease_id = None
        if record.state == DEAD:
            return False
        if record.killed or record.restarts_left == 0:
            record.state = DEAD
            if record.killed:
                record.cause = record.kill_cause or KILLED
            elif record.spec.get("max_restarts", 0) > 0:
                record.cause = f"{why}, and it had no restarts left (max_restarts={record.spec['max_restarts']} used up)"
            else:
                record.cause = f"{why}; it is not restarted (max_restarts=0: pass max_restarts to restart it)"
            return False
        if record.restarts_left > 0:
            record.restarts_left -= 1
        record.state = RESTARTING
        record.incarnation += 1
        record.cause = why
        return True

    def live_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.actors.values():
            if r.state == ALIVE and r.node_id:
                counts[r.node_id] = counts.get(r.node_id, 0) + 1
        return counts
