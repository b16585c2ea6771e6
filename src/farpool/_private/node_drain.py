"""The node agent draining: no new tasks, the running ones finish, the owners copy objects away.

Part of the node agent (node.py): ``DrainPart`` is mixed into ``NodeAgent`` and runs on
the agent's one thread; nothing else may call it.  ``drain`` is called on that thread
when the agent is asked to drain (``farpool stop`` on this node sends it DRAIN_SIGNAL:
node.ask_to_drain and node.run); the agent's ``_apply`` checks after every lease action
whether draining is done, and ObjectsSaved comes from the clients that own objects here::

    drain --> leases.drain() (requests go elsewhere) --Heartbeat(draining)--> head
          --YieldLease--> each client holding a lease here (no more tasks on it; returned as they end)
          --Retire--> every worker leased to a client (it hands back the tasks queued behind it)
    no client's lease left --ObjectsLeaving(node id, store ids)--> each owner of objects stored here
    owner --ObjectsSaved(copied, failed)--> ... all answered, or at the drain timeout --> self.drained()

It uses the agent's state set in ``NodeAgent.__init__`` (``drain_deadline``, ``drained``
(set by node.run: it stops the loop), ``saving``, ``leases``, ``store``, ``sockets``,
``ipc``, ``node_id``, ``loop``) and the agent's ``_apply`` and ``_send_heartbeat``.
"""

from __future__ import annotations

import logging
import os
import time

from farpool._private import transport
from farpool._private.node_clients import HEAD_CLIENT, IPC, TCP
from farpool._private.protocol import encode

log = logging.getLogger("farpool.node")

# Seconds a draining node (``farpool stop`` on it, SIGUSR1 to its agent) waits for the tasks
# running on it to finish before it stops anyway (those tasks are then retried elsewhere, an
# attempt spent).  Longer lets longer tasks finish; shorter frees the machine sooner.
DRAIN_TIMEOUT_S = float(os.environ.get("FARPOOL_DRAIN_TIMEOUT_S", "30"))


class DrainPart:
    """NodeAgent draining before it stops (farpool stop on this node)."""

    # --- draining (farpool stop on this node: SIGUSR1) ---
    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking leases (waiting requests go to other nodes), tell the head (it places
        nothing here more and the other agents send nothing here), ask the clients for their
        leases back (YieldLease: no more tasks to them) and every worker leased to a client to
        retire after its running task (it hands back the tasks queued behind it: their owners
        run them elsewhere, no attempt spent), and call ``self.drained`` once no client's
        lease is left, or after ``timeout_s``.  Actors stay until the node stops: the head then
        restarts them elsewhere (max_restarts).  Then the owners of the objects in our store
        copy those away (_save_objects); what is not copied, its owner rebuilds on demand
        (lineage) once the node is gone."""
        if self.drain_deadline is not None:
            return
        self.drain_deadline = time.monotonic() + timeout_s
        leases = self.leases.client_leases(HEAD_CLIENT)
        log.warning("draining: no new tasks; waiting up to %.0f s for the %d lease(s) of clients to end",
                    timeout_s, len(leases))
        self._apply(self.leases.drain(HEAD_CLIENT))
        self._send_heartbeat()  # the head hears of it now, not at the next beat
        for lease in leases:
            transport.send(self.ipc, [b"w:" + lease.worker_id.encode(), *encode("Retire", ())])
        self.loop.call_later(timeout_s, self._drain_timed_out)
        self._check_drained()

    def _check_drained(self) -> None:
        if self.drain_deadline is None or self.drained is None or self.leases.client_leases(HEAD_CLIENT):
            return
        if self.saving is None:  # no task runs here any more: now what only we hold goes elsewhere
            self._save_objects()
        if self.saving:
            return
        log.warning("drained: no task of a client runs here any more, and what the owners wanted of our "
                    "store is copied; stopping")
        done, self.drained = self.drained, None
        done()

    def _save_objects(self) -> None:
        """Ask the owner of each object stored here (not a copy: the original is elsewhere) to
        copy it away (ObjectsLeaving), and wait for their ObjectsSaved (up to the drain
        timeout): an object whose only copy is here is then not lost with us, nor rebuilt
        by running its task again.  Owners not connected to us are not asked (theirs are
        rebuilt by lineage when read)."""
        by_owner: dict[str, list] = {}
        for store_id, seg in self.store.objects.items():
            if not seg.copy and seg.owner.startswith("c:"):
                by_owner.setdefault(seg.owner, []).append(store_id)
        self.saving = {}
        for owner, store_ids in by_owner.items():
            identity = owner.encode()
            message = [identity, *encode("ObjectsLeaving", (self.node_id, store_ids))]
            if any(kind in self.sockets and transport.send(self.sockets[kind], message) for kind in (IPC, TCP)):
                self.saving[identity] = len(store_ids)
        if self.saving:
            log.warning("draining: asked %d owner(s) to copy the %d object(s) they have here to other nodes",
                        len(self.saving), sum(self.saving.values()))

    def _on_ObjectsSaved(self, client, node_id: str, copied: int, failed: int) -> None:
        if self.saving is None or self.saving.pop(client.identity, None) is None:
            return
        log.warning("draining: %r copied %d object(s) to other nodes%s", client.identity[:24], copied,
                    f" ({failed} could not be: rebuilt by lineage when read)" if failed else "")
        self._check_drained()

    def _drain_timed_out(self) -> None:
        if self.drained is None:
            return
        held = []
        for lease in self.leases.client_leases(HEAD_CLIENT):
            worker = self.leases.workers.get(lease.worker_id)
            held.append(f"lease {lease.lease_id} of {lease.client.identity[:24]!r} on worker "
                        f"{worker.pid if worker is not None and worker.pid else lease.worker_id}"
                        + (" (blocked in get)" if worker is not None and worker.blocked else ""))
        unsaved = [repr(identity[:24]) for identity in self.saving or ()]
        log.warning("draining: stopping at the drain timeout with %d lease(s) still held%s and %d owner(s) "
                    "not done copying objects away%s (their tasks are retried elsewhere, their objects "
                    "rebuilt when read)", len(held), f" ({'; '.join(held)})" if held else "",
                    len(unsaved), f" ({', '.join(unsaved)})" if unsaved else "")
        done, self.drained = self.drained, None
        done()
