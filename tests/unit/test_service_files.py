"""The service files: systemd/volagent.service, smf/volagent.xml and its method script."""

from __future__ import annotations

import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from volagent import config
from volagent.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "volagent.service"
MANIFEST = ROOT / "smf" / "volagent.xml"
METHOD = ROOT / "smf" / "method" / "volagent"

BINARY = "/usr/local/bin/volagent"  # where scripts/install links the console script
CONFIG = str(config.DEFAULT_PATH)
SHUTDOWN_GRACE_S = config.EngineConfig.model_fields["shutdown_grace_s"].default
COMMAND_TIMEOUT_S = 60

# ---------------------------------------------------------------- systemd

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections of a unit file, each a list of (key, value) in file order."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not used"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not KEY=VALUE: {raw}"
        assert current is not None, f"line {number}: outside a section: {raw}"
        current.append((key.strip(), value.strip()))
    return sections


def directive(unit: Unit, section: str, key: str) -> str:
    """The value of a directive set exactly once."""
    values = [v for k, v in unit[section] if k == key]
    assert len(values) == 1, f"[{section}] {key} is set {len(values)} times"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (scripts/install-deps)"
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def verify(text: str, tmp_path: Path) -> str:
    """Everything ``systemd-analyze verify`` says about the unit ``text``; "" when clean.

    verify also checks that every Exec binary exists: the copy runs a stub in ``tmp_path``
    instead of the installed console script, the only change made to the unit.
    """
    stub = tmp_path / "bin" / "volagent"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "volagent.service"
    copy.write_text(text.replace(BINARY, str(stub)), encoding="utf-8")
    done = systemd_analyze("verify", "--man=no", "--generators=no", str(copy))
    report = done.stdout + done.stderr
    return report if done.returncode == 0 else f"exit {done.returncode}\n{report}"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(encoding="utf-8"), tmp_path) == ""


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("KillMode=process", "KillMode=processes"),
        ("Type=notify", "Type=notified"),
        ("WatchdogSec=30", "WatchdogSec=half a minute"),
        ("RestrictAddressFamilies=AF_UNIX", "RestrictAddressFamilies=AF_UNIXX"),
        ("SystemCallFilter=~@clock", "SystemCallFilter=~@clocks"),
        ("NotifyAccess=main", "NotifyAcess=main"),
    ],
)
def test_verify_reports_a_broken_unit(tmp_path: Path, old: str, new: str) -> None:
    # The check above can fail: systemd-analyze reports such mistakes even with exit status 0.
    text = UNIT.read_text(encoding="utf-8")
    assert f"\n{old}" in text
    assert verify(text.replace(f"\n{old}", f"\n{new}", 1), tmp_path) != ""


