"""Bad input thrown at a real head and node agent after authentication, and at protocol.decode.

A peer that holds the token and has done the hello (a CURVE client, its Hello
answered with Welcome) sends random and mutated frames to the agent's and the
head's TCP ports: garbage frames, wrong frame counts, unknown tags, real messages
of every tag with fields dropped, added or swapped for values of other types, and
oversized values.  Each bad frame must be dropped (and logged); neither process
may crash or hang.  After every frame the sender pings on the same connection and
waits for the Pong (the loop handled the frame and still serves), and checks the
two processes by pid; at the end the cluster still runs a task correctly.

Hypothesis is bounded (``max_examples``, no deadline: a frame's round trip is real
I/O) and has no example database (nothing is left in the working directory).
"""

import itertools
import os
import pickle

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import farpool
from farpool._private import protocol, transport, versions
from farpool_testing import TIMEOUT, square

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- what is thrown
def _hello(kind="client"):
    return ("Hello", (kind, {"versions": versions.ours(), "pid": None}))


# Real messages of every tag a peer might send the agent or the head (their fields are
# of the right count and types), to mutate.  Ids name nothing that exists, so a message
# that survives mutation intact does no harm (a lease asked for is given back by the
# Goodbye at the end).
REAL = [
    _hello(), _hello("agent"), ("Ping", (1,)), ("GetNodes", (7,)), ("Goodbye", ("client", None)),
    ("RequestLease", (1, {"CPU": 10000}, None, None, "DEFAULT", False)), ("CancelLease", (1,)),
    ("ReturnLease", (12345, False)), ("SignalWorker", ("no-such-worker", 0)),
    ("WorkerBlocked", ("no-such-worker",)), ("WorkerUnblocked", ("no-such-worker",)),
    ("WorkerReady", ("no-such-worker", 1)),
    ("AllocateObject", (1, b"s" * 28, 100, "c:owner", "an object")), ("FreeObjects", ([b"s" * 28],)),
    ("RestoreObject", (1, b"s" * 28)), ("PullObject", (1, b"s" * 28, 100, [], ("c:o", "n"), "x")),
    ("ReadChunk", (1, b"s" * 28, 0, 100)), ("StoreStats", (1,)), ("WatchPeer", (b"c:nobody",)),
    ("RegisterNode", ({"node_id": "fuzz", "total": {"CPU": 1}, "versions": versions.ours()},)),
    ("Heartbeat", ("no-such-node", {"CPU": 1}, {})), ("NodeAlive", ("no-such-node", 1)),
    ("KVPut", (1, "k", b"v")), ("KVGet", (1, "k")), ("DriverDied", (999, "fuzz")),
    ("CreateActor", (1, "a" * 32, {})), ("GetNamedActor", (1, "nobody", None)), ("WaitActor", ("a" * 32,)),
    ("KillActor", ("a" * 32, True)), ("LeaseGranted", (999, 1, "w", "ipc://x", "n", [])),
    ("LeaseInfeasible", (999, "no", True)), ("WorkerExited", (999, {"node_id": "n"})),
    ("ActorCreated", ("a" * 32, False, None)), ("TaskFinished", ([], False, b"c:x", [], [])),
]

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
oversized = st.sampled_from([b"x" * (4 << 20), "y" * (1 << 20), list(range(100_000)), 10 ** 5000,
                             {str(i): i for i in range(50_000)}])


@st.composite
def mutated(draw):
    """A real message with one of: a field dropped, added, or swapped for another value (perhaps huge)."""
    tag, fields = draw(st.sampled_from(REAL))
    fields = list(fields)
    how = draw(st.sampled_from(["drop", "add", "swap", "swap-huge", "extra-frames", "no-header"]))
    if how == "drop" and fields:
        del fields[draw(st.integers(0, len(fields) - 1))]
    elif how == "add":
        fields.insert(draw(st.integers(0, len(fields))), draw(values))
    elif how.startswith("swap") and fields:
        fields[draw(st.integers(0, len(fields) - 1))] = draw(oversized if how == "swap-huge" else values)
    frames = protocol.encode(tag, tuple(fields))
    if how == "extra-frames":
        frames = frames + draw(st.lists(st.binary(max_size=32), min_size=1, max_size=3))
    elif how == "no-header":
        frames = frames[:1]
    return frames


