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


# --- lending a file descriptor to another thread (EventLoop.lend / run_here) -----------------------

class LoopThread:
    """An EventLoop running on its own thread, with one socket pair whose read end is
    lendable; ``handled`` records the thread each read ran on."""

    def __init__(self):
        self.loop = transport.EventLoop()
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.handled = []
        self.loop.add_reader(self.ours.fileno(), self._on_readable, lendable=True)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def _on_readable(self):
        try:
            data = self.ours.recv(100)
        except BlockingIOError:
            return
        self.handled.append((threading.get_ident(), data))

    def on_loop(self, fn, *args):
        """fn(*args) run by the loop thread; its result."""
        went, out = threading.Event(), []
        self.loop.call_soon(lambda: (out.append(fn(*args)), went.set()))
        assert went.wait(10), "the loop thread did not run its calls"
        return out[0]

    def turn(self):
        """Return once the loop thread has run a whole iteration after this call."""
        for _ in range(2):
            went = threading.Event()
            self.loop.call_soon(went.set)
            assert went.wait(10), "the loop thread did not run its calls"

    def close(self):
        self.loop.stop()
        self.thread.join(10)
        self.loop.close()
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def looping():
    lt = LoopThread()
    yield lt
    lt.close()


def test_a_lent_fd_is_not_read_by_the_loop_thread_until_it_comes_back(looping):
    lt = looping
    fd = lt.ours.fileno()
    assert lt.on_loop(lt.loop.lend, fd)
    assert not lt.on_loop(lt.loop.lend, fd), "lent twice"
    lt.theirs.send(b"one")  # while the loop thread sleeps in a poll that began before the lend
    lt.turn()
    assert lt.handled == []
    lt.on_loop(lt.loop.unlend, fd)
    lt.turn()  # readable all along: the loop thread reads it now
    assert lt.handled == [(lt.thread.ident, b"one")]


def test_serve_runs_the_handler_and_its_calls_on_the_calling_thread(looping):
    lt = looping
    fd = lt.ours.fileno()
    seen = {}

    def on_readable():
        seen["in_loop"] = lt.loop.in_loop_thread()
        lt.loop.call_soon(lambda: seen.setdefault("call", threading.get_ident()))
        lt.loop.call_last(lambda: seen.setdefault("last", threading.get_ident()))
        lt._on_readable()

    lt.loop._handlers[fd] = on_readable
    assert lt.on_loop(lt.loop.lend, fd)
    lt.theirs.send(b"two")
    assert lt.loop.run_here(lt.loop.serve_now, fd, block=True)
    me = threading.get_ident()
    assert lt.handled == [(me, b"two")]
    assert seen == {"in_loop": True, "call": me, "last": me}
    assert not lt.loop.in_loop_thread()
    lt.on_loop(lt.loop.unlend, fd)


def test_a_timer_set_by_serve_wakes_the_sleeping_loop_thread(looping):
    """The loop thread sleeps with no timer (a poll without a timeout): a timer that a
    handler run by run_here() sets must wake it, or it would never fire."""
    lt = looping
    fd = lt.ours.fileno()
    lt.turn()
    fired = threading.Event()

    def on_readable():
        lt._on_readable()
        lt.loop.call_later(0.01, fired.set)

    lt.loop._handlers[fd] = on_readable
    assert lt.on_loop(lt.loop.lend, fd)
    lt.theirs.send(b"three")
    assert lt.loop.run_here(lt.loop.serve_now, fd, block=True)
    assert fired.wait(10), "the timer set in run_here() never fired"


def test_nothing_from_a_user_thread_waits_for_a_busy_loop_thread(looping):
    """run_here gives up at once while the loop thread runs a handler (a loop kept
    busy by a stream of results would otherwise starve a waiting caller)."""
    lt = looping
    inside, leave = threading.Event(), threading.Event()
    lt.loop.call_soon(lambda: (inside.set(), leave.wait(10)))
    assert inside.wait(10)
    try:
        assert not lt.loop.run_here(lambda: None)
        assert not lt.loop.run_here(lt.loop.serve_now, lt.ours.fileno())
    finally:
        leave.set()
    lt.turn()


def test_a_lent_fd_still_gets_its_writer_called(looping):
    """Output queued on a lent stream is still flushed by the loop thread (a caller waits on
    the reply to a task whose bytes the kernel has not all taken yet)."""
    lt = looping
    fd = lt.ours.fileno()
    wrote = threading.Event()

    def on_writable():
        lt.loop.set_writer(fd, None)
        wrote.set()

    assert lt.on_loop(lt.loop.lend, fd)
    lt.loop.call_soon(lt.loop.set_writer, fd, on_writable)
    assert wrote.wait(10), "the writer of a lent fd was not called"
    lt.on_loop(lt.loop.unlend, fd)


def test_a_zmq_send_from_a_user_thread_running_the_loops_work_goes_from_the_loop_thread(looping):
    """zmq sockets are the loop thread's alone (it sits in a poll on them): a send made by a
    user thread in run_here is left to that thread, which is woken to make it."""
    lt = looping
    ctx = transport.context()
    sender, receiver = ctx.socket(transport.zmq.PAIR), ctx.socket(transport.zmq.PAIR)
    receiver.bind("inproc://lent-send")
    sender.connect("inproc://lent-send")
    lt.on_loop(lt.loop.add_reader, sender, lambda: None)  # the loop thread polls it from now on
    left = []

    def in_loop_work():
        assert transport.send(sender, [b"hello"])
        left.append(len(lt.loop._own))

    try:
        assert lt.loop.run_here(in_loop_work, block=True)
        assert left == [1], "the send was made on the user thread"
        assert receiver.poll(10_000), "the loop thread never sent it"
        assert receiver.recv_multipart() == [b"hello"]
    finally:
        lt.on_loop(lt.loop.remove_reader, sender)
        sender.close(0)
        receiver.close(0)
