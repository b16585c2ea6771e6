"""CURVE + ZAP + hello: only token holders get in, and failures are fast and clear."""

import socket
import threading
import time

import pytest

from farpool._private import protocol, transport
from farpool.exceptions import AuthenticationError


class EchoServer:
    """A CURVE ROUTER with the ZAP handler, answering Ping with Pong, on its own thread."""

    def __init__(self, token):
        self.token = token
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        loop = transport.EventLoop()
        zap = transport.ZapHandler(self.token)
        sock = transport.router()
        transport.make_curve_server(sock, self.token)
        self.port = transport.bind_tcp(sock, "127.0.0.1")
        self.bad = 0

        def on_msg():
            for frames in transport.recv_all(sock):
                try:
                    tag, fields, _ = protocol.decode(frames[1:])
                except protocol.ProtocolError:
                    self.bad += 1
                    continue
                transport.send(sock, [frames[0], *protocol.encode("Pong", fields)])
        loop.add_reader(zap.socket, zap.handle)
        loop.add_reader(sock, on_msg)
        self.ready.set()
        while not self.stop.is_set():
            loop.run_once(0.05)
        sock.close(0)
        zap.close()
        loop.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = EchoServer("right-token")
    yield srv
    srv.close()


def test_token_holder_gets_in(server):
    sock = transport.dealer()
    try:
        reply = transport.connect_tcp(sock, f"127.0.0.1:{server.port}", "right-token",
                                      protocol.encode("Ping", (1,)), deadline_s=5)
        assert protocol.decode(reply)[:2] == ("Pong", (1,))
    finally:
        sock.close(0)


def test_wrong_token_is_an_authentication_error_within_seconds(server):
    sock = transport.dealer()
    start = time.monotonic()
    try:
        with pytest.raises(AuthenticationError, match="token is wrong"):
            transport.connect_tcp(sock, f"127.0.0.1:{server.port}", "wrong-token",
                                  protocol.encode("Ping", (1,)), deadline_s=5)
    finally:
        sock.close(0)
    assert time.monotonic() - start < 5  # not an endless silent retry


def test_nothing_listening_is_a_connection_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nobody listens on
    sock = transport.dealer()
    try:
        with pytest.raises(ConnectionError, match="nothing answered"):
            transport.connect_tcp(sock, f"127.0.0.1:{port}", "t", protocol.encode("Ping", ()), deadline_s=1)
    finally:
        sock.close(0)


def test_raw_garbage_on_the_port_does_not_hurt_the_server(server):
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 8)
    raw.close()
    sock = transport.dealer()
    try:
        reply = transport.connect_tcp(sock, f"127.0.0.1:{server.port}", "right-token",
                                      protocol.encode("Ping", (2,)), deadline_s=5)
        assert protocol.decode(reply)[1] == (2,)
    finally:
        sock.close(0)


def test_event_loop_timers_and_cross_thread_calls():
    loop = transport.EventLoop()
    seen = []
    loop.call_later(0.01, seen.append, "timer")
    cancelled = loop.call_later(0.0, seen.append, "cancelled")
    loop.cancel_timer(cancelled)
    t = threading.Thread(target=lambda: loop.call_soon(seen.append, "soon"))
    t.start()
    t.join()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        loop.run_once(0.1)
    loop.close()
    assert sorted(seen) == ["soon", "timer"]


def _wait(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting after {timeout}s for {what}"
        time.sleep(0.01)


def test_a_closed_connection_is_seen_and_a_reconnect_under_the_same_identity_is_reachable():
    """The pieces the node agent notices dead TCP clients with (node._check_tcp_clients)."""
    token = "t" * 32
    zap = transport.ZapHandler(token)
    server = transport.router()
    transport.make_curve_server(server, token)
    port = transport.bind_tcp(server, "127.0.0.1")
    watch = transport.DisconnectWatch(server)
    probe = protocol.encode("Probe", ())
    clients = []
    try:
        def join():
            sock = transport.dealer(b"c:one")
            clients.append(sock)
            transport.start_tcp(sock, f"127.0.0.1:{port}", token, protocol.encode("Ping", ()))

            def arrived():
                zap.handle()
                return server.poll(10) and server.recv_multipart()[0] == b"c:one"
            _wait(arrived, "the client's hello")
            return sock

        first = join()
        assert transport.reachable(server, b"c:one", probe)
        first.close(0)
        closed = [0]
        _wait(lambda: closed.__setitem__(0, closed[0] + watch.read()) or closed[0] >= 1, "the close event")
        _wait(lambda: not transport.reachable(server, b"c:one", probe), "the identity to be unreachable")
        join()  # zmq's reconnect looks the same to the server: a new connection, the same identity
        assert transport.reachable(server, b"c:one", probe)
    finally:
        for sock in clients:
            sock.close(0)
        watch.close()
        server.close(0)
        zap.close()
