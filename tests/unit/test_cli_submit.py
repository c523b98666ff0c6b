from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from volagent.cli import main
from volagent.cli_submit import (
    BAR_WIDTH,
    InvalidTaskInput,
    _Printer,
    build_task,
    event_line,
    parse_params,
    parse_value,
    progress_bar,
)
from volagent.config import Config
from volagent.domain.tasks import VolumeCreateTask, decode_task
from volagent.domain.wire import parse_timestamp
from volagent.errors import EXIT_USAGE

CN = "123e4567-e89b-12d3-a456-426614174000"
VOLUME = "0c8a3e1e-8d5e-4a59-9b3e-1c2d3e4f5a6b"
OWNER = "6d1f8d8c-3b0e-4f4a-8a57-2c9e0c3f0001"
NOW = datetime(2026, 11, 21, 10, 0, 0, 123000, tzinfo=UTC)
CREATE = [
    f"uuid={VOLUME}",
    "name=media",
    f"owner_uuid={OWNER}",
    "size_mib=64",
    "nic.ip=10.0.0.5",
    "nic.prefix=24",
    "nic.network=tenant",
    'allowed_clients=["10.0.0.0/24"]',
    "read_only=false",
    "labels.team=storage",
]


@pytest.fixture(autouse=True)
def _no_volagent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("VOLAGENT_"):
            monkeypatch.delenv(var)


@pytest.fixture
def cfg() -> Config:
    return Config.model_validate(
        {
            "node": {"uuid": CN},
            "storage": {"dataset_root": "tank/volumes"},
            "limits": {"max_volume_mib": 1024},
        }
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    # A broker nobody listens on: a test that got as far as publishing would fail.
    path.write_text(
        f'[node]\nuuid = "{CN}"\n[storage]\ndataset_root = "tank/volumes"\n'
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n',
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------- values and parameters


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("64", 64),
        ("-1.5", -1.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ('{"ip": "10.0.0.5"}', {"ip": "10.0.0.5"}),
        ('["10.0.0.0/24"]', ["10.0.0.0/24"]),
        ('"123"', "123"),
        ("media", "media"),
        ("10.0.0.5", "10.0.0.5"),
        (VOLUME, VOLUME),
        ("007", "007"),
        ("", ""),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("{broken", "{broken"),
    ],
)
def test_values_are_json_when_they_parse_else_strings(text: str, value: Any) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_dotted_keys_build_nested_objects() -> None:
    assert parse_params(["a.b.c=1", "a.b.d=x", "a.e=true", "top=v"]) == {
        "a": {"b": {"c": 1, "d": "x"}, "e": True},
        "top": "v",
    }


def test_a_dotted_key_adds_to_an_object_given_whole() -> None:
    params = parse_params(['nic={"ip": "10.0.0.5"}', "nic.prefix=24"])
    assert params == {"nic": {"ip": "10.0.0.5", "prefix": 24}}


def test_only_the_first_equals_sign_splits() -> None:
    assert parse_params(["labels.expr=a=b", "empty="]) == {"labels": {"expr": "a=b"}, "empty": ""}


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        (["size_mib"], "expected key=value"),
        (["=1"], "empty segment"),
        (["nic..ip=1"], "empty segment"),
        (["nic.=1"], "empty segment"),
        (["name=a", "name=b"], "name is given twice"),
        (["nic.ip=a", "nic.ip=b"], "nic.ip is given twice"),
        (["nic.ip=a", 'nic={"ip": "b"}'], "nic is given twice"),
        (["nic=5", "nic.ip=a"], "nic is already set to a non-object"),
        (["a.b=5", "a.b.c=1"], "a.b is already set to a non-object"),
    ],
)
def test_malformed_params_are_refused(pairs: list[str], fragment: str) -> None:
    with pytest.raises(InvalidTaskInput, match=re.escape(fragment)) as caught:
        parse_params(pairs)
    assert caught.value.exit_code == EXIT_USAGE


# ---------------------------------------------------------------- the message


