"""Large messages over TCP in pieces (fragments.py) and back, alone and through real CURVE sockets."""

import os
import time

import pytest

from farpool._private import fragments, transport


def test_small_messages_are_not_split():
    assert not fragments.needs_split([b"Tag", b"x" * 100, memoryview(bytes(fragments.SPLIT_ABOVE))])
    assert fragments.needs_split([b"Tag", b"", bytearray(fragments.SPLIT_ABOVE + 1)])


@pytest.mark.parametrize("copy", [True, False])
def test_a_split_message_comes_back_whole_in_order(copy):
    big = os.urandom(3 * 1000 + 7)
    message = [b"Tag", b"header", big, b"", memoryview(big)[:1000]]
    pieces = fragments.split(message, piece=1000)
    assert len(pieces) == 2 + 4 + 1 + 1 and all(fragments.is_fragment(p) for p in pieces)
    r = fragments.Reassembler()
    got = [r.feed("peer", p[1], p[2] if copy else memoryview(p[2]), copy) for p in pieces]  # (as recv_all does)
    assert got[:-1] == [None] * (len(pieces) - 1)
    assert [bytes(f) for f in got[-1]] == [b"Tag", b"header", big, b"", big[:1000]]
    kinds = [type(f) for f in got[-1]]
    assert kinds == ([bytes, bytes, bytearray, bytes, bytes] if copy else [memoryview] * 5)
    assert r.partial == {}


def test_peers_interleave_and_a_cut_message_is_dropped_for_the_next():
    r = fragments.Reassembler()
    one = fragments.split([b"A", b"1" * 2500], piece=1000)
    two = fragments.split([b"B", b"2" * 2500], piece=1000)
    cut = fragments.split([b"C", b"3" * 2500], piece=1000)
    out = {}
    for a, b in zip(one, two):
        for peer, p in (("p1", a), ("p2", b)):
            whole = r.feed(peer, p[1], p[2], True)
            if whole:
                out[peer] = whole
    assert out == {"p1": [b"A", b"1" * 2500], "p2": [b"B", b"2" * 2500]}
    for p in cut[:2]:  # its connection was replaced midway: the rest never comes
        assert r.feed("p1", p[1], p[2], True) is None
    again = fragments.split([b"D", b"4" * 2500], piece=1000)
    results = [r.feed("p1", p[1], p[2], True) for p in again]
    assert results[-1] == [b"D", b"4" * 2500] and r.dropped == 1
    assert r.feed("p1", cut[3][1], cut[3][2], True) is None  # a piece without its start: ignored


def test_a_big_message_crosses_a_curve_connection_in_pieces_both_ways():
    token = "fragments-test"
    server = transport.router()
    transport.make_curve_server(server, token)
    zap = transport.ZapHandler(token)
    port = transport.bind_tcp(server, "127.0.0.1", 0)
    client = transport.dealer(b"c:frag")
    transport.make_curve_client(client, token)
    client.connect(f"tcp://127.0.0.1:{port}")
    big = os.urandom(fragments.SPLIT_ABOVE + 12345)
    try:
        assert transport.send(client, [b"Tag", b"head", big])

        def receive(sock, copy, n_frames):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                zap.handle()
                if sock.poll(50):
                    for frames in transport.recv_all(sock, copy=copy):
                        assert len(frames) == n_frames
                        return frames
            raise AssertionError("nothing arrived")
        frames = receive(server, True, 4)
        assert frames[0] == b"c:frag" and frames[1:] == [b"Tag", b"head", big]
        assert transport.send(server, [b"c:frag", b"Reply", memoryview(big)])
        frames = receive(client, False, 2)
        assert frames[0].bytes == b"Reply" and frames[1].buffer == big
    finally:
        client.close(0)
        server.close(0)
        zap.close()
