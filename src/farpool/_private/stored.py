"""Values in node stores, as the client reads and writes them.

Owns: writing a large value into our node's store (``store_value``), mapping a stored
value zero-copy (``map_location``: restored first if it was spilled, copied into our
node's store first if it lives on another node), how a process on some node reads a
value (``read_on``: in place, or a copy its agent makes: pull.py), recording the copies
that reading makes so they are freed with the original (``stored_for``), and having our
agent copy a value here without blocking the I/O thread (``copy_here``).

The read-restore-retry loop and the error it raises live here once: a store answers a
path, the segment may be spilled between that answer and the mapping, so the read is
asked again (``segments.READ_ATTEMPTS``); "full" means the value is safe on disk and
memory must be freed (ObjectStoreFullError), anything else that it is gone
(ObjectLostError).

Who may touch it: user threads (store_value, map_location, fetch_here: they wait on agent
requests) and the I/O thread (read_on, stored_for, copy_here: they never wait).
"""

from __future__ import annotations

import logging
import time

from farpool import exceptions as exc_mod
from farpool._private import protocol, pull, segments, transport
from farpool._private.protocol import encode
from farpool._private.client_part import ClientPart
from farpool._private.refs import READY, Entry, Location

log = logging.getLogger("farpool.client")


class StoreReads(ClientPart):
    """See the module docstring.  ``c``: the CoreClient shell."""

    def store_value(self, store_id: bytes, payload: bytes, buffers: list, what: str) -> Location | None:
        """Write a large pickled value into this node's store; None when it stays inline."""
        home = self.conns.home
        if home is None:
            return None
        size = segments.value_size(payload, buffers)
        if size < segments.INLINE_MAX:
            return None
        if not home.local:
            return self._upload(home, store_id, payload, buffers, size, what)
        path, error = self.conns.agent_request(home, "AllocateObject", (store_id, size, self.c.identity.decode(), what))
        if path is None:
            raise exc_mod.ObjectStoreFullError(error)
        segments.write_segment(path, payload, buffers, store_id)
        return Location("seg", home.node_id, store_id, path, size)

    def _upload(self, home, store_id: bytes, payload: bytes, buffers: list, size: int, what: str) -> Location:
        """A client on another machine than its node (a driver joined by address) puts a large
        value into that node's store: chunks sent straight from the value's buffers, a few
        in flight.  Readers on other nodes then copy it as they copy any stored value
        (pull.py), instead of getting it through us and two relays."""
        path, error = self.conns.agent_request(home, "UploadObject", (store_id, size, self.c.identity.decode(), what))
        if path is None:
            raise exc_mod.ObjectStoreFullError(f"cannot put {what} ({size} bytes) into the store of node "
                                               f"{home.node_id[:8]}: {error}")
        pieces = segments.pieces(payload, buffers, store_id, pull.CHUNK)
        requests = [("WriteChunk", (store_id, offset, i == len(pieces) - 1), [piece])
                    for i, (offset, piece) in enumerate(pieces)]
        answers = self.conns.request_window(home.socket, f"the agent of node {home.node_id[:8]}", requests,
                                            pull.WINDOW, pull.SILENT_S)
        errors = [a[0] for a in answers if a[0] is not None]
        if errors:
            raise exc_mod.ObjectLostError(f"sending {what} ({size} bytes) to the store of node "
                                          f"{home.node_id[:8]} failed: {errors[0]}")
        return Location("seg", home.node_id, store_id, path, size)

    def _download(self, home, store_id: bytes, size: int, private: bool):
        """The bytes of a value our node holds, when we are on another machine (our own large
        put, read back): in chunks, a few in flight, into memory of our own."""
        requests = _read_back_requests(store_id, size)
        answers = self.conns.request_window(home.socket, f"the agent of node {home.node_id[:8]}", requests,
                                            pull.WINDOW, pull.SILENT_S)
        return _assembled(home, store_id, size, requests, answers, private)

    def download_async(self, store_id: bytes, size: int, done, failed) -> None:
        """(I/O thread) ``_download`` without waiting: ``done(payload, buffers)`` or ``failed(error)``."""
        home = self.conns.home
        requests = _read_back_requests(store_id, size)

        def answered(answers):
            try:
                payload, buffers = _assembled(home, store_id, size, requests, answers, False)
            except exc_mod.ObjectLostError as error:
                failed(error)
                return
            done(payload, buffers)
        self.conns.requests_async(home.socket, requests, pull.WINDOW, answered)

    def map_location(self, location: tuple, private: bool = False, oid: bytes | None = None, entry=None):
        """Zero-copy (payload, buffers) of a stored value (restored if spilled).  A value in
        another node's store (the result of a task that ran there) is copied into ours
        first, by our agent (pull.py), once: the copy is freed with the original."""
        _, node_id, store_id, path, size = location
        home = self.conns.home
        if entry is not None and home is not None and home.local and node_id != home.node_id:
            spec = self.stored_for(home.node_id, oid, entry, f"object {oid.hex()[:16]}")
            return self._read(home, "PullObject", _pull_fields(spec), size, private, store_id,
                              lambda error, full: self.copy_failed(oid, error, full), timeout=3600)
        if home is not None and not home.local and node_id == home.node_id:  # our node is on another machine
            return self._download(home, store_id, size, private)
        try:
            return segments.read_segment(path, size, private, store_id)
        except FileNotFoundError:
            agent = self.conns.agents.get(node_id)
            if agent is None:
                raise exc_mod.ObjectLostError(f"object {store_id.hex()} lives on node {node_id[:8]}, "
                                              "which this process cannot reach") from None

            return self._read(agent, "RestoreObject", (store_id,), size, private, store_id,
                              lambda error, full: self.restore_failed(store_id, node_id, error, full))

    def _read(self, agent, tag: str, fields: tuple, size: int, private: bool, store_id: bytes, failed,
              timeout: float = 60.0):
        """Ask ``agent`` for a path to the value (``tag``: a copy or a restore) and map it;
        again if it was spilled between the answer and the mapping.  ``failed(error, full)``:
        the exception when the agent has no path to give."""
        for attempt in range(segments.READ_ATTEMPTS):
            path, error, full = self.conns.agent_request(agent, tag, fields, timeout=timeout)
            if path is None:
                raise failed(error, full) from None
            try:
                return segments.read_segment(path, size, private, store_id)
            except FileNotFoundError:
                if attempt == segments.READ_ATTEMPTS - 1:
                    raise

    @staticmethod
    def restore_failed(store_id: bytes, node_id: str, error: str, full: bool) -> BaseException:
        """The error for a spilled value its node's agent could not bring back: ``full``, it is
        safe on disk and memory must be freed first (ObjectStoreFullError); else it is gone."""
        if full:
            return exc_mod.ObjectStoreFullError(f"cannot bring object {store_id.hex()} back from disk on node "
                                                f"{node_id[:8]}: {error}; free some memory and ask again")
        return exc_mod.ObjectLostError(f"object {store_id.hex()} was spilled and is gone from node {node_id[:8]}: {error}")

    def copy_failed(self, object_id: bytes, error: str, full: bool) -> BaseException:
        kind = exc_mod.ObjectStoreFullError if full else exc_mod.ObjectLostError
        return kind(f"cannot get object {object_id.hex()}: copying it to node {self.conns.home.node_id[:8]} "
                    f"failed: {error}")

    def read_on(self, node_id: str, location: Location, what: str, more_sources=(), owner=None):
        """How a process on node ``node_id`` reads a stored value: a StoredAt when it is in that
        node's store, else a PullFrom: that node's agent copies it from the nodes that hold
        it (pull.py), and frees the copy when ``owner`` ((identity, node id); default: us)
        is gone."""
        where = location.node_id
        if where == node_id:
            return protocol.StoredAt("loc", location.path, location.size, location.store_id)
        sources = [where, *(n for n in more_sources if n not in (where, node_id))]
        owner = owner or (self.c.identity.decode(), self.conns.home.node_id)
        return protocol.PullFrom("pull", location.store_id, location.size, sources, owner, what)

    def stored_for(self, node_id: str, oid: bytes, entry: Entry, what: str) -> tuple:
        """``read_on`` for an object of our table, recording the copy it makes: we free the
        copies of what we own; the owner of what we borrow is told (AddCopy) before our
        borrow can end, so it frees that copy too."""
        with self.lock:
            copies = list(entry.copies or ())
        owner = None if entry.owned or entry.owner is None else (entry.owner.identity.decode(), entry.owner.node_id)
        spec = self.read_on(node_id, entry.location, what, copies, owner)
        if not isinstance(spec, protocol.PullFrom):
            return spec
        if entry.owned:
            with self.lock:
                entry.copies = (entry.copies or set()) | {node_id}
        elif entry.owner is not None:
            self.c.refs.report_copy(entry.owner, oid, entry.location.store_id, node_id)
            self.c.borrowing.schedule_frees()
        return spec

    def copy_here(self, object_id: bytes, spec, copied, failed) -> None:
        """(I/O thread) Our agent copies a value stored on other nodes into our node's store
        (``spec``: a PullFrom): then ``copied(location)``, or ``failed(error)``."""
        spec = protocol.PullFrom._make(spec)
        store_id, size = spec.store_id, spec.size
        home = self.conns.home

        def answer(reply):
            path, error, full = reply
            if path is None:
                failed(self.copy_failed(object_id, error, full))
            else:
                copied(Location("seg", home.node_id, store_id, path, size))
        self.conns.request_async(home.socket, "PullObject", _pull_fields(spec), answer)

    def save_from(self, leaving, node_id: str, store_ids: list) -> None:
        """(I/O thread) Node ``node_id`` drains (``farpool stop --node``) and asks, before it
        leaves, that the values we own in its store (``store_ids``) be copied elsewhere: each
        whose only copy is there is copied into our node's store by our agent (pull.py), a
        copy of the kind reading makes (freed with the original), so it is neither lost nor
        rebuilt when the node goes.  Then ObjectsSaved(node id, copied, not copied) goes to
        ``leaving`` (its agent stops once every owner answered, or at its drain timeout).
        Only a client whose node is on its own machine has copies made (it maps its node's
        store): one on another machine leaves what it owns there to lineage."""
        home = self.conns.home
        alive = {n["node_id"] for n in self.c.nodes if n["alive"] and not n.get("draining")}
        wanted = set(store_ids)
        with self.lock:
            todo = [(oid, entry) for oid, entry in self.objects.items()
                    if entry.owned and entry.state == READY and entry.location is not None
                    and entry.location.node_id == node_id and entry.location.store_id in wanted
                    and not (entry.copies or set()) & (alive - {node_id})]
        left = {"copied": 0, "failed": 0, "waiting": len(todo)}

        def answered():
            if left["waiting"] == 0:
                transport.send(leaving.socket, encode("ObjectsSaved", (node_id, left["copied"], left["failed"])))

        if todo and (home is None or not home.local or home.node_id == node_id or home.node_id not in alive):
            why = ("this process's own node is the one leaving" if home is not None and home.node_id == node_id
                   else "this process has no live node of its own on this machine to copy them to")
            log.warning("node %s leaves with %d object(s) of ours stored only there; they are not copied (%s) "
                        "and will be rebuilt by lineage when read", node_id[:8], len(todo), why)
            left.update(failed=len(todo), waiting=0)
            todo = []
        for oid, entry in todo:
            def copied(reply, oid=oid, entry=entry):
                path, error, _full = reply
                if path is None:
                    left["failed"] += 1
                    log.warning("object %s could not be copied off node %s, which drains: %s; it will be "
                                "rebuilt by lineage when read", oid.hex()[:16], node_id[:8], error)
                else:
                    left["copied"] += 1
                    with self.lock:
                        entry.copies = (entry.copies or set()) | {home.node_id}
                left["waiting"] -= 1
                answered()
            spec = self.read_on(home.node_id, entry.location, f"object {oid.hex()[:16]} (node {node_id[:8]} drains)")
            self.conns.request_async(home.socket, "PullObject", _pull_fields(spec), copied)
        answered()

    def fetch_here(self, refs: list, flags: list, num_returns: int, timeout: float | None) -> list[bool]:
        """wait(fetch_local=True): of the first ``num_returns`` ready ``refs`` (``flags``), those
        whose value lives in another node's store are copied into our node's store (pull.py)
        before they count as ready; True for each ready here now (a failed copy counts: get
        raises its error).  Nothing to do without a store of our own, or for values here."""
        home = self.conns.home
        if home is None or not home.local:
            return flags
        deadline = None if timeout is None else time.monotonic() + timeout
        out = list(flags)
        counted = 0
        for i, (ref, ready) in enumerate(zip(refs, flags)):
            if not ready or counted >= num_returns:
                continue
            counted += 1
            entry = self.objects.get(ref._id)
            if entry is None or entry.state != READY or entry.location is None \
                    or entry.location.node_id == home.node_id:
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                out[i] = False
                continue
            spec = self.stored_for(home.node_id, ref._id, entry, f"object {ref.hex()[:16]}")
            try:
                self.conns.agent_request(home, "PullObject", _pull_fields(spec), timeout=3600 if left is None else left)
            except exc_mod.FarpoolError:  # no answer in time: not here yet
                out[i] = False
        return out


def _read_back_requests(store_id: bytes, size: int) -> list:
    return [("ReadChunk", (store_id, offset, min(pull.CHUNK, size - offset)), [])
            for offset in range(0, size, pull.CHUNK)]


def _assembled(home, store_id: bytes, size: int, requests: list, answers: list, private: bool):
    """(payload, buffers) of the chunks read back (``_read_back_requests``, answered)."""
    data = bytearray(size)
    for (_, (_, offset, length), _), (_, error, chunk) in zip(requests, answers):
        if error is not None or len(chunk) != 1 or len(chunk[0]) != length:
            raise exc_mod.ObjectLostError(f"object {store_id.hex()} cannot be read back from the store of node "
                                          f"{home.node_id[:8]}: {error or 'a chunk came back short'}")
        data[offset:offset + length] = chunk[0]
    return segments.parse(memoryview(data), private)


def _pull_fields(spec) -> tuple:
    """PullObject's fields (after its request id) for a PullFrom."""
    return (spec.store_id, spec.size, spec.sources, spec.owner, spec.what)

