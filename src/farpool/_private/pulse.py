"""The node agent's liveness beat: a thread of its own that nothing else blocks.

Owned by the node agent.  The agent's loop sends the full ``Heartbeat`` (resources
available, store stats) when it runs; this thread sends the head ``NodeAlive`` every
``BEAT_S`` on its own socket, so a loop kept busy (a large message, a slow file
system, a long handler) never makes a live node look dead::

    pulse thread --NodeAlive(node_id, beat)--> head --NodeAliveAck--> pulse thread
                                                    --Error("unknown-node")--> agent loop (call_soon): rejoin

It records the largest gap between two of its beats (the figure ``farpool memory``
shows and the soak test bounds) and when the head last answered (the agent's loop
reads ``last_ack`` to tell a dead head from a busy self).  ``start`` and ``stop``
are called from the agent's thread; the rest runs here.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from farpool._private import protocol, transport
from farpool._private.protocol import encode

log = logging.getLogger("farpool.pulse")

# Seconds between beats.  Shorter lets the head use a shorter NODE_TIMEOUT_S (a lost
# machine noticed sooner); longer costs the head less on clusters of many nodes.
BEAT_S = 0.25


class Pulse:
    def __init__(self, node_id: str, head_address: str, token: str, on_unknown):
        self.node_id = node_id
        self.head_address = head_address
        self.token = token
        self.on_unknown = on_unknown     # thread-safe callable: the head says we are dead
        self.last_ack = time.monotonic()
        self.max_gap = 0.0               # largest seconds between two beats sent
        self.beats = 0
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="farpool-pulse", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reset_gap(self) -> None:
        """Forget the largest gap so far (a measurement starts)."""
        self.max_gap = 0.0

    def _run(self) -> None:
        # Its own identity per incarnation: the head answers on this connection only.
        sock = transport.dealer(f"pulse:{self.node_id}:{os.getpid()}".encode())
        try:
            beat = encode("NodeAlive", (self.node_id, 0))
            if self.head_address.startswith("ipc://"):
                sock.connect(self.head_address)
                transport.send(sock, beat)
            else:
                transport.start_tcp(sock, self.head_address, self.token, beat)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._stop_fd, zmq.POLLIN)
            last = time.monotonic()
            due = last + BEAT_S
            while True:
                now = time.monotonic()
                if now >= due:
                    self.beats += 1
                    transport.send(sock, encode("NodeAlive", (self.node_id, self.beats)))
                    self.max_gap = max(self.max_gap, now - last)
                    last, due = now, now + BEAT_S
                events = dict(poller.poll(max(0.0, due - time.monotonic()) * 1000))
                if self._stop_fd in events:
                    return
                if sock in events:
                    for frames in transport.recv_all(sock):
                        self._on_head(frames)
        except Exception:  # noqa: BLE001 - the agent's own heartbeat still runs; say why this stopped
            log.exception("the liveness thread failed; the head now judges this node by the agent loop's "
                          "heartbeats only")
        finally:
            sock.close(0)

    def _on_head(self, frames) -> None:
        message = protocol.decode_or_log(frames, "the head", log)
        if message is None:
            return
        tag, fields, _ = message
        self.last_ack = time.monotonic()
        if tag != "Error":
            return
        try:
            error = protocol.Error._make(fields)
        except TypeError:  # this thread must go on: its heartbeats are what keeps us alive
            log.warning("dropped a bad Error from the head: %d field(s), expected (code, detail)", len(fields))
            return
        if error.code == "unknown-node":
            self.on_unknown(error.detail)

    def stop(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join(timeout=5)
        os.close(self._stop_fd)