garbage = st.lists(st.binary(max_size=64), min_size=1, max_size=5)  # (zmq sends no empty message)
unknown_tag = st.builds(lambda tag, body: [tag.encode(), pickle.dumps(body)],
                        st.text(min_size=1, max_size=20).filter(lambda t: t not in protocol.TAGS), values)
bad_header = st.builds(lambda tag, body: [tag.encode(), body], st.sampled_from(sorted(protocol.TAGS)),
                       st.binary(max_size=64) | st.builds(pickle.dumps, values))
raw_routed = st.builds(lambda tag, rest: [tag, *rest], st.sampled_from([b"Relay", b"ToPeer"]),
                       st.lists(st.binary(max_size=32), max_size=4))
bad_frames = st.one_of(garbage, unknown_tag, bad_header, mutated(), raw_routed)


# ---------------------------------------------------------------------------- who throws it
class Peer:
    """A CURVE client with the token that has done the hello, on one TCP port."""

    _ids = itertools.count()

    def __init__(self, address: str, token: str, identity: bytes, hello: list):
        self.address = address
        self.sock = transport.dealer(identity + str(os.getpid()).encode() + b"-" + str(next(self._ids)).encode())
        reply = transport.connect_tcp(self.sock, address, token, hello, deadline_s=TIMEOUT)
        self.welcome = protocol.decode(reply)
        self.pings = itertools.count(1)

    def throw(self, frames: list) -> None:
        """Send ``frames``, then wait for the Pong of a Ping sent after them: the frame was handled."""
        self.sock.send_multipart(frames)
        n = next(self.pings)
        transport.send(self.sock, protocol.encode("Ping", (n, "after a bad frame")))
        while True:  # answers to what was thrown (Welcome, Nodes, PeerGone...) may come first
            if not self.sock.poll(TIMEOUT * 1000):
                raise AssertionError(f"{self.address} did not answer a Ping within {TIMEOUT} s after {frames!r:.300}")
            reply = self.sock.recv_multipart()
            try:
                tag, fields, _ = protocol.decode(reply)
            except protocol.ProtocolError:
                continue
            if tag == "Pong" and fields == (n, "after a bad frame"):
                return

    def close(self) -> None:
        transport.send(self.sock, protocol.encode("Goodbye", ("client", None)))  # gives back what it got
        self.sock.close(linger=1000)


def _alive(pids) -> None:
    for what, pid in pids.items():
        proc = psutil.Process(pid)
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, f"the {what} (pid {pid}) died"


@pytest.fixture
def cluster(started):
    started.start_head()
    state = started.read_state()
    with open(os.path.join(state["session_dir"], "head.pid")) as f:  # the head itself, not its supervisor
        pids = {"head": int(f.read()), "head's supervisor": state["head_pid"], "node agent": state["nodes"][0]["pid"]}
    head = Peer(started.address, started.token, b"c:fuzz-head-", protocol.encode(*_hello()))
    _, (welcome,), _ = head.welcome
    agent_address = welcome["nodes"][0]["tcp"]
    peers = {"head": head,
             "agent as a remote client": Peer(agent_address, started.token, b"c:fuzz-agent-",
                                              protocol.encode(*_hello())),
             "agent as a peer agent": Peer(agent_address, started.token, b"a:fuzz-",
                                           protocol.encode(*_hello("agent")))}
    yield peers, pids, state["session_dir"]
    for peer in peers.values():
        peer.close()


