"""A task's arguments and values, as a worker reads them: from the message, mapped zero-copy
from this node's store, or copied here first from other nodes' stores.

Run by the worker's main thread (tasks, threaded actor calls on their threads); the
``StorePuller`` has a socket of its own to this node's agent, used by one thread at a time.
ExecuteTask's buffers are split per task by ``split_batch``; refs that arrive inside the
arguments are recorded (``load_args_tracked``) so that those the call keeps are borrowed.
"""

from __future__ import annotations

import threading

from farpool._private import object_ref, protocol, segments, transport
from farpool._private.protocol import encode


def load_value(payload, bufs):
    """A value from a message, or mapped zero-copy (copy-on-write) from the node store.

    ("loc", path, size, store_id): in this node's store (restored by the agent if spilled).  ("pull", store_id, size, sources, owner,
    what): in other nodes' stores; our agent copies it here first (pull.py), once for
    all the readers of this node.
    """
    stored = protocol.stored_value(payload)
    if isinstance(stored, protocol.PullFrom):
        def read_copy():
            path = store_puller.pull(stored.store_id, stored.size, stored.sources, stored.owner, stored.what)
            return segments.read_segment(path, stored.size, True, stored.store_id)
        try:
            payload, bufs = read_copy()
        except FileNotFoundError:  # spilled between the answer and the mapping: the agent restores it
            payload, bufs = read_copy()
    elif stored is not None:  # copy-on-write views: the task may mutate its arguments
        path, size, store_id = stored.path, stored.size, stored.store_id
        for attempt in range(segments.READ_ATTEMPTS):
            try:
                payload, bufs = segments.read_segment(path, size, True, store_id)
                break
            except FileNotFoundError:  # spilled since: our agent brings it back (PullObject of its own)
                if attempt == segments.READ_ATTEMPTS - 1:
                    raise
                path = store_puller.pull(store_id, size, [], ("", ""), "an argument on disk")
    return protocol.loads(payload, bufs)


class StorePuller:
    """Asks this node's agent for a local copy of an object stored on other nodes.

    A socket of its own (any thread may need a copy: threaded actors), used by one
    thread at a time; the agent answers every PullObject, with a path or an error.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.address: str | None = None
        self.sock = None
        self.requests = 0

    def pull(self, store_id: bytes, size: int, sources: list, owner: tuple, what: str) -> str:
        with self.lock:
            if self.sock is None:
                self.sock = transport.dealer()
                self.sock.connect(self.address)
            self.requests += 1
            transport.send(self.sock, encode("PullObject", (self.requests, store_id, size, sources, owner, what)))
            while True:
                if not self.sock.poll(3600_000):
                    raise RuntimeError(f"the node agent did not deliver a copy of {what} within an hour")
                tag, fields, _ = protocol.decode(self.sock.recv_multipart())
                if tag == "ObjectCopied":
                    answered, path, error, full = fields
                    if answered == self.requests:
                        break
        if path is None:
            from farpool.exceptions import ObjectLostError, ObjectStoreFullError
            raise (ObjectStoreFullError if full else ObjectLostError)(f"cannot read {what}: {error}")
        return path

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close(0)
                self.sock = None


store_puller = StorePuller()


def split_batch(tasks, buffers):
    """Each task of an ExecuteTask message with its argument and ref-value buffers:
    (TaskSpec, its argument buffers, per ref value its buffers), a plain tuple (one per
    task: a NamedTuple costs ~0.5 us more to build), unpacked where it is read.

    The message's buffers follow the tasks in order: each task's argument
    buffers, then the buffers of each of its resolved ref arguments.
    """
    pos = 0
    for task in map(protocol.TaskSpec._make, tasks):
        arg_bufs = buffers[pos:pos + task.n_arg_bufs]
        pos += task.n_arg_bufs
        ref_bufs = []
        for _slot, _payload, nbuf in task.ref_values:
            ref_bufs.append(buffers[pos:pos + nbuf])
            pos += nbuf
        yield task, arg_bufs, ref_bufs


def mark_phase(exc: BaseException, phase: str) -> None:
    """Note on ``exc`` the phase of the task it interrupted (see protocol.PHASE_ATTRIBUTE)."""
    try:
        setattr(exc, protocol.PHASE_ATTRIBUTE, phase)
    except (AttributeError, TypeError):  # an exception type without a __dict__
        pass


def load_args_tracked(args_payload, arg_bufs, ref_values, ref_bufs):
    """Arguments, plus weakrefs to the ObjectRefs that arrived in them (we borrow those)."""
    arrivals: list = []
    nested = object_ref._nested_refs  # (per task: save and restore by hand, cheaper than a with block)
    outer, nested.arrivals = nested.arrivals, arrivals
    try:
        args, kwargs = load_args(args_payload, arg_bufs, ref_values, ref_bufs)
    finally:
        nested.arrivals = outer
    return args, kwargs, arrivals


def still_held(arrivals: list, caller: tuple | None) -> list:
    """Ids of borrowed refs that outlived the call (stored somewhere): the owner must keep them.

    From now on this process tells the owner when it lets go of them (see client._on_borrowers).
    """
    held = [r for r in (w() for w in arrivals) if r is not None]
    client = object_ref.current()
    if held and client is not None:
        client.mark_registered(held, caller)
    return [r._id for r in held]


def load_args(args_payload, arg_bufs, ref_values, ref_bufs):
    args, kwargs = load_value(args_payload, arg_bufs)
    if ref_values:
        args = list(args)
        for (slot, payload, _nbuf), bufs in zip(ref_values, ref_bufs):
            value = load_value(payload, bufs)
            if isinstance(slot, int):
                args[slot] = value
            else:
                kwargs[slot] = value
    return args, kwargs


