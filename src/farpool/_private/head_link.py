"""The client's link to the head: connected, away since t, or given up; and what a
client tells a head that came back.

A part of the client (client.py, client_part.py): ``CoreClient.connect`` makes one once
its head socket (connections.py) is connected; its I/O thread runs the monitor and
message handlers here; user threads call ``request`` (``CoreClient.head_request``: every
request to the head goes through it).  The head
is off the task path: while it is away, tasks on leases the client holds go on; only
calls that need the head wait::

    head socket's monitor --DISCONNECTED--> AWAY(since now): queue Hello(rejoin) + WaitActor
                                               |  (zmq reconnects by itself; the queued
                                               |   messages reach the next head first)
    head --Welcome--> CONNECTED <--------------+
    timer: away HEAD_TIMEOUT_S --> GIVEN_UP: the client breaks (every waiter fails,
                                   executors and pools become broken)
    Error("head-gone", why) -----> GIVEN_UP at once (the head's supervisor gave up and
                                   answers in its place: head_supervisor.py)

A re-registration says what the head must know of this client: its job (a driver's
job keeps its id, so its actors stay its own) and the actors it calls or whose
arguments it pins (the head tells their state changes to those who asked).  Requests
sent to a head that died before answering are sent again to the next one (the head
answers each kind of request the same when asked twice), and so are the actor kills sent
in the last KILL_RESEND_S (``sent_kill``): a head that died before it acted on one would
leave that actor alive; ending it twice ends it once.  The embedded cluster's head
is never restarted: its death breaks the client at once (client._runtime_died).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import struct
import threading
import time

import zmq

from farpool import exceptions as exc_mod
from farpool._private import transport, versions
from farpool._private.client_part import ClientPart
from farpool._private.connections import Waiter
from farpool._private.protocol import encode

log = logging.getLogger("farpool.head_link")

# Seconds a client waits for a head that went away before it gives up (and breaks: every
# pending call fails).  The same setting bounds how long node agents wait (node.py);
# the head's supervisor restarts within it (head_supervisor.py).  Longer rides out a
# slower restart; shorter fails a driver sooner when the head is gone for good.
HEAD_TIMEOUT_S = float(os.environ.get("FARPOOL_HEAD_TIMEOUT_S", "15"))

# Seconds a KillActor for good (no_restart) is sent again to each head that comes back.
# Longer covers a head that died later after it got the kill (it writes its tables as it
# acts); shorter sends fewer (they are no-ops for actors already dead).
KILL_RESEND_S = 60.0

CONNECTED, AWAY, GIVEN_UP = "CONNECTED", "AWAY", "GIVEN_UP"

# The answer of a head request whose head went away before answering: send it again.
_AWAY = object()
_monitor_ids = itertools.count(1)


class LinkState:
    """The link's state machine; pure (times are arguments)."""

    def __init__(self, timeout_s: float = HEAD_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.state = CONNECTED
        self.since: float | None = None   # when it went away
        self.outages: list[float] = []    # seconds each outage lasted, until the head was back

    def lost(self, now: float) -> bool:
        """The connection to the head closed; True when that starts an outage."""
        if self.state != CONNECTED:
            return False
        self.state, self.since = AWAY, now
        return True

    def welcomed(self, now: float) -> float | None:
        """The head answered our Hello; the outage's length (None: there was none)."""
        if self.state != AWAY:
            return None
        away = now - self.since
        self.state, self.since = CONNECTED, None
        self.outages.append(away)
        return away

    def expired(self, now: float) -> bool:
        """True when the head has been away too long: give up (once)."""
        if self.state == AWAY and now - self.since >= self.timeout_s:
            self.state = GIVEN_UP
            return True
        return False

    def give_up(self) -> None:
        self.state = GIVEN_UP

    def wait_left(self, now: float) -> float:
        """Seconds a caller may still wait for the head to come back."""
        return 0.0 if self.state != AWAY else max(0.0, self.since + self.timeout_s - now)


class HeadLink(ClientPart):
    """See the module docstring.  ``c`` is the CoreClient whose head socket this watches."""

    def __init__(self, c):
        super().__init__(c)
        self.where = c.head_address or c.cfg.get("head_address")
        self.state = LinkState(HEAD_TIMEOUT_S)
        self.cond = threading.Condition()
        self.inflight: dict[int, Waiter] = {}  # request id -> waiter, of requests sent to the head
        self.monitor = None
        self.kills: collections.deque = collections.deque()  # (when, KillActor fields), I/O thread
        if not c.cluster_embedded:  # an embedded head never comes back (see the docstring)
            # An address of our own: pyzmq's default names the socket's fd, which a closed
            # client's socket may have had while its monitor's endpoint is not unbound yet.
            self.monitor = self.conns.head.get_monitor_socket(
                zmq.EVENT_DISCONNECTED, addr=f"inproc://farpool-head-link-{os.getpid()}-{next(_monitor_ids)}")
            self.loop.add_reader(self.monitor, self._on_monitor)
        c._from_head["Welcome"] = lambda _peer, fields, _buffers: self._on_welcome(fields[0])
        c._from_head["Error"] = lambda _peer, fields, _buffers: self._on_error(*fields)

    # --- I/O thread ---
    def _on_monitor(self) -> None:
        closed = False
        for frames in transport.recv_all(self.monitor):
            closed = closed or struct.unpack("=hi", frames[0][:6])[0] == zmq.EVENT_DISCONNECTED
        if not closed or self.state.state == GIVEN_UP:
            return
        with self.cond:
            started = self.state.lost(time.monotonic())
            interrupted = list(self.inflight.values())
            self.inflight.clear()
        for waiter in interrupted:  # their head is gone: their callers send them again
            if not waiter.answered:
                waiter.answered = True
                waiter.value = _AWAY
            waiter.event.set()
        if started:
            log.warning("lost the head at %s: waiting up to %.0f s for it to come back (tasks already "
                        "submitted go on)", self.where, self.state.timeout_s)
            self.loop.call_later(self.state.timeout_s, self._check_expired)
        self._register_again()

    def _register_again(self) -> None:
        """Queue what the next head must know of us: it gets these before anything we send later."""
        c, head = self.c, self.conns.head
        info = {"pid": os.getpid(), "client": c.identity, "versions": versions.ours(),
                "job_id": None if c.in_worker else c.job_id, "rejoin": True}
        transport.send(head, encode("Hello", ("driver" if not c.in_worker else "worker", info)))
        watched = {aq.actor_id for aq in c.actor_calls.actors.values() if aq.subscribed}
        for actor_id in sorted(watched | set(c.actor_client.arg_pins)):
            transport.send(head, encode("WaitActor", (actor_id,)))
        self._forget_kills(time.monotonic())
        for _, fields in self.kills:
            transport.send(head, encode("KillActor", fields))

    def sent_kill(self, actor_id: str, reason: str) -> None:
        """I/O thread: a KillActor(actor_id, no_restart=True, reason) went to the head."""
        now = time.monotonic()
        self._forget_kills(now)
        self.kills.append((now, (actor_id, True, reason)))

    def _forget_kills(self, now: float) -> None:
        while self.kills and now - self.kills[0][0] > KILL_RESEND_S:
            self.kills.popleft()

    def _on_welcome(self, welcome: dict) -> None:
        with self.cond:
            away = self.state.welcomed(time.monotonic())
            self.cond.notify_all()
        if away is not None:
            log.warning("the head at %s is back after %.1f s; this client registered again", self.where, away)
        if isinstance(welcome, dict) and isinstance(welcome.get("nodes"), list):
            self.c._on_whole_node_table(welcome["nodes"], welcome.get("nodes_version"))

    def _on_error(self, code, why="", *_) -> None:
        if code == "head-gone" and self.state.state != GIVEN_UP:  # its supervisor gave up
            self._give_up(f"the head at {self.where} is gone and will not come back: {why}. Everything "
                          "pending fails; call farpool.shutdown(), start the cluster again, and init() again")
        elif code == "version-mismatch" and self.state.state == AWAY:
            self._give_up(f"the head at {self.where} came back, but refused this program: {why}")
        else:
            log.warning("the head at %s reported an error: %s %s", self.where, code, why)

    def _check_expired(self) -> None:
        with self.cond:
            expired = self.state.expired(time.monotonic())
        if expired:
            self._give_up(f"the head at {self.where} has been unreachable for {self.state.timeout_s:.0f} s "
                          "(FARPOOL_HEAD_TIMEOUT_S) and did not come back: the cluster is lost. Everything "
                          "pending fails; call farpool.shutdown(), check the head (`farpool status`, its "
                          "head.log), and init() again")

    def _give_up(self, why: str) -> None:
        log.error("%s", why)
        with self.cond:
            self.state.give_up()
            self.cond.notify_all()
        self.c._break(exc_mod.FarpoolError(why))

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self.conns.head.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.monitor = None

    # --- user threads ---
    def request(self, tag: str, fields: tuple, timeout: float = 30.0):
        """``tag(request_id, *fields)`` to the head and its answer; while the head is away,
        wait for it (up to ``timeout`` and HEAD_TIMEOUT_S), then raise FarpoolError saying so."""
        if timeout is None:  # (as long as it takes, while the head is there)
            timeout = math.inf
        deadline = time.monotonic() + timeout
        while True:
            self._wait_connected(tag, deadline, timeout)
            answer = self._send_and_wait(tag, fields, deadline, timeout)  # _AWAY: ask the next head
            if answer is not _AWAY:
                return answer

    def _wait_connected(self, tag: str, deadline: float, timeout: float) -> None:
        with self.cond:
            while True:
                if self.c.broken is not None:
                    raise self.c.broken
                now = time.monotonic()
                if self.state.state == CONNECTED:
                    return
                left = min(deadline - now, self.state.wait_left(now))
                if left <= 0:
                    away = now - self.state.since if self.state.since is not None else 0.0
                    raise exc_mod.FarpoolError(
                        f"{_what(tag)} needs the head, and the head at {self.where} has been away for "
                        f"{away:.0f} s (restarting, or gone); gave up after {timeout:g} s. Try again "
                        f"later: a head that stays away {self.state.timeout_s:.0f} s (FARPOOL_HEAD_TIMEOUT_S) "
                        "ends this session; `farpool status` shows whether the cluster is up")
                self.cond.wait(left)

    def _send_and_wait(self, tag: str, fields: tuple, deadline: float, timeout: float):
        """Connections.request to the head; the answer is _AWAY when the head went away before
        the request left (this link is its gate: admit, forget)."""
        return self.conns.request(None, "the head", tag, fields, max(0.0, deadline - time.monotonic())
                                  if deadline != math.inf else math.inf, gate=self)

    # --- the gate of those requests (I/O thread) ---
    def admit(self, request_id: int, waiter):
        """The socket to send a request on now, or None: the head is away (answered _AWAY)."""
        with self.cond:
            if self.state.state != CONNECTED:  # it went away meanwhile: wait for the next
                waiter.answered, waiter.value = True, _AWAY
                waiter.event.set()
                return None
            self.inflight[request_id] = waiter
        return self.conns.head

    def forget(self, request_id: int) -> None:
        with self.cond:
            self.inflight.pop(request_id, None)


def _what(tag: str) -> str:
    return {"CreateActor": "creating an actor", "GetNamedActor": "farpool.get_actor()",
            "GetNodes": "farpool.nodes()", "KVPut": "shipping a runtime_env package",
            "KVGet": "fetching a runtime_env package"}.get(tag, tag)
