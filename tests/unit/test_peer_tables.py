"""Each kind of peer of the node agent and of the head may send only the messages in its
table (node.MAY_SEND, head.MAY_SEND): anything else is dropped, logged once with the
peer's kind and the tag, and changes nothing.

No processes or sockets: the agent and the head are made without ``__init__`` (which
binds sockets), their handlers are recorders, and ``transport.recv_all`` hands the
dispatch the frames of each case.
"""

import logging

import pytest

from farpool._private import head, node, protocol, transport

NODE_INFO = {"node_id": "n1", "total": {"CPU": 1}}


class RecordingAgent(node.NodeAgent):
    """The agent's dispatch with handlers that only record what they were given."""

    def __init__(self):  # no sockets, store or launcher: only what the dispatch reads
        self.calls = []
        self.sockets = {node.IPC: "ipc-socket", node.TCP: "tcp-socket"}
        self.last_ack = 0.0
        for tag in {t for tags in node.MAY_SEND.values() for t in tags} | {"RegisterNode", "Heartbeat"}:
            setattr(self, "_on_" + tag, lambda *args, _tag=tag: self.calls.append((_tag, args)))
        self._relay = lambda *args: self.calls.append(("Relay", args))
        self._to_peer = lambda *args: self.calls.append(("ToPeer", args))
        self._on_node_table = lambda *args: self.calls.append(("node table", args))
        self._on_node_delta = lambda *args: self.calls.append(("node delta", args))
        self._on_head_error = lambda *args: self.calls.append(("Error", args))
        self.handlers = self._build_handlers()


class RecordingHead(head.Head):
    def __init__(self):
        self.calls = []
        for tag in {t for tags in head.MAY_SEND.values() for t in tags} | {"WorkerReady", "RequestLease"}:
            setattr(self, "_on_" + tag, lambda *args, _tag=tag: self.calls.append((_tag, args)))
        self.handlers = self._build_handlers()


@pytest.fixture
def deliver(monkeypatch):
    """deliver(fn, frames): fn() reads ``frames`` as the one message waiting on its socket."""
    def deliver(fn, frames):
        monkeypatch.setattr(transport, "recv_all", lambda sock, copy=True: [frames])
        fn()
    return deliver


def message(tag, *fields):
    return protocol.encode(tag, fields)


# (socket of the agent, identity of the peer, its kind, a message that kind may not send)
AGENT_REFUSED = [
    (node.IPC, b"c:driver", "local client", message("RegisterNode", NODE_INFO)),
    (node.IPC, b"c:driver", "local client", message("WorkerReady", "w1", 4242)),
    (node.IPC, b"c:driver", "local client", message("ReadChunk", 1, b"id", 0, 10)),
    (node.TCP, b"c:remote", "remote client", message("WorkerReady", "w1", 4242)),
    (node.TCP, b"c:remote", "remote client", message("AllocateObject", 1, b"id", 10, "o", "x")),
    (node.TCP, b"c:remote", "remote client", message("WorkerBlocked", "w1")),
    (node.IPC, b"w:w1", "worker", message("RequestLease", 1, {"CPU": 1}, 1, None, "DEFAULT", True)),
    (node.IPC, b"w:w1", "worker", message("Goodbye", "worker", 1)),
    (node.IPC, b"w:w1", "worker", [b"ToPeer", b"c:other", b"GetObject", b"x"]),
    (node.IPC, b"c:driver", "local client", message("WatchCaller", b"c:other", "n2")),  # workers' streams only
    (node.TCP, b"a:n2", "peer agent", message("UnwatchCaller", b"c:other")),
    (node.IPC, b"\x00\x12\x34\x56\x78", "argument reader", message("RequestLease", 1, {}, 1, None, "DEFAULT", 1)),
    (node.TCP, b"a:n2", "peer agent", message("RequestLease", 1, {"CPU": 1}, 1, None, "DEFAULT", True)),
    (node.TCP, b"a:n2", "peer agent", [b"Relay", b"w1", b"ExecuteTask", b"x"]),
    (node.TCP, b"node:n2", "an unknown peer", message("GetNodes", 1)),
    (node.TCP, b"w:w1", "an unknown peer", message("WorkerReady", "w1", 4242)),  # workers are never on TCP
]