def test_unit_directives(unit: Unit) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStartPre": f"{BINARY} configcheck {CONFIG}",
        "ExecStart": f"{BINARY} run --config {CONFIG}",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillMode": "process",
        "StateDirectory": "volagent",
        "NoNewPrivileges": "yes",
        "RestrictNamespaces": "net mnt",
    }
    assert {key: directive(unit, "Service", key) for key in expected} == expected
    assert directive(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in directive(unit, "Unit", "Wants").split()
    assert "network-online.target" in directive(unit, "Unit", "After").split()


def test_unit_stop_timeout_exceeds_the_shutdown_grace(unit: Unit) -> None:
    timeout = float(directive(unit, "Service", "TimeoutStopSec"))
    assert SHUTDOWN_GRACE_S < timeout <= SHUTDOWN_GRACE_S + 30


def test_unit_keeps_the_host_mount_namespace_and_cgroups(unit: Unit) -> None:
    # Zones are made from the agent's mount namespace and must be visible to the next agent
    # (ip netns bind mounts, shared ZFS mounts); their cgroups live under /sys/fs/cgroup. The
    # other options here would be inherited by every zone or take away root (see the unit).
    namespacing = {
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths",
        "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
        "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags", "ProtectClock",
        "DevicePolicy", "DeviceAllow", "ProtectHostname", "PrivateNetwork", "PrivateUsers",
        "DynamicUser", "User", "Delegate",
    }  # fmt: skip
    assert not namespacing & {key for key, _ in unit["Service"]}


def test_unit_capability_names_are_known_to_systemd(unit: Unit) -> None:
    # systemd 252 ignores an unknown capability name without a word, even in verify.
    listing = systemd_analyze("capability")
    assert listing.returncode == 0, listing.stderr
    known = {line.split()[0].upper() for line in listing.stdout.splitlines()[1:] if line}
    value = directive(unit, "Service", "CapabilityBoundingSet")
    assert value.startswith("~"), "a deny list: the zones need most capabilities"
    dropped = value[1:].split()
    assert dropped
    assert set(dropped) <= known, set(dropped) - known
    assert not {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_CHOWN", "CAP_SETUID"} & set(dropped)


def _cli(argv: list[str]) -> dict[str, object]:
    try:
        return vars(build_parser().parse_args(argv))
    except SystemExit as exc:
        pytest.fail(f"`volagent {' '.join(argv)}` is not a valid command line (exit {exc.code})")


def test_exec_start_pre_is_a_volagent_command_line(unit: Unit) -> None:
    binary, *argv = directive(unit, "Service", "ExecStartPre").split()
    assert binary == BINARY
    args = _cli(argv)
    assert args["command"] == "configcheck"
    assert str(args["file"]) == CONFIG


def test_exec_start_is_a_volagent_command_line(unit: Unit) -> None:
    binary, *argv = directive(unit, "Service", "ExecStart").split()
    assert binary == BINARY
    args = _cli(argv)
    assert args["command"] == "run"
    assert str(args["config"]) == CONFIG


# ---------------------------------------------------------------- SMF manifest

DOCTYPE = '<!DOCTYPE service_bundle SYSTEM "/usr/share/lib/xml/dtd/service_bundle.dtd.1">'
METHOD_PATH = "/opt/volagent/lib/svc/method/volagent"
SMF_CONFIG = "/opt/volagent/etc/config.toml"
FMRI = "svc:/site/volagent:default"
# The order of a <service>'s children in the service_bundle DTD (each kind may be absent).
SERVICE_CHILDREN = (
    "create_default_instance", "single_instance", "restarter", "dependency", "dependent",
    "method_context", "exec_method", "property_group", "instance", "stability", "template",
)  # fmt: skip
REPEATABLE = {"dependency", "dependent", "exec_method", "property_group", "instance"}


@pytest.fixture(scope="module")
def service() -> ET.Element:
    root = ET.parse(MANIFEST).getroot()  # noqa: S314  # the repository's own file, not untrusted input
    assert root.tag == "service_bundle"
    assert root.attrib == {"type": "manifest", "name": "volagent"}
    [element] = list(root)
    assert element.tag == "service"
    return element


def test_manifest_is_well_formed_xml_with_the_smf_doctype() -> None:
    assert shutil.which("xmllint"), "xmllint is missing (scripts/install-deps)"
    done = subprocess.run(
        ["xmllint", "--noout", "--nonet", str(MANIFEST)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert DOCTYPE in MANIFEST.read_text(encoding="utf-8").splitlines()[:2]


def test_manifest_service_children_follow_the_dtd_order(service: ET.Element) -> None:
    tags = [child.tag for child in service]
    assert set(tags) <= set(SERVICE_CHILDREN), set(tags) - set(SERVICE_CHILDREN)
    positions = [SERVICE_CHILDREN.index(tag) for tag in tags]
    assert positions == sorted(positions), tags
    assert all(tags.count(tag) == 1 for tag in set(tags) - REPEATABLE), tags
    assert service.attrib == {"name": "site/volagent", "type": "service", "version": "1"}
    assert service.find("create_default_instance") is not None
    assert service.find("single_instance") is not None


def test_manifest_dependencies(service: ET.Element) -> None:
    found = {
        dep.get("name"): (
            dep.get("grouping"),
            dep.get("type"),
            [fmri.get("value") for fmri in dep.findall("service_fmri")],
        )
        for dep in service.findall("dependency")
    }
    assert found == {
        "network": ("require_all", "service", ["svc:/milestone/network:default"]),
        "filesystem-local": ("require_all", "service", ["svc:/system/filesystem/local:default"]),
    }
    allowed_restart_on = {"error", "restart", "refresh", "none"}
    assert all(dep.get("restart_on") in allowed_restart_on for dep in service.iter("dependency"))


def _property_groups(service: ET.Element) -> dict[str, tuple[str, dict[str, tuple[str, str]]]]:
    groups = {}
    for group in service.findall("property_group"):
        values = {}
        for prop in group:
            assert prop.tag == "propval", prop.tag
            values[str(prop.get("name"))] = (str(prop.get("type")), str(prop.get("value")))
        groups[str(group.get("name"))] = (str(group.get("type")), values)
    return groups


def test_manifest_property_groups(service: ET.Element) -> None:
    assert _property_groups(service) == {
        "startd": (
            "framework",
            {"duration": ("astring", "child"), "ignore_error": ("astring", "core,signal")},
        ),
        "config": ("application", {"config_file": ("astring", SMF_CONFIG)}),
    }
    [pattern] = service.findall("template/pg_pattern")
    assert (pattern.get("name"), pattern.get("type"), pattern.get("required")) == (
        "config",
        "application",
        "true",
    )
    [prop] = pattern.findall("prop_pattern")
    assert (prop.get("name"), prop.get("type"), prop.get("required")) == (
        "config_file",
        "astring",
        "true",
    )


def test_manifest_methods(service: ET.Element) -> None:
    methods = {m.get("name"): m.attrib for m in service.findall("exec_method")}
    assert set(methods) == {"start", "stop"}
    assert all(m["type"] == "method" for m in methods.values())
    assert methods["start"]["exec"] == METHOD_PATH
    assert methods["stop"]["exec"] == ":kill"
    assert SHUTDOWN_GRACE_S < int(methods["stop"]["timeout_seconds"]) <= SHUTDOWN_GRACE_S + 30
    assert int(methods["start"]["timeout_seconds"]) >= 0
    [path] = [
        e.get("value")
        for e in service.findall("method_context/method_environment/envvar")
        if e.get("name") == "PATH"
    ]
    assert str(path).split(":")[0] == "/opt/volagent/bin"


# ---------------------------------------------------------------- SMF method script


def test_method_script_is_executable_posix_sh() -> None:
    assert METHOD.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    assert METHOD.stat().st_mode & stat.S_IXUSR
    done = subprocess.run(
        ["sh", "-n", str(METHOD)], capture_output=True, text=True, timeout=10, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


class FakeSmf:
    """svcprop and volagent stand-ins on PATH; volagent logs "<pid> <argv>" per call."""

    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.log = tmp_path / "volagent.log"
        self.log.touch()

    def svcprop(self, *, value: str | None) -> None:
        answer = f"echo '{value}'" if value is not None else "exit 1"
        self._script(
            "svcprop",
            f'[ "$*" = "-p config/config_file {FMRI}" ] || '
            '{ echo "svcprop: unexpected arguments: $*" >&2; exit 2; }\n'
            f"{answer}\n",
        )

    def volagent(self, *, configcheck_status: int) -> None:
        self._script(
            "volagent",
            f'echo "$$ $*" >> {self.log}\n'
            f'[ "$1" = configcheck ] && exit {configcheck_status}\n'
            "exit 0\n",
        )

    def _script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def run(self, *, fmri: str | None = FMRI) -> tuple[int, int, list[str], str]:
        """Run the method as svc.startd would: (pid, exit status, volagent calls, stderr)."""
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C"}
        if fmri is not None:
            env["SMF_FMRI"] = fmri
        with subprocess.Popen(
            [str(METHOD)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child:
            _, err = child.communicate(timeout=COMMAND_TIMEOUT_S)
        return child.pid, child.returncode, self.log.read_text().splitlines(), err


@pytest.fixture
def smf(tmp_path: Path) -> FakeSmf:
    return FakeSmf(tmp_path)


def test_method_checks_the_config_then_becomes_the_agent(smf: FakeSmf) -> None:
    smf.svcprop(value="/srv/volagent/config.toml")
    smf.volagent(configcheck_status=0)
    pid, status, calls, err = smf.run()
    assert (status, err) == (0, "")
    check, run = calls
    assert check.split(" ", 1)[1] == "configcheck /srv/volagent/config.toml"
    assert check.split(" ", 1)[0] != str(pid)
    # exec: svc.startd's child is the agent itself, not a shell waiting for it.
    assert run == f"{pid} run --config /srv/volagent/config.toml"


def test_method_refused_config_is_a_configuration_error(smf: FakeSmf) -> None:
    smf.svcprop(value="/srv/volagent/config.toml")
    smf.volagent(configcheck_status=78)
    _, status, calls, _ = smf.run()
    assert status == 96  # SMF_EXIT_ERR_CONFIG: maintenance, not a restart loop
    assert [call.split(" ", 1)[1] for call in calls] == ["configcheck /srv/volagent/config.toml"]


@pytest.mark.parametrize("value", [None, ""])
def test_method_without_the_property_is_a_configuration_error(
    smf: FakeSmf, value: str | None
) -> None:
    smf.svcprop(value=value)
    smf.volagent(configcheck_status=0)
    _, status, calls, err = smf.run()
    assert status == 96
    assert calls == []
    assert "config/config_file" in err


def test_method_outside_smf_refuses_to_run(smf: FakeSmf) -> None:
    smf.svcprop(value="/srv/volagent/config.toml")
    smf.volagent(configcheck_status=0)
    _, status, calls, err = smf.run(fmri=None)
    assert status == 99  # SMF_EXIT_ERR_NOSMF
    assert calls == []
    assert "SMF_FMRI" in err
