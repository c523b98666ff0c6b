"""A volume's place on the network: its nic and the clients allowed to mount it.

Addresses are IPv4 or IPv6, written back in their canonical form (``fd00::5``, never
``FD00:0::0005``), so two specs that mean the same compare equal.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final

from pydantic import AfterValidator, Field, ValidationInfo, WithJsonSchema, field_validator

from volagent.domain.wire import NetworkName, WireModel, invalid, is_none

#: At most this many entries in ``allowed_clients`` (they must fit one ZFS user property).
MAX_ALLOWED_CLIENTS: Final = 100

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        msg = "must be an IPv4 or IPv6 address"
        raise invalid(msg) from exc
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        msg = "must not carry a zone index"
        raise invalid(msg)
    return address


def _host_address(text: str) -> str:
    address = _address(text)
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        msg = "must be a unicast address (not unspecified, multicast or loopback)"
        raise invalid(msg)
    return str(address)


def _client(text: str) -> str:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        msg = "must be an IP address or a network like 10.0.0.0/24 (no host bits set)"
        raise invalid(msg) from exc
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _client_order(text: str) -> tuple[int, int, int]:
    network = ipaddress.ip_network(text)
    return network.version, int(network.network_address), network.prefixlen


def _sorted_clients(clients: list[str]) -> list[str]:
    return sorted(set(clients), key=_client_order)


#: A unicast IPv4 or IPv6 address, canonical.
HostAddress = Annotated[
    str,
    AfterValidator(_host_address),
    WithJsonSchema({"type": "string", "description": "An IPv4 or IPv6 address."}),
]
#: One allowed client: an address or a network without host bits, canonical.
Client = Annotated[
    str,
    AfterValidator(_client),
    WithJsonSchema(
        {"type": "string", "description": "An IP address or a CIDR network (no host bits)."}
    ),
]
#: The clients allowed to mount a volume: sorted, without repeats; empty refuses everyone.
Clients = Annotated[
    list[Client], Field(max_length=MAX_ALLOWED_CLIENTS), AfterValidator(_sorted_clients)
]


class Nic(WireModel):
    """The zone's address on the tenant network ``network``."""

    ip: HostAddress
    prefix: Annotated[int, Field(ge=1, le=128)]
    gateway: HostAddress | None = Field(default=None, exclude_if=is_none)
    network: NetworkName

    @field_validator("prefix")
    @classmethod
    def _prefix_fits_ip(cls, prefix: int, info: ValidationInfo) -> int:
        ip = info.data.get("ip")
        if ip is None:
            return prefix
        address = ipaddress.ip_address(ip)
        if prefix > address.max_prefixlen:
            raise invalid(f"must be at most {address.max_prefixlen} for IPv{address.version}")
        network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        if address.version == 4 and prefix <= 30:  # /31 and /32 have no network or broadcast
            if address == network.network_address:
                raise invalid(f"makes the ip {ip} the network address of {network}")
            if address == network.broadcast_address:
                raise invalid(f"makes the ip {ip} the broadcast address of {network}")
        return prefix

    @field_validator("gateway")
    @classmethod
    def _gateway_in_subnet(cls, gateway: str | None, info: ValidationInfo) -> str | None:
        ip, prefix = info.data.get("ip"), info.data.get("prefix")
        if gateway is None or ip is None or prefix is None:
            return gateway
        network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        if ipaddress.ip_address(gateway) not in network:
            raise invalid(f"must be an address in {network}")
        if gateway == ip:
            msg = "must not be the nic's own address"
            raise invalid(msg)
        return gateway

    @property
    def subnet(self) -> str:
        """The nic's network in CIDR form (``10.0.0.0/24``): the default allowed clients."""
        return _client(str(ipaddress.ip_network(f"{self.ip}/{self.prefix}", strict=False)))

    @property
    def url_host(self) -> str:
        """The ip as written in a URL or an NFS path: IPv6 in brackets."""
        return f"[{self.ip}]" if ":" in self.ip else self.ip
