import dataclasses
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from volagent.adapters import ganesha
from volagent.adapters.ganesha import GaneshaSettings, check_spec, render
from volagent.errors import InvalidParameter, ZoneFailed
from volagent.ports.zones import Nic, ZoneSpec

UUID = "123e4567-e89b-12d3-a456-426614174000"
RECOVERY = Path("/var/lib/volagent/zones") / UUID / "recovery"
SPEC = ZoneSpec(
    volume_uuid=UUID,
    source="/tank/volumes/" + UUID,
    export_path="/volumes/web-content",
    nic=Nic(ip="10.0.0.5", prefix=24, network="tenant-a", gateway="10.0.0.1"),
    allowed_clients=("10.0.0.0/24", "192.0.2.7"),
)


def text(spec: ZoneSpec = SPEC, settings: GaneshaSettings | None = None) -> str:
    return render(spec, settings or GaneshaSettings(), recovery_root=RECOVERY).text


def setting(config: str, key: str) -> list[str]:
    """Every value given to ``key`` in the rendered configuration."""
    return re.findall(rf"^\s*{key} = (.*);$", config, flags=re.MULTILINE)


def test_core_parameters_bind_the_zone_address_on_standard_ports() -> None:
    config = text()
    assert setting(config, "Bind_addr") == ["10.0.0.5"]
    assert setting(config, "NFS_Port") == ["2049"]
    assert setting(config, "MNT_Port") == ["20048"]
    assert setting(config, "Enable_NLM") == ["false"]
    assert setting(config, "Enable_RQUOTA") == ["false"]
    assert setting(config, "Enable_UDP") == ["false"]
    assert setting(config, "Mount_Path_Pseudo") == ["true"]
    assert setting(config, "Graceless") == ["true"]
    assert setting(config, "RecoveryRoot") == [f'"{RECOVERY}"']
    assert setting(config, "Only_Numeric_Owners") == ["true"]


def test_one_export_of_the_source_at_the_export_path_for_the_allowed_clients() -> None:
    config = text()
    assert config.count("EXPORT {") == 1
    assert setting(config, "Path") == [f'"{SPEC.source}"']
    assert setting(config, "Pseudo") == ['"/volumes/web-content"']
    assert setting(config, "Access_Type") == ["None", "RW"]  # nobody, then the clients
    assert setting(config, "Clients") == ["10.0.0.0/24, 192.0.2.7"]
    assert setting(config, "SecType") == ["sys"]
    assert setting(config, "Squash") == ["root_squash"]
    assert setting(config, "Anonymous_Uid") == ["65534"]
    assert setting(config, "Anonymous_Gid") == ["65534"]
    assert setting(config, "Name") == ["VFS"]
    assert setting(config, "Protocols") == ["3, 4", "3, 4"]
    assert config.count("{") == config.count("}")


def test_read_only_versions_squash_and_anonymous_ids_come_from_spec_and_settings() -> None:
    spec = dataclasses.replace(SPEC, read_only=True, nfs_versions=(4,))
    settings = GaneshaSettings(root_squash=False, anonymous_uid=1001, anonymous_gid=0)
    config = text(spec, settings)
    assert setting(config, "Access_Type") == ["None", "RO"]
    assert setting(config, "Protocols") == ["4", "4"]
    assert setting(config, "Squash") == ["no_root_squash"]
    assert (setting(config, "Anonymous_Uid"), setting(config, "Anonymous_Gid")) == (["1001"], ["0"])


def test_no_allowed_clients_means_no_client_block() -> None:
    config = text(dataclasses.replace(SPEC, allowed_clients=()))
    assert "CLIENT" not in config
    assert setting(config, "Access_Type") == ["None"]


def test_clients_are_canonical_sorted_and_unique() -> None:
    spec = dataclasses.replace(SPEC, allowed_clients=("192.0.2.7/32", "10.0.0.0/24", "192.0.2.7"))
    assert setting(text(spec), "Clients") == ["10.0.0.0/24, 192.0.2.7"]


