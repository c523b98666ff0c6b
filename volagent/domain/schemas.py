"""JSON Schemas of the wire messages, generated from the models (``scripts/gen-schemas``).

* ``task``: what the agent accepts; one ``oneOf`` branch per kind, told apart by ``kind``;
* ``event``: what the agent publishes, ``result`` being one of the result objects;
* ``volume``: the volume object, as the agent writes it.

:func:`render` gives the committed text: indented, sorted keys, a trailing newline.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from volagent.domain.events import Event
from volagent.domain.results import RESULT_TYPES
from volagent.domain.tasks import Task
from volagent.domain.volume import Volume

#: The JSON Schema dialect of every generated schema.
DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def _headed(schema: dict[str, Any], title: str, description: str) -> dict[str, Any]:
    return {"$schema": DIALECT, **schema, "title": title, "description": description}


def task_schema() -> dict[str, Any]:
    """The task message, as the agent validates it."""
    schema = TypeAdapter(Task).json_schema(mode="validation")
    return _headed(
        schema,
        "volagent task message, protocol v1",
        "A task for one compute node. Unknown envelope fields are ignored; unknown "
        "parameters are refused. At most limits.max_task_bytes (256 KiB by default).",
    )


def event_schema() -> dict[str, Any]:
    """The event message, with the result object of every kind."""
    results: list[type[BaseModel]] = list(dict.fromkeys(RESULT_TYPES.values()))
    keys, defs = models_json_schema(
        [(Event, "serialization"), *((model, "serialization") for model in results)]
    )
    schema: dict[str, Any] = defs["$defs"].pop(Event.__name__)
    schema["properties"]["result"] = {
        "description": schema["properties"]["result"]["description"],
        "anyOf": [keys[(model, "serialization")] for model in results],
    }
    schema["$defs"] = defs["$defs"]
    return _headed(
        schema,
        "volagent task event, protocol v1",
        "An event about one task; seq increases per task and every accepted task ends with "
        "exactly one succeeded or failed event.",
    )


def volume_schema() -> dict[str, Any]:
    """The volume object, as the agent writes it."""
    return _headed(
        Volume.model_json_schema(mode="serialization"),
        "volagent volume object, protocol v1",
        "One volume of one compute node; generation increases with every change.",
    )


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every schema by name; each is committed as ``docs/schemas/<name>.schema.json``."""
    return {"task": task_schema(), "event": event_schema(), "volume": volume_schema()}


def render(schema: dict[str, Any]) -> str:
    """The text of a schema file."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
