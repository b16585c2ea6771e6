"""The node agent watches the owners of the streams its workers run (node_clients.py:
WatchCaller / UnwatchCaller from a worker, CallerGone back), wherever they live: a client of
its own itself, one of another node through that node's agent (WatchPeer, PeerGone), and with
its node.  No processes or sockets: the agent is made without ``__init__`` and what it would
send is recorded."""

from collections import OrderedDict

import pytest

from farpool._private import node, protocol, transport
from farpool._private.node_clients import CALLERS_GONE_REMEMBERED, IPC, TCP, Client

W1, W2 = Client(IPC, b"w:1"), Client(IPC, b"w:2")
HERE, THERE = b"c:here", b"c:there"


class WatchingAgent(node.NodeAgent):
    def __init__(self):  # only what the caller watches read
        self.node_id = "n1"
        self.connected = {HERE}
        self.cluster_nodes = [{"node_id": "n1", "alive": True}, {"node_id": "n2", "alive": True},
                              {"node_id": "n3", "alive": False}]
        self.watched_callers = {}
        self.callers_gone = OrderedDict()
        self.peer_senders = {}
        self.sent = []      # (client, tag, *fields)
        self.to_peers = []  # (node id, tag, *fields) to other nodes' agents
        self.freed = []     # owners whose objects were freed here

    def _send(self, client, tag, *fields):
        self.sent.append((client, tag, *fields))
        return True

    def _peer_agent(self, node_id):
        return ("agent of", node_id), None

    def _owner_gone(self, owner):
        self.freed.append(owner)


@pytest.fixture
def agent(monkeypatch):
    made = WatchingAgent()

    def send(sock, frames):
        tag, fields, _ = protocol.decode(frames)
        made.to_peers.append((sock[1], tag, *fields))
        return True
    monkeypatch.setattr(transport, "send", send)
    return made


def test_a_client_of_ours_is_watched_here_and_its_departure_stops_its_streams(agent):
    agent._on_WatchCaller(W1, HERE, "n1")
    agent._on_WatchCaller(W2, HERE, "n1")
    assert agent.sent == [] and agent.to_peers == []
    agent._peer_gone(Client(IPC, HERE))  # its Goodbye, or its pid
    assert sorted(agent.sent) == [(W1, "CallerGone", HERE), (W2, "CallerGone", HERE)]
    assert agent.watched_callers == {} and agent.freed == ["c:here"]


def test_a_caller_gone_already_or_unknown_is_answered_at_once(agent):
    agent._on_WatchCaller(W1, b"c:left", "n1")        # not connected here
    agent._on_WatchCaller(W1, b"c:lost", "n3")        # its node is dead
    agent._on_WatchCaller(W1, b"c:nowhere", "n9")     # a node we never heard of
    assert agent.sent == [(W1, "CallerGone", b"c:left"), (W1, "CallerGone", b"c:lost"),
                          (W1, "CallerGone", b"c:nowhere")]
    assert agent.watched_callers == {} and agent.to_peers == []
    with pytest.raises(protocol.ProtocolError, match="not a client identity"):
        agent._on_WatchCaller(W1, b"w:7", "n1")


def test_a_caller_on_another_node_is_watched_through_its_agent(agent):
    agent._on_WatchCaller(W1, THERE, "n2")
    agent._on_WatchCaller(W2, THERE, "n2")
    assert agent.to_peers == [("n2", "WatchPeer", THERE)]  # once per caller
    agent._caller_gone(THERE)  # that agent's PeerGone (node_objects._on_peer_agent)
    assert sorted(agent.sent) == [(W1, "CallerGone", THERE), (W2, "CallerGone", THERE)]
    assert THERE in agent.callers_gone
    agent._on_UnwatchCaller(W1, THERE)  # its stream ended: what it stored meanwhile is freed
    assert agent.freed == ["c:there"]


def test_unwatched_callers_are_forgotten_and_an_exited_worker_watches_nothing(agent):
    agent._on_WatchCaller(W1, THERE, "n2")
    agent._on_WatchCaller(W2, THERE, "n2")
    agent._on_UnwatchCaller(W1, THERE)
    assert agent.watched_callers == {THERE: ("n2", {W2})}
    agent._unwatch_callers(W2)  # (the launcher said it exited)
    assert agent.watched_callers == {}
    agent._caller_gone(THERE)  # a late PeerGone: nobody to tell, nothing freed
    assert agent.sent == [] and agent.freed == [] and not agent.callers_gone


def test_callers_on_a_node_declared_dead_are_gone_and_their_items_freed(agent):
    agent._on_WatchCaller(W1, THERE, "n2")
    agent._on_WatchCaller(W1, HERE, "n1")
    agent.cluster_nodes[1]["alive"] = False
    agent._caller_nodes_died()
    assert agent.sent == [(W1, "CallerGone", THERE)] and agent.freed == ["c:there"]
    assert list(agent.watched_callers) == [HERE]


def test_the_callers_gone_are_remembered_boundedly(agent):
    for i in range(CALLERS_GONE_REMEMBERED + 3):
        identity = b"c:%d" % i
        agent._on_WatchCaller(W1, identity, "n2")
        agent._caller_gone(identity)
    assert len(agent.callers_gone) == CALLERS_GONE_REMEMBERED and b"c:0" not in agent.callers_gone