@pytest.mark.parametrize("socket_kind, identity, kind, frames", AGENT_REFUSED,
                         ids=[f"{c[2]}-{c[3][0].decode()}" for c in AGENT_REFUSED])
def test_the_agent_drops_what_a_kind_of_peer_may_not_send(deliver, caplog, socket_kind, identity, kind, frames):
    agent = RecordingAgent()
    with caplog.at_level(logging.WARNING, logger="farpool.node"):
        deliver(lambda: agent._on_socket(socket_kind), [identity, *frames])
    assert agent.calls == []  # nothing handled: nothing changed
    tag = frames[0].decode()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"dropped {tag} from {kind}" in lines[0] and "may not send it" in lines[0]


AGENT_ALLOWED = [
    (node.IPC, b"c:driver", message("RequestLease", 1, {"CPU": 1}, 1, None, "DEFAULT", True), "RequestLease"),
    (node.IPC, b"c:driver", message("WorkerBlocked", "w1"), "WorkerBlocked"),
    (node.IPC, b"c:driver", [b"ToPeer", b"c:other", b"GetObject", b"x"], "ToPeer"),
    (node.TCP, b"c:remote", [b"Relay", b"w1", b"ExecuteTask", b"x"], "Relay"),
    (node.TCP, b"c:remote", message("FreeObjects", [b"id"]), "FreeObjects"),
    # a driver joined by address puts its large values into the store here, and reads them back
    (node.TCP, b"c:remote", message("UploadObject", 1, b"id", 10, "o", "x"), "UploadObject"),
    (node.TCP, b"c:remote", protocol.encode("WriteChunk", (2, b"id", 0, True), [b"0123456789"]), "WriteChunk"),
    (node.TCP, b"c:remote", message("ReadChunk", 3, b"id", 0, 10), "ReadChunk"),
    (node.IPC, b"w:w1", message("WorkerReady", "w1", 4242), "WorkerReady"),
    (node.IPC, b"w:w1", message("WatchCaller", b"c:driver", "n2"), "WatchCaller"),
    (node.IPC, b"w:w1", message("UnwatchCaller", b"c:driver"), "UnwatchCaller"),
    (node.IPC, b"w:w1", [b"Relay", b"c:ipc:c:driver", b"TaskFinished", b"x"], "Relay"),
    (node.IPC, b"\x00\x12\x34\x56\x78", message("PullObject", 1, b"id", 10, [], "o", "x"), "PullObject"),
    (node.TCP, b"a:n2", message("ReadChunk", 1, b"id", 0, 10), "ReadChunk"),
    (node.TCP, b"a:n2", message("WatchPeer", b"c:driver"), "WatchPeer"),
]


@pytest.mark.parametrize("socket_kind, identity, frames, handled", AGENT_ALLOWED,
                         ids=[f"{c[1][:2]!r}-{c[3]}" for c in AGENT_ALLOWED])
def test_the_agent_handles_what_a_kind_of_peer_may_send(deliver, caplog, socket_kind, identity, frames, handled):
    agent = RecordingAgent()
    with caplog.at_level(logging.WARNING, logger="farpool.node"):
        deliver(lambda: agent._on_socket(socket_kind), [identity, *frames])
    assert [c[0] for c in agent.calls] == [handled] and not caplog.records


@pytest.mark.parametrize("frames, handled", [
    (message("RequestLease", 1, {"CPU": 1}, None, None, "DEFAULT", False), "RequestLease"),
    (message("NodeTable", []), "node table"),
    (message("NodeTable", [], (1, 4)), "node table"),
    (message("NodeTableDelta", (1, 4), (1, 5), []), "node delta"),
    (message("NodeRegistered", [], "127.0.0.1:6379"), "node table"),  # (its table, the head's address)
    (message("HeartbeatAck"), None),
])
def test_the_agent_handles_what_the_head_may_send(caplog, frames, handled):
    agent = RecordingAgent()
    with caplog.at_level(logging.WARNING, logger="farpool.node"):
        agent._on_head_message(frames)
    assert [c[0] for c in agent.calls] == ([handled] if handled else []) and not caplog.records
    assert agent.last_ack > 0


