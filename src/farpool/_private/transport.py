"""The only module that imports zmq: sockets, CURVE and ZAP, and the event loop.

Every long-lived loop in farpool (head, node agent, worker, the client's I/O
thread) is an ``EventLoop``: one ``zmq.Poller`` over its sockets, a wake-up
eventfd for work handed over by other threads, plain fds (lifelines, launcher
pipes) and a timer heap that sets the poll timeout.  Nothing polls on a clock::

    other threads --call_soon()--> deque + eventfd --+
    sockets / fds --------------------------------+--> poll(timeout from timer heap)
    timers (heap) ---------------------------------+          |
                                                           handlers

TCP endpoints are protected by CURVE.  Both key pairs are derived from the
cluster token, and the server's ZAP handler admits only clients presenting the
token's client key, so only token holders connect.  A client then completes an
application ``Hello`` with a deadline, watching the socket monitor so that a
wrong token (handshake refused) and a wrong address (nothing answers) fail fast
with different errors instead of zmq's silent endless reconnect.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque

import zmq
import struct
from zmq.utils import z85

from farpool._private import fragments
from farpool.exceptions import AuthenticationError

log = logging.getLogger(__name__)

# How long a client waits for the application hello of a TCP peer before it
# calls the address wrong.  Shorter fails faster on typos, longer tolerates a
# loaded head.
HELLO_DEADLINE_S = float(os.environ.get("FARPOOL_HELLO_DEADLINE_S", "5"))
# Most messages in flight queued per peer before zmq blocks/drops; large
# because the task path batches.
HWM = 100_000
# ZMTP heartbeats on every TCP connection (both ends): a peer whose zmq stops answering
# (its machine crashed, the network was cut: no FIN or RST ever comes) has its
# connection closed after HEARTBEAT_TIMEOUT_MS, as a killed process's is at once by its
# kernel.  Shorter notices a lost peer sooner; longer tolerates a peer's machine stalled
# (swapping) without dropping its connection and the messages queued on it.  zmq
# reconnects a closed connection by itself.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 6000
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

_context: zmq.Context | None = None
_context_pid: int | None = None


def context() -> zmq.Context:
    """This process's zmq context (a fresh one after fork)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.Context()
        _context.setsockopt(zmq.LINGER, 0)
        _context.set(zmq.MAX_SOCKETS, 8192)
        _context_pid = os.getpid()
    return _context


def term_context() -> None:
    global _context
    if _context is not None and _context_pid == os.getpid():
        _context.destroy(linger=0)
    _context = None


def forget_context_after_fork() -> None:
    """In a forked child: drop the parent's context without touching it."""
    global _context, _context_pid
    _context = None
    _context_pid = None


# --- keys -------------------------------------------------------------------

def _keypair(token: str, role: str) -> tuple[bytes, bytes]:
    import hashlib  # (here: OpenSSL costs about 4 MB in processes that never use TCP)
    secret = hashlib.sha256(f"farpool-curve-{role}:{token}".encode()).digest()
    secret_z85 = z85.encode(secret)
    return zmq.curve_public(secret_z85), secret_z85


def server_keys(token: str) -> tuple[bytes, bytes]:
    return _keypair(token, "server")


def client_keys(token: str) -> tuple[bytes, bytes]:
    return _keypair(token, "client")


# --- sockets ----------------------------------------------------------------

def router(identity: bytes | None = None) -> zmq.Socket:
    sock = context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A peer that reconnects with the same identity takes over its old pipe;
    # without this, replies would go to the dead pipe and be lost.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def dealer(identity: bytes | None = None) -> zmq.Socket:
    sock = context().socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def make_curve_server(sock: zmq.Socket, token: str) -> None:
    public, secret = server_keys(token)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"farpool")
    _heartbeats(sock)


def make_curve_client(sock: zmq.Socket, token: str) -> None:
    server_public, _ = server_keys(token)
    public, secret = client_keys(token)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    _heartbeats(sock)


