"""scripts/install, staged with DESTDIR into a temporary directory, without the network."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install"
PREFIX = "/opt/volagent"
INSTALL_TIMEOUT_S = 300  # creating a virtual environment takes seconds; this only stops a hang


def build_wheel(out: Path) -> Path:
    """A wheel of this checkout, made by hand: no build backend, so nothing is downloaded.

    It holds the package's files and the metadata pip needs: name, version and the console
    scripts, all read from pyproject.toml. Dependencies are left out (installed --no-deps).
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files = {
        path.relative_to(ROOT).as_posix(): path.read_bytes()
        for path in sorted((ROOT / "volagent").rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
    scripts = "".join(f"{script} = {target}\n" for script, target in project["scripts"].items())
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    record = [f"{path},sha256={_digest(data)},{len(data)}" for path, data in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,", ""]).encode()
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def run_install(stage: Path, wheel: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "DESTDIR": str(stage),
        "PREFIX": PREFIX,
        "PYTHON": sys.executable,
        "VOLAGENT_INSTALL_PIP_ARGS": "--no-index --no-deps",
        **env,
    }
    return subprocess.run(
        [str(SCRIPT), str(wheel)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )


@dataclass(frozen=True)
class Staged:
    root: Path
    wheel: Path
    first: subprocess.CompletedProcess[str]

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Staged:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    root = tmp_path_factory.mktemp("stage")
    return Staged(root, wheel, run_install(root, wheel))


def test_install_succeeds(staged: Staged) -> None:
    assert staged.first.returncode == 0, staged.first.stderr
    assert staged.first.stdout == f"install: volagent 0.1.0 in {staged.path(PREFIX)}\n"


def test_the_package_is_installed_in_the_virtual_environment(staged: Staged) -> None:
    python = staged.path(f"{PREFIX}/bin/python")
    done = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, volagent; print(m.version('volagent'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "0.1.0\n"), done.stderr


def test_the_console_script_runs_from_prefix(staged: Staged) -> None:
    script = staged.path(f"{PREFIX}/bin/volagent").read_text(encoding="utf-8")
    assert script.splitlines()[0] == f"#!{PREFIX}/bin/python"
    assert "from volagent.cli import main" in script
    link = staged.path("/usr/local/bin/volagent")
    assert link.is_symlink()
    assert link.readlink() == Path(f"{PREFIX}/bin/volagent")


def test_no_staged_path_is_left_in_the_environment_scripts(staged: Staged) -> None:
    venv = staged.path(PREFIX)
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            assert str(staged.root).encode() not in path.read_bytes(), path


def test_the_unit_and_the_example_config_are_installed(staged: Staged) -> None:
    unit = staged.path("/etc/systemd/system/volagent.service")
    assert unit.read_bytes() == (ROOT / "systemd" / "volagent.service").read_bytes()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    example = (ROOT / "docs" / "config.example.toml").read_bytes()
    shipped = staged.path("/etc/volagent/config.toml.example")
    assert shipped.read_bytes() == example
    assert stat.S_IMODE(shipped.stat().st_mode) == 0o644
    config = staged.path("/etc/volagent/config.toml")
    assert config.read_bytes() == example
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_a_second_install_keeps_the_config_and_renews_the_rest(staged: Staged) -> None:
    assert staged.first.returncode == 0, staged.first.stderr
    config = staged.path("/etc/volagent/config.toml")
    config.write_text("# edited by the operator\n", encoding="utf-8")
    example = staged.path("/etc/volagent/config.toml.example")
    example.write_text("# stale\n", encoding="utf-8")
    staged.path("/usr/local/bin/volagent").unlink()
    [installed] = staged.path(PREFIX).glob("lib/python3*/site-packages/volagent/__init__.py")
    installed.write_text("# an older build of the same version\n", encoding="utf-8")

    again = run_install(staged.root, staged.wheel)
    assert again.returncode == 0, again.stderr
    assert config.read_text(encoding="utf-8") == "# edited by the operator\n"
    assert example.read_bytes() == (ROOT / "docs" / "config.example.toml").read_bytes()
    assert installed.read_bytes() == (ROOT / "volagent" / "__init__.py").read_bytes()
    assert staged.path("/usr/local/bin/volagent").readlink() == Path(f"{PREFIX}/bin/volagent")


def test_a_relative_prefix_is_refused(tmp_path: Path, staged: Staged) -> None:
    done = run_install(tmp_path / "stage", staged.wheel, PREFIX="opt/volagent")
    assert done.returncode == 1
    assert "PREFIX must be an absolute path" in done.stderr
    assert not (tmp_path / "stage").exists()
