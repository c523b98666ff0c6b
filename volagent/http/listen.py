"""Where the local HTTP API listens: ``host:port``, ``[v6]:port`` or ``unix:/path``.

The syntax is the one of the ``http.listen`` configuration key, except that port 0 is allowed
here (the kernel then picks a free port; tests use it).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from volagent.errors import ConfigError

__all__ = ["TcpListen", "UnixListen", "is_loopback", "parse_listen"]

_UNIX_PREFIX: Final = "unix:"
_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes including the terminating NUL
_MAX_PORT: Final = 65535
_KEY: Final = "http.listen"


@dataclass(frozen=True, slots=True)
class TcpListen:
    """A TCP address: ``host`` is a name or an address (IPv6 without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixListen:
    """A unix socket path (absolute)."""

    path: Path

    def __str__(self) -> str:
        return f"{_UNIX_PREFIX}{self.path}"


def parse_listen(value: str) -> TcpListen | UnixListen:
    """Parse a listen address; raise :class:`~volagent.errors.ConfigError` when it is invalid."""
    try:
        return _parse(value)
    except ValueError as exc:
        raise ConfigError(f"invalid listen address {value!r}: {exc}", [(_KEY, str(exc))]) from exc


def _parse(value: str) -> TcpListen | UnixListen:
    if value.startswith(_UNIX_PREFIX):
        path = value.removeprefix(_UNIX_PREFIX)
        if not path.startswith("/"):
            msg = "unix: needs an absolute path, like unix:/run/volagent/http.sock"
            raise ValueError(msg)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ValueError(f"unix socket path is longer than {_UNIX_PATH_MAX} bytes")
        return UnixListen(Path(path))
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        msg = 'must be "host:port", "[ipv6]:port" or "unix:/absolute/path"'
        raise ValueError(msg)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{host!r} is not an IPv6 address") from exc
    elif ":" in host:
        msg = "an IPv6 address needs brackets, like [::1]:5310"
        raise ValueError(msg)
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= _MAX_PORT:
        raise ValueError(f"port must be 0..{_MAX_PORT}")
    return TcpListen(host, int(port_text))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address; hostnames other than localhost count as not."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
