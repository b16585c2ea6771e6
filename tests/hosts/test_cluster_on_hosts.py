"""A cluster over three hosts with their own addresses: head on h1, node agents on h2 and h3,
drivers on h1 and h3.  Tasks land where asked, large arrays cross between hosts, nothing a
task carries is readable on the wire, and a peer without the token gets nothing unpickled."""

import glob
import json
import os
import re
import sys
import textwrap

import pytest

import netns

SPREAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import farpool

    @farpool.remote
    def where(tag):
        return tag, farpool.get_runtime_context().node_id

    @farpool.remote
    def make(n, fill):
        return np.full(n, fill, dtype=np.uint8)

    @farpool.remote
    def checksum(a):
        return int(a.sum()), a.nbytes, farpool.get_runtime_context().node_id

    farpool.init()
    by_tag = {}
    for n in farpool.nodes():
        for r in n["resources_total"]:
            if r.startswith("on_"):
                by_tag[r] = (n["node_id"], n["address"])
    placed = {t: farpool.get([where.options(resources={t: 1}).remote(t) for _ in range(4)], timeout=60)
              for t in by_tag}
    affinity = {t: farpool.get(where.options(scheduling_strategy=farpool.NodeAffinity(nid)).remote(t),
                               timeout=60) for t, (nid, _) in by_tag.items()}
    n = int(sys.argv[1])
    # Driver -> h2: an array put here, read by a task on h2.
    data = np.arange(n, dtype=np.uint8)
    on_h2 = farpool.get(checksum.options(resources={"on_h2": 1}).remote(farpool.put(data)), timeout=120)
    # h2 -> h3: made on h2, read on h3 (a copy between the two node agents), then here.
    made = make.options(resources={"on_h2": 1}).remote(n, 3)
    on_h3 = farpool.get(checksum.options(resources={"on_h3": 1}).remote(made), timeout=120)
    back = farpool.get(made, timeout=120)
    print(json.dumps({"by_tag": by_tag, "placed": placed, "affinity": affinity,
                      "expected_sum": int(data.sum()), "on_h2": on_h2, "on_h3": on_h3,
                      "back": [int(back.sum()), back.nbytes]}))
    farpool.shutdown()
""")

SECRET = textwrap.dedent("""
    import sys
    import numpy as np
    import farpool

    @farpool.remote
    def echo(small, big):
        return small + "|" + small, np.frombuffer(bytes(big) + bytes(big), dtype=np.uint8)

    marker = sys.argv[1]
    farpool.init()
    big = np.frombuffer((marker * 20000).encode(), dtype=np.uint8)  # beyond the inline size: the store
    outs = []
    for tag in ("on_h2", "on_h3"):
        small, back = farpool.get(echo.options(resources={tag: 1}).remote(marker, big), timeout=120)
        assert small == marker + "|" + marker, small
        assert bytes(back) == (marker * 40000).encode()
        outs.append(tag)
    print("ok", " ".join(outs))
    farpool.shutdown()
""")

# What a peer without the token might send: a pickle that would run code when unpickled.
BOMB = textwrap.dedent("""
    import os, pickle, socket, sys, time
    import zmq
    host, port, proof = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    payload = pickle.dumps(Bomb())
    # 1. plain TCP bytes
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(payload * 4)
    s.close()
    ctx = zmq.Context()
    # 2. zmq without encryption (NULL mechanism)
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(f"tcp://{host}:{port}")
    plain.send_multipart([b"Hello", payload])
    # 3. CURVE with keys of another token (the right server key: it is derived, not secret)
    sys.path.insert(0, os.environ["FARPOOL_SRC"])
    from farpool._private import transport
    curve = ctx.socket(zmq.DEALER)
    curve.setsockopt(zmq.LINGER, 0)
    server_public = transport.server_keys(os.environ["REAL_TOKEN"])[0]
    public, secret = transport.client_keys("not-the-token")
    curve.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    curve.setsockopt(zmq.CURVE_PUBLICKEY, public)
    curve.setsockopt(zmq.CURVE_SECRETKEY, secret)
    monitor = curve.get_monitor_socket()
    curve.connect(f"tcp://{host}:{port}")
    curve.send_multipart([b"Hello", payload])
    # Until the server has refused the handshake (an event, not a sleep).
    import struct
    while True:
        event = struct.unpack("=hi", monitor.recv_multipart()[0][:6])[0]
        if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED):
            break
    print("refused", event)
    ctx.destroy(linger=0)