@pytest.mark.parametrize("frames", [message("WorkerReady", "w1", 1), message("Hello", "client", {}),
                                    message("RequestLease", 1)])  # the last: too few fields
def test_the_agent_drops_what_the_head_may_not_send_or_cannot_be_read(caplog, frames):
    agent = RecordingAgent()
    agent._on_RequestLease = node.NodeAgent._on_RequestLease.__get__(agent)  # the real one: raises TypeError
    agent.handlers = agent._build_handlers()
    with caplog.at_level(logging.WARNING, logger="farpool.node"):
        agent._on_head_message(frames)  # does not raise: the agent's loop keeps running
    assert agent.calls == []
    assert len(caplog.records) == 1 and "dropped" in caplog.records[0].getMessage()


HEAD_REFUSED = [
    (b"c:driver", "client", message("Heartbeat", "n1", {"CPU": 1}, {})),
    (b"c:driver", "client", message("RegisterNode", NODE_INFO)),
    (b"c:driver", "client", message("WorkerExited", 1, {"node_id": "n1"})),
    (b"c:driver", "client", message("NodeAlive", "n1", 3)),
    (b"c:driver", "client", message("DriverDied", 1, "a lie")),
    (b"node:n1", "node agent", message("CreateActor", 1, "a1", {})),
    (b"node:n1", "node agent", message("KVPut", 1, "k", b"v")),
    (b"pulse:n1:42", "liveness thread", message("Heartbeat", "n1", {"CPU": 1}, {})),
    (b"w:w1", "an unknown peer", message("Hello", "driver", {})),
]


@pytest.mark.parametrize("identity, kind, frames", HEAD_REFUSED,
                         ids=[f"{c[1]}-{c[2][0].decode()}" for c in HEAD_REFUSED])
def test_the_head_drops_what_a_kind_of_peer_may_not_send(deliver, caplog, identity, kind, frames):
    h = RecordingHead()
    with caplog.at_level(logging.WARNING, logger="farpool.head"):
        deliver(lambda: h._on_socket("sock"), [identity, *frames])
    assert h.calls == []
    tag = frames[0].decode()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"dropped {tag} from {kind}" in lines[0] and "may not send it" in lines[0]


@pytest.mark.parametrize("identity, frames, handled", [
    (b"c:driver", message("Hello", "driver", {}), "Hello"),
    (b"c:driver", message("KillActor", "a1", True), "KillActor"),
    (b"node:n1", message("Heartbeat", "n1", {"CPU": 1}, {}), "Heartbeat"),
    (b"node:n1", message("WorkerExited", 1, {"node_id": "n1"}), "WorkerExited"),
    (b"pulse:n1:42", message("NodeAlive", "n1", 3), "NodeAlive"),
])
def test_the_head_handles_what_a_kind_of_peer_may_send(deliver, caplog, identity, frames, handled):
    h = RecordingHead()
    with caplog.at_level(logging.WARNING, logger="farpool.head"):
        deliver(lambda: h._on_socket("sock"), [identity, *frames])
    assert [c[0] for c in h.calls] == [handled] and not caplog.records


def test_a_client_cannot_say_goodbye_for_a_node():
    """Goodbye is in both tables; ("node", id) ends a node only when that node's agent says it."""
    h = head.Head.__new__(head.Head)
    h.subscribers, h.client_job, h.nodes = {}, {}, {"n1": {"alive": True}}
    dead = []
    h._mark_dead = lambda node_id, why: dead.append(node_id)
    h._on_Goodbye("sock", b"c:driver", "node", "n1")
    assert dead == []
    h._on_Goodbye("sock", b"node:n1", "node", "n1")
    assert dead == ["n1"]


