"""Bridges and client network namespaces for tests; every name carries the run's prefix."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import signal
import time
from dataclasses import dataclass, field

from tests.support.run import sh

#: Each bridge gets its own /24 out of this block; bridges have no uplink and the host has no
#: address on them, so nothing sent there can leave the machine.
TEST_BLOCK = ipaddress.IPv4Network("10.213.0.0/16")
_SUBNETS = TEST_BLOCK.subnets(new_prefix=24)


def fence_test_block() -> bool:
    """Blackhole the test block in the host's namespace; True if this call added the route.

    Namespaces on a test bridge reach each other over the bridge, never through the host. A
    connection made from the host's own namespace to a test address would otherwise follow
    the default route off the machine; with this route it fails at once instead.
    """
    routes = sh(["ip", "route", "show", "type", "blackhole", str(TEST_BLOCK)], check=False)
    if routes.strip():
        return False
    sh(["ip", "route", "add", "blackhole", str(TEST_BLOCK)])
    return True


def unfence_test_block() -> None:
    """Remove the blackhole route added by :func:`fence_test_block`."""
    sh(["ip", "route", "del", "blackhole", str(TEST_BLOCK)], check=False)


def pids_in(netns: str) -> list[int]:
    """Pids of the processes living in a network namespace."""
    out = sh(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in out.split()]


def kill_netns_processes(netns: str, *, timeout: float = 10) -> None:
    """SIGKILL every process in the namespace and wait until they are gone."""
    for pid in pids_in(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids_in(netns) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class Namespace:
    """A network namespace with one veth on a test bridge."""

    name: str
    ip: str
    prefix: int
    host_if: str

    def exec_argv(self, *argv: str) -> list[str]:
        """An argv that runs ``argv`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        """Kill what runs inside, then delete the namespace (its veth pair goes with it)."""
        kill_netns_processes(self.name)
        sh(["ip", "netns", "delete", self.name], check=False)
        sh(["ip", "link", "delete", self.host_if], check=False)


@dataclass
class Bridge:
    """A Linux bridge with a private /24; ``namespace()`` attaches a new namespace to it."""

    name: str
    prefix_tag: str
    network: ipaddress.IPv4Network = field(default_factory=lambda: next(_SUBNETS))
    namespaces: list[Namespace] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def create(self) -> Bridge:
        """Create the bridge and bring it up."""
        sh(["ip", "link", "add", self.name, "type", "bridge"])
        sh(["ip", "link", "set", self.name, "up"])
        return self

    def ip(self, host: int) -> str:
        """The address of host number ``host`` in this bridge's subnet."""
        return str(self.network.network_address + host)

    def namespace(self, host: int, *, role: str = "c") -> Namespace:
        """A new namespace holding ``self.ip(host)``/24 on a veth attached to the bridge."""
        n = next(self._seq)
        name = f"{self.prefix_tag}{role}{n}"
        host_if, peer_if = f"{name}h", f"{name}p"
        ns = Namespace(name=name, ip=self.ip(host), prefix=self.network.prefixlen, host_if=host_if)
        self.namespaces.append(ns)
        sh(["ip", "netns", "add", name])
        sh(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if])
        sh(["ip", "link", "set", peer_if, "netns", name])
        sh(["ip", "link", "set", host_if, "master", self.name])
        sh(["ip", "link", "set", host_if, "up"])
        sh(ns.exec_argv("ip", "addr", "add", f"{ns.ip}/{ns.prefix}", "dev", peer_if))
        sh(ns.exec_argv("ip", "link", "set", peer_if, "up"))
        sh(ns.exec_argv("ip", "link", "set", "lo", "up"))
        return ns

    def destroy(self) -> None:
        """Delete every namespace made on this bridge, then the bridge."""
        for ns in self.namespaces:
            ns.delete()
        self.namespaces.clear()
        sh(["ip", "link", "delete", self.name], check=False)