def test_message_shape(cfg: Config) -> None:
    task = build_task(cfg, "volume.create", parse_params(CREATE), now=NOW)
    message = json.loads(task.payload)
    assert list(message) == ["v", "id", "kind", "cn", "created", "params"]
    assert message["v"] == 1
    assert message["kind"] == "volume.create" == task.kind
    assert message["cn"] == CN
    assert message["created"] == "2026-11-21T10:00:00.123Z"
    assert uuid.UUID(message["id"]).version == 4
    assert str(uuid.UUID(message["id"])) == message["id"] == task.id
    assert message["params"] == {
        "uuid": VOLUME,
        "name": "media",
        "owner_uuid": OWNER,
        "size_mib": 64,
        "nic": {"ip": "10.0.0.5", "prefix": 24, "network": "tenant"},
        "allowed_clients": ["10.0.0.0/24"],
        "read_only": False,
        "labels": {"team": "storage"},
    }
    decoded = decode_task(task.payload, cn=CN, limits=cfg.limits, now=NOW)
    assert isinstance(decoded, VolumeCreateTask)
    assert decoded.params.nic.ip == "10.0.0.5"


def test_each_task_gets_a_new_id_unless_given(cfg: Config) -> None:
    first = build_task(cfg, "volume.list", {}, now=NOW)
    second = build_task(cfg, "volume.list", {}, now=NOW)
    assert first.id != second.id
    chosen = str(uuid.uuid4())
    assert (
        json.loads(build_task(cfg, "volume.list", {}, now=NOW, task_id=chosen).payload)["id"]
        == chosen
    )


def test_deadline_is_created_plus_seconds(cfg: Config) -> None:
    message = json.loads(build_task(cfg, "volume.list", {}, now=NOW, deadline_s=90.5).payload)
    assert parse_timestamp(message["deadline"]) - parse_timestamp(message["created"]) == timedelta(
        seconds=90.5
    )
    assert list(message) == ["v", "id", "kind", "cn", "created", "deadline", "params"]


@pytest.mark.parametrize(
    ("kind", "params", "extra", "message"),
    [
        ("volume.get", {"uuid": "nope"}, {}, "invalid parameter uuid: must be a lowercase"),
        ("volume.get", {}, {}, "invalid parameter uuid: is required"),
        ("volume.get", {"uuid": VOLUME, "extra": 1}, {}, "invalid parameter extra"),
        ("volume.frob", {}, {}, "unknown task kind 'volume.frob'"),
        ("volume.list", {}, {"task_id": "not-a-uuid"}, "invalid task field id"),
        ("volume.list", {}, {"task_id": VOLUME.upper()}, "invalid task field id"),
        ("volume.resize", {"uuid": VOLUME, "size_mib": 4096}, {}, "size_mib"),
        ("volume.resize", {"uuid": VOLUME, "size_mib": "64"}, {}, "invalid parameter size_mib"),
        ("volume.list", {}, {"deadline_s": 0.0}, "--deadline-s must be a positive number"),
        ("volume.list", {}, {"deadline_s": float("nan")}, "--deadline-s must be a positive"),
    ],
)
def test_the_agents_decoder_refuses_before_publishing(
    cfg: Config, kind: str, params: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidTaskInput) as caught:
        build_task(cfg, kind, params, now=NOW, **extra)
    assert message in caught.value.message
    assert caught.value.exit_code == EXIT_USAGE


def test_a_decoder_refusal_keeps_its_details(cfg: Config) -> None:
    with pytest.raises(InvalidTaskInput) as caught:
        build_task(cfg, "volume.get", {"uuid": "nope"}, now=NOW)
    assert caught.value.details["parameter"] == "uuid"
    assert isinstance(caught.value.__cause__, Exception)
    assert type(caught.value.__cause__).__name__ == "InvalidParameter"