@pytest.mark.parametrize("spec", [{}, {"hold_shape": {"CPU": -1}, "place_shape": {}}, "not a dict"])
def test_the_head_checks_an_actor_spec_before_its_table_holds_it(spec):
    from farpool._private.actor_table import ActorTable
    h = head.Head.__new__(head.Head)
    h.actors = ActorTable()
    with pytest.raises(ValueError):
        h._on_CreateActor("sock", b"c:driver", 1, "a" * 32, spec)
    assert h.actors.actors == {}  # a bad spec leaves no actor behind


@pytest.mark.parametrize("said_at_hello, in_goodbye, ended", [(3, 3, 3), (3, 1, None), (None, 1, None)])
def test_a_drivers_goodbye_ends_only_its_own_job(said_at_hello, in_goodbye, ended):
    """Goodbye("driver", job) kills the job's workers: a client may end the job it joined for, no other."""
    agent = node.NodeAgent.__new__(node.NodeAgent)
    client = node.Client(node.TCP, b"c:driver")
    agent.client_jobs = {} if said_at_hello is None else {client: said_at_hello}
    left = []
    agent._client_left = lambda c, kind, job_id: left.append((c, kind, job_id))
    agent._on_Goodbye(client, "driver", in_goodbye)
    assert left == [(client, "driver", ended)]


def test_a_chunk_written_by_a_remote_client_reaches_its_handler_with_its_bytes(deliver):
    agent = RecordingAgent()
    deliver(lambda: agent._on_socket(node.TCP),
            [b"c:remote", *protocol.encode("WriteChunk", (2, b"id", 64, False), [b"bytes"])])
    [(tag, (client, *fields))] = agent.calls
    assert tag == "WriteChunk" and client == (node.TCP, b"c:remote")
    assert fields[:4] == [2, b"id", 64, False] and [bytes(b) for b in fields[4]] == [b"bytes"]


@pytest.mark.parametrize("alive, ended", [(True, True), (False, False)], ids=["live-node", "dead-node"])
def test_the_head_ends_a_job_on_a_live_nodes_word_only(caplog, alive, ended):
    """A node cut off from the network took the driver for dead (it could not reach it either);
    its DriverDied, queued while cut off, arrives once the link returns and the head declared
    that node dead meanwhile: the driver, connected to the head all along, keeps its job."""
    h = RecordingHead()
    h.nodes = {"n1": {"alive": alive}}
    h.client_job = {("sock", b"c:driver"): 7}
    h.subscribers = {}
    h._job_ended = lambda job_id, why: h.calls.append(("job ended", job_id))
    with caplog.at_level(logging.WARNING, logger="farpool.head"):
        head.Head._on_DriverDied(h, "sock", b"node:n1", 7, "no connection for 11 s")
    assert (h.calls == [("job ended", 7)]) is ended
    assert (h.client_job == {}) is ended
    assert any("ignored node n1's word that the driver of job 7 died" in r.getMessage()
               for r in caplog.records) is not ended


def test_a_first_beat_before_the_registration_is_not_taken_for_a_dead_node():
    """The liveness thread's socket is not the agent loop's: a NodeAlive may reach the head
    before the RegisterNode sent first.  Answered "unknown-node", the agent joined again under
    a new id at start-up (under CI load), and its driver's tasks waited on a node gone."""
    h = head.Head.__new__(head.Head)
    h.nodes, h.last_seen, h.unconfirmed, h.epoch = {}, {}, set(), 1
    h._restarted = lambda node_id: False
    replies = []
    h._reply = lambda sock, identity, *fields: replies.append(fields)
    h._on_NodeAlive("sock", b"pulse:n1:1", "n1", 1)
    assert replies == []  # not yet registered: nothing to say
    h.nodes["n1"] = {"alive": True}
    h._on_NodeAlive("sock", b"pulse:n1:1", "n1", 2)
    assert replies == [("NodeAliveAck", 2)]
    h.nodes["n1"] = {"alive": False, "death_reason": "missed heartbeats"}
    h._on_NodeAlive("sock", b"pulse:n1:1", "n1", 3)
    assert replies[-1][:2] == ("Error", "unknown-node") and "missed heartbeats" in replies[-1][2]
