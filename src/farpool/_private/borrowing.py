"""The borrower protocol, as the client carries it out: the reference table's outbox, the
processes it watches, and borrowed values fetched from their owners.

The counting is the reference table's (refs.py, pure).  This part does what it asks, on
the I/O thread: sends its owner messages (AddBorrower / BorrowReleased / AddCopy), frees
(FreeObjects to the agents of the nodes holding the copies) and ended actors (KillActor),
and watches borrowers: a pidfd for one on our node, else WatchPeer to the agent of its
node, whose PeerGone (like its node's death) ends its borrows.

Reaching an owner: one on our node (both of us attached to its agent over ipc) is reached
on its own ipc ROUTER, the fast path.  Any other owner is reached through the agent of
its node, which is the agent it is attached to (its home)::

    borrower --ToPeer(owner, msg)--> that agent --FromPeer(borrower, msg)--> owner
    owner --ToPeer(borrower, reply)--> its agent --FromPeer(owner, reply)--> borrower

and such a borrower gets the value's bytes, never a store location it cannot map.  No ipc
path crosses nodes, even on one machine, so a loopback cluster takes the path a real one
does.  An agent that cannot deliver answers PeerGone; a node that dies or never answers
fails what waits on it (``owner_lost``): a get never hangs.

Who may touch it: the I/O thread; other threads reach it with ``loop.call_soon`` (or
``schedule_frees``, which may be called from any thread).
"""

from __future__ import annotations

import logging

from farpool import exceptions as exc_mod
from farpool._private import context as context_mod
from farpool._private import protocol, transport
from farpool._private.client_part import ClientPart
from farpool._private.protocol import encode
from farpool._private.refs import FAILED, READY, Location

log = logging.getLogger("farpool.client")


