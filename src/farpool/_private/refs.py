"""The reference table: what this process owns and borrows, who borrows from it, and what to free.

Pure state, no sockets, threads or clocks: events come in as method calls, and
what they make the process do goes into the table's outbox, which the client
(client.py, the shell) sends from its I/O thread::

    user threads: ObjectRef made/dropped, put, get of a borrowed value -+
    I/O thread:   task finished, borrower kept/released/died, copies  --+--> RefTable
                                                                         |
    outbox (in order, drained by CoreClient._flush_frees) <--------------+
      owner_messages  (owner address, frames): AddBorrower / BorrowReleased / AddCopy
      ended_actors    actor ids whose last handle went (KillActor to the head)
      frees           node id -> store ids to free there (FreeObjects to its agent)
      watches         ("watch", borrower address) / ("unwatch", identity): the shell
                      watches a borrower's process (a pidfd on our node, else its
                      node's agent) and calls ``borrower_died`` when it goes

Every method takes ``lock`` itself, or says "(lock held)" when its caller must
hold it; user threads call ``add_ref``, ``release``, ``pin_quietly``,
``mark_registered``, ``pin_forever``, ``register_arrivals``, ``lend_returned``
and ``take_sub_borrowed``; the rest run on the I/O thread.  ``release`` may run
in ``ObjectRef.__del__`` on any thread at any point, even inside a locked
section of the same thread, so it never waits for the lock.

Lineage (the owner's): a task result stored in a node store can be lost with its node.
The table keeps the task that made it (its arguments stay pinned) while any of its
results is referenced and the task may run again, up to ``LINEAGE_MAX_BYTES`` of
lineage, evicting the oldest first; ``lost_on`` names the objects whose every copy
was on dead nodes, and the client re-runs their tasks (completion.py).  An object
without lineage says why in ``Entry.no_lineage``.

Counting (DESIGN "Objects", Ray's borrower protocol): an object lives while it
has local refs, pending tasks that use it (``task_pins``), borrowers, or a
value of ours that contains it; the borrower rules are spelled out above
``borrowed_by``, ``add_borrower`` and ``lend_returned``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from farpool._private.protocol import Location, encode, owner_address  # noqa: F401 - Location: named here too

PENDING, READY, FAILED = 0, 1, 2
# The most bytes of lineage (the arguments of finished tasks whose stored results may
# need re-running) an owner keeps; beyond it the oldest is dropped, and its results
# cannot be rebuilt if lost.  More rebuilds more; less holds less memory (and store
# memory: large arguments stay in the store while their lineage is kept).
LINEAGE_MAX_BYTES = int(os.environ.get("FARPOOL_LINEAGE_MAX_BYTES", str(256 << 20)))
# What a lineage record costs besides its arguments (the record, its ids).
LINEAGE_OVERHEAD = 256
# The most stored by-value arguments whose content digest is kept for reuse; beyond it the
# oldest is forgotten (its object lives on, it is just not offered again).  Each costs
# ~100 bytes: more lets more distinct large arguments be stored once at the same time.
SHARED_MAX = 1024


@dataclass
class Entry:
    """One object in this process's table."""
    state: int = PENDING
    payload: bytes | None = None
    buffers: list | tuple = ()   # (shared empty defaults here: fewer objects for the cyclic GC per task)
    error: object = None          # a raised-later exception object, or an error tuple
    local_refs: int = 0
    task_pins: int = 0            # pending tasks that use it as an argument
    owned: bool = True
    waiters: list | tuple = ()    # callables(entry) run on the I/O thread (add_waiter)
    task: object = None           # the TaskRecord that produces it (owner only)
    size: int = 0
    location: Location | None = None  # when in a node's store
    borrowers: set | frozenset = frozenset()  # owner: identities of processes still holding it
    registered: bool = False      # borrower: the owner counts us (so we tell it when we let go)
    contains: list | tuple = ()   # owner: ids of refs nested in this value (pinned)
    pinned_forever: bool = False  # pickled outside farpool: never freed this session
    actor_id: str | None = None   # an actor's handle token: freeing it ends the actor
    fetched: bool = True          # borrower: value requested from the owner (or not needed)
    owner: tuple | None = None    # borrower: the owner's address
    copies: set | None = None     # owner of a stored value: other nodes we had copy it (pull.py)
    kept_reports: dict | None = None  # owner: borrower -> its own reports of chained keeps
    #                                   minus those relayed by the chain (see add_borrower)
    lineage: object = None        # owner: the Lineage that can make it again (see keep_lineage)
    no_lineage: str = ""          # owner of a stored value without lineage: why it cannot be rebuilt
    digest: bytes | None = None   # owner: content digest of a by-value argument stored once (shared_args.py)
    #                               (kept after RefTable.by_content forgets it: it marks such arguments)

    def add_waiter(self, fn) -> None:
        """Call ``fn(entry)`` on the I/O thread when this entry is done (the table's lock held)."""
        if self.waiters:
            self.waiters.append(fn)
        else:  # (the shared empty tuple until then: one list less per object in flight)
            self.waiters = [fn]

    def drop_waiter(self, fn) -> None:
        """Forget ``fn`` if it is still waiting (the table's lock held)."""
        if fn in self.waiters:
            self.waiters.remove(fn)


