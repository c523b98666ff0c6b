from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from volagent import __version__, config
from volagent.cli import main
from volagent.errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE

UUID = "123e4567-e89b-12d3-a456-426614174000"
VALID = f"""
[node]
uuid = "{UUID}"
[storage]
dataset_root = "tank/volumes"
"""
BAD = """
[mqtt]
url = "http://broker"
[storage]
dataset_root = "tank"
"""


@pytest.fixture(autouse=True)
def _no_volagent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("VOLAGENT_"):
            monkeypatch.delenv(var)


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"volagent {__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "usage: volagent" in capsys.readouterr().err


def test_unknown_command_and_extra_argument_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["frobnicate"]) == EXIT_USAGE
    assert main(["configcheck", str(_write(tmp_path, VALID)), "extra"]) == EXIT_USAGE
    assert "unrecognized arguments: extra" in capsys.readouterr().err


def test_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, VALID)
    assert main(["configcheck", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"config OK: {path}",
        f"cn: {UUID}",
        "dataset root: tank/volumes",
        f"broker: mqtt://127.0.0.1:1883 (client id volagent-{UUID})",
    ]
    assert err == ""


def test_invalid_file_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BAD)
    assert main(["configcheck", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"volagent: invalid configuration in {path}: 3 problems"
    assert sorted(line.split(":")[0] for line in lines[1:]) == [
        "mqtt.url",
        "node.uuid",
        "storage.dataset_root",
    ]
    assert "node.uuid: required key is missing" in lines


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["configcheck", str(path)]) == EXIT_CONFIG
    assert f"{path}: file not found" in capsys.readouterr().err.splitlines()


def test_file_from_volagent_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, VALID, "from-env.toml")
    monkeypatch.setenv("VOLAGENT_CONFIG", str(path))
    assert main(["configcheck"]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"config OK: {path}\n")


def test_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "default.toml")
    assert main(["configcheck"]) == EXIT_CONFIG
    assert f"{tmp_path / 'default.toml'}: file not found" in capsys.readouterr().err


def test_env_overrides_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, VALID)
    monkeypatch.setenv("VOLAGENT_MQTT_URL", "mqtts://broker.example")
    monkeypatch.setenv("VOLAGENT_MQTT_CLIENT_ID", "agent-1")
    assert main(["configcheck", str(path)]) == EXIT_OK
    assert "broker: mqtts://broker.example (client id agent-1)" in capsys.readouterr().out

    monkeypatch.setenv("VOLAGENT_ENGINE_MAX_CONCURENT", "4")
    assert main(["configcheck", str(path)]) == EXIT_CONFIG
    assert "VOLAGENT_ENGINE_MAX_CONCURENT: not a setting" in capsys.readouterr().err


def test_installed_command_reports_bad_keys(tmp_path: Path) -> None:
    _write(tmp_path, BAD, "bad.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLAGENT_")}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("volagent")), "configcheck", "bad.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stdout == ""
    for key in ("mqtt.url", "node.uuid", "storage.dataset_root"):
        assert f"\n{key}: " in result.stderr