def _check_still_serving(started, peers, pids, session_dir, threw_bad_frames=True):
    for peer in peers.values():  # what a message that survived mutation got (a lease) is given back
        peer.close()
    peers.clear()
    _alive(pids)
    logs = ""
    for name in ("head.log", "node.log"):
        with open(os.path.join(session_dir, name), errors="replace") as f:
            logs += f.read()
    farpool.init(address=started.address, token=started.token)
    try:
        assert farpool.get(farpool.remote(square).remote(12), timeout=TIMEOUT) == 144
    except Exception:
        print("\n".join(line[:300] for line in logs.splitlines()
                        if "tag" not in line and "may not send" not in line and "tuple" not in line))
        raise
    _alive(pids)
    assert "dropped" in logs or not threw_bad_frames  # bad frames are logged, not silently eaten
    # What the head itself sends the agent is read in full (a NodeRegistered dropped for its
    # arity once left the agent without the node table until the next broadcast).
    assert "from the head" not in logs


@pytest.mark.parametrize("target", ["head", "agent as a remote client", "agent as a peer agent"])
def test_bad_frames_after_the_hello_are_dropped_and_the_cluster_keeps_serving(started, cluster, target):
    peers, pids, session_dir = cluster
    peer = peers[target]

    @FUZZ
    @given(frames=bad_frames)
    def throw(frames):
        peer.throw(frames)
        _alive(pids)
    throw()
    _check_still_serving(started, peers, pids, session_dir)


BAD_VALUES = [None, True, -1, 2**64, 1.5, float("nan"), "", "x" * 100, b"", b"\x00" * 100, [], (), {},
              {"CPU": "many"}, {"CPU": -1}, [None], ValueError("a value"), b"y" * (2 << 20)]


@pytest.mark.parametrize("target", ["head", "agent as a remote client", "agent as a peer agent"])
def test_every_field_of_every_message_swapped_for_a_bad_value(started, cluster, target):
    """The systematic sweep beside the random one: each field of each real message in turn
    becomes each of BAD_VALUES; then the message with a field too few and one too many."""
    peers, pids, session_dir = cluster
    peer = peers[target]
    for tag, fields in REAL:
        for i in range(len(fields)):
            for bad in BAD_VALUES:
                peer.throw(protocol.encode(tag, fields[:i] + (bad,) + fields[i + 1:]))
        peer.throw(protocol.encode(tag, fields[:-1]))
        peer.throw(protocol.encode(tag, fields + (None,)))
    _check_still_serving(started, peers, pids, session_dir)


def _answer(peer, request_id):
    """The agent's answer to lease request ``request_id`` (skipping anything else)."""
    while True:
        assert peer.sock.poll(TIMEOUT * 1000), f"no answer to lease request {request_id} within {TIMEOUT} s"
        tag, fields, _ = protocol.decode(peer.sock.recv_multipart())
        if tag.startswith("Lease") and fields[0] == request_id:
            return tag, fields


def test_a_lease_for_a_negative_amount_is_refused(started, cluster):
    """Found by the sweep: a shape of {"CPU": -1} was granted, adding to the free CPUs; given
    back after a real lease (releases stop at the total), it took a unit for good and no
    1-CPU task ran again."""
    peers, pids, session_dir = cluster
    peer = peers["agent as a remote client"]
    transport.send(peer.sock, protocol.encode("RequestLease", (1, {"CPU": 10000}, None, None, "DEFAULT", False)))
    assert _answer(peer, 1)[0] == "LeaseGranted"
    transport.send(peer.sock, protocol.encode("RequestLease", (2, {"CPU": -1}, None, None, "DEFAULT", False)))
    tag, fields = _answer(peer, 2)
    assert tag == "LeaseInfeasible" and "ints >= 0" in fields[1] and fields[2] is True
    # the Goodbye gives back the lease granted
    _check_still_serving(started, peers, pids, session_dir, threw_bad_frames=False)


# ---------------------------------------------------------------------------- decode
@settings(max_examples=200, deadline=None, database=None)
@given(frames=st.one_of(garbage, unknown_tag, bad_header, mutated(),
                        st.lists(st.binary(max_size=16) | st.sampled_from([t.encode() for t in protocol.TAGS]),
                                 max_size=4)))
def test_decode_reads_a_message_or_raises_protocol_error(frames):
    try:
        tag, fields, buffers = protocol.decode(frames)
    except protocol.ProtocolError:
        return
    assert tag in protocol.TAGS and isinstance(fields, tuple) and buffers == frames[2:]