def _heartbeats(sock: zmq.Socket) -> None:
    """Ping the peer every HEARTBEAT_IVL_MS; close the connection when it has sent nothing
    for HEARTBEAT_TIMEOUT_MS after a ping, and ask it (TTL) to do the same of us."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


class DisconnectWatch:
    """Tells that connections of a (ROUTER) socket closed, not whose: a socket monitor.

    zmq's ROUTER_NOTIFY would name the peer, but it is a draft API that the libzmq in
    pyzmq's wheels is built without (setting it fails with EINVAL).  Whose connection is
    down is learnt by ``reachable``.  ``socket`` goes in the owner's event loop;
    ``read`` drains it and returns how many connections closed.
    """

    def __init__(self, sock: zmq.Socket):
        self._watched = sock
        self.socket = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def read(self) -> int:
        closed = 0
        for frames in recv_all(self.socket):
            if struct.unpack("=hi", frames[0][:6])[0] == zmq.EVENT_DISCONNECTED:
                closed += 1
        return closed

    def close(self) -> None:
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(0)


def reachable(sock: zmq.Socket, identity: bytes, frames: list) -> bool:
    """Send ``frames`` to ``identity`` on a ROUTER (with ROUTER_MANDATORY): False when no
    connection of that identity is up, so it could not be sent.  A connection whose queue
    is full (EAGAIN) is up."""
    try:
        sock.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        if exc.errno == zmq.EAGAIN:
            return True
        raise
    return True


def bind_tcp(sock: zmq.Socket, host: str, port: int = 0) -> int:
    """Bind to host:port (0: any free port, no race) and return the bound port.

    Raises OSError that says what to do when the port is taken or the host is not ours."""
    try:
        sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"port {port} on {host} is already in use (by another farpool "
                                     "cluster or another program); choose another port, or leave the "
                                     "port out to get a free one") from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EINVAL):
            raise OSError(exc.errno, f"cannot listen on {host}: it is not an address of this machine "
                                     f"({exc.strerror}); give one of its addresses (`ip addr`), or "
                                     "0.0.0.0 for all of them") from None
        raise
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    return int(endpoint.rsplit(":", 1)[1])


class ZapHandler:
    """Answers ZAP requests in the owner's event loop: admit only the token's client key."""

    def __init__(self, token: str):
        self._allowed = z85.decode(client_keys(token)[0])
        self.socket = context().socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def handle(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            key = frames[6] if len(frames) > 6 else b""
            ok = mechanism == b"CURVE" and key == self._allowed
            if not ok:
                log.warning("refused a connection from %s: it does not hold the cluster token",
                            address.decode(errors="replace"))
            self.socket.send_multipart([
                version, request_id,
                b"200" if ok else b"400",
                b"OK" if ok else b"not a holder of the cluster token",
                b"farpool" if ok else b"", b""])

    def close(self) -> None:
        self.socket.close(0)


def connect_tcp(sock: zmq.Socket, address: str, token: str, hello: list,
                deadline_s: float | None = None) -> list:
    """Connect a DEALER to a CURVE endpoint and complete the application hello.

    Sends ``hello`` (frames), waits for one reply and returns its frames.
    Raises AuthenticationError when the peer refuses our token, and
    ConnectionError when nothing answers within the deadline.
    """
    deadline_s = HELLO_DEADLINE_S if deadline_s is None else deadline_s
    make_curve_client(sock, token)
    monitor = sock.get_monitor_socket(
        zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
    try:
        sock.connect(f"tcp://{address}")
        sock.send_multipart(hello)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        end = time.monotonic() + deadline_s
        connected = handshake_failed = False
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            events = dict(poller.poll(remaining * 1000))
            if sock in events:
                return sock.recv_multipart(copy=True)
            if monitor in events:
                event = struct.unpack("=hi", monitor.recv_multipart()[0][:6])[0]
                if event == zmq.EVENT_CONNECTED:
                    connected = True
                elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                               zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                    handshake_failed = True
                    break
                elif event == zmq.EVENT_DISCONNECTED and connected:
                    # A CURVE server that cannot decrypt our hello drops the connection.
                    handshake_failed = True
                    break
        if handshake_failed:
            raise AuthenticationError(
                f"the farpool cluster at {address} refused our credentials: the cluster token "
                "is wrong. Use the token printed by `farpool start --head` (FARPOOL_TOKEN, "
                "--token-file, or init(token=...)).")
        if connected:
            raise ConnectionError(
                f"something accepted a connection at {address} but did not answer as a farpool "
                f"head or node within {deadline_s:.0f} s; check the address and port.")
        raise ConnectionError(
            f"nothing answered at {address} within {deadline_s:.0f} s: no farpool cluster "
            "listens there. Check the address and port printed by `farpool start --head`, "
            "and that the head is running (`farpool status`).")
    finally:
        sock.disable_monitor()
        monitor.close(0)


def start_tcp(sock: zmq.Socket, address: str, token: str, hello: list) -> None:
    """Connect a DEALER to a CURVE endpoint and queue ``hello`` without waiting.

    For an event loop that must not block: what is sent next queues behind the
    hello until the connection is up.  The caller waits for the answer to the
    hello on its loop and gives up after ``HELLO_DEADLINE_S`` (zmq itself would
    retry an unreachable address forever).
    """
    make_curve_client(sock, token)
    sock.connect(f"tcp://{address}")
    send(sock, hello)


# --- event loop -------------------------------------------------------------

# Plain ints: pyzmq's flags are enum members, and enum arithmetic costs microseconds
# per test on the loop's hottest line.
_POLLIN, _POLLOUT, _POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)
_READABLE = _POLLIN | _POLLERR
_EPOLLOUT = 0x004  # select.EPOLLOUT
_EPOLL_READABLE = 0x001 | 0x008 | 0x010  # EPOLLIN | EPOLLERR | EPOLLHUP

class EventLoop:
    """One poller over sockets and fds, a timer heap and a cross-thread wake-up.

    Owned by one thread, which runs every handler, timer and call.  Other threads may
    ``call_soon``/``call_soon_lazy``, and a user thread may run the loop's work itself
    for a moment (``run_here``), holding the loop (``_owner``, which the loop thread lets go
    only while it sleeps in its poll): this is how a caller waiting on a task reads the
    worker's reply without waking the loop thread first.

    Lending: a file descriptor added with ``lendable=True`` is watched through an epoll set
    that the poller watches (epoll's interest list changes take effect in a poll already
    under way, zmq's poller's do not).  ``lend(fd)`` stops the loop thread from seeing it
    readable until ``unlend(fd)``: meanwhile the borrowing thread polls it itself and runs
    its handler through ``run_here(serve_now, fd)``.  A lent fd's writer (queued output) is still served.
    Nothing a user thread does here waits for a busy loop thread (``run_here`` gives up at
    once: that thread is awake then, and does the work itself), so a
    loop kept busy by a stream of results cannot starve them.  zmq sockets stay the loop
    thread's alone (libzmq's rule: the loop thread sits in a poll on them meanwhile):
    what a user thread running the loop's work sends or closes on one is left to the loop
    thread (``on_loop_thread``; ``send`` does it by itself), which is woken for it.
    """

    def __init__(self):
        self._poller = zmq.Poller()
        self._handlers: dict = {}
        self._writers: dict = {}
        self._timers: list = []
        self._timer_seq = itertools.count()
        self._calls: deque = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._armed = False  # a wake-up is pending; others need not write again
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._handlers[self._wake_fd] = self._on_wake
        self.running = False
        self._thread_id = None  # the thread running handlers now (the loop's, or one in run_here)
        self._last: list = []   # see call_last
        self._owner = threading.Lock()  # held by whoever runs handlers (released in the poll)
        self._deadline = None   # when the loop thread's poll under way times out (None: never)
        self._poll_changed = False  # the poller's set changed since the loop thread's poll began
        self._epoll = None      # lendable fds (select.epoll, made at the first)
        self._lent: set = set()
        self._own: deque = deque()  # what a user thread running our work left to our thread

    def add_reader(self, sock_or_fd, handler, lendable: bool = False) -> None:
        self._handlers[sock_or_fd] = handler
        if lendable:
            if self._epoll is None:
                import select
                self._epoll = select.epoll()
                self._poller.register(self._epoll.fileno(), zmq.POLLIN)
                self._handlers[self._epoll.fileno()] = self._on_epoll
                self._poll_changed = True
            self._epoll.register(sock_or_fd, self._epoll_mask(sock_or_fd))
            return
        self._poller.register(sock_or_fd, zmq.POLLIN | (zmq.POLLOUT if sock_or_fd in self._writers else 0))
        self._poll_changed = True

    def _lendable(self, fd) -> bool:
        return self._epoll is not None and isinstance(fd, int) and fd in self._handlers and \
            fd != self._epoll.fileno() and fd not in self._poller

    def _epoll_mask(self, fd) -> int:
        import select
        return (0 if fd in self._lent else select.EPOLLIN) | (select.EPOLLOUT if fd in self._writers else 0)

    def remove_reader(self, sock_or_fd) -> None:
        self._writers.pop(sock_or_fd, None)
        if sock_or_fd not in self._handlers:
            return
        if self._lendable(sock_or_fd):
            self._lent.discard(sock_or_fd)
            try:
                self._epoll.unregister(sock_or_fd)
            except (OSError, ValueError):  # closed already: the kernel dropped it
                pass
        else:
            self._poller.unregister(sock_or_fd)
            self._poll_changed = True
        del self._handlers[sock_or_fd]

    def set_writer(self, fd: int, handler) -> None:
        """Call handler when fd is writable (None: stop watching for that)."""
        if handler is None:
            if self._writers.pop(fd, None) is None or fd not in self._handlers:
                return
        else:
            self._writers[fd] = handler
        if self._lendable(fd):
            self._epoll.modify(fd, self._epoll_mask(fd))
        elif handler is not None:
            self._poller.register(fd, zmq.POLLIN | zmq.POLLOUT)
            self._poll_changed = True
        elif fd in self._handlers:
            self._poller.register(fd, zmq.POLLIN)
            self._poll_changed = True

    def lend(self, fd: int) -> bool:
        """(as the loop: its thread, or in ``run_here``) The loop thread stops watching the
        lendable ``fd`` for reading, at once, even in a poll under way; False when it is not a
        lendable fd of this loop or lent already."""
        if not self._lendable(fd) or fd in self._lent:
            return False
        self._lent.add(fd)
        self._epoll.modify(fd, self._epoll_mask(fd))
        return True

    def unlend(self, fd: int) -> None:
        """(as the loop) The loop thread watches ``fd`` again."""
        if fd in self._lent:
            self._lent.discard(fd)
            if fd in self._handlers:
                self._epoll.modify(fd, self._epoll_mask(fd))

    def serve_now(self, fd) -> None:
        """(as the loop: in ``run_here`` from a user thread, on its lent ``fd`` found readable)
        Run ``fd``'s handler."""
        handler = self._handlers.get(fd)
        if handler is not None:
            handler()

    def run_here(self, fn, *args, block: bool = False) -> bool:
        """From a user thread: run fn(*args) now, as the loop thread would, if the loop thread
        sleeps in its poll; False (nothing run) if it is busy: hand the work over then
        (``block``: wait for it instead, for tests)."""
        if not self.running or not self._owner.acquire(blocking=block):
            return False
        try:
            self._as_loop(fn, args)
        finally:
            self._owner.release()
        return True

    def _as_loop(self, fn, args) -> None:
        """(holding the loop) fn(*args) and the calls and last calls it queues, on this thread;
        then the loop thread is woken only if it must be sooner than it would wake (a timer
        due earlier, a socket to watch)."""
        loop_thread, self._thread_id = self._thread_id, threading.get_ident()
        outer, _borrower.loop = _borrower.loop, self
        try:
            if self._calls:  # (calls queued before go first, as in run_once)
                self._drain_calls()
            fn(*args)
            if self._calls:
                self._drain_calls()
            if self._last:
                self._run_last()
        finally:
            _borrower.loop = outer
            self._thread_id = loop_thread
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
        if self._own or self._poll_changed or (timers and (self._deadline is None or timers[0][0] < self._deadline)):
            self.wake()

    def on_loop_thread(self, fn, *args) -> None:
        """fn(*args) on this loop's own thread: now if this is it, else (a user thread running
        its work) as soon as it wakes.  For zmq sockets, which are that thread's alone."""
        if _borrower.loop is self:
            self._own.append((fn, args))
        else:
            fn(*args)

    def call_later(self, delay_s: float, fn, *args) -> list:
        """Run fn(*args) on the loop after delay_s; returns a handle for cancel_timer."""
        entry = [time.monotonic() + delay_s, next(self._timer_seq), fn, args]
        heapq.heappush(self._timers, entry)
        return entry

    @staticmethod
    def cancel_timer(entry: list | None) -> None:
        if entry is not None:
            entry[2] = None

    def call_soon(self, fn, *args) -> None:
        """Thread-safe: run fn(*args) on the loop thread soon."""
        self._calls.append((fn, args))
        # The loop thread itself drains calls before it sleeps: no wake-up needed (and the
        # write would give the GIL away mid-handler).
        if not self._armed and threading.get_ident() != self._thread_id:
            self._armed = True
            os.eventfd_write(self._wake_fd, 1)

    def in_loop_thread(self) -> bool:
        """True in the thread running the loop's handlers now (the loop's, or one in run_here)."""
        return threading.get_ident() == self._thread_id

    def call_last(self, fn, *args) -> None:
        """Loop thread only: run fn(*args) at the end of this iteration, just before the loop
        sleeps.  For calls that wake other threads: they need the GIL this thread holds
        until it sleeps, so whatever the loop still does after the wake-up delays them."""
        self._last.append((fn, args))

    def call_soon_lazy(self, fn, *args) -> None:
        """Thread-safe: run fn(*args) on the loop thread before it handles the next socket
        event, without waking it (whatever that event is will)."""
        self._calls.append((fn, args))

    def wake(self) -> None:
        if not self._armed:
            self._armed = True
            os.eventfd_write(self._wake_fd, 1)

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        self._armed = False
        self._drain_calls()

    def _on_epoll(self) -> None:
        self._dispatch(self._epoll.poll(0), _EPOLLOUT, _EPOLL_READABLE)

    def _dispatch(self, ready, writable: int, readable: int) -> None:
        """Writers, then readers, of the (fd or socket, events) pairs ``ready``."""
        for sock_or_fd, events in ready:
            if events & writable:
                writer = self._writers.get(sock_or_fd)
                if writer is not None:
                    writer()
            if events & readable:
                handler = self._handlers.get(sock_or_fd)
                if handler is not None:
                    handler()

    def _drain_calls(self) -> None:
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            fn(*args)

    def _run_last(self) -> None:
        while self._last:
            last, self._last = self._last, []
            for fn, args in last:
                fn(*args)
            if self._calls:
                self._drain_calls()

    def run_once(self, max_wait_s: float | None = None) -> None:
        """One iteration: due timers, a poll, handlers, calls, last calls (from the loop's
        handlers, as a stream's producer does while it waits, or alone, as tests do)."""
        if self._thread_id == threading.get_ident():  # (a handler of ours: we hold the loop)
            self._iterate(max_wait_s)
            return
        with self._owner:
            self._thread_id = threading.get_ident()
            try:
                self._iterate(max_wait_s)
            finally:
                self._thread_id = None

    def _iterate(self, max_wait_s: float | None) -> None:
        """run_once, holding the loop; its poll lets go of it."""
        timeout = None
        timers = self._timers
        if timers:
            now = time.monotonic()
            while timers and (timers[0][2] is None or timers[0][0] <= now):
                entry = heapq.heappop(timers)
                if entry[2] is not None:
                    entry[2](*entry[3])
                now = time.monotonic()
            if timers:
                # In whole milliseconds, rounded up: zmq's poll truncates, and a timer due in
                # 0.4 ms would make it return at once, again and again until then (a spin).
                timeout = math.ceil(max(0.0, timers[0][0] - now) * 1000)
        if self._calls:
            timeout = 0
        if max_wait_s is not None:
            timeout = math.ceil(max_wait_s * 1000) if timeout is None else min(timeout, math.ceil(max_wait_s * 1000))
        # A timer that run_here() adds before this deadline wakes us (the earliest one when the
        # timeout comes from the timers; a shorter max_wait_s only makes us wake sooner).
        self._deadline = None if timeout is None else (timers[0][0] if timers and timeout else 0.0)
        self._poll_changed = False
        self._owner.release()
        try:
            ready = self._poller.poll(timeout)
        finally:
            self._owner.acquire()
        self._thread_id = threading.get_ident()
        own = self._own
        while own:  # (left by a user thread that ran our work meanwhile: in their order)
            fn, args = own.popleft()
            fn(*args)
        if self._calls:  # calls queued before what woke us happened go first (see call_soon_lazy)
            self._drain_calls()
        self._dispatch(ready, _POLLOUT, _READABLE)
        if self._calls:
            self._drain_calls()
        if self._last:
            self._run_last()

    def run(self) -> None:
        self.running = True
        with self._owner:
            self._thread_id = threading.get_ident()
            while self.running:
                self._iterate(None)

    def stop(self) -> None:
        self.running = False
        self.wake()

    def close(self) -> None:
        # Armed for good first: a call_soon from another thread (a waiter fired as the client
        # shuts down) must not write to the closed fd, or to another file given its number.
        self._armed = True
        try:
            os.close(self._wake_fd)
        except OSError:
            pass
        if self._epoll is not None:
            self._epoll.close()


