"""The head's actors: their table, placing each on a node, and telling callers where they are.

Part of the head (head.py): ``ActorsPart`` is mixed into ``Head`` and runs on the head's
one thread; nothing else may call it.  Its handlers are reached through the head's
dispatch (head.MAY_SEND), and the head's own code calls ``_schedule_actor``,
``_notify_actor`` and ``_kill_actor`` (a node joins or dies, a job ends, a placement
group is created or removed).  The decisions are in actor_table.ActorTable (pure); this
is the I/O around them::

    client --CreateActor/GetNamedActor--> ActorRegistered      client --WaitActor--> ActorInfo (and on each change)
    client --KillActor--> agent: SignalWorker(SIGKILL)          head --RequestLease--> agent of the chosen node
    agent --LeaseGranted--> Relay(CreateActor) to the worker   agent --LeaseInfeasible--> the actor is DEAD
    agent --ActorCreated/WorkerExited--> ALIVE, or DEAD / restarted elsewhere (max_restarts)

It uses the head's state set in ``Head.__init__`` (``actors``, ``actor_requests``,
``nodes``, ``node_peers``, ``unconfirmed``, ``pgs``, ``embedded``) and the head's
``_reply``, ``_save_actor`` and ``_table``.
"""

from __future__ import annotations

import logging
import signal as _signal

from farpool._private import actor_table, placement_groups, protocol, scheduling, transport
from farpool._private.actor_table import ALIVE, DEAD, PENDING
from farpool._private.protocol import encode

log = logging.getLogger("farpool.head")