def test_ipv6_zone_and_clients() -> None:
    nic = Nic(ip="fd00::5", prefix=64, network="tenant-a", gateway="fd00::1")
    spec = dataclasses.replace(SPEC, nic=nic, allowed_clients=("fd00::/64", "2001:db8::7"))
    config = text(spec)
    assert setting(config, "Bind_addr") == ["fd00::5"]
    assert setting(config, "Clients") == ["2001:db8::7, fd00::/64"]


def test_digest_and_restart_key() -> None:
    base = render(SPEC, GaneshaSettings(), recovery_root=RECOVERY)
    assert base == render(SPEC, GaneshaSettings(), recovery_root=RECOVERY)
    reloadable = [
        dataclasses.replace(SPEC, allowed_clients=("10.0.0.9",)),
        dataclasses.replace(SPEC, read_only=True),
    ]
    for spec in reloadable:
        changed = render(spec, GaneshaSettings(), recovery_root=RECOVERY)
        assert changed.digest != base.digest
        assert changed.restart_key == base.restart_key
    for settings in (GaneshaSettings(root_squash=False), GaneshaSettings(anonymous_uid=7)):
        changed = render(SPEC, settings, recovery_root=RECOVERY)
        assert (changed.digest != base.digest, changed.restart_key) == (True, base.restart_key)
    needs_restart = [
        dataclasses.replace(SPEC, nic=dataclasses.replace(SPEC.nic, ip="10.0.0.6")),
        dataclasses.replace(SPEC, nfs_versions=(3,)),
        dataclasses.replace(SPEC, source="/tank/other"),
        dataclasses.replace(SPEC, export_path="/volumes/other"),
    ]
    for spec in needs_restart:
        assert render(spec, GaneshaSettings(), recovery_root=RECOVERY).restart_key != (
            base.restart_key
        )
    moved = render(SPEC, GaneshaSettings(), recovery_root=Path("/elsewhere"))
    assert moved.restart_key != base.restart_key


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"volume_uuid": "not-a-uuid"}, "volume_uuid"),
        ({"source": "tank/volumes/x"}, "source"),
        ({"source": "/"}, "source"),
        ({"source": "/tank/../etc"}, "source"),
        ({"source": "/tank/./x"}, "source"),
        ({"source": "/tank//x"}, "source"),
        ({"source": "/tank/x/"}, "source"),
        ({"source": '/tank/"x'}, "source"),
        ({"source": "/tank/x;y"}, "source"),
        ({"source": "/tank/x y"}, "source"),
        ({"source": "/tank/x\nEXPORT {"}, "source"),
        ({"source": "/tank/{x}"}, "source"),
        ({"source": "/tank/#x"}, "source"),
        ({"source": "/tank/a,b"}, "source"),
        ({"source": "/" + "x" * 1024}, "source"),
        ({"export_path": "volumes/x"}, "export_path"),
        ({"export_path": "/"}, "export_path"),
        ({"export_path": "/v;Access_Type=RW"}, "export_path"),
        ({"allowed_clients": ("10.0.0.1/24",)}, "allowed_clients"),
        ({"allowed_clients": ("*",)}, "allowed_clients"),
        ({"allowed_clients": ("host.example",)}, "allowed_clients"),
        ({"allowed_clients": ("10.0.0.0/24; Access_Type = RW",)}, "allowed_clients"),
        ({"allowed_clients": "10.0.0.0/24"}, "allowed_clients"),
        ({"nfs_versions": ()}, "nfs_versions"),
        ({"nfs_versions": (2, 3)}, "nfs_versions"),
        ({"nfs_versions": (True,)}, "nfs_versions"),
        ({"read_only": "yes"}, "read_only"),
        ({"nic": Nic(ip="10.0.0.300", prefix=24, network="n")}, "nic.ip"),
        ({"nic": Nic(ip="fe80::1%eth0", prefix=64, network="n")}, "nic.ip"),
        ({"nic": Nic(ip="10.0.0.5", prefix=0, network="n")}, "nic.prefix"),
        ({"nic": Nic(ip="10.0.0.5", prefix=33, network="n")}, "nic.prefix"),
        ({"nic": Nic(ip="10.0.0.5", prefix=24, network="n", gateway="10.0.1.1")}, "nic.gateway"),
        ({"nic": Nic(ip="10.0.0.5", prefix=24, network="n", gateway="fd00::1")}, "nic.gateway"),
        ({"nic": Nic(ip="10.0.0.5", prefix=24, network="n", gateway="10.0.0.5")}, "nic.gateway"),
        ({"nic": Nic(ip="10.0.0.5", prefix=24, network="n", gateway="gw")}, "nic.gateway"),
    ],
)
def test_every_value_is_checked_before_rendering(change: dict[str, object], parameter: str) -> None:
    spec = dataclasses.replace(SPEC, **change)  # type: ignore[arg-type]  # wrong types on purpose
    with pytest.raises(InvalidParameter) as caught:
        check_spec(spec)
    assert caught.value.details["parameter"] == parameter
    with pytest.raises(InvalidParameter):
        text(spec)