# The EventLoop whose work this thread runs now for it (EventLoop.run_here), if any.
class _Borrower(threading.local):
    loop = None


_borrower = _Borrower()


def send(sock: zmq.Socket, frames: list) -> bool:
    """Send without blocking; False when the peer is gone or unknown (ROUTER).  Over TCP a
    message with a frame over fragments.SPLIT_ABOVE goes in pieces (see fragments.py).
    From a user thread running a loop's work, the loop's own thread sends it (True)."""
    loop = _borrower.loop
    if loop is not None:
        loop.on_loop_thread(send, sock, frames)
        return True
    try:
        if fragments.needs_split(frames) and sock.getsockopt(zmq.MECHANISM) == zmq.CURVE:
            envelope = frames[:1] if sock.type == zmq.ROUTER else []
            for piece in fragments.split(frames[len(envelope):]):
                sock.send_multipart(envelope + piece, copy=False, flags=zmq.NOBLOCK)
            return True
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        return True
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return False  # (a message cut short by EAGAIN is dropped by its receiver)
        raise


_reassemblers: "weakref.WeakKeyDictionary[zmq.Socket, fragments.Reassembler]" = weakref.WeakKeyDictionary()


def recv_all(sock: zmq.Socket, limit: int = 1000, copy: bool = True):
    """Yield up to ``limit`` messages already queued on ``sock`` (never blocks); a message
    sent in pieces (fragments.py) is yielded once, whole.

    ``copy=False``: frames are zmq Frames (their ``.buffer`` is a view of zmq's memory),
    for large payloads that are written somewhere at once (chunks of a copy).
    """
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return
        if 3 <= len(frames) <= 4 and (fragments.is_fragment(frames) or fragments.is_fragment(frames, 1)):
            frames = _reassemble(sock, frames, copy)
            if frames is None:
                continue
        yield frames


def _reassemble(sock: zmq.Socket, frames: list, copy: bool) -> list | None:
    envelope = frames[:len(frames) - 3]
    peer = bytes(envelope[0]) if envelope else None
    assembler = _reassemblers.get(sock)
    if assembler is None:
        assembler = _reassemblers[sock] = fragments.Reassembler()
    try:
        whole = assembler.feed(peer, frames[-2], frames[-1] if copy else frames[-1].buffer, copy)
    except (ValueError, struct.error) as exc:
        assembler.forget(peer)
        log.warning("dropped a message sent in pieces by %r: %s", peer, exc)
        return None
    if whole is None:
        return None
    if not copy:
        whole = [zmq.Frame(f, copy=False) for f in whole]
    return envelope + whole


Again = zmq.Again
LINGER = zmq.LINGER
ZMQError = zmq.ZMQError
