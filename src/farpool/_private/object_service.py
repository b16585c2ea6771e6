"""The owner's object service: what this process answers borrowers about the objects it owns.

A borrower asks for a value (GetObject), says it had a copy made (AddCopy), that it
borrows on (AddBorrower) or that its borrow ended (BorrowReleased).  Borrowers on our node
reach us on our ipc ROUTER (``on_socket``); any other through our agent (FromPeer, routed
by the shell to ``on_request`` with ``remote``).

How a value is served depends on where the borrower is and where the value lives:
pending -> answered when it is done; inline -> its bytes; in a node store, for a borrower
with a store of its own on another node -> a "pull" its agent carries out; in our node's
store, for a borrower on our node -> the location, which it maps; for a borrower with no
store (a driver joined over TCP) -> the bytes, as views of the mapping (restored first if
spilled, copied to our node first if stored on another, neither blocking the I/O thread),
or, when we are such a driver ourselves, read back from our node's store first.

Who may touch it: the I/O thread only.
"""

from __future__ import annotations

import logging

from farpool import exceptions as exc_mod
from farpool._private import protocol, segments, transport
from farpool._private.client_part import ClientPart
from farpool._private.protocol import encode
from farpool._private.refs import FAILED, PENDING, READY, Entry

log = logging.getLogger("farpool.client")


class ObjectService(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def on_socket(self) -> None:
        sock = self.conns.owner_socket
        for frames in transport.recv_all(sock):
            identity = frames[0]
            message = protocol.decode_or_log(frames[1:], "a borrower", log)
            if message is not None:
                self.on_request(identity, message[0], message[1], remote=False)

    def on_request(self, identity: bytes, tag: str, fields: tuple, remote: bool) -> None:
        """A borrower on our node (``remote`` False: our ipc ROUTER) or elsewhere (through our agent)."""
        try:
            if tag == "GetObject":
                object_id, node = fields  # node: the borrower's, None when it has no store
                self.serve(identity, object_id, remote, node)
            elif tag == "AddCopy":
                self._add_copy(*fields)
            elif tag == "BorrowReleased":
                self.c.borrowing.borrow_released(identity, fields[0])
            elif tag == "AddBorrower":
                oid, borrower, *kept = fields  # kept: a ref kept from a task's arguments (add_borrower)
                report = None
                if kept and kept[0]:
                    report = "direct" if borrower[0] == identity else "chain"
                self.refs.borrower_reported(oid, borrower, report)
                self.c.borrowing.schedule_frees()
            else:
                log.warning("an owner does not handle %s (from %r)", tag, identity[:24])
        except (TypeError, ValueError, IndexError) as exc:
            log.warning("dropped a bad %s from %r: %s", tag, identity[:24], exc)

    def serve(self, identity, object_id, remote: bool = False, node: str | None = None) -> None:
        """Answer GetObject from a borrower on ``node`` (None: it has no node store to read from)."""
        entry = self.objects.get(object_id)
        home = self.conns.home
        if entry is None:
            error = exc_mod.ObjectLostError(f"object {object_id.hex()} was freed by its owner")
            self._reply(identity, object_id, FAILED, None, [], error, remote)
        elif entry.state == PENDING:
            with self.lock:
                entry.add_waiter(lambda e, i=identity, o=object_id: self.serve(i, o, remote, node))
        elif entry.state == READY and entry.location is not None and node is not None \
                and node != entry.location.node_id:  # its agent copies it (pull.py)
            spec = self.c.stored.stored_for(node, object_id, entry, f"object {object_id.hex()[:16]}")
            self._reply(identity, object_id, READY, tuple(spec), [], None, remote)
        elif entry.state == READY and entry.location is not None and remote and node is None:
            if home.local and entry.location.node_id != home.node_id:
                self._serve_copied(identity, object_id, entry)
            elif not home.local:  # our own put, in our node's store on another machine
                self.c.stored.download_async(
                    entry.location.store_id, entry.location.size,
                    lambda payload, buffers: self._reply(identity, object_id, READY, bytes(payload), buffers,
                                                         None, remote=True),
                    lambda error: self._reply(identity, object_id, FAILED, None, [], error, remote=True))
            else:
                self._serve_stored(identity, object_id, entry.location)
        elif entry.state == READY and entry.location is not None:  # in its node's store: it maps it
            self._reply(identity, object_id, READY, tuple(entry.location), [], None, remote)
        elif entry.state == READY:
            self._reply(identity, object_id, READY, entry.payload, entry.buffers, None, remote)
        else:
            self._reply(identity, object_id, FAILED, None, [], self.c.values.error_of(entry), remote)

    def _add_copy(self, object_id: bytes, store_id: bytes, node_id: str) -> None:
        """A borrower had our object copied to ``node_id``: free that copy with the rest,
        or now if the object is gone already."""
        with self.lock:
            entry = self.objects.get(object_id)
            if entry is not None and entry.owned and entry.location is not None:
                entry.copies = (entry.copies or set()) | {node_id}
                return
            self.refs.free_copy(node_id, store_id)
        self.c.borrowing.schedule_frees()

    def _serve_copied(self, identity, object_id, entry: Entry) -> None:
        """The bytes of our value stored on another node, for a borrower with no store to copy
        it into (a driver joined over TCP): copied into our node's store first (pull.py)."""
        reads = self.c.stored
        spec = reads.stored_for(self.conns.home.node_id, object_id, entry, f"object {object_id.hex()[:16]}")
        reads.copy_here(object_id, spec,
                         lambda location: self._serve_stored(identity, object_id, location, location.path),
                         lambda error: self._reply(identity, object_id, FAILED, None, [], error, remote=True))

    def _serve_stored(self, identity, object_id, location: tuple, path: str | None = None) -> None:
        """Send a borrower on another node the bytes of a value in a node store.

        The buffers go as views of the mapping (no copy); they keep it mapped, and the
        segment pinned, until zmq has sent them.  A spilled value is restored first,
        without blocking this thread: the agent's answer continues here (``path``).
        """
        _, node_id, store_id, stored_path, size = location
        try:
            payload, buffers = segments.read_segment(path or stored_path, size, store_id=store_id)
        except FileNotFoundError:
            agent = self.conns.agents.get(node_id)
            if path is None and agent is not None:
                self.conns.request_async(agent.socket, "RestoreObject", (store_id,),
                                         lambda answer: self._serve_restored(identity, object_id, location, *answer))
                return
            error = exc_mod.ObjectLostError(f"object {object_id.hex()} is gone from the store of node "
                                            f"{node_id[:8]}")
            self._reply(identity, object_id, FAILED, None, [], error, remote=True)
            return
        self._reply(identity, object_id, READY, bytes(payload), buffers, None, remote=True)

    def _serve_restored(self, identity, object_id, location, path, error, full) -> None:
        if path is None:
            error = self.c.stored.restore_failed(location.store_id, location.node_id, error, full)
            self._reply(identity, object_id, FAILED, None, [], error, remote=True)
        else:
            self._serve_stored(identity, object_id, location, path)

    def _reply(self, identity, object_id, state, payload, buffers, error, remote: bool = False) -> None:
        if error is not None:
            try:
                protocol.pickle.dumps(error)
            except Exception:
                error = exc_mod.FarpoolError(str(error))
        frames = encode("ObjectValue", (object_id, state, payload, error), buffers)
        if remote:
            transport.send(self.conns.home.socket, [b"ToPeer", identity, *frames])
        else:
            transport.send(self.conns.owner_socket, [identity, *frames])
