"""The test bed itself: hosts with their own addresses and files, a capture that sees the
wire, and nothing left behind, even when the test inside fails."""

import os
import sys

import pytest

import netns
from farpool_testing import wait_until

ECHO_SERVER = ("import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(); "
               "print(s.getsockname()[1], flush=True); c, _ = s.accept(); print(c.recv(100).decode())")


def test_each_host_has_its_own_address_tmp_and_shm(bed):
    for host in bed.hosts:
        out = host.run(["sh", "-c", "ip -4 -o addr show; ip -o link show lo; echo $$ > /tmp/me; "
                                    "touch /dev/shm/mark-" + host.name])
        assert f"inet {host.address}/24" in out.stdout
        assert "127.0.0.1/8" in out.stdout and "UP" in out.stdout.split(" lo:")[1]
    for host in bed.hosts:  # private /tmp and /dev/shm: only its own files
        assert os.listdir(host.path("/dev/shm")) == [f"mark-{host.name}"]
        assert os.path.exists(host.path("/tmp/me"))
        os.unlink(host.path("/dev/shm/mark-" + host.name))
        os.unlink(host.path("/tmp/me"))
    assert not os.path.exists("/tmp/me")


def test_hosts_reach_each_other_and_the_capture_sees_plaintext(bed, tmp_path):
    h1, h2 = bed[0], bed[1]
    server = h2.popen([sys.executable, "-c", ECHO_SERVER, h2.address], stdout=-1, text=True)
    try:
        port = int(server.stdout.readline())
        marker = os.urandom(8).hex()
        with netns.Capture(bed, str(tmp_path / "cap")) as cap:
            h1.python(f"import socket; socket.create_connection(('{h2.address}', {port}), timeout=10)"
                      f".sendall(b'{marker}')")
            assert server.stdout.readline().strip() == marker
    finally:
        server.kill()
        server.wait(timeout=10)
        server.stdout.close()
    assert cap.tcp_segments >= 1
    assert cap.contains(marker.encode()) == [f"{h1.address}:{cap_port(cap, h1)} -> {h2.address}:{port}", "a raw frame"]


def cap_port(cap, host):
    return next(k[1] for k in cap.streams if k[0] == host.address)


class Boom(Exception):
    pass


def test_a_bed_is_removed_even_when_the_test_inside_fails():
    if os.geteuid() != 0:
        pytest.skip("separate hosts are network and mount namespaces: making them needs root")
    with pytest.raises(Boom):
        with netns.HostBed(2) as bed:
            daemon = bed[0].popen(["sleep", "1000"], start_new_session=True)
            wait_until(lambda: bed[0].processes(), "the sleep to run on h1")
            pids = [bed[0].pid1, bed[1].pid1, *bed[0].processes()]
            raise Boom()
    daemon.wait(timeout=30)
    assert not [n for n in netns.netns_list() if n.startswith(bed.tag)]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
