"""Same-machine stream channels: framed, non-blocking AF_UNIX streams between an owner and
its workers on one machine (the task path), and the listening socket a worker accepts
them on.

A ``StreamChannel`` belongs to one event loop (transport.EventLoop): its thread sends,
and reads when the loop finds the socket readable; a thread that sends while it holds
the stream for the moment uses ``send_from_thread``.  The client's loop lends a worker's
stream to a user thread waiting on a task sent there (EventLoop.lend): that thread then
reads it, through the loop's own handler (EventLoop.run_here with serve_now).
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farpool._private.transport import EventLoop

# The task path between an owner and a worker on the same machine uses plain
# AF_UNIX stream sockets in the 0700 session directory instead of zmq: a
# round trip over zmq here costs ~135 us (four extra thread hops through zmq's
# I/O threads) against ~20 us for a Unix socket (benchmarks/README.md).  The
# framing is ours: a message is a list of frames, sent with one sendmsg().
#
#   header: "!I" frame count, then "!Q" per frame length; then the frames.

_COUNT = struct.Struct("!I")
_LENGTHS: dict = {}  # frame count -> the struct of that many lengths (counts up to 64 are kept)
# Frames at least this large are received straight into their own buffer.
_BIG_FRAME = 256 * 1024
_RECV_CHUNK = 256 * 1024


def _lengths(count: int) -> struct.Struct:
    """The struct of ``count`` frame lengths (one unpack per header, not one per frame)."""
    unpacker = _LENGTHS.get(count)
    if unpacker is None:
        unpacker = struct.Struct(f"!{count}Q")
        if count <= 64:
            _LENGTHS[count] = unpacker
    return unpacker


class StreamChannel:
    """A framed, non-blocking AF_UNIX stream; owned by one event loop thread.

    ``send`` never blocks: what the kernel does not take is queued and flushed
    when the socket becomes writable (the loop calls ``on_writable``).
    ``read`` returns the complete messages received so far and sets ``eof``
    when the peer has closed.
    """

    def __init__(self, sock, loop: "EventLoop | None" = None):
        self.sock = sock
        self.sock.setblocking(False)
        self.fd = sock.fileno()
        self.loop = loop
        self._out: deque = deque()      # memoryviews still to send
        self._inbuf = bytearray()
        self._chunk = bytearray(_RECV_CHUNK)
        self._chunk_view = memoryview(self._chunk)
        self._big: bytearray | None = None  # a large frame being received
        self._big_filled = 0
        self._frames: list = []          # frames of the message being parsed
        self._lengths: list | None = None
        self.closed = False
        self.eof = False

    @classmethod
    def connect(cls, path: str, loop=None) -> "StreamChannel":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, loop)

    @staticmethod
    def _pack(frames) -> tuple[list, int]:
        """(the header and the frames as sendmsg takes them, their size in all)"""
        lengths = []
        out = [b""]  # (the header, once the lengths are known)
        for f in frames:
            if f.__class__ is bytes:  # (most frames)
                lengths.append(len(f))
                out.append(f)
                continue
            view = f.raw() if isinstance(f, pickle_buffer_type) else memoryview(f)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            lengths.append(view.nbytes)
            out.append(view)
        out[0] = _COUNT.pack(len(lengths)) + _lengths(len(lengths)).pack(*lengths)
        return out, len(out[0]) + sum(lengths)

    def send(self, frames) -> bool:
        if self.closed:
            return False
        out, size = self._pack(frames)
        if self._out:
            self._out.extend(out)
            return True
        try:
            sent = self.sock.sendmsg(out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return False
        if sent < size:
            self._queue_rest(out, sent)
        return True

    def send_from_thread(self, frames) -> None:
        """``send`` from a thread other than the loop's, by one that owns the stream for the
        moment (the loop sends nothing on it meanwhile): what the kernel does not take at
        once is handed to the loop, which sends it in order.  The caller hands the stream
        back to the loop only after this returns, through the loop's calls (after the
        hand-over of the rest queued here)."""
        if self._out or self.closed:
            self.loop.call_soon(self.send, frames)
            return
        out, size = self._pack(frames)
        try:
            sent = self.sock.sendmsg(out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.loop.call_soon(self.close)
            return
        if sent < size:
            self.loop.call_soon(self._queue_rest, out, sent)

    def _queue_rest(self, out, sent) -> None:
        for i, part in enumerate(out):
            n = len(part) if isinstance(part, bytes) else part.nbytes
            if sent >= n:
                sent -= n
                continue
            rest = memoryview(part)[sent:] if sent else part
            self._out.append(rest)
            self._out.extend(out[i + 1:])
            if self.loop is not None:
                self.loop.set_writer(self.fd, self.on_writable)
            return

    def on_writable(self) -> None:
        while self._out:
            batch = list(itertools.islice(self._out, 64))
            try:
                sent = self.sock.sendmsg(batch)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            for part in batch:
                n = len(part) if isinstance(part, bytes) else part.nbytes
                if sent >= n:
                    sent -= n
                    self._out.popleft()
                else:
                    self._out[0] = memoryview(part)[sent:]
                    return
        if self.loop is not None:
            self.loop.set_writer(self.fd, None)

    def flush_blocking(self, timeout_s: float = 30.0) -> None:
        """Send everything queued, blocking (used right before a process exits)."""
        if not self._out or self.closed:
            return
        self.sock.settimeout(timeout_s)
        try:
            while self._out:
                part = self._out.popleft()
                self.sock.sendall(part)
        except OSError:
            pass

    def read(self) -> list:
        """Complete messages received so far (each a list of frames); sets ``eof`` at EOF."""
        messages: list = []
        while True:
            if self._big is not None:
                view = memoryview(self._big)[self._big_filled:]
                try:
                    n = self.sock.recv_into(view)
                except BlockingIOError:
                    return messages
                except OSError:
                    n = 0
                if n == 0:
                    self.eof = True
                    return messages
                self._big_filled += n
                if self._big_filled == len(self._big):
                    self._frames.append(self._big)
                    self._big = None
                    self._parse(messages)
                continue
            try:
                # Into a reused buffer: recv(n) would allocate (and fault in) n fresh bytes each call.
                n = self.sock.recv_into(self._chunk)
            except BlockingIOError:
                return messages
            except OSError:
                n = 0
            if not n:
                self.eof = True
                return messages
            self._inbuf += self._chunk_view[:n]
            self._parse(messages)
            if n < _RECV_CHUNK and self._big is None:
                return messages

    def _parse(self, messages: list) -> None:
        """Move the complete messages in ``_inbuf`` to ``messages``; keep a partial one's state."""
        buf = self._inbuf
        end = len(buf)
        pos = 0
        frames, lengths = self._frames, self._lengths
        while True:
            if lengths is None:
                if end - pos < 4:
                    break
                (count,) = _COUNT.unpack_from(buf, pos)
                if end - pos < 4 + 8 * count:
                    break
                lengths = _lengths(count).unpack_from(buf, pos + 4)
                frames = []
                pos += 4 + 8 * count
            for n in lengths[len(frames):]:
                have = end - pos
                if have < n:
                    self._frames, self._lengths = frames, lengths
                    if n >= _BIG_FRAME:  # receive the rest of a big frame straight into its own buffer
                        self._big = bytearray(n)
                        self._big[:have] = buf[pos:]
                        self._big_filled = have
                        pos = end
                    del buf[:pos]
                    return
                frames.append(bytes(buf[pos:pos + n]))
                pos += n
            messages.append(frames)
            frames, lengths = [], None
        self._frames, self._lengths = frames, lengths
        del buf[:pos]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.loop is not None:
            self.loop.set_writer(self.fd, None)
            self.loop.remove_reader(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass


pickle_buffer_type = pickle.PickleBuffer


def listen_unix(path: str):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
