"""``volagent status``: what the running agent says about itself, from its local HTTP API.

:class:`LocalClient` talks to the API at ``http.listen`` (``host:port``, ``[v6]:port`` or
``unix:/path``; a wildcard address is reached through loopback). :func:`fetch` reads
``/status`` and ``/ready`` into one document, ``{"status": ..., "ready": ...}``;
:func:`render` turns it into a table for people. An agent that does not answer, or answers
with something that is not its API, raises :class:`AgentUnreachable`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar, Final, Self, TextIO

import aiohttp

from volagent.config import HttpConfig
from volagent.errors import EXIT_OK, VolagentError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AgentUnreachable",
    "LocalClient",
    "client_error_reason",
    "fetch",
    "render",
    "status_command",
]

#: How long one request to the local HTTP API may take.
DEFAULT_TIMEOUT_S: Final = 10.0
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104  # mapped, never bound


class AgentUnreachable(VolagentError):
    """The agent's local HTTP API did not answer, or not as the agent's API answers."""

    code: ClassVar[str] = "AgentUnreachable"


class LocalClient:
    """A client of the agent's local HTTP API; use it as an ``async with`` block."""

    def __init__(self, http: HttpConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Reach the API at ``http.listen``; each request takes at most ``timeout_s``."""
        self.address = http.listen
        self._unix = http.unix_path
        tcp = http.tcp_address
        if tcp is None:
            self._base = "http://localhost"
        else:
            host = _WILDCARDS.get(tcp[0], tcp[0])
            self._base = f"http://[{host}]:{tcp[1]}" if ":" in host else f"http://{host}:{tcp[1]}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        """Open the session."""
        connector = None if self._unix is None else aiohttp.UnixConnector(path=str(self._unix))
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str) -> tuple[int, Any]:
        """``GET path``: the HTTP status and the JSON body; :class:`AgentUnreachable` if none."""
        if self._session is None:
            msg = "LocalClient is used outside its async with block"
            raise VolagentError(msg)
        try:
            async with self._session.get(self._base + path) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = client_error_reason(exc)
            raise AgentUnreachable(
                f"the agent's HTTP API at {self.address} is not reachable ({reason});"
                " is the agent running (volagent run) and http.listen right?",
                details={"address": self.address, "path": path},
            ) from exc
        try:
            return status, json.loads(text)
        except ValueError as exc:
            raise AgentUnreachable(
                f"{self.address}{path} answered {status} with something that is not JSON;"
                " is http.listen the agent's address?",
                details={"address": self.address, "path": path, "status": status},
            ) from exc


def client_error_reason(exc: aiohttp.ClientError | TimeoutError) -> str:
    """What went wrong with an HTTP request, in a few words (``Connection refused``)."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        return os.strerror(error.errno) if error.errno else str(error)
    return str(exc) or type(exc).__name__


async def _document(
    client: LocalClient, path: str, accepted: frozenset[int], key: str
) -> dict[str, Any]:
    """The JSON object ``path`` answers with a status in ``accepted``, holding ``key``."""
    code, body = await client.get(path)
    if code in accepted and isinstance(body, dict) and key in body:
        return body
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    raise AgentUnreachable(
        f"the agent answered {path} with status {code}" + (f": {message}" if message else ""),
        details={"path": path, "status": code},
    )


async def fetch(http: HttpConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """``{"status": <GET /status>, "ready": <GET /ready>}`` of the agent at ``http.listen``."""
    async with LocalClient(http, timeout_s=timeout_s) as client:
        status = await _document(client, "/status", frozenset({200}), "cn")
        ready = await _document(client, "/ready", frozenset({200, 503}), "checks")
    return {"status": status, "ready": ready}


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _broker(broker: object) -> str:
    if not isinstance(broker, Mapping):
        return "?"
    reconnects = f"{broker.get('reconnects', 0)} reconnect(s)"
    if broker.get("connected"):
        return f"connected ({reconnects})"
    error = broker.get("last_error") or "connecting"
    return f"DISCONNECTED: {error} ({reconnects})"


def _counts(counts: object, first: str | None = None) -> str:
    if not isinstance(counts, Mapping) or not counts:
        return "-"
    keys = [k for k in counts if k != first]
    if first in counts:
        keys.insert(0, first)
    return "  ".join(f"{str(k).replace('_', ' ')} {counts[k]}" for k in keys)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render(document: Mapping[str, Any]) -> str:
    """The document of :func:`fetch` as a table for people (several lines, no final newline)."""
    status: Mapping[str, Any] = document.get("status") or {}
    ready: Mapping[str, Any] = document.get("ready") or {}
    lines = [f"volagent {status.get('version', '?')} on node {status.get('cn', '?')}", ""]
    lines += _table(
        [
            ("uptime", _duration(status.get("uptime_s"))),
            ("broker", _broker(status.get("broker"))),
            ("ready", "yes" if ready.get("ready") else "NO"),
        ]
    )
    checks = ready.get("checks")
    if isinstance(checks, Mapping) and checks:
        rows: list[tuple[str, ...]] = [("CHECK", "STATE", "DETAIL")]
        for name, check in checks.items():
            ok = isinstance(check, Mapping) and check.get("ok") is True
            detail = str(check.get("detail", "")) if isinstance(check, Mapping) else ""
            rows.append((str(name), "ok" if ok else "FAIL", detail))
        lines += ["", *_table(rows)]
    lines += [
        "",
        *_table(
            [
                ("tasks", _counts(status.get("tasks"))),
                ("volumes", _counts(status.get("volumes"), first="total")),
            ]
        ),
    ]
    return "\n".join(lines)


async def status_command(http: HttpConfig, *, as_json: bool, out: TextIO) -> int:
    """Print the agent's status (a table, or the JSON of :func:`fetch`); return 0.

    Raises :class:`AgentUnreachable` when the agent does not answer.
    """
    document = await fetch(http)
    text = json.dumps(document, indent=2, ensure_ascii=False) if as_json else render(document)
    out.write(text + "\n")
    return EXIT_OK