def test_a_message_over_the_size_limit_is_refused(cfg: Config) -> None:
    big = {"uuid": VOLUME, "name": "x" * 300_000}
    with pytest.raises(InvalidTaskInput, match=re.escape("(limits.max_task_bytes)")):
        build_task(cfg, "volume.get", big, now=NOW)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["volume.get", "--param", "uuid=nope"], "invalid parameter uuid"),
        (["volume.frob"], "unknown task kind 'volume.frob'"),
        (["volume.get", "--param", "uuid"], "expected key=value"),
        (["volume.list", "--id", "1234"], "invalid task field id"),
    ],
)
def test_invalid_input_exits_2_with_the_message_and_publishes_nothing(
    config_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status = main(["task", "submit", "--config", str(config_file), *argv])
    captured = capsys.readouterr()
    assert status == EXIT_USAGE
    assert message in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv", [["--deadline-s", "0"], ["--timeout", "-1"], ["--timeout", "soon"], []]
)
def test_bad_options_are_usage_errors(
    config_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    kind = ["volume.list"] if argv else []
    assert main(["task", "submit", "--config", str(config_file), *kind, *argv]) == EXIT_USAGE
    assert "usage: volagent task submit" in capsys.readouterr().err


def test_a_valid_task_goes_to_the_broker_and_a_refused_connection_exits_1(
    config_file: Path,
) -> None:
    # A process of its own: the command configures logging for the whole process.
    argv = ["task", "submit", "--config", str(config_file), "volume.list", "--timeout", "20"]
    done = subprocess.run(
        [sys.executable, "-m", "volagent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert "broker mqtt://127.0.0.1:1" in done.stderr
    assert "the task was not published" in done.stderr


# ---------------------------------------------------------------- showing events


def test_progress_bar() -> None:
    assert progress_bar(0, 2, width=10) == "[..........]"
    assert progress_bar(1, 2, width=10) == "[#####.....]"
    assert progress_bar(2, 2, width=10) == "[##########]"
    assert progress_bar(5, 2, width=10) == "[##########]"
    assert progress_bar(0, 0, width=10) == "[..........]"
    assert len(progress_bar(1, 3)) == BAR_WIDTH + 2


def _event(state: str, seq: int, **body: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "task": VOLUME,
        "kind": "volume.create",
        "cn": CN,
        "seq": seq,
        "ts": "2026-11-21T10:00:01.250Z",
        "state": state,
        **body,
    }


def test_event_lines() -> None:
    assert event_line(_event("accepted", 0)) == f"10:00:01.250 accepted  volume.create {VOLUME}"
    assert event_line(_event("running", 1)) == "10:00:01.250 running"
    progress = _event("progress", 2, progress={"phase": "zone", "done": 1, "total": 2})
    assert event_line(progress) == "10:00:01.250 progress  zone 1/2"
    error = {"code": "VolumeNotFound", "message": "no volume", "retryable": False, "details": {}}
    assert event_line(_event("failed", 3, error=error)) == (
        "10:00:01.250 failed    VolumeNotFound: no volume"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal() -> None:
    out = _Terminal()
    printer = _Printer(out)
    printer.event(_event("running", 1))
    printer.event(_event("progress", 2, progress={"phase": "dataset", "done": 0, "total": 2}))
    printer.event(_event("progress", 3, progress={"phase": "zone", "done": 1, "total": 2}))
    printer.event(_event("succeeded", 4, result={}))
    bar = progress_bar(1, 2)
    assert out.getvalue() == (
        "10:00:01.250 running\n"
        f"\r\x1b[K{progress_bar(0, 2)} dataset 0/2"
        f"\r\x1b[K{bar} zone 1/2\n"
        "10:00:01.250 succeeded\n"
    )


def test_progress_is_plain_lines_elsewhere() -> None:
    out = io.StringIO()
    printer = _Printer(out)
    printer.event(_event("progress", 2, progress={"phase": "zone", "done": 1, "total": 2}))
    printer.event(_event("succeeded", 3, result={}))
    assert out.getvalue() == "10:00:01.250 progress  zone 1/2\n10:00:01.250 succeeded\n"
