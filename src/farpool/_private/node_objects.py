"""The node agent's objects: its store (segments, spilling, freeing) and copies from other nodes.

Part of the node agent (node.py): ``ObjectsPart`` is mixed into ``NodeAgent`` and runs
on the agent's one thread; nothing else may call it (the spill threads report back
through the loop: ``_on_move_done``).  The decisions are in store.ObjectStore and
pull.Pull (pure); this is the I/O around them::

    writer --AllocateObject--> ObjectAllocated(path)     reader --RestoreObject/PullObject--> ObjectCopied(path)
    owner --FreeObjects--> segment freed                  owner gone (PeerGone, Goodbye) --> its objects freed
    this agent --ReadChunk--> other node's agent --Chunk--> pwrite into the copy's segment
    client on another machine --UploadObject--> ObjectAllocated, --WriteChunk + bytes--> ChunkWritten
        (pwrite into the segment; the last chunk closes it; ReadChunk reads it back)

It uses the agent's state set in ``NodeAgent.__init__`` (``store``, ``mover``,
``allocating``, ``store_writers``, ``trim_timer``, ``pulls``, ``pulls_by_store``,
``pull_ids``, ``pull_timer``, ``peer_agents``, ``copy_counts``, ``copy_log``, ``watched_owners``) and
the agent's ``_send`` and ``cluster_nodes``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

from farpool._private import copy_events, protocol, pull, scheduling, segments, spill, store, transport
from farpool._private.protocol import encode

log = logging.getLogger("farpool.node")


class Upload(NamedTuple):
    """A value a client on another machine is writing into our store (UploadObject)."""
    client: tuple   # who writes it: only that client's chunks are taken
    fd: int         # open_to_fill: holds the segment's lock until the last chunk
    size: int       # the segment's bytes

class ObjectsPart:
    """NodeAgent's object store and copies from other nodes."""

    # --- object store ---
    def _apply_store(self, acts: store.StoreActions) -> None:
        """Start the store's byte moves on the I/O threads, answer whom it answers."""
        for move in acts.moves:
            self.mover.submit(move)
        for path in acts.removals:
            self.mover.remove(path)
        for waiter, seg, error, full in acts.answers:
            waiter(seg, error, full)
        self._tell_writers()

    def _on_move_done(self, move, error) -> None:
        self._apply_store(self.store.move_done(move, error))

    def _on_AllocateObject(self, client, request_id, store_id: bytes, size: int, owner: str, what: str) -> None:
        """A segment for a new object (put, task result, large argument): at once, or once
        spills made room (the writer waits; this loop does not)."""
        self.store_writers.add(client)

        def answer(seg, error, full):
            self._send(client, "ObjectAllocated", request_id, seg and seg.path, error)
        self._apply_store(self.store.allocate(answer, store_id, size, owner, what))

    # --- values put by a client on another machine (a driver joined by address) ---
    def _on_UploadObject(self, client, request_id, store_id: bytes, size: int, owner: str, what: str) -> None:
        """A client with no store on this machine puts a large value here: a segment now (or
        once spills made room), then its bytes in chunks (WriteChunk).  It cannot map the
        segment, so it is not told when segments drop (store_writers)."""
        def answer(seg, error, full):
            if seg is not None:
                self.uploads[store_id] = Upload(client, segments.open_to_fill(seg.path), seg.used)
            self._send(client, "ObjectAllocated", request_id, seg and seg.path, error)
        self._apply_store(self.store.allocate(answer, store_id, size, owner, what))

    def _on_WriteChunk(self, client, request_id, store_id: bytes, offset: int, last: bool, buffers) -> None:
        """Bytes of an upload at ``offset``; the ``last`` chunk seals it (readable from then on).
        ChunkWritten(error) answers each, so the writer keeps a few in flight, no more."""
        upload = self.uploads.get(store_id)
        data = buffers[0] if len(buffers) == 1 else b""
        if upload is None or upload.client != client:
            error = "no upload of it is open here: it was freed, or never allocated"
        elif not (0 <= offset and offset + len(data) <= upload.size):
            error = f"bad range: {len(data)} bytes at {offset} of {upload.size}"
        else:
            error = None
            os.pwrite(upload.fd, data, offset)
            self.copy_counts["uploaded_bytes"] += len(data)
        if upload is not None and (last or error is not None):
            self._end_upload(store_id)
            if error is not None:
                self._apply_store(self.store.free_object(store_id))
        self._send(client, "ChunkWritten", request_id, error)

    def _end_upload(self, store_id: bytes) -> None:
        upload = self.uploads.pop(store_id, None)
        if upload is not None:
            os.close(upload.fd)  # drops the fill lock

    def _on_FreeObjects(self, client, store_ids: list) -> None:
        self._free_objects(store_ids)

    def _owner_gone(self, owner: str) -> None:
        """A client that owned objects here left for good (Goodbye, death, its worker's exit,
        or its agent told us): nobody frees them any more, so we do."""
        self.watched_owners.discard(owner)
        owned = self.store.owned_by(owner)
        if owned:
            log.info("freeing %d object(s) of %s, which is gone", len(owned), owner[:24])
            self._free_objects(owned, f"its owner ({owner[:24]}) is gone: the object was lost with it")

    def _free_objects(self, store_ids, why: str = "it was freed by its owner while it was being copied") -> None:
        for store_id in store_ids:
            copying = self.pulls_by_store.get(store_id)
            if copying is not None:  # nobody will read it
                self._end_pull(copying, why)
            self._end_upload(store_id)
            for reader, reader_request in self.allocating.pop(store_id, ()):  # (its segment awaited room)
                self._send(reader, "ObjectCopied", reader_request, None, why, False)
            self._apply_store(self.store.free_object(store_id))
        if self.trim_timer is None and self.store.free:
            self.trim_timer = self.loop.call_later(store.FREE_IDLE_S, self._trim_store)

    def _trim_store(self) -> None:
        """Free segments not reused for a while go back to the system (see store.FREE_IDLE_S)."""
        self.trim_timer = None
        due = self.store.trim_idle()
        self._tell_writers()
        if due is not None:  # a segment still mapped by a reader, or freed more recently
            self.trim_timer = self.loop.call_later(max(0.05, due - time.monotonic()), self._trim_store)

    def _tell_writers(self) -> None:
        """Segments we unlinked (dropped or spilled): writers keep mappings of segments
        they wrote (segments._WriterMaps), which would hold the memory until they let go."""
        if not self.store.dropped:
            return
        dropped, self.store.dropped = self.store.dropped, []
        for writer in list(self.store_writers):
            if not self._send(writer, "SegmentsDropped", dropped):
                self.store_writers.discard(writer)  # gone

    def _on_RestoreObject(self, client, request_id, store_id: bytes) -> None:
        """The path of an object of our store, brought back first if it was spilled:
        ObjectCopied(path, error, no room for it), when the object is whole there."""
        def answer(seg, error, full):
            self._send(client, "ObjectCopied", request_id, seg and seg.path, error, full)
        self._apply_store(self.store.restore(answer, store_id))

    # --- copies from other nodes (pull.py) ---
    def _on_PullObject(self, client, request_id, store_id: bytes, size: int, sources: list, owner: tuple,
                       what: str) -> None:
        """A reader on this node wants an object stored on other nodes: answer the path of a
        local copy (ObjectCopied), pulling it first unless we have it or are pulling it.
        ``owner`` (identity, node id) frees the copy, or we do when it is gone."""
        owner_identity, owner_node = owner
        copying = self.pulls_by_store.get(store_id)
        if copying is not None:
            copying.waiters.append((client, request_id))
            return
        if store_id in self.allocating:  # its segment waits for room: so does this reader
            self.allocating[store_id].append((client, request_id))
            return
        if store_id in self.store.objects:  # the original, or a copy pulled before
            self._on_RestoreObject(client, request_id, store_id)
            return
        sources = [s for s in sources if s != self.node_id]
        if not sources:  # (a reader of ours restoring an object we no longer have)
            self._send(client, "ObjectCopied", request_id, None, "it is gone from this node's store", False)
            return
        self.allocating[store_id] = [(client, request_id)]

        def allocated(seg, error, full):
            readers = self.allocating.pop(store_id, [])
            if seg is None:
                for reader, reader_request in readers:
                    self._send(reader, "ObjectCopied", reader_request, None, error, full)
            elif readers:
                self._start_pull(seg, store_id, size, sources, owner, readers, what)
            else:  # every reader gave up meanwhile (its owner freed it)
                self._apply_store(self.store.free_object(store_id))
        self._apply_store(self.store.allocate(allocated, store_id, size, owner_identity, what, copy=True))

    def _start_pull(self, seg, store_id: bytes, size: int, sources: list, owner: tuple, readers: list,
                    what: str) -> None:
        owner_identity, owner_node = owner
        seg.owner_node = owner_node
        if owner_node != self.node_id and owner_identity not in self.watched_owners:
            # Its agent tells us when it goes (PeerGone): the copies of what it owned go too.
            sock, _ = self._peer_agent(owner_node)
            if sock is not None:
                transport.send(sock, encode("WatchPeer", (owner_identity.encode(),)))
                self.watched_owners.add(owner_identity)
        job = pull.Pull(next(self.pull_ids), store_id, size, sources)
        job.fd = segments.open_to_fill(seg.path)
        job.path = seg.path
        job.waiters.extend(readers)
        job.what = what
        job.started_at = time.time()  # (wall clock: the timeline lines copies up with tasks)
        self.pulls[job.pull_id] = job
        self.pulls_by_store[store_id] = job
        self.copy_counts["pulls"] += 1
        if self.pull_timer is None:
            self.pull_timer = self.loop.call_later(pull.SILENT_S / 3, self._check_pulls)
        self._pump(job)

    def _pump(self, job: pull.Pull) -> None:
        """Ask the sources for the next chunks; end the pull when none is left to ask."""
        while True:
            asks = job.requests()
            if not asks:
                break
            for source, offset, length in asks:
                sock, why = self._peer_agent(source)
                if sock is None or not transport.send(sock, encode("ReadChunk", (job.pull_id, job.store_id,
                                                                                offset, length))):
                    job.source_failed(source, why or f"node {source[:8]} cannot be reached")
        if job.failed:
            self._end_pull(job, job.error())

    def _peer_agent(self, node_id: str) -> tuple:
        """(our connection to the agent of ``node_id``, None), or (None, why there is none)."""
        sock = self.peer_agents.get(node_id)
        if sock is not None:
            return sock, None
        address, why = scheduling.agent_address(self.cluster_nodes, node_id)
        if address is None:
            return None, why
        sock = transport.dealer(f"a:{self.node_id}".encode())
        transport.start_tcp(sock, address, self.token, encode("Hello", ("agent", {"node_id": self.node_id})))
        self.peer_agents[node_id] = sock
        self.loop.add_reader(sock, lambda: self._on_peer_agent(node_id, sock))
        return sock, None

    def _on_peer_agent(self, node_id: str, sock) -> None:
        for frames in transport.recv_all(sock, copy=False):  # chunks go straight into a segment
            try:
                tag, fields, buffers = protocol.decode([f.bytes if i < 2 else f.buffer for i, f in enumerate(frames)])
                if tag == "Chunk":
                    self._on_chunk(node_id, *fields, buffers)
                elif tag == "PeerGone":  # an owner of copies we hold (WatchPeer in _on_PullObject),
                    (owner,) = fields  # or of a stream a worker of ours runs (_on_WatchCaller)
                    self._owner_gone(owner.decode(errors="replace"))
                    self._caller_gone(owner)
            except (protocol.ProtocolError, TypeError, ValueError, IndexError) as exc:
                log.warning("dropped a bad message from the agent of node %s: %s", node_id[:8], exc)

    def _on_ReadChunk(self, client, pull_id: int, store_id: bytes, offset: int, length: int) -> None:
        """Another node's agent copies one of our objects: send it ``length`` bytes from ``offset``."""
        seg = self.store.objects.get(store_id)
        if seg is None or store_id in self.pulls_by_store or store_id in self.uploads:
            error = "it is not in its store (freed, or still arriving)"
            frames = encode("Chunk", (pull_id, offset, error))
        elif not (0 <= offset and 0 < length <= pull.MAX_CHUNK and offset + length <= seg.used):
            frames = encode("Chunk", (pull_id, offset, f"bad range: {length} bytes at {offset} of {seg.used}"))
        else:
            try:
                frames = encode("Chunk", (pull_id, offset, None),
                                [segments.read_range(seg.read_path(), offset, length)])
                self.copy_counts["chunks_sent"] += 1
            except OSError as exc:
                frames = encode("Chunk", (pull_id, offset, f"reading it failed: {exc}"))
        kind, identity = client
        transport.send(self.sockets[kind], [identity, *frames])

    def _on_chunk(self, source: str, pull_id: int, offset: int, error, buffers) -> None:
        job = self.pulls.get(pull_id)
        if job is None:
            return  # ended meanwhile (freed, or failed)
        expected = min(job.chunk, job.size - offset) if 0 <= offset < job.size else -1
        if error is None and (len(buffers) != 1 or len(buffers[0]) != expected):
            error = f"sent {sum(len(b) for b in buffers)} bytes for a chunk of {expected}"
        if error is not None:
            job.source_failed(source, f"node {source[:8]}: {error}")
        elif job.received_chunk(source, offset, expected):
            os.pwrite(job.fd, buffers[0], offset)
            self.copy_counts["pulled_bytes"] += expected
        if job.done:
            self._end_pull(job, None)
        else:
            self._pump(job)

    def _end_pull(self, job: pull.Pull, error: str | None) -> None:
        del self.pulls[job.pull_id]
        del self.pulls_by_store[job.store_id]
        os.close(job.fd)  # drops the fill lock
        self.copy_log.add(copy_events.CopyRecord(job.store_id, job.size, job.what, self.node_id, list(job.sent.items()),
                                                 job.started_at, time.time(), error))
        if error is not None:
            log.warning("copying object %s to this node failed: %s", job.store_id.hex()[:16], error)
            self.copy_counts["pull_failures"] += 1
            self._apply_store(self.store.free_object(job.store_id))
        for client, request_id in job.waiters:
            self._send(client, "ObjectCopied", request_id, None if error else job.path, error, False)

    def _check_pulls(self) -> None:
        """Sources that stopped answering are given up on (their chunks go to the others)."""
        self.pull_timer = None
        now = time.monotonic()
        for job in list(self.pulls.values()):
            for source in job.silent_sources(now):
                job.source_failed(source, f"node {source[:8]} sent nothing for {pull.SILENT_S:.0f} s")
            self._pump(job)
        if self.pulls:
            self.pull_timer = self.loop.call_later(pull.SILENT_S / 3, self._check_pulls)

    def _sources_died(self) -> None:
        """Nodes the head declared dead send nothing more: pulls go on from the other sources."""
        dead = {n["node_id"] for n in self.cluster_nodes if not n["alive"]}
        orphans = [sid for sid, seg in self.store.objects.items() if seg.copy and seg.owner_node in dead]
        if orphans:  # copies of objects whose owner died with its node
            self._free_objects(orphans, "its owner died with its node: the object was lost with it")
        for node_id in dead & set(self.peer_agents):
            sock = self.peer_agents.pop(node_id)
            self.loop.remove_reader(sock)
            sock.close(0)
        for job in list(self.pulls.values()):
            for source in dead & set(job.load):
                job.source_failed(source, f"node {source[:8]} died")
            self._pump(job)

    def _store_stats(self) -> dict:
        return dict(self.store.stats(), **self.copy_counts, pulls_in_progress=len(self.pulls),
                    spill_busy_seconds=self.mover.busy[spill.SPILL],
                    restore_busy_seconds=self.mover.busy[spill.RESTORE],
                    heartbeat_gap_max_s=self.pulse.max_gap if self.pulse else None,
                    loop_lag_max_s=self.loop_lag_max)

    def _on_StoreStats(self, client, request_id, limit: int = store.LISTING_DEFAULT, spilled=None) -> None:
        """Our store's counts and its largest objects: ``limit`` of them (`farpool memory` shows
        20, `farpool list objects` asks for its --limit), only the spilled ones (or only those
        in memory) when ``spilled`` is True (False)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            limit = store.LISTING_DEFAULT
        spilled = spilled if isinstance(spilled, bool) else None
        self._send(client, "StoreStats", request_id, self._store_stats(),
                   self.store.listing(min(limit, store.LISTING_MAX), spilled))
