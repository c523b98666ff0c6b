"""The routes of the local HTTP API: one table, read by the server and the OpenAPI builder.

Every route is a ``GET``. :data:`ROUTES` names each route's path, handler, documentation and
answers; :mod:`volagent.http.app` registers exactly these routes and
:mod:`volagent.http.openapi` documents exactly these, so the document cannot drift from the
server. Errors are JSON objects ``{"error": {"code", "message"}}`` with a code of
:class:`ApiErrorCode`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from aiohttp import web

from volagent.domain import names
from volagent.domain.wire import format_timestamp
from volagent.errors import InvalidParameter
from volagent.http.view import NodeView
from volagent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = [
    "JSON",
    "OPENAPI",
    "ROUTES",
    "VIEW",
    "ApiErrorCode",
    "Handler",
    "PathParam",
    "Reply",
    "Route",
    "error_response",
    "json_response",
    "schema_ref",
]

#: The media type of every JSON answer.
JSON: Final = "application/json"
#: Where the view lives in the application.
VIEW: Final = web.AppKey[NodeView]("view")
#: The OpenAPI document, rendered once when the application is built.
OPENAPI: Final = web.AppKey("openapi", bytes)

#: A route's handler.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiErrorCode(StrEnum):
    """The codes of the error objects the local HTTP API answers with."""

    INVALID_PARAMETER = "InvalidParameter"
    VOLUME_NOT_FOUND = "VolumeNotFound"
    TASK_NOT_FOUND = "TaskNotFound"
    NOT_FOUND = "NotFound"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    BAD_REQUEST = "BadRequest"
    INTERNAL = "Internal"
    UNAVAILABLE = "Unavailable"


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented answer of a route: what it means and its body's schema."""

    description: str
    schema: Mapping[str, Any]
    media_type: str = JSON


@dataclass(frozen=True, slots=True)
class PathParam:
    """A ``{name}`` part of a route's path, with the pattern it must match."""

    name: str
    description: str
    pattern: str


@dataclass(frozen=True, slots=True)
class Route:
    """A ``GET`` route: path, handler and documentation.

    ``asks_view`` says whether the handler calls the daemon's view: such a route may also
    answer 500 (the view failed) and 503 (it did not answer in time).
    """

    path: str
    handler: Handler
    operation_id: str
    summary: str
    description: str
    replies: Mapping[int, Reply]
    params: tuple[PathParam, ...] = ()
    asks_view: bool = True


def schema_ref(name: str) -> dict[str, str]:
    """A reference to the schema ``name`` of the OpenAPI document's components."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(body: object, *, status: int = 200) -> web.Response:
    """A JSON answer; mappings and timezone-aware datetimes in ``body`` are written as JSON."""
    text = json.dumps(body, default=_jsonable, ensure_ascii=False, separators=(",", ":"))
    return web.Response(
        body=text.encode("utf-8"), status=status, content_type=JSON, charset="utf-8"
    )


def error_response(
    status: int,
    code: ApiErrorCode,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error answer: ``{"error": {"code": code, "message": message}}``."""
    response = json_response({"error": {"code": code.value, "message": message}}, status=status)
    response.headers.update(headers or {})
    return response


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- handlers


