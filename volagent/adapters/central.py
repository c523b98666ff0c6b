"""The central API client: volume reports (``PUT /volumes/<uuid>``) and node heartbeats.

:class:`CentralClient` speaks the central API of protocol v1 over aiohttp. It sends bodies as
they are given (the callers build the JSON), adds ``Authorization: Bearer <token>`` when a
token file is configured, and reads that file anew for every request, so a rotated token is
used from the next request on.

What counts as delivered is decided here: ``PUT /volumes/<uuid>`` is delivered on any 2xx or
on 409 (the central side already has that generation or a newer one); a heartbeat on any 2xx.
Every other outcome (another status, a redirect, a timeout, a refused or broken connection,
an unreadable token file) raises :class:`CentralUnavailable`, which is retryable: the protocol
keeps such reports and sends them again. A 4xx other than 409 is retried too, but says the
request itself or its token is at fault: callers log it as an error rather than a passing
outage (``details["status"]`` says which it was). Redirects are not followed (aiohttp would
turn a redirected POST into a GET).

The client does not log: the services using it write one line per delivery attempt.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Self

import aiohttp

from volagent import __version__
from volagent.domain import names
from volagent.errors import VolagentError

__all__ = ["BODY_EXCERPT_CHARS", "CentralClient", "CentralUnavailable"]

#: How much of an error answer's body is kept in :attr:`CentralUnavailable.details`.
BODY_EXCERPT_CHARS: Final = 300

_USER_AGENT: Final = f"volagent/{__version__}"
_CONFLICT: Final = 409


class CentralUnavailable(VolagentError):
    """The central API did not take a request (no answer, an error answer); retry later.

    ``details`` holds ``status`` (the HTTP status, None when there was no answer), ``reason``
    (the reason phrase, or what went wrong on the way) and ``url``; error answers add the
    start of their body as ``body``.
    """

    code: ClassVar[str] = "CentralUnavailable"
    retryable: bool = True


def _read_token(path: Path) -> str:
    """The bearer token in ``path``, without surrounding whitespace.

    A small local file read once per request, on purpose, so that rotation needs no restart.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CentralUnavailable(
            f"cannot read the central API token file {path}: {reason}",
            details={"status": None, "reason": reason, "token_file": str(path)},
        ) from exc
    if not token:
        raise CentralUnavailable(
            f"the central API token file {path} is empty",
            details={"status": None, "reason": "empty token file", "token_file": str(path)},
        )
    return token


class CentralClient:
    """A client of the central API at ``url``; use it as an ``async with`` block.

    ``token_file`` holds the optional bearer token; ``timeout_s`` bounds each request from
    connecting to the end of the answer. A ``session`` passed in stays the caller's (it is not
    closed here); without one, the client opens its own on first use and closes it on exit.
    """

    def __init__(
        self,
        url: str,
        *,
        token_file: Path | None,
        timeout_s: float,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Prepare a client; nothing is connected until the first request."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        self.url = url.rstrip("/")
        self.token_file = token_file
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        """Use the client in an ``async with`` block that closes its own session."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session if the client opened it."""
        await self.close()

    async def close(self) -> None:
        """Close the session if the client opened it (a later request opens a new one)."""
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def put_volume(self, uuid: str, body: bytes) -> int:
        """Report a volume object (JSON ``body``); return the status of a 2xx or 409 answer.

        Raises :class:`~volagent.errors.InvalidParameter` for a malformed ``uuid`` (nothing is
        sent) and :class:`CentralUnavailable` when the report was not delivered.
        """
        path = f"/volumes/{names.validate_volume_uuid(uuid)}"
        return await self._send("PUT", path, body, conflict_ok=True)

    async def heartbeat(self, cn: str, body: bytes) -> None:
        """Post the node's heartbeat document (JSON ``body``); a 2xx answer takes it.

        Raises :class:`~volagent.errors.InvalidParameter` for a malformed ``cn`` (nothing is
        sent) and :class:`CentralUnavailable` when the heartbeat was not taken.
        """
        path = f"/nodes/{names.validate_volume_uuid(cn, param='cn')}/heartbeat"
        await self._send("POST", path, body, conflict_ok=False)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
        if self.token_file is not None:
            headers["Authorization"] = f"Bearer {_read_token(self.token_file)}"
        return headers

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _send(self, method: str, path: str, body: bytes, *, conflict_ok: bool) -> int:
        url = f"{self.url}{path}"
        headers = self._headers()
        session = self._open_session()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with session.request(
                method, url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                status = response.status
                if 200 <= status < 300 or (conflict_ok and status == _CONFLICT):
                    return status
                excerpt = (await response.text(errors="replace"))[:BODY_EXCERPT_CHARS]
                reason = response.reason or ""
        except TimeoutError as exc:
            # Also aiohttp's own timeouts (ServerTimeoutError is a TimeoutError).
            raise CentralUnavailable(
                f"the central API did not answer {method} {url} within {self.timeout_s:g} s",
                details=_details(None, f"timed out after {self.timeout_s:g} s", url),
            ) from exc
        except aiohttp.ClientError as exc:
            why = str(exc) or type(exc).__name__
            raise CentralUnavailable(
                f"cannot reach the central API for {method} {url}: {why}",
                details=_details(None, why, url),
            ) from exc
        answer = f"{status} {reason}".strip()
        raise CentralUnavailable(
            f"the central API answered {answer} to {method} {url}",
            details={**_details(status, reason, url), "body": excerpt},
        )


def _details(status: int | None, reason: str, url: str) -> dict[str, Any]:
    return {"status": status, "reason": reason, "url": url}
