from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.run import sh
from volagent.domain.results import RESULT_TYPES
from volagent.domain.schemas import all_schemas, render
from volagent.domain.tasks import TASK_KINDS
from volagent.errors import WIRE_CODES

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "docs" / "schemas"
SCHEMAS = all_schemas()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schemas_are_generated_from_the_current_code(name: str) -> None:
    path = SCHEMA_DIR / f"{name}.schema.json"
    assert path.exists(), f"{path} is missing; run scripts/gen-schemas"
    assert path.read_text(encoding="utf-8") == render(SCHEMAS[name]), (
        f"{path.relative_to(ROOT)} is out of date with the code; run scripts/gen-schemas"
    )


def test_no_stray_schema_files() -> None:
    assert {p.name for p in SCHEMA_DIR.glob("*.json")} == {f"{n}.schema.json" for n in SCHEMAS}


def test_the_files_are_pretty_sorted_and_end_with_a_newline() -> None:
    text = render({"b": 1, "a": [1]})
    assert text == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'


def test_the_task_schema_has_one_branch_per_kind_told_apart_by_kind() -> None:
    schema = SCHEMAS["task"]
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(schema["discriminator"]["mapping"]) == set(TASK_KINDS)
    assert len(schema["oneOf"]) == len(TASK_KINDS)
    defs = schema["$defs"]
    for kind, ref in schema["discriminator"]["mapping"].items():
        branch = defs[ref.split("/")[-1]]
        assert branch["properties"]["kind"]["const"] == kind
        assert set(branch["required"]) == {"v", "id", "kind", "cn", "created", "params"}
        params = defs[branch["properties"]["params"]["$ref"].split("/")[-1]]
        assert params["additionalProperties"] is False  # unknown params are refused


def test_the_event_schema_lists_every_result_and_error_code() -> None:
    schema = SCHEMAS["event"]
    results = {ref["$ref"].split("/")[-1] for ref in schema["properties"]["result"]["anyOf"]}
    assert results == {model.__name__ for model in RESULT_TYPES.values()}
    assert set(schema["$defs"]["ErrorBody"]["properties"]["code"]["enum"]) == WIRE_CODES
    assert set(schema["$defs"]["EventState"]["enum"]) == {
        "accepted",
        "running",
        "progress",
        "succeeded",
        "failed",
    }
    assert set(schema["required"]) == {"v", "task", "kind", "cn", "seq", "ts", "state"}


def test_the_volume_schema_requires_every_field_of_the_protocol() -> None:
    schema = SCHEMAS["volume"]
    assert set(schema["required"]) == {
        "uuid", "name", "owner_uuid", "size_mib", "used_bytes", "state", "resource",
        "filesystem_path", "nic", "allowed_clients", "read_only", "nfs_versions", "zone",
        "snapshots", "cn", "generation", "labels",
    }  # fmt: skip
    assert set(schema["$defs"]["Nic"]["required"]) == {"ip", "prefix", "network"}


def test_gen_schemas_checks_and_rewrites_stale_files(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "gen-schemas"
    shutil.copy(ROOT / "scripts" / "gen-schemas", script)
    out = tmp_path / "docs" / "schemas"
    out.mkdir(parents=True)
    (out / "task.schema.json").write_text("{}\n")

    with pytest.raises(RuntimeError, match="exited 1"):
        sh([sys.executable, str(script), "--check"])
    assert (
        sh([sys.executable, str(script), "--check"], check=False).count("run scripts/gen-schemas")
        == 3
    )
    assert (out / "task.schema.json").read_text() == "{}\n"  # --check writes nothing

    sh([sys.executable, str(script)])
    for name, schema in SCHEMAS.items():
        assert (out / f"{name}.schema.json").read_text(encoding="utf-8") == render(schema)
    assert sh([sys.executable, str(script), "--check"]) == ""