class ActorsPart:
    """Head's actors: created, placed on a node's leased worker, watched, killed, restarted."""

    # --- actors ---
    def _on_CreateActor(self, sock, identity, request_id, actor_id: str, spec: dict) -> None:
        if not isinstance(actor_id, str) or not isinstance(spec, dict):
            raise ValueError(f"CreateActor of {actor_id!r} with a {type(spec).__name__} for its spec")
        for key in ("hold_shape", "place_shape"):  # checked before the table holds the actor
            scheduling.check_shape(spec.get(key))
        known = self.actors.actors.get(actor_id)
        if known is not None:  # asked again (its answer was lost with a restarted head): the same answer
            self._reply(sock, identity, "ActorRegistered", request_id, actor_id, None, known.spec.get("meta"))
            return
        used_id, error = self.actors.register(actor_id, spec)
        meta = self.actors.actors[used_id].spec.get("meta") if used_id else None
        self._reply(sock, identity, "ActorRegistered", request_id, used_id, error, meta)
        if used_id == actor_id:
            self._save_actor(self.actors.actors[actor_id], new=True)
            self._schedule_actor(self.actors.actors[actor_id])

    def _on_GetNamedActor(self, sock, identity, request_id, name: str, namespace) -> None:
        record = self.actors.lookup(name, namespace)
        if record is None:
            self._reply(sock, identity, "ActorRegistered", request_id, None,
                        f"no actor named {name!r} in namespace {namespace!r}", None)
        else:
            self._reply(sock, identity, "ActorRegistered", request_id, record.actor_id, None,
                        record.spec.get("meta"))

    def _on_WaitActor(self, sock, identity, actor_id: str) -> None:
        record = self.actors.actors.get(actor_id)
        if record is None:
            self._reply(sock, identity, "ActorInfo", actor_id, {
                "state": DEAD, "incarnation": 0, "node_id": None, "worker_id": None, "path": None,
                "cause": "this actor is unknown to the cluster (its cluster was restarted?)"})
            return
        record.subscribers.add((sock, identity))
        if record.node_id in self.unconfirmed and record.state != DEAD:
            return  # told when its node registers again, or is declared dead (a restarted head)
        self._reply(sock, identity, "ActorInfo", actor_id, record.info())

    def _on_KillActor(self, sock, identity, actor_id: str, no_restart: bool, reason: str = "kill") -> None:
        """``reason``: "kill" (farpool.kill) or "released" (its last handle and pending call went)."""
        record = self.actors.actors.get(actor_id)
        if record is not None and record.state != DEAD:
            self._kill_actor(record, no_restart, actor_table.KILL_REASONS.get(reason, actor_table.KILLED))

    def _kill_actor(self, record, no_restart: bool, why: str) -> None:
        if no_restart:
            record.killed = True
            record.kill_cause = why
            self._save_actor(record)
        if record.worker_id is not None and record.node_id in self.node_peers:
            sock, ident = self.node_peers[record.node_id]
            transport.send(sock, [ident, *encode("SignalWorker", (record.worker_id, int(_signal.SIGKILL)))])
        elif no_restart:  # not started yet: it never will
            self.actors.died(record, why)
            record.cause = why
            self._notify_actor(record)

    def _schedule_actor(self, record) -> None:
        group_id = record.spec.get("placement_group")
        if group_id is not None:
            group = self.pgs.get(group_id)
            if group is None or group.state == placement_groups.REMOVED:
                record.state = DEAD
                record.cause = (group.cause if group is not None else
                                f"its placement group {group_id} is unknown to the cluster")
                self._notify_actor(record)
                return
            if group.state != placement_groups.CREATED:  # placed when the group is (_apply_groups)
                record.state = PENDING
                record.node_id = record.request_id = None
                return
        node_id = self.actors.place(record, self._table())
        if node_id is None or node_id not in self.node_peers:
            shape = record.spec["place_shape"]
            from farpool._private import scheduling
            totals = ", ".join(scheduling.describe(n["total"]) for n in self.nodes.values() if n["alive"])
            message = (f"no node can host actor {record.spec.get('class_name')} that needs "
                       f"{scheduling.describe(shape)}; the nodes have {totals or 'nothing'}")
            if self.embedded:
                record.state = DEAD
                record.cause = message
                self._notify_actor(record)
            else:
                log.warning("%s; it waits for a node that fits", message)
                record.state = PENDING
                record.node_id = None
                record.request_id = None
                self._save_actor(record)
            return
        record.node_id = node_id
        request_id = self.actors.next_request()
        record.request_id = request_id
        self.actor_requests[request_id] = record.actor_id
        self._save_actor(record)
        sock, ident = self.node_peers[node_id]
        pool_key = f"actor:{record.actor_id}:{record.incarnation}"
        transport.send(sock, [ident, *encode("RequestLease", (request_id, record.spec["hold_shape"],
                                                              record.spec.get("job_id"), pool_key,
                                                              "DEFAULT", False))])

    def _on_LeaseGranted(self, sock, identity, request_id, lease_id, worker_id, address, node_id, gpu_ids):
        actor_id = self.actor_requests.pop(request_id, None)
        record = self.actors.actors.get(actor_id) if actor_id else None
        if record is None or record.state == DEAD:
            transport.send(sock, [identity, *encode("ReturnLease", (lease_id, True))])
            return
        record.lease_id, record.worker_id, record.path = lease_id, worker_id, address
        self._save_actor(record)
        spec = record.spec
        options = dict(spec["options"], gpu_ids=list(gpu_ids or []))  # the GPUs it holds (as tasks get them)
        fields = (record.actor_id, spec["cls_bytes"], spec["args_payload"], len(spec["arg_bufs"]),
                  spec["ref_values"], spec["job_setup"], options)
        frames = encode("CreateActor", fields, list(spec["arg_bufs"]) + list(spec["ref_bufs"]))
        transport.send(sock, [identity, b"Relay", worker_id.encode(), *frames])

    def _on_LeaseInfeasible(self, sock, identity, request_id, message, fatal) -> None:
        actor_id = self.actor_requests.pop(request_id, None)
        record = self.actors.actors.get(actor_id) if actor_id else None
        if record is not None:
            record.state = DEAD
            record.cause = message
            self._notify_actor(record)

    def _on_ActorCreated(self, sock, identity, actor_id: str, ok: bool, error) -> None:
        record = self.actors.actors.get(actor_id)
        if record is None:
            return
        if ok:
            record.state = ALIVE
            record.cause = ""
        else:
            _payload, type_name, tb_text, _fn, where = error
            record.state = DEAD
            record.killed = True
            record.cause = f"its __init__ raised {type_name} on {where}:\n{tb_text}"
            transport.send(sock, [identity, *encode("ReturnLease", (record.lease_id, True))])
        self._notify_actor(record)

    def _on_WorkerExited(self, sock, identity, lease_id, info: dict) -> None:
        for record in self.actors.actors.values():
            if record.lease_id == lease_id and record.node_id == info.get("node_id"):
                if info.get("exitcode") == protocol.ACTOR_EXIT_CODE and not info.get("signal"):
                    record.killed = True  # exit_actor(): for good
                    record.kill_cause = record.kill_cause or actor_table.EXITED
                how = (f"was killed by {_signal_name(info['signal'])}" if info.get("signal")
                       else f"exited with code {info.get('exitcode')}")
                why = f"its worker (pid {info.get('pid')}) on node {str(info.get('node_id'))[:8]} {how}"
                if self.actors.died(record, why):
                    log.warning("actor %s %s; restarting it", record.actor_id[:8], why)
                    self._schedule_actor(record)
                self._notify_actor(record)
                return

    def _notify_actor(self, record) -> None:
        self._save_actor(record)
        frames = encode("ActorInfo", (record.actor_id, record.info()))
        for sock, identity in list(record.subscribers):
            if not transport.send(sock, [identity, *frames]):
                record.subscribers.discard((sock, identity))


def _signal_name(number) -> str:
    try:
        name = _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    hint = " (often the out-of-memory killer, or someone's kill -9)" if number == _signal.SIGKILL else ""
    return f"{name}{hint}"