""")


@pytest.fixture
def three_hosts(hosts_cluster, bed):
    hosts_cluster.start_head()
    hosts_cluster.join(bed[1], "--num-cpus", "2", "--resources", '{"on_h2": 4}')
    hosts_cluster.join(bed[2], "--num-cpus", "2", "--resources", '{"on_h3": 4}')
    return hosts_cluster


@pytest.mark.parametrize("driver_host", [0, 2], ids=["driver-on-h1", "driver-on-h3"])
def test_tasks_land_on_each_host_and_arrays_cross_between_hosts(three_hosts, bed, driver_host):
    n = 40_000_000
    out = three_hosts.driver(bed[driver_host], SPREAD, args=(str(n),), timeout=110)
    report = json.loads(out.stdout.splitlines()[-1])
    by_tag = report["by_tag"]
    assert by_tag["on_h2"][1].startswith(bed[1].address + ":")
    assert by_tag["on_h3"][1].startswith(bed[2].address + ":")
    for tag, (node_id, _) in by_tag.items():
        assert {nid for _, nid in report["placed"][tag]} == {node_id}
        assert report["affinity"][tag][1] == node_id
    assert report["on_h2"] == [report["expected_sum"], n, by_tag["on_h2"][0]]
    assert report["on_h3"] == [3 * n, n, by_tag["on_h3"][0]]
    assert report["back"] == [3 * n, n]


def test_nothing_a_task_carries_is_plaintext_on_the_wire(three_hosts, bed, tmp_path):
    marker = "MARK" + os.urandom(12).hex()
    plain_marker = "PLAIN" + os.urandom(12).hex()
    h1, h2, h3 = bed.hosts
    with netns.Capture(bed, str(tmp_path / "cap")) as cap:
        out = three_hosts.driver(h3, SECRET, args=(marker,))
        assert out.stdout.split() == ["ok", "on_h2", "on_h3"]
        # The control: the same capture sees what is sent in the clear between two hosts.
        server = h1.popen([sys.executable, "-c", ECHO], stdout=-1, text=True, env={"HOST": h1.address})
        try:
            port = int(server.stdout.readline())
            h2.python(f"import socket; socket.create_connection(('{h1.address}', {port}), timeout=10)"
                      f".sendall(b'{plain_marker}')")
            assert server.stdout.readline().strip() == plain_marker
            # The echo exits by itself once it printed: wait for it rather than kill it.
            # Killing ends only `nsenter`, and the echo, orphaned to the host's pid 1, may
            # still be exiting when the fixture checks that nothing is left on h1.
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=10)
            server.stdout.close()
    assert cap.contains(plain_marker.encode()), "the capture saw nothing in the clear: it is broken"
    head_port = int(three_hosts.address.rsplit(":", 1)[1])
    assert any(k[3] == head_port or k[1] == head_port for k in cap.streams), "no traffic to the head seen"
    # The task on h2 got `big` from h3 and sent twice its size back: the capture holds at
    # least those bytes between hosts, encrypted.
    between = sum(cap.bytes_between(a.address, b.address) for a, b in ((h1, h2), (h1, h3), (h2, h3)))
    assert between > 3 * len(marker) * 20000
    assert cap.contains(marker.encode()) == []


ECHO = ("import os, socket; s = socket.socket(); s.bind((os.environ['HOST'], 0)); s.listen(); "
        "print(s.getsockname()[1], flush=True); c, _ = s.accept(); print(c.recv(100).decode())")


def test_a_peer_without_the_token_gets_nothing_unpickled(three_hosts, bed):
    h1, h2, h3 = bed.hosts
    session_dir = re.search(r"session (\S+)\)", three_hosts.head_output).group(1)
    targets = [(h1, three_hosts.address, f"{session_dir}/head.log")]
    nodes = json.loads(three_hosts.driver(h1, NODES).stdout.splitlines()[-1])
    h2_node = next(n for n in nodes if n["address"].startswith(h2.address + ":"))
    h2_logs = glob.glob(h2.path("/tmp/farpool-0/s-*/node.log"))
    assert len(h2_logs) == 1, h2_logs
    targets.append((h2, h2_node["address"], h2_logs[0][len(h2.path("")):]))
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    for host, address, log in targets:
        ip, port = address.rsplit(":", 1)
        proof = f"/tmp/unpickled-{os.urandom(4).hex()}"
        peer = h3 if host is h2 else h2  # a peer on another host than the target
        out = peer.run(
            [sys.executable, "-c", BOMB, ip, port, proof],
            env={"FARPOOL_SRC": src, "REAL_TOKEN": three_hosts.token})
        assert out.stdout.startswith("refused")
        assert not os.path.exists(host.path(proof)), f"a pickle from a peer without the token ran on {host.name}"
        with open(host.path(log)) as f:
            text = f.read()
        assert f"refused a connection from {peer.address}: it does not hold the cluster token" in text
    # The cluster still works, on every node.
    out = three_hosts.driver(h3, SPREAD, args=("1000",))
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["on_h3"][:2] == [3000, 1000]


NODES = textwrap.dedent("""
    import json
    import farpool
    farpool.init()
    print(json.dumps([{"node_id": n["node_id"], "address": n["address"]} for n in farpool.nodes()]))
    farpool.shutdown()
""")
