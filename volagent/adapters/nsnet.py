"""TCP connections opened from inside a named network namespace, without a process.

A socket belongs to the network namespace it was created in, whatever thread later uses it:
its routes, addresses and listeners are that namespace's. :func:`open_connection` therefore
only *creates* the socket inside the namespace, on a dedicated single-thread executor whose
thread enters the namespace with ``setns(2)`` (Python 3.11 has no ``os.setns``, so through
ctypes) and returns to its own at once. The connect itself then runs on the event loop like
any other non-blocking connect, under ``asyncio.timeout``.

The thread's own namespace (``/proc/thread-self/ns/net``) is restored in a ``finally``. Should
that ever fail, the thread is left in a foreign namespace: it is marked stranded and refuses
every later call (those already queued for it move to a new executor), and its executor is
shut down, so the thread ends.

Failures are zone failures (:class:`~volagent.errors.ZoneFailed` on the wire): a missing
namespace is :class:`NetnsNotFound`; a refused, unreachable or reset connection is
:class:`ConnectFailed`, and one that does not complete in time :class:`ConnectTimeout`.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import structlog

from volagent.errors import ZoneFailed

#: Where ``ip netns`` keeps its named namespaces (bind mounts of ``/proc/<pid>/ns/net``).
NETNS_DIR: Final = Path("/run/netns")
CLONE_NEWNET: Final = 0x40000000  # from <sched.h>
_OWN_NETNS: Final = "/proc/thread-self/ns/net"

_log = structlog.get_logger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NetnsNotFound(ZoneFailed):
    """The named network namespace does not exist (the zone is gone)."""


class ConnectFailed(ZoneFailed):
    """A TCP connection inside a namespace was refused, unreachable or reset."""


class ConnectTimeout(ConnectFailed):
    """A TCP connection inside a namespace did not complete in time."""


class _RestoreFailed(Exception):
    """The worker thread could not return to its own namespace (the error is kept as cause)."""


class _Stranded(Exception):
    """The worker thread is stuck in a foreign namespace: run the call on another thread."""


_thread = threading.local()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _socket_in(netns: str, family: socket.AddressFamily) -> socket.socket:
    """Create a non-blocking TCP socket inside ``netns`` (runs on the executor's thread)."""
    if getattr(_thread, "stranded", False):
        raise _Stranded
    own = os.open(_OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            sock: socket.socket | None = None
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            finally:
                try:
                    _setns(own)
                except OSError as exc:
                    _thread.stranded = True
                    if sock is not None:
                        sock.close()
                    raise _RestoreFailed from exc
        finally:
            os.close(target)
    finally:
        os.close(own)
    return sock


def _close_result(fut: asyncio.Future[socket.socket]) -> None:
    """Close the socket of a creation whose caller was cancelled meanwhile."""
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


class _Executor:
    """The one thread that enters namespaces; replaced when it may be stuck in a foreign one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _current(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="volagent-netns")
            return self._pool

    def _discard(self, pool: ThreadPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False)

    async def socket_in(self, netns: str, family: socket.AddressFamily) -> socket.socket:
        """A socket created inside ``netns`` by the executor's thread."""
        while True:
            pool = self._current()
            created = asyncio.get_running_loop().run_in_executor(pool, _socket_in, netns, family)
            try:
                return await asyncio.shield(created)
            except asyncio.CancelledError:
                created.add_done_callback(_close_result)
                raise
            except _Stranded:
                self._discard(pool)  # queued behind the call that stranded it: go again
            except _RestoreFailed as exc:
                self._discard(pool)
                _log.error("netns_restore_failed", netns=netns, error=str(exc.__cause__))
                raise ZoneFailed(
                    f"cannot return from network namespace {netns}: {exc.__cause__}",
                    details={"netns": netns},
                ) from exc


_executor = _Executor()


def _check_name(netns: str) -> None:
    """Refuse a name that is not a plain file name under /run/netns (a bug if so)."""
    if not netns or "/" in netns or "\0" in netns or netns in {".", ".."}:
        raise ValueError(f"not a network namespace name: {netns!r}")


async def open_connection(
    netns: str,
    host: str,
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection to ``host``:``port`` (an IP literal) from inside ``netns``.

    Raises :class:`NetnsNotFound` when ``/run/netns/<netns>`` does not exist,
    :class:`ConnectFailed` when the connection is refused, unreachable or reset, and
    :class:`ConnectTimeout` when it is not established within ``timeout`` seconds.
    """
    _check_name(netns)
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    where = {"netns": netns, "host": host, "port": port}
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await _executor.socket_in(netns, family)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            return await asyncio.open_connection(sock=sock)
    except TimeoutError as exc:
        _close(sock)
        msg = f"no connection to {host}:{port} in {netns} within {timeout:.3g} s"
        raise ConnectTimeout(msg, details=where) from exc
    except OSError as exc:
        _close(sock)
        if sock is None and isinstance(exc, FileNotFoundError):
            raise NetnsNotFound(f"no network namespace {netns}", details=where) from exc
        if sock is None:
            msg = f"cannot enter network namespace {netns}: {exc}"
            raise ZoneFailed(msg, details=where) from exc
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectFailed(
            f"cannot connect to {host}:{port} in {netns}: {reason}",
            details={**where, "errno": errno.errorcode.get(exc.errno or 0, "")},
        ) from exc
    except BaseException:
        _close(sock)
        raise


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()
