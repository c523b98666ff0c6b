"""Where the local HTTP API listens: ``host:port``, ``[v6]:port`` or ``unix:/path``.

The syntax is the one of the ``http.listen`` configuration key, except that port 0 is allowed
here (the kernel then picks a free port; tests use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from volagent import config
from volagent.errors import ConfigError

__all__ = ["TcpListen", "UnixListen", "parse_listen"]

_UNIX_PREFIX: Final = "unix:"
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
    parsed = config.parse_listen(value, min_port=0)
    if isinstance(parsed, Path):
        return UnixListen(parsed)
    return TcpListen(*parsed)
