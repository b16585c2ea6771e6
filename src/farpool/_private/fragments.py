"""Large messages over TCP as a run of small ones, and put back together: the pure part.

Owned by transport.py (``send`` splits, ``recv_all`` reassembles); no sockets here.

Why: every TCP connection has ZMTP heartbeats (transport.HEARTBEAT_TIMEOUT_MS).
zmq counts a peer as heard only when a whole message arrives, so one message
that takes longer than the timeout to cross the link (a 1 GB value at 100 MB/s)
gets its connection closed under it, again and again, and is never delivered.
Split into pieces of ``PIECE_BYTES``, the peer's pongs pass between the pieces::

    sender:   [f0, f1, BIG]  ->  [MARK, head(id, 0, 0, n, len0), f0]
                                 [MARK, head(id, 1, 0, n, len1), f1]
                                 [MARK, head(id, 2, 0, n, lenB), BIG[0:4M]]
                                 [MARK, head(id, 2, 4M, n, lenB), BIG[4M:8M]] ...
    receiver: Reassembler.feed(peer, fragment) -> None ... the whole [f0, f1, BIG]

A connection delivers in order, so one partial message per peer is kept; a new
message id from a peer drops its partial one (its connection was replaced).
Only messages with a frame over ``SPLIT_ABOVE`` are split: the rest go as they are.
"""

from __future__ import annotations

import itertools
import struct

# A frame larger than this is sent in pieces.  Above the chunks of an object copy
# (pull.CHUNK, 4 MB), so those, the bulk of large transfers, go as they are.
SPLIT_ABOVE = 8 << 20
# Piece size: each crosses a 10 MB/s link in well under the heartbeat timeout, and the
# per-message cost (~20 us) is nothing next to 4 MB of encryption.
PIECE_BYTES = 4 << 20
MARK = b"\x00farpool-fragment\x00"
_HEAD = struct.Struct("!QIQIQ")  # message id, frame index, offset, frame count, frame length
_ids = itertools.count(1)


def nbytes(frame) -> int:
    if isinstance(frame, bytes):
        return len(frame)
    try:
        return memoryview(frame).nbytes
    except TypeError:
        return len(frame)


def needs_split(frames) -> bool:
    for frame in frames:
        if not isinstance(frame, bytes) or len(frame) > SPLIT_ABOVE:
            if nbytes(frame) > SPLIT_ABOVE:
                return True
    return False


def split(frames, piece: int = PIECE_BYTES) -> list[list]:
    """The fragments (each a list of frames) that carry ``frames``; large frames as views."""
    msg_id = next(_ids)
    count = len(frames)
    out = []
    for index, frame in enumerate(frames):
        size = nbytes(frame)
        if size <= piece:
            out.append([MARK, _HEAD.pack(msg_id, index, 0, count, size), frame])
            continue
        view = memoryview(frame).cast("B")
        for offset in range(0, size, piece):
            out.append([MARK, _HEAD.pack(msg_id, index, offset, count, size), view[offset:offset + piece]])
    return out


def is_fragment(frames, at: int = 0) -> bool:
    """Whether the message ``frames`` (its own frames from index ``at``) is a fragment."""
    return len(frames) == at + 3 and len(frames[at]) == len(MARK) and bytes(frames[at]) == MARK


class Reassembler:
    """Partial messages per peer; ``feed`` returns a message once its last piece is in."""

    def __init__(self):
        self.partial: dict = {}   # peer -> [message id, frames so far, buffer of the frame in pieces]
        self.dropped = 0          # partial messages given up (their connection was replaced)

    def feed(self, peer, head, piece, copy: bool) -> list | None:
        """One fragment (its header and piece) from ``peer``; the whole message's frames when
        complete: with ``copy``, bytes (a frame sent in pieces: a bytearray), else memoryviews."""
        msg_id, index, offset, count, size = _HEAD.unpack(bytes(head))
        state = self.partial.get(peer)
        if state is None or state[0] != msg_id:
            if state is not None:
                self.dropped += 1
            if index != 0 or offset != 0:  # the start of this one was lost: wait for the next
                self.partial.pop(peer, None)
                return None
            state = self.partial[peer] = [msg_id, [], None]
        frames = state[1]
        if len(frames) != index:
            raise ValueError(f"fragment of frame {index} at {offset} while frame {len(frames)} is due")
        data = memoryview(piece).cast("B") if not isinstance(piece, bytes) else piece
        if offset == 0 and len(data) == size:  # a whole frame in one piece
            frames.append(bytes(data) if copy else data)
        else:
            if offset == 0:
                state[2] = bytearray(size)
            buf = state[2]
            if buf is None or offset + len(data) > size:
                raise ValueError(f"piece of {len(data)} bytes at {offset} of a {size}-byte frame")
            buf[offset:offset + len(data)] = data
            if offset + len(data) == size:  # (``copy``: the bytearray itself, not a second copy)
                frames.append(buf if copy else memoryview(buf))
                state[2] = None
        if len(frames) == count:
            del self.partial[peer]
            return frames
        return None

    def forget(self, peer) -> None:
        self.partial.pop(peer, None)
