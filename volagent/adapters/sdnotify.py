"""The systemd notification protocol (``sd_notify(3)``), without libsystemd.

Under ``Type=notify`` systemd passes the address of a datagram socket in ``NOTIFY_SOCKET``: a
file system path (``/run/systemd/notify``) or, starting with ``@``, a name in the abstract
namespace. Each notification is one datagram of ``KEY=VALUE`` lines: ``READY=1`` once start-up
is done, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` as a keep-alive,
``STOPPING=1`` and ``RELOADING=1``.

With ``WatchdogSec=`` set, systemd also passes ``WATCHDOG_USEC`` (the timeout) and
``WATCHDOG_PID`` (the process expected to ping); :attr:`Notifier.watchdog_interval_s` is the
recommended interval between pings, half the timeout.

Without ``NOTIFY_SOCKET`` (not started by systemd, or another ``Type=``) the notifier is
disabled and every method does nothing. Sending never raises: a notification that cannot be
sent is logged as a warning, once per notifier, and the agent carries on. Sockets are
non-blocking, so a service manager that does not read cannot stall the event loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Final

import structlog

__all__ = ["ENV_NOTIFY_SOCKET", "ENV_WATCHDOG_PID", "ENV_WATCHDOG_USEC", "Notifier"]

ENV_NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC: Final = "WATCHDOG_USEC"
ENV_WATCHDOG_PID: Final = "WATCHDOG_PID"

_log = structlog.get_logger(__name__)


class Notifier:
    """Sends notifications to the service manager at ``address`` (None: disabled).

    ``address`` is a socket path, or an abstract socket name starting with ``@``
    (:class:`ValueError` otherwise). ``watchdog_usec`` is the watchdog timeout systemd expects
    pings within (None: no watchdog). ``monotonic_ns`` is the clock stamped on
    ``RELOADING=1``. The methods never raise: the first notification that cannot be sent is
    logged as a warning, later ones silently dropped.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if watchdog_usec is not None and watchdog_usec <= 0:
            raise ValueError(f"watchdog_usec must be positive, not {watchdog_usec}")
        self._address = address
        self._target = None if address is None else _socket_target(address)
        self._watchdog_usec = watchdog_usec
        self._monotonic_ns = monotonic_ns
        self._warned = False

    @classmethod
    def from_env(
        cls, env: MutableMapping[str, str] = os.environ, *, unset: bool = False
    ) -> Notifier:
        """The notifier systemd set up for this process, from ``NOTIFY_SOCKET`` and friends.

        Disabled when ``NOTIFY_SOCKET`` is unset or empty, or (with a warning) when it names
        neither a path nor an abstract socket. The watchdog counts only when ``WATCHDOG_USEC``
        is a positive integer and ``WATCHDOG_PID``, if set, is this process. With ``unset``
        the three variables are removed from ``env`` afterwards, so that the processes the
        agent starts (zones among them) do not inherit them.
        """
        address = env.get(ENV_NOTIFY_SOCKET) or None
        usec = _watchdog_usec(env.get(ENV_WATCHDOG_USEC), env.get(ENV_WATCHDOG_PID))
        if unset:
            for var in (ENV_NOTIFY_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(var, None)
        try:
            return cls(address, watchdog_usec=usec)
        except ValueError:
            _log.warning("sdnotify_socket_unsupported", notify_socket=address)
            return cls(None)

    @property
    def enabled(self) -> bool:
        """Whether notifications are sent anywhere."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half the timeout); None when there is no watchdog."""
        if self._target is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """Start-up is complete (``READY=1``), with an optional status line."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        self._send(lines)

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows."""
        self._send([_status_line(text)])

    def stopping(self) -> None:
        """Shutdown has begun (``STOPPING=1``)."""
        self._send(["STOPPING=1"])

    def watchdog(self) -> None:
        """Ping the watchdog (``WATCHDOG=1``)."""
        self._send(["WATCHDOG=1"])

    def reloading(self) -> None:
        """A reload has begun (``RELOADING=1`` with ``MONOTONIC_USEC``); send ready() after."""
        self._send(["RELOADING=1", f"MONOTONIC_USEC={self._monotonic_ns() // 1000}"])

    def _send(self, lines: list[str]) -> None:
        if self._target is None:
            return
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0)  # non-blocking: a manager that does not read cannot stall us
                sock.sendto(message, self._target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _log.warning(
                    "sdnotify_send_failed",
                    notify_socket=self._address,
                    notification=lines[0],
                    error=exc.strerror or str(exc),
                )


def _socket_target(address: str) -> str:
    """The address to send to: a path as it is, an abstract name with ``@`` turned into NUL."""
    if address.startswith("/"):
        return address
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]
    raise ValueError(f"not a socket path or abstract socket name: {address!r}")


def _status_line(text: str) -> str:
    # One KEY=VALUE per line, and systemd drops a datagram that holds a NUL byte.
    return "STATUS=" + " ".join(text.replace("\0", " ").splitlines())


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    """The watchdog timeout meant for this process, as sd_watchdog_enabled(3) decides it."""
    if usec is None or not usec.isascii() or not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isascii() or not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec)
