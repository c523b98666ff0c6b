"""Logging: structlog events and standard-library records, one line each, in one format.

When the output is not a terminal every line is a JSON object that ``bunyan`` reads::

    {"v":0,"name":"volagent","hostname":"n1","pid":42,"level":30,"msg":"task finished",
     "time":"2026-11-21T10:00:00.123Z","component":"volagent.worker","task_id":"t-1"}

On a terminal, structlog's console renderer is used instead. Both kinds of producer share the
output: structlog loggers hand their events to the standard library, and the root handler
installed by :func:`configure` renders them together with records from libraries that use
:mod:`logging` directly (aiomqtt, aiohttp, asyncio). The logger name becomes ``component``.

The project style is one canonical line per unit of work: bind its ids with :func:`bind`, and
log one line when it ends with everything learned on the way.

Loggers are cached on first use (``cache_logger_on_first_use``). Obtain them with
:func:`get_logger` or ``structlog.get_logger(__name__)``: both return lazy proxies, so a
module-level logger created before :func:`configure` follows the configuration in force when
it first logs. A logger that has already logged keeps the level filter of that time when
:func:`configure` is called again; its lines still go to the new output.

structlog has no ``trace`` method, so the ``trace`` level lets through what ``debug`` does.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import traceback
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TextIO, cast

import structlog

from volagent.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

#: Bunyan's level numbers by name.
LEVELS: Mapping[str, int] = MappingProxyType(
    {"trace": 10, "debug": 20, "info": 30, "warn": 40, "error": 50, "fatal": 60}
)

_STDLIB_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
# Names that structlog and the standard library put in ``level``, mapped to bunyan's numbers.
_BUNYAN_LEVELS = {**LEVELS, "warning": 40, "critical": 60}
_FORMATS = ("auto", "json", "console")


class _Handler(logging.StreamHandler[TextIO]):
    """The root handler installed by :func:`configure`, told apart from anyone else's."""


def configure(
    *,
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    name: str = "volagent",
) -> None:
    """Route structlog and standard-library logging to ``stream`` (default: standard error).

    ``fmt="auto"`` picks the console renderer when ``stream`` is a terminal and bunyan JSON
    otherwise. Calling it again replaces the previous configuration.
    """
    if level not in LEVELS:
        raise ConfigError(
            f"unknown log level {level!r}", [("log.level", f"must be one of {', '.join(LEVELS)}")]
        )
    if fmt not in _FORMATS:
        raise ConfigError(
            f"unknown log format {fmt!r}", [("log.format", f"must be one of {', '.join(_FORMATS)}")]
        )
    out = sys.stderr if stream is None else stream
    tty = out.isatty()
    renderer: Processor
    if fmt == "console" or (fmt == "auto" and tty):
        renderer = structlog.dev.ConsoleRenderer(colors=tty, timestamp_key="time")
    else:
        renderer = _bunyan_renderer(name, socket.gethostname())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_component,
        _add_time,
    ]
    numeric = _STDLIB_LEVELS[level]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)


def get_logger(component: str | None = None) -> FilteringBoundLogger:
    """Return a lazy logger whose lines carry ``component``.

    Without ``component``, structlog names the logger after the module that first logs with it.
    """
    logger = structlog.get_logger(component) if component else structlog.get_logger()
    return cast("FilteringBoundLogger", logger)


@contextmanager
def bind(**ids: object) -> Iterator[None]:
    """Add ``ids`` to every line logged inside the block, restoring the previous values after.

    The ids live in context variables, so tasks started inside the block inherit them and
    sibling asyncio tasks never see them.
    """
    with structlog.contextvars.bound_contextvars(**ids):
        yield


def _add_component(logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Name the component after the standard-library logger, unless one is bound."""
    record = event_dict.get("_record")
    name = record.name if isinstance(record, logging.LogRecord) else getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("component", name)
    return event_dict


def _add_time(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Stamp the event with the UTC time in ISO 8601, to the millisecond."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    event_dict["time"] = now.replace("+00:00", "Z")
    return event_dict


def _bunyan_renderer(name: str, hostname: str) -> Processor:
    """Render an event as one compact line of bunyan JSON."""

    def render(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> str:
        exc = _exception(event_dict.pop("exc_info", None))
        head: dict[str, object] = {
            "v": 0,
            "name": name,
            "hostname": hostname,
            "pid": os.getpid(),
            "level": _BUNYAN_LEVELS.get(str(event_dict.pop("level", "info")), LEVELS["info"]),
            "msg": str(event_dict.pop("event", "")),
            "time": event_dict.pop("time"),
        }
        if exc is not None:
            stack = "".join(traceback.format_exception(exc)).rstrip("\n")
            head["err"] = {"message": str(exc), "name": type(exc).__name__, "stack": stack}
        # Bunyan's own fields win; a clashing field of the event is kept with a trailing "_".
        fields = {(f"{key}_" if key in head else key): value for key, value in event_dict.items()}
        return json.dumps(head | fields, default=str, separators=(",", ":"))

    return render


def _exception(exc_info: object) -> BaseException | None:
    """Return the exception an ``exc_info`` value (True, a tuple, an exception) stands for."""
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, tuple):
        exc_info = exc_info[1]
    return exc_info if isinstance(exc_info, BaseException) else None