@dataclass
class Lineage:
    """A finished task kept so that its stored results can be made again."""
    task: object                  # the TaskRecord (its arguments stay pinned while kept)
    size: int                     # bytes it holds (its arguments)
    live: int = 0                 # its results still in the table


@dataclass
class BorrowerWatch:
    """Owner side: a process that borrows some of our objects, watched so its death releases them."""
    address: tuple               # an OwnerAddress (identity, node_id, endpoint, pid)
    object_ids: set = field(default_factory=set)


class RefTable:
    def __init__(self, identity: bytes, in_worker: bool):
        self.identity = identity
        self.in_worker = in_worker
        self.peer_address: tuple | None = None  # how borrowers name us (set once connected)
        self.lock = threading.Lock()
        self.objects: dict[bytes, Entry] = {}
        self.released: deque = deque()   # decrements that could not take the lock (see release)
        self.watched: dict[bytes, BorrowerWatch] = {}  # borrower identity -> what it holds
        self.early_releases: set = set()  # (borrower, oid) released before its AddBorrower came
        self.sub_borrowed: list = []      # worker: (oid, borrower, owner[, kept]) for our next TaskFinished
        # The outbox (see the module docstring).
        self.owner_messages: deque = deque()
        self.ended_actors: deque = deque()
        self.frees: dict[str, list] = {}
        self.watches: deque = deque()
        # Lineage kept, oldest first (task id -> Lineage), and its bytes (see keep_lineage).
        self.lineage: OrderedDict = OrderedDict()
        self.lineage_bytes = 0
        self.lineage_max_bytes = LINEAGE_MAX_BYTES
        # Large by-value arguments stored once (shared_args.py): content digest -> object id,
        # an entry only while its object lives (``delete`` drops it), at most SHARED_MAX.
        self.by_content: OrderedDict = OrderedDict()

    def has_output(self) -> bool:
        return bool(self.owner_messages or self.ended_actors or self.frees or self.watches)

    # ------------------------------------------------------------------ local refs (any thread)
    def add_ref(self, ref) -> None:
        """An ObjectRef (anything with ``_id`` and ``_owner``) was made in this process."""
        with self.lock:
            entry = self.objects.get(ref._id)
            if entry is None and owner_address(ref._owner).identity != self.identity:
                # A borrowed ref: counted here; the value is fetched from its owner on demand.
                entry = self.objects[ref._id] = Entry(owned=False, fetched=False, owner=owner_address(ref._owner))
            if entry is not None:
                entry.local_refs += 1

    def release(self, object_id: bytes) -> bool:
        """One local ref of ``object_id`` dropped.  Counted now when the lock is free, else
        queued; True when queued: the shell must call ``drain_released`` soon (once is
        enough for many).  Counting here spares the I/O thread a wake-up per dropped ref."""
        if not self.lock.acquire(False):
            self.released.append(object_id)
            return True
        try:
            self._count_down_local(object_id)
        finally:
            self.lock.release()
        return False

    def drain_released(self) -> None:
        with self.lock:
            while self.released:
                self._count_down_local(self.released.popleft())

    def _count_down_local(self, object_id: bytes) -> None:
        entry = self.objects.get(object_id)
        if entry is not None:
            entry.local_refs -= 1
            self.delete_if_unreferenced(object_id, entry)

    def pin_quietly(self, object_ids) -> None:
        """Refs handed on where no borrower protocol reaches (results, actor arguments): keep them."""
        with self.lock:
            for oid in object_ids:
                entry = self.objects.get(oid)
                if entry is not None:
                    entry.pinned_forever = True

    def pin_forever(self, object_id: bytes) -> bool:
        """A ref pickled outside farpool: nobody will say when it goes.  True if newly pinned."""
        with self.lock:
            entry = self.objects.get(object_id)
            if entry is None or entry.pinned_forever:
                return False
            entry.pinned_forever = True
            return True

    # ------------------------------------------------------------------ stored once (any thread)
    def reuse_stored(self, digest: bytes) -> bytes | None:
        """The id of a live stored object with content ``digest``, counted as one more local
        ref (the caller makes the ObjectRef with ``counted=True``); None when there is none."""
        with self.lock:
            oid = self.by_content.get(digest)
            if oid is None:
                return None
            entry = self.objects[oid]  # (delete drops the digest with the object)
            entry.local_refs += 1
            return oid

    def add_stored(self, oid: bytes, entry: Entry, digest: bytes) -> None:
        """A by-value argument just stored as ``entry`` (one local ref counted already), to be
        reused while it lives."""
        with self.lock:
            entry.digest = digest
            self.objects[oid] = entry
            self.by_content[digest] = oid
            self.by_content.move_to_end(digest)
            while len(self.by_content) > SHARED_MAX:
                self.by_content.popitem(last=False)  # (its object keeps its digest: see keep_lineage)

    def unpin(self, object_ids) -> None:
        """(lock held) A task that used these as arguments ended."""
        for oid in object_ids:
            entry = self.objects.get(oid)
            if entry is not None:
                entry.task_pins -= 1
                self.delete_if_unreferenced(oid, entry)

    # ------------------------------------------------------------------ deletion
    @staticmethod
    def unreferenced(entry: Entry) -> bool:
        """No local ref, no pending task, no borrower anywhere: the object can go."""
        return (entry.local_refs <= 0 and entry.task_pins <= 0 and not entry.borrowers
                and not entry.pinned_forever and (entry.state != PENDING or not entry.owned))

    def delete_if_unreferenced(self, oid: bytes, entry: Entry) -> None:
        """(lock held)"""
        if self.unreferenced(entry):
            self.delete(oid, entry)

    def delete(self, oid: bytes, entry: Entry) -> None:
        """(lock held) Forget an object: give back its memory, or our borrow."""
        del self.objects[oid]
        if entry.digest is not None and self.by_content.get(entry.digest) == oid:
            del self.by_content[entry.digest]
        if entry.actor_id is not None:  # the actor's last handle is gone, here and everywhere
            self.ended_actors.append(entry.actor_id)
        self.unpin(entry.contains)  # refs nested in this value were pinned by it
        if not entry.owned:
            if entry.registered and entry.owner is not None:
                self.owner_messages.append((entry.owner, encode("BorrowReleased", (oid,))))
            return
        if entry.location is not None:
            self.free_location(entry.location, entry.copies)
        if entry.lineage is not None:
            record = entry.lineage
            record.live -= 1
            if record.live == 0 and self.lineage.pop(record.task.task_id, None) is not None:
                self.lineage_bytes -= record.size
                self.release_task(record.task)

    def free_location(self, location: tuple, copies=()) -> None:
        """(lock held) Free a stored value: the original and every copy we had made on other nodes."""
        _, node_id, store_id, _path, _size = location
        for node in {node_id, *(copies or ())}:
            self.frees.setdefault(node, []).append(store_id)

    def report_copy(self, owner: tuple, oid: bytes, store_id: bytes, node_id: str) -> None:
        """We (a borrower) had ``oid`` copied to ``node_id``: its owner frees that copy too."""
        self.owner_messages.append((owner, encode("AddCopy", (oid, store_id, node_id))))

    def free_copy(self, node_id: str, store_id: bytes) -> None:
        """(lock held) A copy on ``node_id`` nobody counts (its object is gone): free it there."""
        self.frees.setdefault(node_id, []).append(store_id)

    # ------------------------------------------------------------------ lineage
    def release_task(self, task) -> None:
        """(lock held) A task ended for good: its arguments are no longer pinned by it, nor
        held by the refs in its record (task events keep records a while: an argument's
        memory comes back now, for the next value to reuse)."""
        if task.pinned:
            self.unpin(task.pinned)
            task.pinned = ()
        task.ref_slots = ()  # (a new one: a submitting thread may still read the old one)
        if task.args_location is not None:
            self.free_location(task.args_location, task.args_copies)
            task.args_location = None

    def keep_lineage(self, task) -> None:
        """(lock held) ``task`` finished with results in a node store and may run again: keep
        it (and its arguments) while any of its results lives, so a lost one can be rebuilt."""
        shared = 0  # large by-value arguments stored once (shared_args.py) count as if stored per call
        for oid in task.pinned:
            entry = self.objects.get(oid)
            if entry is not None and entry.digest is not None:
                shared += entry.size
        record = Lineage(task, LINEAGE_OVERHEAD + len(task.args_payload) + sum(len(b) for b in task.arg_bufs)
                         + (task.args_location.size if task.args_location is not None else 0) + shared)
        for oid in task.return_ids:
            entry = self.objects.get(oid)
            if entry is not None:
                entry.lineage = record
                record.live += 1
        if record.live == 0:
            self.release_task(task)
            return
        task.lineage_kept = True
        self.lineage[task.task_id] = record
        self.lineage_bytes += record.size
        while self.lineage_bytes > self.lineage_max_bytes and len(self.lineage) > 1:
            _, oldest = self.lineage.popitem(last=False)
            self.lineage_bytes -= oldest.size
            why = (f"its lineage (the task {oldest.task.name} that made it) was evicted: this process keeps "
                   f"at most {self.lineage_max_bytes} bytes of lineage (FARPOOL_LINEAGE_MAX_BYTES), dropping "
                   "the oldest first; raise it to rebuild more")
            for oid in oldest.task.return_ids:
                entry = self.objects.get(oid)
                if entry is not None and entry.lineage is oldest:
                    entry.lineage = None
                    entry.no_lineage = why
            oldest.task.lineage_kept = False
            if oldest.task.state == "DONE":  # (else being rebuilt: released when that run ends)
                self.release_task(oldest.task)

    def lost_on(self, dead_nodes) -> list:
        """(lock held) (id, entry) of our stored objects whose every copy was on ``dead_nodes``."""
        lost = []
        for oid, entry in self.objects.items():
            location = entry.location
            if entry.owned and entry.state == READY and location is not None and location.node_id in dead_nodes \
                    and not any(n not in dead_nodes for n in entry.copies or ()):
                lost.append((oid, entry))
        return lost

    # ------------------------------------------------------------------ values that hold refs
    def hold_nested(self, entry: Entry, inner: list, sender: tuple | None = None) -> None:
        """(lock held) Refs nested in a result (from ``sender``) live as long as it; we borrow
        those owned elsewhere."""
        for inner_id, owner in inner:
            owner = owner_address(owner)
            e = self.objects.get(inner_id)
            if e is None:
                if owner.identity == self.identity:
                    continue  # ours and already freed: a get of it will say so
                e = self.objects[inner_id] = Entry(owned=False, fetched=False, owner=owner)
            if not e.owned:
                e.registered = True  # the returning worker made the owner count us, and so do we
                self.report_returned(inner_id, owner, sender)
            e.task_pins += 1
            if not entry.contains:
                entry.contains = []
            entry.contains.append(inner_id)

    def discard_value(self, value: tuple, inner: list, sender: tuple | None) -> None:
        """(lock held) A result nobody wants (its refs were dropped, or its task ended
        already): give its memory back, and our borrow of the refs inside it.  ``value``:
        a Location, or (payload, buffers)."""
        if isinstance(value, Location):
            self.free_location(value)
        for inner_id, owner in inner:
            owner = owner_address(owner)
            if owner.identity == self.identity:
                continue
            self.report_returned(inner_id, owner, sender)
            e = self.objects.get(inner_id)
            if e is not None and not e.owned:
                e.registered = True  # we hold it anyway: its release covers this one
            else:
                self.owner_messages.append((owner, encode("BorrowReleased", (inner_id,))))

    # ------------------------------------------------------------------ borrowers
    # Every borrow is counted by the object's owner, never along a chain of borrowers:
    #   task arguments: the worker reports the refs it kept in its TaskFinished to the
    #     submitter, which adds it (when it owns them) or sends AddBorrower to the owner;
    #   refs nested in a returned value: the returning worker adds the caller (when it
    #     owns them) or sends AddBorrower to the owner, before the reply leaves.
    # A borrower sends BorrowReleased to the owner when its last local reference goes;
    # a borrower that dies releases them all (the shell watches it: "watch" in the outbox).
    # Messages to one owner leave in order, so a process's AddBorrower for someone else
    # always precedes its own release; a release that overtakes the AddBorrower naming
    # it (they come from different processes) is remembered and cancels it.
    def mark_registered(self, object_ids, caller: tuple | None = None) -> None:
        """Borrowed refs this process now reports holding (to ``caller``, in the reply of the
        task that got them): their owner will count us until we release.  Refs whose owner is
        not the caller are also reported to the owner ourselves: the report that climbs the
        chain of callers is lost if one of them dies first (see add_borrower)."""
        with self.lock:
            for oid in object_ids:
                entry = self.objects.get(oid)
                if entry is not None and not entry.owned:
                    entry.registered = True
                    if caller is not None and entry.owner is not None \
                            and owner_address(caller).identity != entry.owner.identity:
                        # Ahead of our release on the same FIFO, so the owner never sees it first.
                        self.owner_messages.append((entry.owner, encode(
                            "AddBorrower", (oid, self.peer_address, True))))

    def on_borrowers(self, sender: tuple | None, object_ids: list, pairs: list = ()) -> None:
        """A worker kept refs it got in a task's arguments (``object_ids``), or learned that
        processes it passed them to keep them (``pairs`` of (id, borrower, owner, kept)): count them."""
        with self.lock:
            for oid in object_ids:
                self.borrowed_by(oid, owner_address(sender), kept=True)
            for oid, borrower, owner, *kept in pairs:  # (kept: sent by newer workers only)
                self.borrowed_by(oid, owner_address(borrower), owner_address(owner), any(kept), relayed=True)

    def borrowed_by(self, oid: bytes, borrower: tuple, owner: tuple | None = None, kept: bool = False,
                    relayed: bool = False) -> None:
        """(lock held) ``borrower`` holds ``oid``: count it if ours, else make its owner count it.
        ``kept``: it kept a ref from a task's arguments, and reported that to the owner itself
        too unless its caller is the owner (mark_registered); ``relayed``: we are not that caller."""
        borrower = owner_address(borrower)
        owner = owner_address(owner) if owner is not None else None
        entry = self.objects.get(oid)
        if entry is None:
            if owner is not None and owner.identity != self.identity:  # not one we know: tell its owner
                self.owner_messages.append((owner, encode("AddBorrower", (oid, borrower, kept))))
            return
        if entry.owned:
            self.add_borrower(oid, entry, borrower, "chain" if kept and relayed else None)
        elif entry.registered or not self.in_worker:
            # Our own borrow is counted by the owner, and our release will follow this on
            # the same socket: the object cannot go before the owner counts the new borrower.
            if entry.owner is not None:
                self.owner_messages.append((entry.owner, encode("AddBorrower", (oid, borrower, kept))))
        else:
            # We hold it only through the caller of our running task, which pins it until our
            # TaskFinished arrives: the borrower travels up in that reply (the caller counts it).
            self.sub_borrowed.append((oid, tuple(borrower), entry.owner, kept))

    def register_arrivals(self, refs: list, in_task: bool) -> None:
        """Refs unpickled from a value we borrowed (their owner does not know we hold them):
        become a counted borrower, as if they had come in a task's arguments.  ``in_task``:
        a task of ours runs, whose caller pins the container: report with its reply."""
        with self.lock:
            for ref in refs:
                entry = self.objects.get(ref._id)
                if entry is None or entry.owned or entry.registered \
                        or owner_address(ref._owner).identity == self.identity:
                    continue
                entry.registered = True
                if in_task:
                    self.sub_borrowed.append((ref._id, self.peer_address, ref._owner))
                else:
                    self.owner_messages.append((ref._owner, encode("AddBorrower", (ref._id, self.peer_address))))

    def take_sub_borrowed(self) -> list:
        with self.lock:
            pairs, self.sub_borrowed = self.sub_borrowed, []
        return pairs

    # A chain of borrowers: we lend ``oid`` to B1, which passes it to B2, which keeps it.
    # B2 reports that to its caller B1, and the report climbs the chain of callers to us
    # (a TaskFinished's pairs, or AddBorrower from B1 when B1 is counted itself): while it
    # climbs, each caller pins the ref, so we count B2 before we could free the object.
    # But if B1 dies before passing it on, the report is lost and B2 would hold a ref we
    # free.  So B2 also reports its keep to us itself ("direct", mark_registered), ahead of
    # its release on the same FIFO.  Each keep then reaches us twice, in either order, or
    # once if the chain broke; ``kept_reports[B2]`` counts direct minus chain reports:
    #   direct: always counts B2;
    #   chain:  counts B2 unless a direct report is waiting for it (count > 0): B2 was
    #           counted then and may have released since (the chain must not revive it).
    # Still lost (not fixable without a round trip before each hand-over): a keep whose
    # direct report reaches us after we freed the object, i.e. B1 died (and we stopped
    # pinning for it) while B2's task still ran.  A chain report lost for good leaves the
    # count at 1; a later keep by B2 whose chain report overtakes its direct one is then
    # not counted until the direct one arrives.  A ref returned inside a value by a worker
    # that does not own it is reported the same two ways (see lend_returned).
    def add_borrower(self, oid: bytes, entry: Entry, borrower: tuple, report: str | None = None) -> None:
        """(lock held) Count ``borrower`` as holding our object ``oid``; watch it for death.
        ``report``: "direct" or "chain" for the two reports of a kept ref (see above)."""
        borrower = owner_address(borrower)
        identity = borrower.identity
        if report is not None:
            if entry.kept_reports is None:
                entry.kept_reports = {}
            waiting = entry.kept_reports.get(identity, 0)
            waiting += 1 if report == "direct" else -1
            if waiting:
                entry.kept_reports[identity] = waiting
            else:
                entry.kept_reports.pop(identity, None)
            if report == "chain" and waiting >= 0:
                return
        if (identity, oid) in self.early_releases:
            self.early_releases.discard((identity, oid))
            return
        if identity == self.identity:
            return
        if not entry.borrowers:
            entry.borrowers = set()
        entry.borrowers.add(identity)
        watch = self.watched.get(identity)
        if watch is None:
            watch = self.watched[identity] = BorrowerWatch(borrower)
            self.watches.append(("watch", watch.address))
        watch.object_ids.add(oid)

    def borrower_reported(self, oid: bytes, borrower: tuple, report: str | None) -> None:
        """AddBorrower came (from ``borrower`` itself or another process) for an object we own."""
        with self.lock:
            entry = self.objects.get(oid)
            if entry is not None and entry.owned:
                self.add_borrower(oid, entry, owner_address(borrower), report)

    def borrow_released(self, borrower: bytes, oid: bytes) -> None:
        with self.lock:
            entry = self.objects.get(oid)
            if entry is None:
                return
            if borrower not in entry.borrowers:
                self.early_releases.add((borrower, oid))
                return
            self._release_borrow(borrower, oid, entry)

    def _release_borrow(self, borrower: bytes, oid: bytes, entry: Entry) -> None:
        """(lock held)"""
        if entry.borrowers:  # (empty: the shared frozenset)
            entry.borrowers.discard(borrower)
        watch = self.watched.get(borrower)
        if watch is not None:
            watch.object_ids.discard(oid)
            if not watch.object_ids:
                self._unwatch(borrower)
        self.delete_if_unreferenced(oid, entry)

    def _unwatch(self, identity: bytes) -> None:
        if self.watched.pop(identity, None) is not None:
            self.watches.append(("unwatch", identity))

    def borrower_died(self, identity: bytes) -> None:
        """A borrower's process ended (or its node died): it holds nothing any more."""
        with self.lock:
            watch = self.watched.get(identity)
            if watch is None:
                return
            for oid in list(watch.object_ids):
                entry = self.objects.get(oid)
                if entry is not None:
                    self._release_borrow(identity, oid, entry)
            self._unwatch(identity)
            self.early_releases = {(b, o) for b, o in self.early_releases if b != identity}

    def borrowers_on(self, node_ids) -> list[bytes]:
        """Identities of the borrowers we watch that run on these nodes."""
        with self.lock:
            return [i for i, w in self.watched.items() if w.address.node_id in node_ids]

    def is_watched(self, identity: bytes) -> bool:
        with self.lock:
            return identity in self.watched

    def watched_address(self, identity: bytes) -> tuple | None:
        with self.lock:
            watch = self.watched.get(identity)
            return watch.address if watch is not None else None

    # A ref returned inside a value to caller C and owned by a third party O (neither us
    # nor C): we tell O that C borrows it, and C tells O itself when the value arrives
    # (report_returned), ahead of its release on the same FIFO.  Ours alone could reach O
    # after C's release (they leave from different processes) and count C again, or never
    # leave if we die first, and O would free the object under C.  So ours is the chain
    # report of a kept ref and C's the direct one (see add_borrower): O counts C from the
    # first to arrive until C's release, and ours arriving after the release counts nothing.
    # Still lost: O sees us die (and stops counting us) before C's report arrives, and no
    # one else holds the object: O frees it under C (the window of a chain, add_borrower).
    def lend_returned(self, refs: list, caller: tuple) -> None:
        """Refs nested in a value this worker returns to ``caller``: the caller borrows them."""
        caller = owner_address(caller)
        with self.lock:
            for ref in refs:
                owner = owner_address(ref._owner)
                if owner.identity == caller.identity:
                    continue  # the caller owns it: the value it stores pins it there
                entry = self.objects.get(ref._id)
                if owner.identity == self.identity:
                    if entry is not None:
                        self.add_borrower(ref._id, entry, caller)
                else:  # a chain report, unless we are the caller (then C's report is not sent)
                    self.owner_messages.append((owner, encode(
                        "AddBorrower", (ref._id, caller, caller.identity != self.identity))))

    def report_returned(self, oid: bytes, owner: tuple, sender: tuple | None) -> None:
        """(lock held) We got ``oid`` in a value returned by ``sender``, which reported us to the
        owner (lend_returned): report us ourselves too, unless the sender is the owner (it
        counted us before it replied) or us (see above)."""
        if sender is not None and owner_address(sender).identity in (owner.identity, self.identity):
            return
        self.owner_messages.append((owner, encode("AddBorrower", (oid, self.peer_address, True))))

    # ------------------------------------------------------------------ checks
    def validate_state(self) -> None:
        """Raise AssertionError if the table contradicts itself (tests call it after each event)."""
        with self.lock:
            pins: dict[bytes, int] = {}
            for oid, entry in self.objects.items():
                assert entry.local_refs >= 0 or self.released, (oid.hex(), "negative local refs")
                assert entry.task_pins >= 0, (oid.hex(), "negative task pins")
                assert entry.owned or not entry.borrowers, (oid.hex(), "a borrowed object has borrowers")
                assert entry.owned or entry.owner is not None, (oid.hex(), "borrowed without an owner")
                assert entry.owned or entry.owner.identity != self.identity, (oid.hex(), "we borrow from us")
                assert entry.owned or not entry.copies, (oid.hex(), "a borrower records copies")
                for inner in entry.contains:
                    pins[inner] = pins.get(inner, 0) + 1
                for identity in entry.borrowers:
                    watch = self.watched.get(identity)
                    assert watch is not None and oid in watch.object_ids, \
                        (oid.hex(), identity, "a borrower not watched for this object")
                assert not (self.unreferenced(entry) and not entry.waiters and not self.released), \
                    (oid.hex(), "an unreferenced object is still in the table")
            for identity, watch in self.watched.items():
                assert watch.object_ids, (identity, "a watch with nothing borrowed")
                for oid in watch.object_ids:
                    entry = self.objects.get(oid)
                    assert entry is not None and identity in entry.borrowers, \
                        (identity, oid.hex(), "a watch names an object its borrower does not hold")
            live: dict = {}
            for entry in self.objects.values():
                if entry.lineage is not None:
                    live[id(entry.lineage)] = live.get(id(entry.lineage), 0) + 1
            for task_id, record in self.lineage.items():
                assert record.task.task_id == task_id and record.task.lineage_kept, (task_id.hex(), "lineage misfiled")
                assert live.get(id(record), 0) == record.live > 0, (task_id.hex(), "lineage counts its results wrong")
            assert self.lineage_bytes == sum(r.size for r in self.lineage.values()), "lineage bytes miscounted"
            for digest, oid in self.by_content.items():
                entry = self.objects.get(oid)
                assert entry is not None and entry.digest == digest, (oid.hex(), "a digest outlived its object")
            for inner, count in pins.items():
                entry = self.objects.get(inner)
                assert entry is None or entry.task_pins >= count, \
                    (inner.hex(), "pinned by fewer than the values that contain it")
