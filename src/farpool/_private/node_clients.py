"""The node agent's clients: who is connected, who is still alive, and messages between them.

Part of the node agent (node.py): ``ClientsPart`` is mixed into ``NodeAgent`` and runs
on the agent's one thread; nothing else may call it.  A client is ``(socket kind,
identity)``: IPC for this machine, TCP for others, HEAD for the head leasing workers
for actors.  It owns:

- the clients' arrivals and departures: Hello, Goodbye, and a Goodbye said for a client
  that died without one (its pid watched with a pidfd on this machine, its connection
  on another: see ``_check_tcp_clients``);
- routing between peers: Relay (client <-> worker), ToPeer/FromPeer (client <-> client,
  the owner messages), WatchPeer and the PeerGone that answers a client's departure;
- the callers our workers' streams answer to, watched for them wherever they live
  (WatchCaller / UnwatchCaller from a worker, CallerGone back: see ``_on_WatchCaller``).

It uses the agent's state set in ``NodeAgent.__init__`` (``client_jobs``, ``log_clients``,
``worker_clients``, ``connected``, ``client_pidfds``, ``tcp_clients``, ``unreachable``,
``tcp_checks``, ``peer_senders``, ``watched_callers``, ``callers_gone``) and the agent's ``_send``, ``_apply``,
``_peer_agent`` and ``_owner_gone`` (node_objects.py).
"""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

from farpool._private import protocol, transport
from farpool._private.protocol import encode

log = logging.getLogger("farpool.node")

# A client on TCP whose connection closed and stayed down this long is taken for dead
# (its process, its machine or the network between us): what it held is released as if
# it had said Goodbye.  Shorter frees its leases and borrows sooner; longer lets it ride
# out a longer network cut (zmq reconnects by itself), since a client taken for dead
# while it lives has lost its leases and its borrows.  A killed process's connection
# closes at once; a lost machine's after transport.HEARTBEAT_TIMEOUT_MS.
CLIENT_GRACE_S = float(os.environ.get("FARPOOL_CLIENT_GRACE_S", "10"))
# How long after a connection closed its client is first looked for (zmq takes the
# connection's routing id away a moment after it reports the close).
CLOSE_SETTLE_S = min(0.5, CLIENT_GRACE_S)
# Checks of the TCP clients due this close together are done once.
CHECK_COALESCE_S = 0.25

# Stream owners that died while our workers streamed to them, remembered so that what those
# workers stored for them in the meantime is freed when their streams end (_on_UnwatchCaller).
# More remembers longer; each costs a few dozen bytes.
CALLERS_GONE_REMEMBERED = 1024

IPC, TCP, HEAD = "ipc", "tcp", "head"  # the kinds of socket a client reaches us on


class Client(NamedTuple):
    """A client of this agent (never sent): the key of what it holds here (leases, watches)."""
    kind: str                   # IPC (this machine), TCP (another), HEAD (the head leasing for actors)
    identity: bytes             # its zmq routing id on that socket (b"" for the head)


HEAD_CLIENT = Client(HEAD, b"")  # the head leases workers for actors like any client


class ClientWatch(NamedTuple):
    """How a client on this machine is watched (client_pidfds): its death is its Goodbye."""
    pidfd: int | None           # None: it was gone before we could watch it
    driver: bool
    job_id: object


