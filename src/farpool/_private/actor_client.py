"""Actor calls, as the client carries them out.

The decisions are ActorCalls' (actor_calls.py, pure: per-actor order, restarts, retries,
kill).  This part applies them: subscribes to an actor's state at the head (WaitActor),
opens the channel to its worker when it is ALIVE (a stream on this machine, else a relay
through its node's agent), sends the calls ActorCalls lets go, and fails the ones it
gives up on.  It also keeps what an actor's life pins: its handles' token object (freed:
the actor ends) and the refs in its constructor's arguments (kept until it is dead for
good: a restart runs ``__init__`` again with them).

Who may touch it: ``submit_call``, ``token``, ``pin_arguments`` and ``kill`` from any
thread; the rest on the I/O thread.
"""

from __future__ import annotations

import os
import pickle

from farpool._private import transport
from farpool._private.actor_calls import ActorCalls
from farpool._private.client_part import ClientPart
from farpool._private.connections import RelayChannel
from farpool._private.object_ref import ObjectRef
from farpool._private.protocol import encode
from farpool._private.refs import READY, Entry
from farpool._private.task_queues import LeaseState, RemoteFunctionInfo


class ActorClient(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def __init__(self, c):
        super().__init__(c)
        self.calls: ActorCalls = c.actor_calls
        self.method_infos: dict = {}
        self.arg_pins: dict[str, list] = {}  # actor id -> ids in its constructor's arguments

    def dispatch(self, actor_id: str) -> None:
        """(I/O thread) Send what the actor's queue lets go now."""
        aq = self.calls.actor(actor_id)
        completion = self.c.completion
        if aq.state == "DEAD":
            completion.fail_all(ActorCalls.fail_all(aq))
            return
        if not aq.subscribed:
            aq.subscribed = True
            transport.send(self.conns.head, encode("WaitActor", (aq.actor_id,)))
        if not aq.queue:  # (after a call's result, mostly)
            return
        batch, failed = self.calls.next_batch(aq, self.c.submitter.failed_argument)
        if failed:
            error_of = self.c.values.error_of
            completion.fail_all([(task, error_of(entry)) for task, entry in failed])
        if batch:
            self.c.submitter.send_tasks(aq.lease, batch)

    def on_actor_info(self, actor_id: str, info: dict) -> None:
        """(I/O thread) The head's news of an actor we call or pinned arguments for."""
        if info["state"] == "DEAD" and actor_id in self.arg_pins:
            with self.lock:
                self.c.refs.unpin(self.arg_pins.pop(actor_id))
            self.c.borrowing.flush()
        update = self.calls.update(actor_id, info["state"], info["incarnation"], info.get("cause") or "")
        if update is None:
            return
        self.c.completion.fail_all(update.failed)
        aq = self.calls.actor(actor_id)
        if update.connect:
            channel = self._channel(info)
            if channel is None:
                return
            ActorCalls.set_lease(aq, LeaseState(aq.incarnation, info["worker_id"], info["node_id"], channel, [],
                                                ("actor", actor_id), actor_id=actor_id))
        self.dispatch(actor_id)

    def _channel(self, info: dict):
        path = info.get("path")
        conns = self.conns
        agent = conns.agents.get(info["node_id"])
        if path and os.path.exists(path) and (agent is None or agent.local):
            try:
                return conns.worker_channel(path, doorbell=False)
            except OSError:
                return None  # it died meanwhile: the head will say so
        if agent is None:
            agent, _ = conns.agent_conn(info["node_id"], self.c.nodes)
            if agent is None:
                return None  # its node is gone or unknown yet: the head will say
        return RelayChannel(agent, info["worker_id"])

    # ------------------------------------------------------------------ any thread
    def submit_call(self, actor_id: str, method: str, qualname: str, args, kwargs, num_returns: int,
                    max_task_retries: int, token=None, stream=None) -> list:
        info = self.method_infos.get((actor_id, method))
        if info is None:
            info = self.method_infos[(actor_id, method)] = RemoteFunctionInfo(
                qualname, b"actor:" + method.encode(), b"")
        return self.c.submitter.submit(info, args, kwargs, num_returns, {}, max_task_retries, False, qualname,
                                       actor_id=actor_id, token=token, stream=stream)

    def token(self, actor_id: str) -> ObjectRef:
        """A small object whose lifetime is the actor's: freed -> the actor ends."""
        oid = self.c.new_object_id()
        with self.lock:
            self.objects[oid] = Entry(state=READY, payload=pickle.dumps(actor_id), actor_id=actor_id)
        return ObjectRef(oid, self.c.owner_address)

    def pin_arguments(self, actor_id: str, refs: list) -> None:
        """Refs inside an actor's constructor arguments: kept until the actor is dead for good
        (a restart runs __init__ again with them; the actor may keep them all its life)."""
        with self.lock:
            pinned = self.arg_pins.setdefault(actor_id, [])
            for ref in refs:
                entry = self.objects.get(ref._id)
                if entry is not None:
                    entry.task_pins += 1
                    pinned.append(ref._id)
        self.c.send_head("WaitActor", (actor_id,))

    def kill(self, actor_id: str, no_restart: bool) -> None:
        """Ask the head to end the actor; with no_restart, later calls from here fail at once."""
        def kill():
            if no_restart:
                self.c.completion.fail_all(self.calls.kill(actor_id)[1])
                self.c.head_link.sent_kill(actor_id, "kill")  # (sent again to a head that comes back)
            transport.send(self.conns.head, encode("KillActor", (actor_id, no_restart)))
        self.loop.call_soon(kill)
