"""The local HTTP API server: :class:`LocalApi` serves the routes of :mod:`volagent.http.routes`.

It runs in the agent's event loop with aiohttp's :class:`~aiohttp.web.AppRunner` (no signal
handling of its own) and listens on one address: ``host:port``, ``[v6]:port`` or
``unix:/path``. A TCP address that is not loopback is refused unless explicitly allowed. A unix
socket is created with mode 0660; a stale socket file left by an earlier run is removed first,
one that a live process still serves is not.

Every answer is JSON except ``/metrics``. A view call that fails answers 500 (code
``Internal``) and one that takes longer than ``view_timeout_s`` answers 503 (code
``Unavailable``); the server carries on either way. Each request is logged in one line (method,
path, status, duration_ms); aiohttp's own access log is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
import time
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web

from volagent.config import is_loopback
from volagent.errors import ConfigError, StartupError, VolagentError
from volagent.http import openapi
from volagent.http.listen import TcpListen, UnixListen, parse_listen
from volagent.http.routes import (
    OPENAPI,
    ROUTES,
    VIEW,
    ApiErrorCode,
    Handler,
    error_response,
)
from volagent.http.view import NodeView

__all__ = ["DEFAULT_VIEW_TIMEOUT_S", "LocalApi"]

_log = structlog.get_logger(__name__)

#: How long a request may wait for the daemon's view before it answers 503.
DEFAULT_VIEW_TIMEOUT_S: Final = 10.0
#: How long :meth:`LocalApi.stop` lets requests in progress finish.
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
#: The mode of the unix socket: owner and group may connect.
SOCKET_MODE: Final = 0o660

_VIEW_TIMEOUT: Final = web.AppKey("view_timeout_s", float)


class LocalApi:
    """The local HTTP API of one agent, served from the running event loop.

    ``listen`` is checked at once: a malformed address, or a TCP address that is not loopback
    while ``allow_non_loopback`` is false, raises :class:`~volagent.errors.ConfigError`.
    """

    def __init__(
        self,
        view: NodeView,
        *,
        listen: str,
        allow_non_loopback: bool,
        view_timeout_s: float = DEFAULT_VIEW_TIMEOUT_S,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    ) -> None:
        self._listen = parse_listen(listen)
        if (
            isinstance(self._listen, TcpListen)
            and not allow_non_loopback
            and not is_loopback(self._listen.host)
        ):
            reason = (
                f"{self._listen.host} is not a loopback address; set"
                " http.allow_non_loopback = true to serve the HTTP API beyond this host"
            )
            raise ConfigError(
                f"refusing to listen on {listen}: {reason}", [("http.listen", reason)]
            )
        self._app = _build_app(view, view_timeout_s=view_timeout_s)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._address: str | None = None
        self._socket_inode: int | None = None

    @property
    def address(self) -> str:
        """Where the API listens, port included: ``host:port``, ``[v6]:port`` or ``unix:/path``.

        When a host name bound several addresses, the first one.
        """
        if self._address is None:
            msg = "the local HTTP API is not started"
            raise VolagentError(msg)
        return self._address

    async def start(self) -> None:
        """Bind the address and serve; raise :class:`~volagent.errors.StartupError` if it fails."""
        if self._runner is not None:
            msg = "the local HTTP API is already started"
            raise VolagentError(msg)
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        sock: socket.socket | None = None
        try:
            site: web.BaseSite
            if isinstance(self._listen, UnixListen):
                sock = _bind_unix(self._listen.path)
                self._socket_inode = self._listen.path.lstat().st_ino
                site = web.SockSite(runner, sock)
            else:
                site = web.TCPSite(runner, self._listen.host, self._listen.port)
            await site.start()
        except BaseException as exc:
            await runner.cleanup()
            if sock is not None:
                sock.close()
            self._remove_socket()
            if isinstance(exc, OSError):
                raise StartupError(f"cannot listen on {self._listen}: {exc}") from exc
            raise
        self._runner = runner
        self._address = self._bound_address(runner)
        _log.info("http api listening", address=self._address)

    async def stop(self) -> None:
        """Stop serving: requests in progress get ``shutdown_timeout_s``, then are cut off."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            async with asyncio.timeout(self._shutdown_timeout_s + 1.0):
                await runner.cleanup()
        except TimeoutError:
            _log.warning("http api stop timed out", address=self._address)
        finally:
            self._remove_socket()
            self._address = None

    def _bound_address(self, runner: web.AppRunner) -> str:
        if isinstance(self._listen, UnixListen):
            return str(self._listen)
        host, port = runner.addresses[0][:2]
        return str(TcpListen(str(host), int(port)))

    def _remove_socket(self) -> None:
        """Remove the unix socket file this server created (not one that replaced it)."""
        inode, self._socket_inode = self._socket_inode, None
        if inode is None or not isinstance(self._listen, UnixListen):
            return
        with contextlib.suppress(FileNotFoundError):
            if self._listen.path.lstat().st_ino == inode:
                self._listen.path.unlink()


def _build_app(view: NodeView, *, view_timeout_s: float) -> web.Application:
    app = web.Application(middlewares=[_middleware])
    app[VIEW] = view
    app[_VIEW_TIMEOUT] = view_timeout_s
    app[OPENAPI] = openapi.render(openapi.document()).encode("utf-8")
    for route in ROUTES:
        app.router.add_route("GET", route.path, route.handler, name=route.operation_id)
    return app


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bound the handler, turn every failure into a JSON error and log one line per request."""
    started = time.monotonic()
    failure: BaseException | None = None
    timeout = request.app[_VIEW_TIMEOUT]
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            response = await handler(request)
    except web.HTTPException as exc:
        response = _from_http_exception(request, exc)
    except TimeoutError as exc:
        if deadline.expired():
            response = error_response(
                503, ApiErrorCode.UNAVAILABLE, f"the agent did not answer within {timeout:g} s"
            )
        else:
            failure = exc
            response = _internal(request)
    except Exception as exc:  # noqa: BLE001 -- any failure of the view answers 500 and is logged
        failure = exc
        response = _internal(request)
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
    }
    if failure is not None:
        _log.error("http request failed", **fields, exc_info=failure)
    elif deadline.expired():
        _log.warning("http request timed out", **fields)
    else:
        _log.info("http request", **fields)
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    """The JSON form of an answer aiohttp's router gave (unknown path, wrong method)."""
    if exc.status == 404:
        return error_response(404, ApiErrorCode.NOT_FOUND, f"no such path: {request.path}")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "GET")
        return error_response(
            405,
            ApiErrorCode.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.path}; allowed: {allow}",
            headers={"Allow": allow},
        )
    code = ApiErrorCode.INTERNAL if exc.status >= 500 else ApiErrorCode.BAD_REQUEST
    return error_response(exc.status, code, exc.reason)


def _internal(request: web.Request) -> web.Response:
    return error_response(
        500, ApiErrorCode.INTERNAL, f"the agent failed to answer {request.path}; see its log"
    )


def _bind_unix(path: Path) -> socket.socket:
    """A unix stream socket bound at ``path`` with mode 0660, not yet listening."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Nobody can connect before listen(), which comes after the mode is set.
        path.chmod(SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a file of another type."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.0)  # non-blocking: a full backlog answers EAGAIN at once
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        return
    except BlockingIOError:
        pass  # a live server whose backlog is full
    except OSError as exc:
        raise StartupError(f"cannot listen on unix:{path}: {exc}") from exc
    finally:
        probe.close()
    raise StartupError(f"cannot listen on unix:{path}: another process serves it")