class Borrowing(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def __init__(self, c):
        super().__init__(c)
        self.remote_fetches: dict[bytes, tuple] = {}  # object id -> owner, asked through its agent
        self.local_fetches: dict[bytes, tuple] = {}   # object id -> owner on this node, asked by ipc
        self._free_scheduled = False

    # ------------------------------------------------------------------ the table's outbox
    def schedule_frees(self) -> None:
        if not self._free_scheduled:
            self._free_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """(I/O thread) Carry out the reference table's outbox, in order."""
        self._free_scheduled = False
        refs = self.refs
        while refs.watches:
            what, arg = refs.watches.popleft()
            if what == "watch":
                self._watch_borrower(arg)
            else:
                self.conns.unwatch_pid(("borrower", arg))
        while refs.owner_messages:
            owner, frames = refs.owner_messages.popleft()
            self.send_owner(owner, frames)
        while refs.ended_actors:
            actor_id = refs.ended_actors.popleft()
            self.c.head_link.sent_kill(actor_id, "released")  # (sent again to a head that comes back)
            transport.send(self.conns.head, encode("KillActor", (actor_id, True, "released")))
        with self.lock:  # other threads add frees under the lock (release_ref)
            frees, refs.frees = refs.frees, {}
        for node_id, ids in frees.items():
            agent = self.conns.agents.get(node_id)
            if agent is None:  # a node that only holds copies: we never leased there
                agent, _ = self.conns.agent_conn(node_id, self.c.nodes)
            if agent is not None:  # (a dead node took its copies with it)
                transport.send(agent.socket, encode("FreeObjects", (ids,)))

    # ------------------------------------------------------------------ our borrowers
    def on_borrowers(self, sender: tuple | None, object_ids: list, pairs: list = ()) -> None:
        self.refs.on_borrowers(sender, object_ids, pairs)
        self.schedule_frees()

    def register_arrivals(self, refs: list) -> None:
        c = self.c
        in_task = c.in_worker and context_mod.context.task_id is not None
        self.refs.register_arrivals(refs, in_task)
        self.schedule_frees()

    def lend_returned(self, refs: list, caller: tuple | None) -> None:
        """Refs nested in a value this worker returns to ``caller``: the caller borrows them."""
        if caller is None:
            self.refs.pin_quietly([ref._id for ref in refs])
            return
        self.refs.lend_returned(refs, caller)
        self.schedule_frees()

    def borrow_released(self, borrower: bytes, oid: bytes) -> None:
        self.refs.borrow_released(borrower, oid)
        self.flush()

    def borrower_died(self, identity: bytes) -> None:
        """A borrower's process ended (or its node died): it holds nothing any more."""
        self.refs.borrower_died(identity)
        self.flush()

    def _watch_borrower(self, address: tuple) -> None:
        """Watch a new borrower: a pidfd when it runs on our node (both of us attached to our
        node over ipc: a pid means something only there), else the agent of its node tells
        us when it goes (WatchPeer -> PeerGone)."""
        address = protocol.owner_address(address)
        identity, node_id = address.identity, address.node_id
        home = self.conns.home
        if home is not None and home.local and node_id == home.node_id and address.endpoint is not None \
                and address.pid is not None:
            if not self.conns.watch_pid(("borrower", identity), address.pid, lambda: self.borrower_died(identity)):
                self.loop.call_soon(self.borrower_died, identity)  # already gone: all its borrows end now
            return
        node = next((n for n in self.c.nodes if n["node_id"] == node_id), None)
        if node is not None and not node["alive"]:  # forget_dead_nodes ran before we counted it
            self.loop.call_soon(self.borrower_died, identity)
            return
        conn = self.conns.agents.get(node_id)
        if conn is None and node is not None and node.get("tcp"):
            conn, _ = self.conns.agent_conn(node_id, self.c.nodes)
        if conn is None:
            # A node our table does not show yet (or one without TCP): not watched; its death
            # still releases the borrows (forget_dead_nodes), its Goodbye-less exit does not.
            log.info("cannot watch borrower %r: no connection to the agent of node %s",
                     identity[:24], str(node_id)[:8])
            return
        transport.send(conn.socket, encode("WatchPeer", (identity,)))

    # ------------------------------------------------------------------ values we borrow
    def _owner_is_local(self, owner: tuple) -> bool:
        home = self.conns.home
        return owner.endpoint is not None and home is not None and home.local and owner.node_id == home.node_id

    def fetch(self, object_id: bytes, owner: tuple) -> None:
        """Ask ``owner`` for the value of ``object_id`` (once: Values.entry_for)."""
        owner = protocol.owner_address(owner)
        if owner.identity == self.c.identity:
            return
        if not self._owner_is_local(owner):
            self.remote_fetches[object_id] = owner
        else:
            self.local_fetches[object_id] = owner
            if owner.pid is not None:  # watch the owner: if it dies before it answers, say so (no hang)
                self._watch_owner(owner)
        home = self.conns.home
        node = home.node_id if home is not None and home.local else None
        self.send_owner(owner, encode("GetObject", (object_id, node)))

    def _watch_owner(self, owner: tuple) -> None:
        identity = owner.identity
        key = ("owner", identity)
        if key in self.conns.pidfds:
            return
        if not self.conns.watch_pid(key, owner.pid, lambda: self._local_owner_died(identity)):
            self._local_owner_died(identity)  # already gone

    def _local_owner_died(self, identity: bytes) -> None:
        self.conns.unwatch_pid(("owner", identity))
        lost = [oid for oid, owner in self.local_fetches.items() if owner.identity == identity]
        for oid in lost:
            self.remote_fetches[oid] = self.local_fetches.pop(oid)
        self.owner_lost(lambda owner: owner.identity == identity, "its process has exited")

    def send_owner(self, owner: tuple, frames: list) -> None:
        """To an object's owner (I/O thread); messages to one owner leave in order."""
        owner = protocol.owner_address(owner)
        identity, node_id = owner.identity, owner.node_id
        if identity == self.c.identity:
            return
        if not self._owner_is_local(owner):
            conn, why = self.conns.agent_conn(node_id, self.c.nodes)
            if conn is None:  # the owner is gone with its node: nobody is left to answer or count
                self.owner_lost(lambda o: o.node_id == node_id, why)
                return
            transport.send(conn.socket, [b"ToPeer", identity, *frames])
            return
        transport.send(self.conns.owner_dealer(owner.endpoint), frames)

    def owner_lost(self, match, why: str) -> None:
        """Fail the values we asked owners that ``match`` for: they cannot answer, ``why``."""
        lost = [(oid, owner) for oid, owner in self.remote_fetches.items() if match(owner)]
        for oid, owner in lost:
            del self.remote_fetches[oid]
            self._set_borrowed(oid, FAILED, exc_mod.OwnerDiedError(
                f"cannot get object {oid.hex()}: its owner, a process on node {owner.node_id[:8]}, cannot "
                f"answer: {why}. The value was lost with its owner; create it again (re-run the task "
                "that made it, or put() it), from a process that lives as long as its readers "
                "(the driver, or an actor) if it must outlive the process that made it."))

    def peer_gone(self, identity: bytes) -> None:
        """An agent could not deliver to ``identity``, or saw it leave: it answers nothing and holds nothing."""
        self.owner_lost(lambda owner: owner.identity == identity, "its process has exited")
        if self.refs.is_watched(identity):
            self.borrower_died(identity)

    def on_owner_reply(self, sock) -> None:
        """An owner on our node answered (its ipc ROUTER, our DEALER)."""
        for frames in transport.recv_all(sock):
            message = protocol.decode_or_log(frames, "an owner", log)
            if message is None:
                continue
            tag, fields, buffers = message
            if tag == "ObjectValue":
                self.take_value(fields, buffers, remote=False)
            else:
                log.warning("dropped %s from an owner: not a message it may send us", tag)

    def take_value(self, fields, buffers, remote: bool) -> None:
        """ObjectValue: an owner's answer to our GetObject."""
        object_id, state, payload, error = fields
        fetches = self.remote_fetches if remote else self.local_fetches
        if fetches.pop(object_id, None) is None:
            return  # not asked for, or given up on already
        stored = protocol.stored_value(payload) if state == READY else None
        if isinstance(stored, protocol.PullFrom):  # stored on other nodes: our agent copies it here
            self.c.stored.copy_here(object_id, stored,
                                    lambda location: self._set_borrowed(object_id, READY, None, location=location),
                                    lambda error: self._set_borrowed(object_id, FAILED, error))
        elif isinstance(stored, Location):  # in our node's store: we map it
            self._set_borrowed(object_id, READY, None, location=stored)
        elif state == READY:
            self._set_borrowed(object_id, READY, None, payload, list(buffers))
        else:
            self._set_borrowed(object_id, FAILED, error)

    def _set_borrowed(self, object_id, state, error, payload=None, buffers=(), location=None) -> None:
        with self.lock:
            entry = self.objects.get(object_id)
            if entry is None:
                return
            entry.state = state
            entry.error = error
            entry.payload = payload
            entry.buffers = list(buffers)
            entry.location = location
        self.c.values.fire(entry)
