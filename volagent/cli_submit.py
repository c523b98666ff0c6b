"""``volagent task submit``: build a protocol-v1 task, check it, publish it, follow its events.

The task is built from ``--param key=value`` pairs (:func:`parse_params`): a value is taken as
JSON when it parses as JSON (``size_mib=64``, ``force=true``, ``nic={"ip": ...}``,
``allowed_clients=["10.0.0.0/24"]``) and as a string otherwise (``name=media``); a dotted key
builds nested objects (``nic.ip=10.0.0.5``). :func:`build_task` wraps the parameters in the
envelope and checks the whole message with the agent's own decoder before anything is sent;
an invalid task raises :class:`InvalidTaskInput` (exit status 2).

:func:`submit` publishes the message at QoS 1 on the node's tasks topic with the agent's broker
credentials but a client id of its own (:func:`mqtt_client`; never the agent's, whose session
it would take over). With ``follow`` it subscribes to the events topic first, prints one line
per event of the task (a progress bar on a terminal), and ends at the terminal event: the
result as indented JSON and status 0, or the error and status 1.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, TextIO

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from volagent.adapters.mqtt import BrokerUnavailable, credentials, tls_context
from volagent.config import Config
from volagent.domain.tasks import decode_task
from volagent.domain.wire import PROTOCOL_VERSION, format_timestamp
from volagent.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, TaskRejected, VolagentError

__all__ = [
    "BAR_WIDTH",
    "FollowTimeout",
    "InvalidTaskInput",
    "Task",
    "build_task",
    "event_line",
    "mqtt_client",
    "parse_params",
    "parse_value",
    "progress_bar",
    "submit",
]

#: Characters between the brackets of the progress bar.
BAR_WIDTH: Final = 20
#: How long one broker round trip (CONNACK, SUBACK, PUBACK) may take.
BROKER_TIMEOUT_S: Final = 10.0
_TERMINAL: Final = frozenset({"succeeded", "failed"})


class InvalidTaskInput(VolagentError):
    """The task given on the command line is not valid; nothing was published."""

    code: ClassVar[str] = "InvalidTaskInput"
    exit_code: ClassVar[int] = EXIT_USAGE


class FollowTimeout(VolagentError):
    """The task's terminal event did not come within ``--timeout``."""

    code: ClassVar[str] = "FollowTimeout"


