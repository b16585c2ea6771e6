"""Which address a node registers (farpool._private.addresses): pure rules, no cluster."""

import pytest

from farpool._private import addresses


def test_split_and_join_round_trip_v4_and_v6():
    assert addresses.split("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert addresses.split("[::1]:80") == ("::1", 80)
    assert addresses.join("::1", 80) == "[::1]:80"
    assert addresses.join("10.0.0.1", 1) == "10.0.0.1:1"
    with pytest.raises(ValueError, match="address must be HOST:PORT, got 'nohost'"):
        addresses.split("nohost")


def test_the_route_to_loopback_is_loopback():
    assert addresses.route_to("127.0.0.1") == "127.0.0.1"
    assert addresses.is_loopback("127.0.0.5") and addresses.is_loopback("localhost")
    assert not addresses.is_loopback("10.231.0.1") and not addresses.is_loopback("a-host-name")


def test_node_ip_prefers_the_flag_then_the_listen_address_then_the_route_to_the_head():
    assert addresses.node_ip("127.0.0.1:5", "10.1.2.3", None) == "10.1.2.3"
    assert addresses.node_ip("127.0.0.1:5", None, "127.0.0.1") == "127.0.0.1"
    assert addresses.node_ip("127.0.0.1:5", None, None) == "127.0.0.1"       # the route to the head
    assert addresses.node_ip("127.0.0.1:5", None, "0.0.0.0") == "127.0.0.1"  # a wildcard is no address


def test_no_route_to_the_head_says_what_to_do():
    with pytest.raises(ValueError, match="cannot resolve 'no-such-host.invalid'"):
        addresses.route_to("no-such-host.invalid")