@pytest.mark.parametrize("anonymous", [-1, 2**31, 4294967294])
def test_anonymous_ids_must_fit_zfs_fuse(anonymous: int) -> None:
    with pytest.raises(InvalidParameter, match="anonymous_uid"):
        text(settings=GaneshaSettings(anonymous_uid=anonymous))
    with pytest.raises(InvalidParameter, match="anonymous_gid"):
        text(settings=GaneshaSettings(anonymous_gid=anonymous))


def test_recovery_root_is_checked() -> None:
    with pytest.raises(InvalidParameter, match="recovery_root"):
        render(SPEC, GaneshaSettings(), recovery_root=Path("/var/lib/vol agent"))


def test_argv() -> None:
    argv = ganesha.argv("ganesha.nfsd", conf=Path("/c"), log=Path("/l"), pidfile=Path("/p"))
    assert argv == ["ganesha.nfsd", "-F", "-f", "/c", "-L", "/l", "-p", "/p"]


# ---------------------------------------------------------------- write_atomic


def test_write_atomic_replaces_the_file_with_its_mode_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ganesha.conf"
    path.write_text("old")
    ganesha.write_atomic(path, "new", mode=0o600)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ganesha.conf"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "ganesha.conf"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        ganesha.write_atomic(path, "bad \udcff surrogate")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ganesha.conf"]


# ---------------------------------------------------------------- reload

# Stands in for ganesha: on SIGHUP, logs what ganesha logs once its exports are re-read.
FAKE_SERVER = """
import signal, sys, time
log = sys.argv[1]
def reread(*_):
    with open(log, "a") as f:
        f.write("... reread_exports :CONFIG :EVENT :Reread exports complete\\n")
signal.signal(signal.SIGHUP, reread)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    log = tmp_path / "ganesha.log"
    log.write_text("Reread exports complete (an old reload)\n")
    with subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER, str(log)], stdout=subprocess.PIPE
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        yield child.pid, log
        child.kill()


async def test_reload_signals_and_waits_for_the_reload_line(server: tuple[int, Path]) -> None:
    pid, log = server
    await ganesha.reload(pid, log, timeout=10)
    assert log.read_text().count("Reread exports complete") == 2
    await ganesha.reload(pid, log, timeout=10)
    assert log.read_text().count("Reread exports complete") == 3


@pytest.fixture
def gone_pid() -> int:
    with subprocess.Popen(["true"]) as child:
        child.wait()
    return child.pid


async def test_reload_of_a_gone_process_is_zone_failed(gone_pid: int, tmp_path: Path) -> None:
    with pytest.raises(ZoneFailed, match="is gone"):
        await ganesha.reload(gone_pid, tmp_path / "log", timeout=1)


IGNORES_HUP = """
import signal, time
signal.signal(signal.SIGHUP, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def deaf_server() -> Iterator[int]:
    with subprocess.Popen([sys.executable, "-c", IGNORES_HUP], stdout=subprocess.PIPE) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        yield child.pid
        child.kill()


async def test_reload_that_is_not_logged_in_time_is_zone_failed(
    deaf_server: int, tmp_path: Path
) -> None:
    with pytest.raises(ZoneFailed, match="did not reload"):
        await ganesha.reload(deaf_server, tmp_path / "log", timeout=0.3)