async def _health(_request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.StreamResponse:
    checks = await request.app[VIEW].ready()
    ready = all(check.ok for check in checks)
    body = {
        "ready": ready,
        "checks": {check.name: {"ok": check.ok, "detail": check.detail} for check in checks},
    }
    return json_response(body, status=200 if ready else 503)


async def _status(request: web.Request) -> web.StreamResponse:
    return json_response(await request.app[VIEW].status())


async def _metrics(request: web.Request) -> web.StreamResponse:
    body = await request.app[VIEW].metrics()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _volumes(request: web.Request) -> web.StreamResponse:
    return json_response({"volumes": list(await request.app[VIEW].volumes())})


async def _volume(request: web.Request) -> web.StreamResponse:
    try:
        uuid = names.validate_volume_uuid(request.match_info["uuid"])
    except InvalidParameter as exc:
        return error_response(400, ApiErrorCode.INVALID_PARAMETER, exc.message)
    volume = await request.app[VIEW].volume(uuid)
    if volume is None:
        return error_response(404, ApiErrorCode.VOLUME_NOT_FOUND, f"no volume {uuid} on this node")
    return json_response(volume)


async def _task(request: web.Request) -> web.StreamResponse:
    try:
        task_id = names.validate_volume_uuid(request.match_info["id"], param="id")
    except InvalidParameter as exc:
        return error_response(400, ApiErrorCode.INVALID_PARAMETER, exc.message)
    task = await request.app[VIEW].task(task_id)
    if task is None:
        return error_response(404, ApiErrorCode.TASK_NOT_FOUND, f"no task {task_id} is known")
    return json_response(task)


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type=JSON, charset="utf-8")


# ---------------------------------------------------------------- the table

_ERROR = schema_ref("ApiError")
_UUID_PATTERN: Final = f"^{names.UUID_PATTERN}$"

#: Every route of the local HTTP API.
ROUTES: Final[tuple[Route, ...]] = (
    Route(
        path="/health",
        handler=_health,
        operation_id="getHealth",
        summary="Liveness",
        description="200 while the agent's event loop runs; asks nothing of the agent.",
        replies={200: Reply("The event loop runs.", schema_ref("Health"))},
        asks_view=False,
    ),
    Route(
        path="/ready",
        handler=_ready,
        operation_id="getReady",
        summary="Readiness, check by check",
        description="Ready when every check (broker, zfs, zones, central) is ok.",
        replies={
            200: Reply("Every check is ok.", schema_ref("Ready")),
            503: Reply("At least one check is not ok.", schema_ref("Ready")),
        },
    ),
    Route(
        path="/status",
        handler=_status,
        operation_id="getStatus",
        summary="Node status",
        description="Version, node uuid, uptime, broker state, tasks by state, volume counts.",
        replies={200: Reply("The status document.", schema_ref("Status"))},
    ),
    Route(
        path="/metrics",
        handler=_metrics,
        operation_id="getMetrics",
        summary="Prometheus metrics",
        description="The agent's metrics in the Prometheus text format 0.0.4.",
        replies={
            200: Reply("The text exposition.", {"type": "string"}, METRICS_CONTENT_TYPE),
        },
    ),
    Route(
        path="/volumes",
        handler=_volumes,
        operation_id="listVolumes",
        summary="Every volume of this node",
        description="The volume objects of this node, as the wire protocol writes them.",
        replies={200: Reply("The volumes.", schema_ref("VolumeList"))},
    ),
    Route(
        path="/volumes/{uuid}",
        handler=_volume,
        operation_id="getVolume",
        summary="One volume",
        description="The volume object of one volume of this node.",
        params=(PathParam("uuid", "The volume's uuid (lowercase canonical).", _UUID_PATTERN),),
        replies={
            200: Reply("The volume object.", schema_ref("Volume")),
            400: Reply("The uuid is malformed (code InvalidParameter).", _ERROR),
            404: Reply("This node has no such volume (code VolumeNotFound).", _ERROR),
        },
    ),
    Route(
        path="/tasks/{id}",
        handler=_task,
        operation_id="getTask",
        summary="One task",
        description="What the agent's journal holds about one task.",
        params=(PathParam("id", "The task id (lowercase canonical uuid).", _UUID_PATTERN),),
        replies={
            200: Reply("The task record.", schema_ref("Task")),
            400: Reply("The id is malformed (code InvalidParameter).", _ERROR),
            404: Reply("The agent knows no such task (code TaskNotFound).", _ERROR),
        },
    ),
    Route(
        path="/openapi.json",
        handler=_openapi,
        operation_id="getOpenApi",
        summary="This document",
        description="The OpenAPI 3.1 document of the local HTTP API.",
        replies={200: Reply("The OpenAPI document.", {"type": "object"})},
        asks_view=False,
    ),
)
