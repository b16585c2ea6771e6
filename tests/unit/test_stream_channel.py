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
