"""The client's connections: every socket a CoreClient holds, and its request/reply table.

Owns: the DEALER to the head; one connection per node agent (``AgentConn``: ipc to the
agent on this machine, CURVE TCP to any other); the streams to leased workers
(``DirectChannel``, or a ``RelayChannel`` through a remote worker's agent); DEALERs to
owners on this node and the ROUTER where borrowers on this node reach us; the doorbell
datagram socket; the pidfds that watch processes on this node; and the table that
matches answers to requests by request id, with two kinds of entry: a thread that waits
(``request``) or a continuation on the I/O thread (``request_async``).

There is one way to reach an agent from the I/O thread (``agent_conn``), and it never
waits: a TCP agent is opened without waiting for its hello's answer, messages queue
behind the hello, and an agent silent for ``transport.HELLO_DEADLINE_S`` is given up and
remembered as unreachable (``unreachable``, with why).

Who may touch it: the client shell (client.py) and its parts, on the I/O thread; other
threads only through ``request``, ``agent_request``, ``head_request`` and ``agent_of``.
What happens on a socket (its messages, an agent given up) goes to the callbacks the
shell passes in; this module decides nothing about tasks or objects.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket as _socket
import threading

from farpool import exceptions as exc_mod
from farpool._private import protocol, scheduling, session, transport, unix_streams
from farpool._private.protocol import encode

log = logging.getLogger("farpool.client")


class AgentConn:
    """A connection to a node agent (ipc on this machine, CURVE TCP elsewhere)."""

    __slots__ = ("node_id", "socket", "local", "address", "hello_timer")

    def __init__(self, node_id: str, socket, local: bool, address: str = ""):
        self.node_id = node_id
        self.socket = socket
        self.local = local
        self.address = address
        self.hello_timer = None  # opened without waiting: gives up unless the agent answers in time


class DirectChannel:
    """A Unix stream straight to a leased worker on this machine (see unix_streams.StreamChannel)."""

    __slots__ = ("stream", "doorbell", "carrier")

    def __init__(self, stream: unix_streams.StreamChannel, doorbell: str | None = None):
        self.stream = stream
        self.carrier = stream  # what results of tasks sent here come back over
        self.doorbell = doorbell  # the worker's datagram socket for TakeBack (answered mid-task)

    def send(self, frames) -> bool:
        return self.stream.send(frames)


class RelayChannel:
    """Tasks for a worker on another machine, relayed by its node agent."""

    __slots__ = ("agent", "prefix", "carrier")

    def __init__(self, agent: AgentConn, worker_id: str):
        self.agent = agent
        self.carrier = agent  # what results of tasks sent here come back over (relayed)
        self.prefix = [b"Relay", worker_id.encode()]

    def send(self, frames) -> bool:
        return transport.send(self.agent.socket, self.prefix + frames)


class Waiter:
    """A request a thread waits on (``Connections.request``): answered, or broken."""

    __slots__ = ("event", "value", "answered")

    def __init__(self):
        self.event = threading.Event()
        self.value = None
        self.answered = False


# The answer of a request that nobody will answer: the client broke while it waited.
BROKEN = object()


class Connections:
    """See the module docstring."""

    def __init__(self, identity: bytes, token: str | None, loop: transport.EventLoop, hello,
                 on_agent, on_agent_silent, on_worker, on_owner_reply):
        self.identity = identity
        self.token = token
        self.loop = loop
        self._hello = hello                    # () -> the Hello frames an agent gets from us
        self._on_agent = on_agent              # (conn) its socket is readable
        self._on_agent_silent = on_agent_silent  # (conn, why) given up (closed already)
        self._on_worker = on_worker            # (stream) a worker's stream is readable
        self._on_owner_reply = on_owner_reply  # (sock) an owner on our node answered
        self.head = None
        self.home: AgentConn | None = None
        self.agents: dict[str, AgentConn] = {}
        self.unreachable: dict[str, str] = {}  # node id -> why its agent could not be reached
        self.worker_channels: dict[str, DirectChannel] = {}  # worker ipc address -> channel
        self.owner_conns: dict[str, object] = {}  # ipc endpoint -> DEALER, to owners on our node
        self.owner_socket = None
        self.owner_path: str | None = None
        self.pidfds: dict[tuple, int] = {}  # (what, key) -> pidfd of a process on this node
        self._doorbell = None  # datagrams to workers' doorbells (TakeBack), made on first use
        self._request_ids = itertools.count(1)
        self.pending: dict[int, object] = {}   # request id -> Waiter, or a continuation (I/O thread)
        self._waiting: set[Waiter] = set()     # threads in request(), answered or broken
        self.broken: BaseException | None = None

    # ------------------------------------------------------------------ opening
    def wait_reply(self, sock, what: str, deadline_s: float, session_dir) -> list:
        if not sock.poll(deadline_s * 1000):
            raise ConnectionError(f"{what} did not answer within {deadline_s:.0f} s; "
                                  f"see the logs in {session_dir}")
        return sock.recv_multipart()

    def connect_head(self, address: str, hello: list, deadline_s: float, session_dir) -> list:
        """Open the head connection and say hello (calling thread, before I/O starts): its answer."""
        self.head = transport.dealer(self.identity)
        if address.startswith("ipc://"):
            self.head.connect(address)
            transport.send(self.head, hello)
            return self.wait_reply(self.head, "the head", deadline_s, session_dir)
        return transport.connect_tcp(self.head, address, self.token, hello)

    def open_agent(self, node_id: str, address: str) -> AgentConn:
        """An agent over ipc (never waits), or over TCP waiting for its hello: only on the
        calling thread before I/O starts (the home agent); the I/O thread uses agent_conn."""
        sock = transport.dealer(self.identity)
        if address.startswith("ipc://"):
            sock.connect(address)
            transport.send(sock, self._hello())
            local = True
        else:
            transport.connect_tcp(sock, address, self.token, self._hello())  # its Welcome carries nothing we need
            local = False
        conn = AgentConn(node_id, sock, local)
        self.agents[node_id] = conn
        self.loop.add_reader(sock, lambda: self._on_agent(conn))
        return conn

    def agent_conn(self, node_id: str, nodes: list, tcp: str | None = None, ipc: str | None = None) -> tuple:
        """(our connection to the agent of ``node_id``, None), or (None, why there is none): the
        one way to reach an agent from the I/O thread, opened if needed without waiting for
        its answer.  Its address: ``tcp``/``ipc`` when given (a spillback names a node our
        table may not show yet), else the node table's; TCP when the node has it (the path a
        real cluster takes), else its ipc socket when that is on this machine."""
        conn = self.agents.get(node_id)
        if conn is not None:
            return conn, None
        if node_id in self.unreachable:
            return None, self.unreachable[node_id]
        if tcp is None and ipc is None:
            tcp, why = scheduling.agent_address(nodes, node_id)
            if tcp is None:
                node = next((n for n in nodes if n["node_id"] == node_id), None)
                ipc = node.get("ipc") if node is not None and node["alive"] else None
                if not self._ipc_reachable(ipc):
                    return None, why
        if tcp:
            return self._open_agent_nowait(node_id, tcp), None
        if self._ipc_reachable(ipc):
            return self.open_agent(node_id, ipc), None  # (an ipc connect never waits)
        return None, f"node {node_id[:8]} has no address reachable from here"

    def _ipc_reachable(self, address: str | None) -> bool:
        return bool(address) and self.home is not None and self.home.local \
            and os.path.exists(address[len("ipc://"):])

    def _open_agent_nowait(self, node_id: str, address: str) -> AgentConn:
        sock = transport.dealer(self.identity)
        transport.start_tcp(sock, address, self.token, self._hello())
        conn = self.agents[node_id] = AgentConn(node_id, sock, False, address)
        conn.hello_timer = self.loop.call_later(transport.HELLO_DEADLINE_S, self._agent_silent, conn)
        self.loop.add_reader(sock, lambda: self._on_agent(conn))
        return conn

    def agent_answered(self, conn: AgentConn) -> None:
        """Its Welcome came: the agent is up."""
        if conn.hello_timer is not None:
            self.loop.cancel_timer(conn.hello_timer)
            conn.hello_timer = None

    def _agent_silent(self, conn: AgentConn) -> None:
        conn.hello_timer = None
        if self.agents.get(conn.node_id) is not conn:
            return  # closed already (its node died)
        del self.agents[conn.node_id]
        why = (f"the agent of node {conn.node_id[:8]} at {conn.address} did not answer within "
               f"{transport.HELLO_DEADLINE_S:.0f} s (the node may be down, or its port unreachable from here)")
        # Not tried again: leases asked of it go elsewhere or fail (agent_conn says why).
        self.unreachable[conn.node_id] = why
        self.close_agent(conn)
        self._on_agent_silent(conn, why)

    def close_agent(self, conn: AgentConn) -> None:
        self.loop.cancel_timer(conn.hello_timer)
        self.loop.remove_reader(conn.socket)
        self.loop.on_loop_thread(conn.socket.close, 0)  # (a zmq socket: the loop thread's alone)

    def worker_channel(self, address: str, doorbell: bool = True) -> DirectChannel:
        """Our stream to the worker listening at ``address`` (one per worker, kept across
        leases); raises OSError when it cannot be reached."""
        channel = self.worker_channels.get(address)
        if channel is None:
            stream = unix_streams.StreamChannel.connect(address, self.loop)
            # (lendable: a caller waiting on a task sent there reads it itself: values.py)
            self.loop.add_reader(stream.fd, lambda s=stream: self._on_worker(s), lendable=True)
            channel = self.worker_channels[address] = DirectChannel(stream, address + ".tb" if doorbell else None)
        return channel

    def worker_stream_ended(self, stream: unix_streams.StreamChannel) -> None:
        stream.close()
        for address, channel in list(self.worker_channels.items()):
            if channel.stream is stream:
                del self.worker_channels[address]

    def close_worker_channel(self, node_id: str, worker_id: str) -> None:
        """The worker is gone: close our stream to it."""
        agent = self.agents.get(node_id)
        if agent is None or not agent.local:
            return
        for address, channel in list(self.worker_channels.items()):
            if address.endswith(f"/w-{worker_id}"):
                channel.stream.close()
                del self.worker_channels[address]

    def owner_dealer(self, endpoint: str):
        """A DEALER to the owner listening at ``endpoint`` on our node (kept: messages to one
        owner leave in order)."""
        sock = self.owner_conns.get(endpoint)
        if sock is None:
            sock = transport.dealer(self.identity)
            sock.connect(endpoint)
            self.owner_conns[endpoint] = sock
            self.loop.add_reader(sock, lambda s=sock: self._on_owner_reply(s))
        return sock

    def bind_owner_socket(self, session_dir: str, name: str, on_readable) -> str:
        """The ipc ROUTER where borrowers on our node ask us for values: its endpoint."""
        self.owner_socket = transport.router()
        path = self.owner_path = session.ipc(session_dir, name)
        self.owner_socket.bind(path)
        self.loop.add_reader(self.owner_socket, on_readable)
        return path

    def send_doorbell(self, data: bytes, address: str) -> bool:
        """A datagram to a worker's doorbell; False when it is gone or its queue is full."""
        if self._doorbell is None:
            self._doorbell = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            self._doorbell.setblocking(False)
        try:
            self._doorbell.sendto(data, address)
            return True
        except OSError:
            return False

    def watch_pid(self, key: tuple, pid: int, on_exit) -> bool:
        """Call ``on_exit()`` on the I/O thread when process ``pid`` (on this machine) ends;
        False when it is gone already.  ``key`` names the watch for ``unwatch_pid``."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        self.pidfds[key] = fd
        self.loop.add_reader(fd, on_exit)
        return True

    def unwatch_pid(self, key: tuple) -> None:
        fd = self.pidfds.pop(key, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    # ------------------------------------------------------------------ requests and answers
    def next_request_id(self) -> int:
        return next(self._request_ids)

    def request(self, sock, who: str, tag: str, fields: tuple, timeout: float, gate=None):
        """``tag(request_id, *fields)`` on ``sock``, and wait for its answer (any thread but the
        I/O one).  A client that breaks fails the requests still waiting at once (``break_all``).
        ``timeout``: seconds, or math.inf.  ``gate`` (head_link's): on the I/O thread, right
        before the send, ``gate.admit(request_id, waiter)`` gives the socket to send on, or None
        when it answered the waiter itself; ``gate.forget(request_id)`` once the wait is over."""
        waiter = Waiter()
        request_id = next(self._request_ids)
        self._waiting.add(waiter)
        try:
            if self.broken is not None:
                raise self.broken

            def send():
                to = sock if gate is None else gate.admit(request_id, waiter)
                if to is not None:
                    self.pending[request_id] = waiter
                    transport.send(to, encode(tag, (request_id, *fields)))
            self.loop.call_soon(send)
            if not waiter.event.wait(None if timeout == math.inf else max(0.0, timeout)):
                if self.broken is not None:
                    raise self.broken
                raise exc_mod.FarpoolError(f"{who} did not answer {tag} within {timeout:g} s")
        finally:
            self._waiting.discard(waiter)
            if gate is not None or not waiter.answered:  # (an answer unasked for is dropped)
                try:
                    self.loop.call_soon(self._forget, request_id, gate)
                except OSError:  # the I/O thread has ended (and closed its loop): nothing to forget
                    pass
        if waiter.value is BROKEN:
            raise self.broken
        return waiter.value

    def _forget(self, request_id: int, gate) -> None:
        self.pending.pop(request_id, None)
        if gate is not None:
            gate.forget(request_id)

    def request_async(self, sock, tag: str, fields: tuple, continuation) -> None:
        """(I/O thread) ``tag(request_id, *fields)``; ``continuation(answer)`` runs when it comes."""
        request_id = next(self._request_ids)
        self.pending[request_id] = continuation
        transport.send(sock, encode(tag, (request_id, *fields)))

    def request_window(self, sock, who: str, requests: list, window: int, silent_s: float) -> list:
        """``requests_async`` from a user thread: wait for every answer; the answers, in order.
        Fails when ``who`` answers nothing for ``silent_s`` seconds, or the client breaks."""
        waiter = Waiter()

        def done(answers):
            waiter.answered, waiter.value = True, answers
            waiter.event.set()
        self._waiting.add(waiter)
        try:
            if self.broken is not None:
                raise self.broken
            progress = {"answered": 0}
            self.loop.call_soon(self.requests_async, sock, requests, window, done, progress)
            seen = -1
            while not waiter.event.wait(silent_s):
                if progress["answered"] == seen or self.broken is not None:
                    raise self.broken or exc_mod.FarpoolError(
                        f"{who} answered nothing for {silent_s} s ({seen} of {len(requests)} "
                        f"{requests[0][0]} answered)")
                seen = progress["answered"]
        finally:
            self._waiting.discard(waiter)
        if waiter.value is BROKEN:
            raise self.broken
        return waiter.value

    def requests_async(self, sock, requests: list, window: int, done, progress: dict | None = None) -> None:
        """(I/O thread) Send ``requests`` ((tag, fields, buffers) each; the request id goes first
        in the fields) with at most ``window`` unanswered; ``done(answers)``, in order, once all
        are answered.  A stream of chunks: enough in flight to keep the link busy, never so
        many that a socket's high-water mark drops one.  ``progress["answered"]`` counts."""
        answers = [None] * len(requests)
        progress = progress if progress is not None else {}
        progress.update(sent=0, answered=0)

        def send_more():
            while progress["sent"] < len(requests) and progress["sent"] - progress["answered"] < window:
                i = progress["sent"]
                progress["sent"] += 1
                request_id = next(self._request_ids)
                self.pending[request_id] = lambda value, i=i: answered(i, value)
                tag, fields, buffers = requests[i]
                transport.send(sock, encode(tag, (request_id, *fields), buffers))

        def answered(i, value):
            answers[i] = value
            progress["answered"] += 1
            if progress["answered"] == len(requests):
                done(answers)
            else:
                send_more()
        send_more()

    def answer(self, request_id, value) -> None:
        entry = self.pending.pop(request_id, None)
        if isinstance(entry, Waiter):
            if not entry.answered:
                entry.answered = True
                entry.value = value
            entry.event.set()
        elif entry is not None:
            entry(value)

    def agent_request(self, agent: AgentConn, tag: str, fields: tuple, timeout: float = 60.0):
        return self.request(agent.socket, "the node agent", tag, fields, timeout)

    def head_request(self, tag: str, fields: tuple, timeout: float = 30.0):
        return self.request(self.head, "the head", tag, fields, timeout)

    def agent_of(self, node_id: str, nodes, timeout: float = 30.0) -> AgentConn:
        """Our connection to the agent of ``node_id`` (opened if needed). Any thread but the I/O one."""
        done = threading.Event()
        answer: list = []

        def find():
            answer.extend(self.agent_conn(node_id, nodes()))
            done.set()
        self.loop.call_soon(find)
        if not done.wait(timeout):
            raise exc_mod.FarpoolError(f"no answer looking for the agent of node {node_id[:8]}")
        conn, why = answer
        if conn is None:
            raise exc_mod.FarpoolError(f"cannot reach the agent of node {node_id[:8]}: {why}")
        return conn

    def break_all(self, error: BaseException) -> None:
        """Every request still waiting fails with ``error``: nobody is left to answer it."""
        self.broken = error
        for waiter in list(self._waiting):
            if not waiter.answered:
                waiter.answered = True
                waiter.value = BROKEN
            waiter.event.set()

    # ------------------------------------------------------------------ messages
    @staticmethod
    def receive(frames, peer, table: dict, source: str) -> None:
        """Decode ``frames`` from ``source`` and call its handler in ``table``: (peer, fields,
        buffers).  Garbage, and a message that kind of peer may not send, are dropped and logged."""
        message = protocol.decode_or_log(frames, source, log)
        if message is None:
            return
        tag, fields, buffers = message
        handler = table.get(tag)
        if handler is None:
            log.warning("dropped %s from %s: not a message it may send us", tag, source)
            return
        handler(peer, fields, buffers)

    # ------------------------------------------------------------------ closing
    def close_all(self) -> None:
        for conn in self.agents.values():
            conn.socket.close(0)
        for channel in self.worker_channels.values():
            channel.stream.close()
        for sock in self.owner_conns.values():
            sock.close(0)
        if self.owner_socket is not None:
            self.owner_socket.close(0)
            try:
                os.unlink(self.owner_path[len("ipc://"):])
            except (OSError, TypeError):
                pass
        if self.head is not None:
            self.head.close(0)
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds.clear()
        if self._doorbell is not None:
            self._doorbell.close()
