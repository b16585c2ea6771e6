"""Which address of this machine other machines reach it at.

Pure helpers for the CLI and the launchers (no sockets kept, no packets sent).
A node agent listens on one address and registers it with the head; every
other node and driver connects to what it registered, so it must be an address
they can route to, not loopback.  The default is the local address on the
route to the head: the one the kernel would send the head's packets from.
"""

from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("0.0.0.0", "::", "")


def split(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` too) -> (host, port), or ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def route_to(host: str) -> str:
    """The local address the kernel sends packets to ``host`` from (a UDP socket's
    ``connect`` picks the route and sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    errors = []
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.connect(sockaddr)
                return s.getsockname()[0]
            except OSError as exc:
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
    raise ValueError(f"this machine has no route to {host} ({'; '.join(errors)}); "
                     "check the head's address, or give this node's address with --node-ip")


def node_ip(head_address: str | None, node_ip: str | None, listen: str | None) -> str:
    """The address a node agent registers: ``node_ip`` if given; else the address it listens
    on when that is one address; else the local address on the route to the head (for a
    head node, whose head is here: the route to the rest of the network)."""
    if node_ip:
        return node_ip
    if listen and listen not in WILDCARDS:
        return listen
    if head_address:
        return route_to(split(head_address)[0])
    return default_ip()


def default_ip() -> str:
    """The address on the default route (what other machines most likely reach), else loopback."""
    for probe in ("192.0.2.1", "2001:db8::1"):  # documentation addresses: nothing is sent
        try:
            return route_to(probe)
        except ValueError:
            continue
    return "127.0.0.1"