# ---------------------------------------------------------------- building the task


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_value(text: str) -> Any:
    """``text`` as JSON if it is JSON (``NaN`` and ``Infinity`` are not), else as a string."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return text


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """The parameters object of ``key=value`` pairs; dotted keys build nested objects.

    A dotted key may add to an object given whole (``nic={"ip": ...}`` then ``nic.prefix=24``)
    but not replace a value, and no key may be given twice: those raise
    :class:`InvalidTaskInput`, as does a pair without ``=`` or with an empty key segment.
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise InvalidTaskInput(f"--param {pair!r}: expected key=value")
        path = key.split(".")
        if not all(path):
            raise InvalidTaskInput(f"--param {pair!r}: {key!r} is not a key (empty segment)")
        table = params
        for depth, part in enumerate(path[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                where = ".".join(path[: depth + 1])
                raise InvalidTaskInput(f"--param {pair!r}: {where} is already set to a non-object")
        leaf = path[-1]
        if leaf in table:
            raise InvalidTaskInput(f"--param {pair!r}: {key} is given twice")
        table[leaf] = parse_value(text)
    return params


@dataclass(frozen=True, slots=True)
class Task:
    """A checked task: its id, kind and the exact bytes to publish."""

    id: str
    kind: str
    payload: bytes = field(repr=False)


def build_task(
    config: Config,
    kind: str,
    params: Mapping[str, Any],
    *,
    now: datetime,
    task_id: str | None = None,
    deadline_s: float | None = None,
) -> Task:
    """Build the task message for this node and check it as the agent will.

    ``now`` (timezone-aware) is ``created``; ``deadline_s`` seconds later is the deadline.
    ``task_id`` defaults to a new random UUID. Raises :class:`InvalidTaskInput` with the
    decoder's message when the agent would refuse the task.
    """
    message: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": task_id if task_id is not None else str(uuid.uuid4()),
        "kind": kind,
        "cn": config.cn,
        "created": format_timestamp(now),
    }
    if deadline_s is not None:
        if not math.isfinite(deadline_s) or deadline_s <= 0:
            raise InvalidTaskInput(f"--deadline-s must be a positive number, not {deadline_s!r}")
        message["deadline"] = format_timestamp(now + timedelta(seconds=deadline_s))
    message["params"] = dict(params)
    payload = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    try:
        decode_task(payload, cn=config.cn, limits=config.limits, now=now)
    except TaskRejected as exc:
        raise InvalidTaskInput(exc.message, details=exc.details) from exc
    return Task(id=message["id"], kind=kind, payload=payload)


# ---------------------------------------------------------------- the broker


def mqtt_client(config: Config, client_id: str) -> aiomqtt.Client:
    """A client of the agent's broker with the agent's credentials and TLS, as ``client_id``.

    The session is clean and ends with the connection: the broker keeps nothing for it.
    Raises :class:`~volagent.adapters.mqtt.BrokerUnavailable` when the password file or the
    CA file cannot be read.
    """
    username, password = credentials(config.mqtt)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
    properties.SessionExpiryInterval = 0
    return aiomqtt.Client(
        config.mqtt.host,
        config.mqtt.port,
        username=username,
        password=password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        properties=properties,
        keepalive=config.mqtt.keepalive_s,
        timeout=BROKER_TIMEOUT_S,
        tls_context=tls_context(config.mqtt),
    )


# ---------------------------------------------------------------- showing events


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#####.....]``: ``done`` of ``total`` as ``width`` characters (empty when total is 0)."""
    filled = 0 if total <= 0 else round(width * min(max(done, 0), total) / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _error_text(error: object) -> str:
    if not isinstance(error, Mapping):
        return "no error object"
    return f"{error.get('code', '?')}: {error.get('message', '')}"


def event_line(event: Mapping[str, Any]) -> str:
    """One line about one event: time, state and what the state carries."""
    state = str(event.get("state", "?"))
    ts = str(event.get("ts", ""))
    clock = ts[11:23] if len(ts) >= 23 else ts
    detail = ""
    if state == "accepted":
        detail = f"{event.get('kind', '')} {event.get('task', '')}"
    elif state == "progress":
        progress = event.get("progress")
        if isinstance(progress, Mapping):
            detail = f"{progress.get('phase', '')} {progress.get('done')}/{progress.get('total')}"
    elif state == "failed":
        detail = _error_text(event.get("error"))
    return f"{clock} {state:<9} {detail}".rstrip()


class _Printer:
    """Writes event lines; on a terminal, progress events redraw one bar line in place."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._bar_shown = False

    def event(self, event: Mapping[str, Any]) -> None:
        progress = event.get("progress")
        if self._tty and event.get("state") == "progress" and isinstance(progress, Mapping):
            done, total = progress.get("done"), progress.get("total")
            if isinstance(done, int) and isinstance(total, int):
                bar = progress_bar(done, total)
                self._out.write(f"\r\x1b[K{bar} {progress.get('phase', '')} {done}/{total}")
                self._out.flush()
                self._bar_shown = True
                return
        self.line(event_line(event))

    def line(self, text: str) -> None:
        if self._bar_shown:
            self._out.write("\n")
            self._bar_shown = False
        self._out.write(text + "\n")
        self._out.flush()


def _decode_event(payload: object, task_id: str) -> dict[str, Any] | None:
    """The event if ``payload`` is a JSON object about ``task_id``, else None."""
    if not isinstance(payload, bytes | bytearray):
        return None
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or event.get("task") != task_id:
        return None
    return event


async def _follow(client: aiomqtt.Client, task: Task, printer: _Printer) -> dict[str, Any]:
    """Print the task's events as they come (each ``seq`` once); return the terminal one."""
    seen: set[object] = set()
    async for message in client.messages:
        event = _decode_event(message.payload, task.id)
        if event is None or event.get("seq") in seen:
            continue
        seen.add(event.get("seq"))
        printer.event(event)
        if event.get("state") in _TERMINAL:
            return event
    msg = "the broker closed the connection while following the task"
    raise BrokerUnavailable(msg)


def _outcome(event: Mapping[str, Any], printer: _Printer) -> int:
    if event.get("state") == "succeeded":
        printer.line(json.dumps(event.get("result"), indent=2, ensure_ascii=False))
        return EXIT_OK
    printer.line(json.dumps(event.get("error"), indent=2, ensure_ascii=False))
    return EXIT_FAILURE


async def submit(
    config: Config,
    task: Task,
    *,
    follow: bool,
    timeout_s: float,
    out: TextIO,
) -> int:
    """Publish ``task``; with ``follow`` print its events until the terminal one.

    Without ``follow``, prints the task id once the broker has the task (PUBACK) and returns
    0. With it, returns 0 when the task succeeded and 1 when it failed. Everything, broker
    connection included, takes at most ``timeout_s`` seconds: then :class:`FollowTimeout`
    (the task was published) or :class:`~volagent.adapters.mqtt.BrokerUnavailable` (it was
    not) is raised, as it is for broker errors.
    """
    client = mqtt_client(config, f"volagent-submit-{uuid.uuid4().hex[:12]}")
    printer = _Printer(out)
    published = False
    try:
        async with asyncio.timeout(timeout_s), client:
            if follow:
                await client.subscribe(config.events_topic, qos=1)
            await client.publish(config.tasks_topic, task.payload, qos=1)
            published = True
            if not follow:
                printer.line(task.id)
                return EXIT_OK
            return _outcome(await _follow(client, task, printer), printer)
    except TimeoutError as exc:
        if published:
            raise FollowTimeout(
                f"task {task.id} did not finish within {timeout_s:g} s; it may still run"
                f" (the agent's HTTP API shows it at /tasks/{task.id})",
                details={"task": task.id},
            ) from exc
        raise BrokerUnavailable(
            f"the broker at {config.mqtt.url} did not take the task within {timeout_s:g} s"
        ) from exc
    except (aiomqtt.MqttError, OSError) as exc:
        state = "after publishing the task" if published else "the task was not published"
        raise BrokerUnavailable(f"broker {config.mqtt.url}: {exc} ({state})") from exc
