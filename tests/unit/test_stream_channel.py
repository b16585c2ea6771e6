"""The same-machine framed stream: message boundaries, big frames, backpressure, EOF."""

import socket

import numpy as np

from farpool._private import transport, unix_streams


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = transport.EventLoop()
    return loop, unix_streams.StreamChannel(a, loop), unix_streams.StreamChannel(b, loop)


def pump(loop, channel, want, out):
    loop.add_reader(channel.fd, lambda: out.extend(channel.read()))
    for _ in range(10_000):
        if len(out) >= want:
            return
        loop.run_once(1.0)
    raise AssertionError(f"got {len(out)} of {want} messages")


def test_boundaries_and_empty_frames():
    loop, a, b = pair()
    out = []
    a.send([b"one", b""])
    a.send([b"two"])
    a.send([b"x" * 10, b"y" * 20, b"z"])
    pump(loop, b, 3, out)
    assert out == [[b"one", b""], [b"two"], [b"x" * 10, b"y" * 20, b"z"]]


def test_big_frames_and_backpressure_lose_nothing():
    loop, a, b = pair()
    big = np.random.default_rng(0).integers(0, 255, 20_000_000, dtype=np.uint8)
    for i in range(3):  # far more than the kernel buffer: the rest is queued and flushed
        a.send([b"big", str(i).encode(), big.data])
    a.send([b"end"])
    out = []
    pump(loop, b, 4, out)
    for i in range(3):
        assert out[i][:2] == [b"big", str(i).encode()]
        np.testing.assert_array_equal(np.frombuffer(out[i][2], dtype=np.uint8), big)
    assert out[3] == [b"end"]


def test_eof_is_reported():
    loop, a, b = pair()
    a.send([b"last"])
    a.close()
    out = []
    pump(loop, b, 1, out)
    while not b.eof:
        out.extend(b.read())
    assert out == [[b"last"]] and b.eof


def test_messages_arriving_a_few_bytes_at_a_time_come_out_whole():
    """The parser keeps a message's state across reads: its header, its frames so far, and a big
    frame begun in one read; frames of every kind the senders pass (bytes, bytearray, a numpy
    array's memory, a PickleBuffer)."""
    import pickle

    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b = unix_streams.StreamChannel(theirs)
    big = np.arange(unix_streams._BIG_FRAME // 8 + 3, dtype=np.int64)
    sent = [
        [b"tag", b""],
        [bytearray(b"abc"), memoryview(np.arange(5, dtype=np.int32))],
        [b"big", pickle.PickleBuffer(big)],
        [b"x" * 7] * 9,
        [],
    ]
    import struct

    def wire(message):  # "!I" frame count, "!Q" per frame length, then the frames
        frames = [memoryview(f).cast("B") if not isinstance(f, pickle.PickleBuffer) else f.raw() for f in message]
        return struct.pack(f"!I{len(frames)}Q", len(frames), *(f.nbytes for f in frames)) + \
            b"".join(bytes(f) for f in frames)

    stream = b"".join(wire(m) for m in sent)
    out, pos, step = [], 0, 1
    while pos < len(stream):
        piece = stream[pos:pos + step]
        raw.sendall(piece)
        pos += len(piece)
        step = step * 3 % 100_003 + 1  # 1, 4, 13, 40, ... bytes: cuts fall everywhere
        while True:
            got = b.read()
            out.extend(got)
            if not got:
                break
    assert [[bytes(f) for f in m] for m in out] == [
        [b"tag", b""],
        [b"abc", np.arange(5, dtype=np.int32).tobytes()],
        [b"big", big.tobytes()],
        [b"x" * 7] * 9,
        [],
    ]
    raw.close()
    b.close()
