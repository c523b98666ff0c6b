"""The test bed itself: each fixture gives a working component and cleans it up."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MQTT_USER
from tests.support.ganesha import Ganesha
from tests.support.mqtt import Mosquitto
from tests.support.net import Bridge, Namespace
from tests.support.nfs import NfsClient, nfs_url
from tests.support.run import sh
from tests.support.zfs import Pool


@pytest.mark.zfs
def test_dataset_root_is_a_fresh_mounted_dataset(dataset_root: str, zpool: Pool) -> None:
    out = sh(["zfs", "get", "-H", "-p", "-o", "property,value", "type,mounted", dataset_root])
    assert dict(line.split("\t") for line in out.splitlines()) == {
        "type": "filesystem",
        "mounted": "yes",
    }
    assert dataset_root.startswith(f"{zpool.name}/")
    children = sh(["zfs", "list", "-H", "-r", "-o", "name", dataset_root]).split()
    assert children == [dataset_root]


@pytest.mark.zfs
def test_make_pool_makes_a_separate_pool(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size_mb=64)
    assert pool.image.exists()
    health = sh(["zpool", "list", "-H", "-o", "name,health", pool.name]).split()
    assert health == [pool.name, "ONLINE"]


@pytest.mark.mqtt
def test_mosquitto_delivers_and_keeps_retained_messages_across_restart(
    mosquitto: Mosquitto,
) -> None:
    mosquitto.pub("t/retained", "kept", retain=True)
    mosquitto.restart()
    assert mosquitto.sub("t/retained", count=1) == ["kept"]


@pytest.mark.mqtt
def test_mosquitto_stop_refuses_connections_until_started(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    with pytest.raises(RuntimeError, match="exited"):
        mosquitto.pub("t/x", "lost")
    mosquitto.start()
    mosquitto.pub("t/x", "delivered")


@pytest.mark.mqtt
def test_mosquitto_password_variant_refuses_anonymous(mosquitto_auth: Mosquitto) -> None:
    with pytest.raises(RuntimeError, match=r"not authori[sz]ed|Connection Refused"):
        mosquitto_auth.pub("t/x", "anon")
    creds = {"username": "volagent", "password": MQTT_USER["volagent"]}
    mosquitto_auth.pub("t/auth", "ok", retain=True, auth=creds)
    assert mosquitto_auth.sub("t/auth", count=1, auth=creds) == ["ok"]


@pytest.mark.netns
def test_client_namespaces_get_their_address_and_go_away(
    bridge: Bridge, client_ns: Callable[[int], Namespace]
) -> None:
    a = client_ns(21)
    addrs = sh(a.exec_argv("ip", "-o", "-4", "addr", "show"))
    assert f"{a.ip}/24" in addrs
    a.delete()
    assert a.name not in sh(["ip", "netns", "list"]).split()
    gone = subprocess.run(["ip", "link", "show", a.host_if], capture_output=True, check=False)
    assert gone.returncode != 0


@pytest.mark.zfs
@pytest.mark.nfs
@pytest.mark.netns
def test_whole_chain_dataset_exported_by_ganesha_in_a_namespace(
    dataset_root: str,
    bridge: Bridge,
    client_ns: Callable[[int], Namespace],
    nfs_client: Callable[[Namespace], NfsClient],
    tmp_path: Path,
) -> None:
    """A dataset on the test pool, served by ganesha in a namespace, written by A, read by B."""
    volume = f"{dataset_root}/vol"
    sh(["zfs", "create", volume])
    mountpoint = sh(["zfs", "get", "-H", "-o", "value", "mountpoint", volume]).strip()
    Path(mountpoint).chmod(0o1777)

    zone = bridge.namespace(10, role="z")
    a, b, c = client_ns(21), client_ns(22), client_ns(23)
    server = Ganesha(zone, tmp_path / "zone")
    try:
        server.start(path=mountpoint, clients=[a.ip, b.ip])
        payload = os.urandom(256 * 1024)
        src = tmp_path / "payload.bin"
        src.write_bytes(payload)

        nfs_client(a).cp(src, nfs_url(zone.ip, f"{mountpoint}/from-a.bin")).expect_ok()
        assert (
            nfs_client(b).cat(nfs_url(zone.ip, f"{mountpoint}/from-a.bin")).expect_ok() == payload
        )
        v4 = nfs_client(b).cat(nfs_url(zone.ip, f"{mountpoint}/from-a.bin", version=4))
        assert v4.expect_ok() == payload
        assert Path(mountpoint, "from-a.bin").read_bytes() == payload  # it landed in the dataset

        refused = nfs_client(c).cat(nfs_url(zone.ip, f"{mountpoint}/from-a.bin"))
        assert not refused.ok
        assert "MNT3ERR_ACCES" in refused.stderr
    finally:
        server.stop()
