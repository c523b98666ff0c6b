"""The OpenAPI 3.1 document of the local HTTP API, built from the route table.

Paths, parameters and answers come from :data:`volagent.http.routes.ROUTES`, the table the
server registers; the volume, result and error objects come from the wire models. The document
is served at ``GET /openapi.json`` and committed as ``docs/openapi.json`` by
``scripts/gen-openapi``.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from volagent.domain import names
from volagent.domain.events import ErrorBody
from volagent.domain.results import RESULT_TYPES
from volagent.domain.schemas import render
from volagent.domain.volume import Volume
from volagent.engine.journal import TaskState
from volagent.http.routes import ROUTES, ApiErrorCode, Reply, Route, schema_ref

__all__ = ["OPENAPI_VERSION", "document", "render"]

#: The OpenAPI version of the document.
OPENAPI_VERSION: Final = "3.1.0"
#: The version of the local HTTP API (follows the wire protocol's).
API_VERSION: Final = "1"
#: The address the API listens on unless ``http.listen`` says otherwise.
DEFAULT_SERVER: Final = "http://127.0.0.1:5310"

_UUID: Final = {"type": "string", "pattern": f"^{names.UUID_PATTERN}$"}
_TIMESTAMP: Final = {"type": "string", "format": "date-time"}
_COUNT: Final = {"type": "integer", "minimum": 0}
_ERROR: Final = schema_ref("ApiError")
_INTERNAL = Reply("The agent failed to answer (code Internal); the agent logs why.", _ERROR)
_UNAVAILABLE = Reply("The agent did not answer in time (code Unavailable).", _ERROR)


def document() -> dict[str, Any]:
    """The OpenAPI document of the local HTTP API."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "volagent local HTTP API",
            "version": API_VERSION,
            "description": (
                "Read-only view of one compute node's agent: health, readiness, status, "
                "metrics, volumes and tasks. Listens on http.listen (a loopback address or a "
                "unix socket unless http.allow_non_loopback is set). Every error is an "
                "ApiError object; unknown paths answer 404 (NotFound) and methods other than "
                "GET answer 405 (MethodNotAllowed)."
            ),
        },
        "servers": [{"url": DEFAULT_SERVER, "description": "The default http.listen."}],
        "paths": {route.path: {"get": _operation(route)} for route in ROUTES},
        "components": {"schemas": _schemas()},
    }


def _operation(route: Route) -> dict[str, Any]:
    replies: dict[int, list[Reply]] = {status: [reply] for status, reply in route.replies.items()}
    if route.asks_view:
        replies.setdefault(500, []).append(_INTERNAL)
        replies.setdefault(503, []).append(_UNAVAILABLE)
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "description": route.description,
        "responses": {str(status): _response(replies[status]) for status in sorted(replies)},
    }
    if route.params:
        operation["parameters"] = [
            {
                "name": param.name,
                "in": "path",
                "required": True,
                "description": param.description,
                "schema": {"type": "string", "pattern": param.pattern},
            }
            for param in route.params
        ]
    return operation


def _response(replies: list[Reply]) -> dict[str, Any]:
    """One documented status; when it has several meanings, each is one of the body's shapes."""
    content: dict[str, list[Any]] = {}
    for reply in replies:
        content.setdefault(reply.media_type, []).append(dict(reply.schema))
    return {
        "description": " Or: ".join(reply.description for reply in replies),
        "content": {
            media: {"schema": schemas[0] if len(schemas) == 1 else {"oneOf": schemas}}
            for media, schemas in content.items()
        },
    }


def _schemas() -> dict[str, Any]:
    models: list[type[BaseModel]] = list(dict.fromkeys([Volume, ErrorBody, *RESULT_TYPES.values()]))
    keys, defs = models_json_schema(
        [(model, "serialization") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    results = list(dict.fromkeys(RESULT_TYPES.values()))
    own: dict[str, Any] = {
        "ApiError": _api_error(),
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Ready": _ready(),
        "Status": _status(),
        "VolumeList": {
            "type": "object",
            "required": ["volumes"],
            "properties": {"volumes": {"type": "array", "items": schema_ref("Volume")}},
        },
        "Task": _task(
            result=[keys[(model, "serialization")] for model in results],
            error=keys[(ErrorBody, "serialization")],
        ),
    }
    generated: dict[str, Any] = defs["$defs"]
    clash = own.keys() & generated.keys()
    if clash:
        raise ValueError(f"schema names defined twice: {sorted(clash)}")
    return generated | own


def _api_error() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "What every error answer of the local HTTP API carries.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"enum": [code.value for code in ApiErrorCode]},
                    "message": {"type": "string"},
                },
            }
        },
    }


def _ready() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["ready", "checks"],
        "properties": {
            "ready": {"type": "boolean", "description": "Whether every check is ok."},
            "checks": {
                "type": "object",
                "description": "Each check by name (broker, zfs, zones, central).",
                "additionalProperties": {
                    "type": "object",
                    "required": ["ok", "detail"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "detail": {"type": "string", "description": "What was found, in words."},
                    },
                },
            },
        },
    }


def _status() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["version", "cn", "uptime_s", "broker", "tasks", "volumes"],
        "properties": {
            "version": {"type": "string", "description": "The agent's version."},
            "cn": {**_UUID, "description": "This compute node's uuid."},
            "uptime_s": {"type": "number", "minimum": 0, "description": "Seconds since start."},
            "broker": {
                "type": "object",
                "description": "The MQTT broker connection.",
                "properties": {"connected": {"type": "boolean"}},
            },
            "tasks": {
                "type": "object",
                "description": "Tasks the journal holds, by state.",
                "propertyNames": {"enum": [state.value for state in TaskState]},
                "additionalProperties": _COUNT,
            },
            "volumes": {
                "type": "object",
                "description": "Volumes by state, and their total.",
                "required": ["total"],
                "properties": {"total": _COUNT},
                "additionalProperties": _COUNT,
            },
        },
    }


def _task(*, result: list[Any], error: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": {**_UUID, "description": "The task id."},
        "kind": {
            "type": ["string", "null"],
            "description": "The task kind; null when the message did not say.",
        },
        "state": {"enum": [state.value for state in TaskState]},
        "received": {**_TIMESTAMP, "description": "When the agent received the task."},
        "started": {"anyOf": [_TIMESTAMP, {"type": "null"}], "description": "First start."},
        "finished": {"anyOf": [_TIMESTAMP, {"type": "null"}], "description": "End."},
        "attempts": {**_COUNT, "description": "How often the task was started."},
        "volume_uuid": {
            "anyOf": [_UUID, {"type": "null"}],
            "description": "The volume the task is about, if any.",
        },
        "result": {
            "anyOf": [*result, {"type": "null"}],
            "description": "The result object of a succeeded task, else null.",
        },
        "error": {
            "anyOf": [error, {"type": "null"}],
            "description": "The error object of a failed task, else null.",
        },
    }
    return {"type": "object", "required": list(fields), "properties": fields}