class ClientsPart:
    """NodeAgent's handlers for clients coming and going, and for routing between peers."""

    # --- clients coming and going ---
    def _on_Hello(self, client, kind: str, info: dict) -> None:
        # Worker ids are unique per node only: a worker's client from another node
        # (spillback, owner messages) is not inside our worker of the same id.
        if info.get("worker_id") is not None and info.get("node_id") == self.node_id:
            self.worker_clients.setdefault(info["worker_id"], set()).add(client)
        if info.get("job_id") is not None:
            self.client_jobs[client] = info["job_id"]
            if info.get("log_to_driver"):
                self.log_clients.setdefault(info["job_id"], set()).add(client)
        self.connected.add(client.identity)
        self._watch_client(client, info)
        if client.kind == TCP and kind == "client" and client not in self.client_pidfds:
            self.tcp_clients[client] = (bool(info.get("driver")), info.get("job_id"))
            self.unreachable.pop(client, None)
        self._send(client, "Welcome", {"node_id": self.node_id, "session_dir": self.session_dir,
                                       "nodes": self.cluster_nodes})

    def _on_Goodbye(self, client, kind: str, job_id) -> None:
        own = self.client_jobs.get(client)
        if kind == "driver" and job_id is not None and job_id != own:
            # Its job's workers end with it: only the job it said at its Hello, never another's.
            log.warning("a Goodbye from %r names job %r, but it joined for job %r: ending only what it held",
                        client.identity[:24], job_id, own)
            job_id = None
        self._client_left(client, kind, job_id)

    def _client_left(self, client, kind: str, job_id, kill_running: bool = False) -> None:
        self._unwatch_client(client)
        self.tcp_clients.pop(client, None)
        self.unreachable.pop(client, None)
        for clients in self.log_clients.values():
            clients.discard(client)
        acts = self.leases.client_gone(client, kill_running=kill_running)
        if kind == "driver" and job_id is not None:
            acts.extend(self.leases.job_finished(job_id))
            if kill_running:  # it died without a Goodbye: the head ends its job (its actors)
                transport.send(self.head, encode("DriverDied", (job_id, f"noticed by node {self.node_id[:8]}")))
        self.client_jobs.pop(client, None)
        self._peer_gone(client)
        self._apply(acts)

    def _watch_client(self, client, info: dict) -> None:
        """Watch the process of a client on this machine (pidfd on the pid of its Hello), so
        that its death counts as its Goodbye: a killed driver (or any client we did not spawn)
        must not keep its leases, nor the borrows its owners watch through us (WatchPeer).
        The clients inside our own workers are left to the launcher ("exited").  A client on
        another machine is watched by its connection instead (_check_tcp_clients)."""
        pid = info.get("pid")
        if (not pid or self.pid_space is None or info.get("pid_space") != self.pid_space
                or client in self.client_pidfds or client.kind == HEAD
                or (info.get("worker_id") is not None and info.get("node_id") == self.node_id)):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            self.client_pidfds[client] = ClientWatch(None, info.get("driver", False), info.get("job_id"))
            self.loop.call_soon(self._client_died, client)
            return
        self.client_pidfds[client] = ClientWatch(fd, info.get("driver", False), info.get("job_id"))
        self.loop.add_reader(fd, lambda: self._client_died(client))

    def _unwatch_client(self, client) -> ClientWatch | None:
        watch = self.client_pidfds.pop(client, None)
        if watch is not None and watch.pidfd is not None:
            self.loop.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
        return watch

    def _client_died(self, client) -> None:
        """A watched client's process ended without a Goodbye: say it for it.  Its running
        tasks have no one to report to (as for the clients of an exited worker): end them."""
        watch = self._unwatch_client(client)
        if watch is None:
            return  # it said Goodbye first
        kind = "driver" if watch.driver else "client"
        log.info("client %r (a %s) exited without a goodbye", client.identity[:24], kind)
        self._client_left(client, kind, watch.job_id, kill_running=True)

    def _on_tcp_closed(self) -> None:
        """Connections to our TCP port closed (whose, the monitor does not say): look for
        the clients on TCP soon, and once more after the grace period."""
        if self.tcp_watch.read() and self.tcp_clients:
            now = time.monotonic()
            self._check_tcp_clients_at(now + CLOSE_SETTLE_S)
            self._check_tcp_clients_at(now + CLIENT_GRACE_S)

    def _check_tcp_clients_at(self, due: float) -> None:
        if any(abs(other - due) < CHECK_COALESCE_S for other in self.tcp_checks):
            return
        self.tcp_checks.append(due)
        self.loop.call_later(max(0.0, due - time.monotonic()), self._check_tcp_clients, due)

    def _check_tcp_clients(self, due: float) -> None:
        """A client on TCP found without a connection, and still without one CLIENT_GRACE_S
        later, died without a Goodbye (as _client_died for a client watched by pid): its
        leases come back, its running tasks end, its job ends if it was a driver, and
        those that watch it are told (PeerGone).  One found connected again is forgiven:
        zmq reconnected it (with ROUTER_HANDOVER, under the same identity)."""
        self.tcp_checks.remove(due)
        now = time.monotonic()
        probe = encode("Probe", ())
        for client, (driver, job_id) in list(self.tcp_clients.items()):
            if transport.reachable(self.tcp, client.identity, probe):
                self.unreachable.pop(client, None)
                continue
            since = self.unreachable.setdefault(client, now)
            if now - since < CLIENT_GRACE_S:
                self._check_tcp_clients_at(since + CLIENT_GRACE_S)
                continue
            log.warning("client %r (a %s) on TCP has had no connection for %.1f s: taken for dead "
                        "(its process, its machine or the network is gone); releasing what it held",
                        client.identity[:24], "driver" if driver else "client", now - since)
            self._client_left(client, "driver" if driver else "client", job_id, kill_running=True)

    # --- routing between peers ---
    def _relay(self, kind: str, identity: bytes, frames) -> None:
        """Relay(target) from a client to a worker, or from a worker back to its client."""
        target = frames[2]
        if kind == IPC and identity.startswith(b"w:") and target.startswith(b"c:"):
            origin_kind, origin = target[2:].split(b":", 1)
            if origin_kind == b"head":
                transport.send(self.head, frames[3:])
            elif not transport.send(self.sockets[origin_kind.decode()], [origin, *frames[3:]]):
                # (a result of a task its owner retried elsewhere, if the network was cut: dropped)
                log.warning("a %s from worker %s to client %r was not delivered: the client is not "
                            "connected (it left, or the network between us is cut)",
                            bytes(frames[3][:32]).decode(errors="replace"), identity[2:].decode(errors="replace"),
                            bytes(origin[:24]))
        else:
            origin = b"c:" + kind.encode() + b":" + identity
            if not transport.send(self.ipc, [b"w:" + target, b"Relayed", origin, *frames[3:]]):
                log.warning("relay to worker %s failed: it is gone", target.decode(errors="replace"))

    def _to_peer(self, kind: str, sender: bytes, frames) -> None:
        """ToPeer(target, *inner) from a client: hand ``inner`` to the client ``target`` as
        FromPeer(sender, *inner), on whichever of our sockets it is connected to.

        The inner message is not decoded here: the agent only routes it.  A target
        we cannot reach (its process ended, or it never connected) is answered with
        PeerGone(target), so that the sender fails what waits on it instead of hanging.
        """
        if len(frames) < 4:
            raise protocol.ProtocolError(f"ToPeer has {len(frames) - 2} frame(s), expected a target and a message")
        target = frames[2]
        if not target.startswith(b"c:"):
            raise protocol.ProtocolError(f"ToPeer to {target[:24]!r}, which is not a client")
        out = [b"FromPeer", sender, *frames[3:]]
        sender_client = Client(kind, sender)
        if transport.send(self.ipc, [target, *out]) or (
                TCP in self.sockets and transport.send(self.sockets[TCP], [target, *out])):
            # Remember who talks to ``target``, to tell them when it goes (_peer_gone).
            self.peer_senders.setdefault(target, set()).add(sender_client)
            return
        log.info("a message from %r to %r was not delivered: no such client is connected here",
                 sender[:24], target[:24])
        self._send(sender_client, "PeerGone", target)

    def _on_WatchPeer(self, client, target: bytes) -> None:
        """An owner counts ``target`` (a client of ours) as a borrower: tell it PeerGone(target)
        when that client leaves (Goodbye, death) -- at once if it is not connected here.

        A client says Hello to its home agent before it can hold any ref, and its address
        names that agent's node: one we do not know is gone (or never was ours)."""
        if not isinstance(target, bytes):
            raise protocol.ProtocolError(f"WatchPeer of {target!r}, which is not a client identity")
        if target in self.connected:
            self.peer_senders.setdefault(target, set()).add(client)
        else:
            self._send(client, "PeerGone", target)

    def _peer_gone(self, client) -> None:
        """A client left (Goodbye, death, or its worker exited): tell those that sent it
        ToPeer or WatchPeer, and free the objects it owned here."""
        identity = client.identity
        self.connected.discard(identity)
        if identity.startswith(b"c:"):
            self._owner_gone(identity.decode(errors="replace"))
        self._caller_gone(identity)
        for sender in self.peer_senders.pop(identity, ()):
            self._send(sender, "PeerGone", identity)
        for senders in self.peer_senders.values():
            senders.discard(client)

    # --- the owners of our workers' streams ---
    def _on_WatchCaller(self, client, identity: bytes, node_id) -> None:
        """One of our workers runs a stream (streaming generator task or actor method) for
        ``identity``, a client whose home is ``node_id``: tell the worker CallerGone(identity)
        when that client is gone, so that its stream stops instead of waiting for credit
        forever.  A client of ours is watched here (its Goodbye, its pid); one of another
        node through that node's agent (WatchPeer, whose PeerGone comes to _on_peer_agent),
        and with its node (_caller_nodes_died).  Unknown or gone already: CallerGone at once."""
        if not isinstance(identity, bytes) or not identity.startswith(b"c:"):
            raise protocol.ProtocolError(f"WatchCaller of {identity!r}, which is not a client identity")
        watched = self.watched_callers.get(identity)
        if watched is not None:
            watched[1].add(client)
            return
        if node_id is None or node_id == self.node_id:
            if identity not in self.connected:
                self._send(client, "CallerGone", identity)
                return
            node_id = self.node_id
        else:
            node = next((n for n in self.cluster_nodes if n["node_id"] == node_id), None)
            sock = None
            if node is not None and node["alive"]:
                sock, _why = self._peer_agent(node_id)
            if sock is None:
                self._send(client, "CallerGone", identity)
                return
            transport.send(sock, encode("WatchPeer", (identity,)))
        self.watched_callers[identity] = (node_id, {client})

    def _on_UnwatchCaller(self, client, identity: bytes) -> None:
        """The worker's streams for ``identity`` ended.  (The other node's agent keeps our
        WatchPeer until that client leaves: one PeerGone, then dropped here.)  Of a caller
        gone already: the items the worker stored for it after we freed its objects (made
        before the worker read CallerGone) are freed now; it makes none after this."""
        watched = self.watched_callers.get(identity)
        if watched is not None:
            watched[1].discard(client)
            if not watched[1]:
                del self.watched_callers[identity]
        elif identity in self.callers_gone:
            self._owner_gone(identity.decode(errors="replace"))

    def _unwatch_callers(self, client) -> None:
        """A worker exited: it watches nothing any more."""
        for identity in [i for i, (_node, workers) in self.watched_callers.items() if client in workers]:
            self._on_UnwatchCaller(client, identity)

    def _caller_gone(self, identity: bytes) -> None:
        """A client left, here or on another node (its agent said PeerGone): the workers whose
        streams answer to it stop them."""
        watched = self.watched_callers.pop(identity, None)
        if watched is not None:
            self.callers_gone[identity] = None
            while len(self.callers_gone) > CALLERS_GONE_REMEMBERED:
                self.callers_gone.popitem(last=False)
            for worker in watched[1]:
                self._send(worker, "CallerGone", identity)

    def _caller_nodes_died(self) -> None:
        """Nodes the head declared dead took their clients with them: what our workers stream
        to those clients stops, and the items made for them here are freed."""
        dead = {n["node_id"] for n in self.cluster_nodes if not n["alive"]}
        for identity in [i for i, (node_id, _workers) in self.watched_callers.items() if node_id in dead]:
            self._owner_gone(identity.decode(errors="replace"))
            self._caller_gone(identity)
