"""A real central API for tests: an aiohttp server on loopback that records and misbehaves.

It serves ``PUT /volumes/<uuid>`` and ``POST /nodes/<cn>/heartbeat`` (any other route gets a
404, recorded too) and records every request as it arrives, before answering. How it answers
is set at any time:

* :meth:`CentralServer.answer` (default 200): every request gets that status;
* :meth:`CentralServer.answer_path`: requests to one path get their own status;
* :meth:`CentralServer.hang`: requests are recorded and not answered until the mode changes
  or the server stops, then they get a 503 (they are recorded with ``status`` None);
* :meth:`CentralServer.stop` / :meth:`CentralServer.start`: the server goes away completely
  (listening socket and open connections closed, so connections are refused) and comes back
  later on the same port.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

_ROUTES = (
    ("PUT", re.compile(r"/volumes/[^/]+")),
    ("POST", re.compile(r"/nodes/[^/]+/heartbeat")),
)


@dataclass(frozen=True)
class Request:
    """One request as the server got it; ``status`` is what it answered (None: never)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = field(repr=False)
    status: int | None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def taken(self) -> bool:
        """Whether the answer counts as delivered for a volume report (2xx or 409)."""
        return self.status is not None and (200 <= self.status < 300 or self.status == 409)


class CentralServer:
    """The server; use ``async with CentralServer() as server`` (it starts listening)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.port = 0
        self._status = 200
        #: Seconds to wait before answering each request (after recording it).
        self.delay_s = 0.0
        self._path_status: dict[str, int] = {}
        self._hanging = False
        self._unhang = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen (on a new ephemeral port the first time, on the same port afterwards)."""
        assert self._runner is None, "already running"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        if self._hanging:
            self._unhang = asyncio.Event()

    async def stop(self) -> None:
        """Close the listening socket and every open connection (requests in hang end too)."""
        runner, self._runner = self._runner, None
        self._unhang.set()
        if runner is not None:
            await runner.cleanup()

    def answer(self, status: int) -> None:
        """Answer every request from now on with ``status`` (ends a hang)."""
        self._status = status
        self._hanging = False
        self._unhang.set()

    def answer_path(self, path: str, status: int | None) -> None:
        """Answer requests to ``path`` with ``status`` (None: as every other request)."""
        if status is None:
            self._path_status.pop(path, None)
        else:
            self._path_status[path] = status

    def hang(self) -> None:
        """Record requests from now on and never answer them (until another mode is set)."""
        self._hanging = True
        if self._unhang.is_set():
            self._unhang = asyncio.Event()

    def taken(self, path_prefix: str = "/volumes/") -> list[Request]:
        """The requests under ``path_prefix`` answered 2xx or 409, in arrival order."""
        return [r for r in self.requests if r.path.startswith(path_prefix) and r.taken]

    async def wait_until(
        self, predicate: Callable[[list[Request]], bool], timeout_s: float = 30.0
    ) -> None:
        """Wait until ``predicate(self.requests)`` holds (a hang guard, not a speed check)."""
        async with self._changed, asyncio.timeout(timeout_s):
            await self._changed.wait_for(lambda: predicate(self.requests))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        known = any(
            request.method == method and pattern.fullmatch(request.path)
            for method, pattern in _ROUTES
        )
        hanging = known and self._hanging
        status = None if hanging else self._path_status.get(request.path, self._status)
        if not known:
            status = 404
        await self._record(
            Request(request.method, request.path, dict(request.headers), body, status)
        )
        if hanging:
            await self._unhang.wait()  # the event of this hang, set when it ends
            raise web.HTTPServiceUnavailable  # the wait ended: the mode changed or we stop
        assert status is not None
        await asyncio.sleep(self.delay_s)
        if 200 <= status < 300:
            return web.Response(status=status)
        return web.Response(status=status, text=f"answered {status}")

    async def _record(self, request: Request) -> None:
        async with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
