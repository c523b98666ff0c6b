from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from volagent import config
from volagent.config import Config, NetworkConfig, NodeConfig, StorageConfig
from volagent.errors import EXIT_CONFIG, ConfigError

UUID = "123e4567-e89b-12d3-a456-426614174000"
EXAMPLE = Path(__file__).parents[2] / "docs" / "config.example.toml"


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Render nested dicts of str/int/float/bool as TOML (enough for these tests)."""
    scalars = [f"{json.dumps(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = (f"[{prefix}]\n" if prefix else "") + "".join(f"{s}\n" for s in scalars)
    for key, value in data.items():
        if isinstance(value, dict):
            text += _toml(value, f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key))
    return text


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value)


def minimal() -> dict[str, Any]:
    return {"node": {"uuid": UUID}, "storage": {"dataset_root": "tank/volumes"}}


def write(tmp_path: Path, data: dict[str, Any] | str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(data if isinstance(data, str) else _toml(data), encoding="utf-8")
    return path


def problems(path: Path | None, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config.load(path, env=env or {})
    found = dict(info.value.problems)
    assert len(found) == len(info.value.problems), "one problem per key"
    return found


def with_value(section: str, key: str, value: object) -> dict[str, Any]:
    data = minimal()
    data.setdefault(section, {})[key] = value
    return data


# ---------------------------------------------------------------- valid files


def test_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, minimal()), env={})
    assert cfg == Config(
        node=NodeConfig(uuid=UUID), storage=StorageConfig(dataset_root="tank/volumes")
    )
    assert cfg.cn == UUID
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1883"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("127.0.0.1", 1883, False)
    assert cfg.mqtt.username == ""
    assert cfg.mqtt.password_file is None
    assert cfg.mqtt.ca_file is None
    assert cfg.mqtt.keepalive_s == 30
    assert cfg.client_id == f"volagent-{UUID}"
    assert cfg.tasks_topic == f"volagent/v1/cn/{UUID}/tasks"
    assert cfg.events_topic == f"volagent/v1/cn/{UUID}/events"
    assert cfg.status_topic == f"volagent/v1/cn/{UUID}/status"
    assert cfg.storage.backend == "cli"
    assert (cfg.storage.zfs_bin, cfg.storage.zpool_bin) == ("zfs", "zpool")
    assert cfg.storage.command_timeout_s == 60.0
    assert cfg.networks == {}
    assert cfg.central.url == ""
    assert cfg.central.token_file is None
    assert (cfg.central.heartbeat_s, cfg.central.timeout_s) == (5.0, 10.0)
    assert cfg.http.tcp_address == ("127.0.0.1", 5310)
    assert cfg.http.unix_path is None
    assert cfg.http.allow_non_loopback is False
    assert cfg.state.dir == Path("/var/lib/volagent")
    assert (cfg.engine.max_concurrent, cfg.engine.shutdown_grace_s) == (8, 20.0)
    assert cfg.limits.max_volume_mib == 1048576
    assert cfg.limits.max_snapshots_per_volume == 100
    assert cfg.limits.max_task_bytes == 262144
    assert (cfg.zones.memory_mib, cfg.zones.cpus, cfg.zones.pids) == (256, 1.0, 1024)
    assert cfg.zones.root_squash is True
    assert (cfg.zones.ganesha_bin, cfg.zones.rpcbind_bin) == ("ganesha.nfsd", "rpcbind")
    assert cfg.zones.probe_interval_s == 5.0
    assert (cfg.zones.anonymous_uid, cfg.zones.anonymous_gid) == (65534, 65534)
    assert cfg.zones.cgroup_parent == "/volagent"
    assert (cfg.zones.probe_timeout_s, cfg.zones.start_timeout_s) == (2.0, 30.0)
    assert (cfg.zones.stop_timeout_s, cfg.zones.command_timeout_s) == (10.0, 30.0)
    assert (cfg.log.level, cfg.log.format) == ("info", "auto")


FULL = f"""
[node]
uuid = "{UUID.upper()}"

[mqtt]
url = "mqtts://broker.example.net"
username = "agent"
password_file = "/etc/volagent/mqtt.password"
topic_root = "site1/volagent"
keepalive_s = 15
ca_file = "/etc/volagent/ca.pem"
client_id = "agent-7"

[storage]
dataset_root = "data/nfs/volumes"
backend = "pyzfs"
zfs_bin = "/sbin/zfs"
zpool_bin = "/sbin/zpool"
command_timeout_s = 30

[networks.tenant-a]
bridge = "br-a"

[networks."vlan.20"]
bridge = "br20"

[central]
url = "https://central.example.net/api"
token_file = "/etc/volagent/central.token"
heartbeat_s = 2.5
timeout_s = 4

[http]
listen = "[::]:8080"
allow_non_loopback = true

[state]
dir = "/srv/volagent"

[engine]
max_concurrent = 1024
shutdown_grace_s = 0

[limits]
max_volume_mib = 1024
max_snapshots_per_volume = 3
max_task_bytes = 1000

[zones]
memory_mib = 512
cpus = 0.5
pids = 64
root_squash = false
ganesha_bin = "/usr/bin/ganesha.nfsd"
rpcbind_bin = "/sbin/rpcbind"
probe_interval_s = 1.5
anonymous_uid = 2147483647
anonymous_gid = 0
cgroup_parent = "volagent-zones"
probe_timeout_s = 0.5
start_timeout_s = 5
stop_timeout_s = 1.5
command_timeout_s = 7

[log]
level = "trace"
format = "json"
"""


def test_full_valid_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, FULL), env={})
    assert cfg.cn == UUID  # normalised to lower case
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("broker.example.net", 8883, True)
    assert cfg.mqtt.username == "agent"
    assert cfg.mqtt.password_file == Path("/etc/volagent/mqtt.password")
    assert cfg.mqtt.ca_file == Path("/etc/volagent/ca.pem")
    assert cfg.mqtt.keepalive_s == 15
    assert cfg.client_id == "agent-7"
    assert cfg.tasks_topic == f"site1/volagent/cn/{UUID}/tasks"
    assert cfg.storage == StorageConfig(
        dataset_root="data/nfs/volumes",
        backend="pyzfs",
        zfs_bin="/sbin/zfs",
        zpool_bin="/sbin/zpool",
        command_timeout_s=30.0,
    )
    assert cfg.networks == {
        "tenant-a": NetworkConfig(bridge="br-a"),
        "vlan.20": NetworkConfig(bridge="br20"),
    }
    assert cfg.central.url == "https://central.example.net/api"
    assert cfg.central.token_file == Path("/etc/volagent/central.token")
    assert (cfg.central.heartbeat_s, cfg.central.timeout_s) == (2.5, 4.0)
    assert cfg.http.tcp_address == ("::", 8080)
    assert cfg.state.dir == Path("/srv/volagent")
    assert (cfg.engine.max_concurrent, cfg.engine.shutdown_grace_s) == (1024, 0.0)
    assert (cfg.limits.max_volume_mib, cfg.limits.max_snapshots_per_volume) == (1024, 3)
    assert cfg.limits.max_task_bytes == 1000
    assert (cfg.zones.memory_mib, cfg.zones.cpus, cfg.zones.pids) == (512, 0.5, 64)
    assert cfg.zones.root_squash is False
    assert cfg.zones.ganesha_bin == "/usr/bin/ganesha.nfsd"
    assert cfg.zones.rpcbind_bin == "/sbin/rpcbind"
    assert cfg.zones.probe_interval_s == 1.5
    assert (cfg.zones.anonymous_uid, cfg.zones.anonymous_gid) == (2147483647, 0)
    assert cfg.zones.cgroup_parent == "volagent-zones"
    assert (cfg.zones.probe_timeout_s, cfg.zones.start_timeout_s) == (0.5, 5.0)
    assert (cfg.zones.stop_timeout_s, cfg.zones.command_timeout_s) == (1.5, 7.0)
    assert (cfg.log.level, cfg.log.format) == ("trace", "json")


def test_example_file_loads_and_shows_every_key_with_its_default() -> None:
    cfg = config.load(EXAMPLE, env={})
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for section, field in Config.model_fields.items():
        assert section in raw, f"[{section}] missing from the example"
        if section == "networks":
            assert raw[section], "the example shows one network"
            for network in raw[section].values():
                assert set(network) == set(NetworkConfig.model_fields)
        else:
            model = field.annotation
            assert isinstance(model, type)
            assert issubclass(model, BaseModel)
            assert set(raw[section]) == set(model.model_fields), section
    # apart from the two required keys and the network, every value is the default
    assert cfg == Config(
        node=cfg.node,
        storage=StorageConfig(dataset_root=cfg.storage.dataset_root),
        networks=cfg.networks,
    )


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, minimal()), env={})
    with pytest.raises(ValidationError):
        cfg.mqtt.url = "mqtt://elsewhere"  # type: ignore[misc]  # proving it fails at run time too


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker", "broker", 1883, False),
        ("mqtts://broker", "broker", 8883, True),
        ("mqtt://broker:1999/", "broker", 1999, False),
        ("mqtts://[::1]:8884", "::1", 8884, True),
        ("MQTT://Broker.Example", "broker.example", 1883, False),
    ],
)
def test_mqtt_url_parts(tmp_path: Path, url: str, host: str, port: int, tls: bool) -> None:
    cfg = config.load(write(tmp_path, with_value("mqtt", "url", url)), env={})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == (host, port, tls)


def test_load_has_no_side_effects(tmp_path: Path) -> None:
    data = minimal()
    data["state"] = {"dir": str(tmp_path / "state" / "deep")}
    data["mqtt"] = {
        "url": "mqtts://broker",
        "password_file": str(tmp_path / "no-such-password"),
        "ca_file": str(tmp_path / "no-such-ca.pem"),
    }
    data["central"] = {"url": "http://central", "token_file": str(tmp_path / "no-such-token")}
    data["http"] = {"listen": f"unix:{tmp_path}/sock/http.sock"}
    path = write(tmp_path, data)
    cfg = config.load(path, env={})
    assert cfg.state.dir == tmp_path / "state" / "deep"
    assert cfg.http.unix_path == tmp_path / "sock" / "http.sock"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---------------------------------------------------------------- problems in the file


def test_missing_required_keys(tmp_path: Path) -> None:
    assert problems(write(tmp_path, "")) == {
        "node.uuid": "required key is missing",
        "storage.dataset_root": "required key is missing",
    }


def test_several_problems_reported_together(tmp_path: Path) -> None:
    text = """
[mqtt]
url = "http://broker:1883"
keepalive_s = "30"
[storage]
dataset_root = "tank/volumes"
datset_root = "tank/other"
"""
    found = problems(write(tmp_path, text))
    assert set(found) == {"mqtt.url", "node.uuid", "storage.datset_root", "mqtt.keepalive_s"}
    assert found["mqtt.url"] == 'scheme must be mqtt:// or mqtts:// (got "http://broker:1883")'
    assert found["node.uuid"] == "required key is missing"
    assert found["storage.datset_root"] == "unknown key; did you mean 'dataset_root'?"
    assert found["mqtt.keepalive_s"] == 'expected an integer (got "30")'


def test_problems_come_in_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, ""), env={})
    assert info.value.exit_code == EXIT_CONFIG
    assert "2 problems" in info.value.message
    assert str(tmp_path / "config.toml") in info.value.message
    assert info.value.details["problems"] == [list(p) for p in info.value.problems]


def test_unknown_section_and_top_level_key(tmp_path: Path) -> None:
    data = minimal()
    data["mqqt"] = {"url": "mqtt://x"}
    data["verbose"] = True
    assert problems(write(tmp_path, data)) == {
        "mqqt": "unknown section; did you mean 'mqtt'?",
        "verbose": "unknown key",
    }


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("node", "uuid", 5, "expected a string (got 5)"),
        ("mqtt", "keepalive_s", 30.5, "expected an integer (got 30.5)"),
        ("mqtt", "url", ["mqtt://a"], "expected a string (got an array)"),
        ("zones", "root_squash", "yes", 'expected true or false (got "yes")'),
        ("zones", "cpus", "1", 'expected a number (got "1")'),
        ("zones", "cpus", True, "expected a number (got true)"),
        ("engine", "max_concurrent", 8.0, "expected an integer (got 8.0)"),
        ("limits", "max_task_bytes", True, "expected an integer (got true)"),
        ("state", "dir", 1, "expected a string (got 1)"),
        ("mqtt", "password_file", False, "expected a string (got false)"),
    ],
)
def test_wrong_types(tmp_path: Path, section: str, key: str, value: object, message: str) -> None:
    assert problems(write(tmp_path, with_value(section, key, value))) == {
        f"{section}.{key}": message
    }


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    data: dict[str, Any] = {**minimal(), "mqtt": 5, "networks": {"a": "br0"}}
    assert problems(write(tmp_path, data)) == {
        "mqtt": "expected a table (got 5)",
        "networks.a": 'expected a table (got "br0")',
    }


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("node", "uuid", "not-a-uuid", "must be a UUID"),
        ("node", "uuid", "123e4567e89b12d3a456426614174000", "must be a UUID"),
        ("mqtt", "url", "http://broker", "scheme must be mqtt:// or mqtts://"),
        ("mqtt", "url", "broker:1883", "scheme must be"),
        ("mqtt", "url", "mqtt://", "a host is required"),
        ("mqtt", "url", "mqtt://:1883", "a host is required"),
        ("mqtt", "url", "mqtt://user:pw@broker", "must not contain credentials"),
        ("mqtt", "url", "mqtt://broker/topic", "must not have a path"),
        ("mqtt", "url", "mqtt://broker?x=1", "must not have a query"),
        ("mqtt", "url", "mqtt://broker:0", "port must be 1..65535"),
        ("mqtt", "url", "mqtt://broker:70000", "is not a valid URL"),
        ("mqtt", "url", "mqtt://broker:http", "is not a valid URL"),
        ("mqtt", "url", "mqtt://bro ker", "whitespace"),
        ("mqtt", "url", "mqtt://[::1", "is not a valid URL"),
        ("mqtt", "topic_root", "", "must not be empty"),
        ("mqtt", "topic_root", "volagent/+", "wildcards"),
        ("mqtt", "topic_root", "volagent/#", "wildcards"),
        ("mqtt", "topic_root", "/volagent", "must not begin or end with /"),
        ("mqtt", "topic_root", "volagent/", "must not begin or end with /"),
        ("mqtt", "topic_root", "$SYS/volagent", "must not begin with $"),
        ("mqtt", "keepalive_s", 0, "greater than or equal to 1"),
        ("mqtt", "keepalive_s", 65536, "less than or equal to 65535"),
        ("mqtt", "password_file", "secrets/pw", "must be an absolute path"),
        ("mqtt", "ca_file", "/etc/ca.pem", "only used with an mqtts:// url"),
        ("storage", "dataset_root", "tank", "below the pool"),
        ("storage", "dataset_root", "tank/vol@snap", "only ASCII letters, digits"),
        ("storage", "dataset_root", "tank/a b", "only ASCII letters, digits"),
        ("storage", "dataset_root", "tank//volumes", "empty name component"),
        ("storage", "dataset_root", "tank/volumes/", "empty name component"),
        ("storage", "dataset_root", "/tank/volumes", "empty name component"),
        ("storage", "dataset_root", "tank/../etc", "must not be '.' or contain '..'"),
        ("storage", "dataset_root", "tank/-x", "must not start with '-'"),
        ("storage", "dataset_root", "1tank/volumes", "pool name must start with a letter"),
        ("storage", "dataset_root", "tank/" + "v" * 196, "at most 200 characters"),
        ("storage", "backend", "zfs", "must be 'cli' or 'pyzfs'"),
        ("storage", "zfs_bin", "", "must not be empty"),
        ("storage", "command_timeout_s", 0, "greater than 0"),
        ("storage", "command_timeout_s", float("inf"), "finite number"),
        ("central", "url", "ftp://central", "scheme must be http:// or https://"),
        ("central", "url", "https://", "a host is required"),
        ("central", "token_file", "token", "must be an absolute path"),
        ("central", "heartbeat_s", 0, "greater than 0"),
        ("central", "timeout_s", -1, "greater than 0"),
        ("http", "listen", "5310", "must be"),
        ("http", "listen", ":5310", "must be"),
        ("http", "listen", "::1:5310", "needs brackets"),
        ("http", "listen", "[nope]:5310", "is not an IPv6 address"),
        ("http", "listen", "127.0.0.1:0", "port must be 1..65535"),
        ("http", "listen", "127.0.0.1:http", "port must be 1..65535"),
        ("http", "listen", "unix:run/http.sock", "absolute path"),
        ("http", "listen", "unix:/" + "s" * 107, "longer than 107 bytes"),
        ("state", "dir", "var/lib/volagent", "must be an absolute path"),
        ("state", "dir", "", "must be an absolute path"),
        ("engine", "max_concurrent", 0, "greater than or equal to 1"),
        ("engine", "max_concurrent", 1025, "less than or equal to 1024"),
        ("engine", "shutdown_grace_s", -0.5, "greater than or equal to 0"),
        ("limits", "max_volume_mib", 0, "greater than or equal to 1"),
        ("limits", "max_snapshots_per_volume", 0, "greater than or equal to 1"),
        ("zones", "cpus", 0, "greater than 0"),
        ("zones", "ganesha_bin", "", "must not be empty"),
        ("zones", "probe_interval_s", 0.0, "greater than 0"),
        ("zones", "anonymous_uid", 2147483648, "less than or equal to 2147483647"),
        ("zones", "anonymous_uid", -2, "greater than or equal to 0"),
        ("zones", "anonymous_gid", 4294967294, "less than or equal to 2147483647"),
        ("zones", "cgroup_parent", "", "must be a cgroup path"),
        ("zones", "cgroup_parent", "/", "must be a cgroup path"),
        ("zones", "cgroup_parent", "/a b", "must be a cgroup path"),
        ("zones", "cgroup_parent", "/volagent/../x", "must be a cgroup path"),
        ("zones", "cgroup_parent", "/volagent/", "must be a cgroup path"),
        ("zones", "cgroup_parent", "a//b", "must be a cgroup path"),
        ("zones", "start_timeout_s", 0, "greater than 0"),
        ("zones", "stop_timeout_s", -1, "greater than 0"),
        ("log", "level", "verbose", "must be 'trace', 'debug', 'info', 'warn', 'error' or"),
        ("log", "format", "text", "must be 'auto', 'json' or 'console'"),
    ],
)
def test_bad_values(tmp_path: Path, section: str, key: str, value: object, fragment: str) -> None:
    found = problems(write(tmp_path, with_value(section, key, value)))
    assert list(found) == [f"{section}.{key}"]
    assert fragment in found[f"{section}.{key}"]


@pytest.mark.parametrize("name", ["bad name", "-lead", "x" * 65, "tenant/a", ""])
def test_bad_network_name(tmp_path: Path, name: str) -> None:
    data = {**minimal(), "networks": {name: {"bridge": "br0"}}}
    found = problems(write(tmp_path, data))
    key = (
        f"networks.{json.dumps(name)}" if not re.fullmatch(r"[\w-]+", name) else f"networks.{name}"
    )
    assert list(found) == [key]
    assert found[key].startswith("invalid network name: must match pattern")


@pytest.mark.parametrize("bridge", ["br0", "br-tenant_a.10", "x" * 15])
def test_good_bridge_names(tmp_path: Path, bridge: str) -> None:
    data = {**minimal(), "networks": {"n.1": {"bridge": bridge}}}
    assert config.load(write(tmp_path, data), env={}).networks["n.1"].bridge == bridge


@pytest.mark.parametrize("bridge", ["", "x" * 16, "br 0", "br/0", "br:0", ".", ".."])
def test_bad_bridge_names(tmp_path: Path, bridge: str) -> None:
    data = {**minimal(), "networks": {"n": {"bridge": bridge}}}
    assert list(problems(write(tmp_path, data))) == ["networks.n.bridge"]


def test_network_without_bridge(tmp_path: Path) -> None:
    data = {**minimal(), "networks": {"n": {"brige": "br0"}}}
    assert problems(write(tmp_path, data)) == {
        "networks.n.bridge": "required key is missing",
        "networks.n.brige": "unknown key; did you mean 'bridge'?",
    }


# ---------------------------------------------------------------- http.listen


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:5310", ("127.0.0.1", 5310)),
        ("127.9.9.9:1", ("127.9.9.9", 1)),
        ("[::1]:5310", ("::1", 5310)),
        ("[::ffff:127.0.0.1]:80", ("::ffff:127.0.0.1", 80)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_loopback_listen_is_accepted(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    cfg = config.load(write(tmp_path, with_value("http", "listen", listen)), env={})
    assert cfg.http.tcp_address == address
    assert cfg.http.unix_path is None


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:5310", "[::]:5310", "192.0.2.1:80", "[2001:db8::1]:80", "example.com:80"],
)
def test_non_loopback_listen_needs_allow(tmp_path: Path, listen: str) -> None:
    found = problems(write(tmp_path, with_value("http", "listen", listen)))
    assert list(found) == ["http.listen"]
    assert found["http.listen"].startswith("not a loopback address")
    assert "allow_non_loopback" in found["http.listen"]
    assert f"(got {json.dumps(listen)})" in found["http.listen"]

    allowed = with_value("http", "listen", listen)
    allowed["http"]["allow_non_loopback"] = True
    assert config.load(write(tmp_path, allowed), env={}).http.tcp_address is not None


def test_unix_listen(tmp_path: Path) -> None:
    cfg = config.load(
        write(tmp_path, with_value("http", "listen", "unix:/run/v/http.sock")), env={}
    )
    assert cfg.http.unix_path == Path("/run/v/http.sock")
    assert cfg.http.tcp_address is None


# ---------------------------------------------------------------- file problems


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems(path) == {str(path): "file not found"}


def test_unreadable_file(tmp_path: Path) -> None:
    assert list(problems(tmp_path)) == [str(tmp_path)]  # a directory


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nuuid = "x"\n[storage\n')
    found = problems(path)
    assert list(found) == [str(path)]
    assert found[str(path)].startswith("not valid TOML")
    assert "line 3" in found[str(path)]
    assert "column" in found[str(path)]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[node]\nuuid = "\xff"\n')
    assert list(problems(path)) == [str(path)]


# ---------------------------------------------------------------- environment


def test_env_overrides_file(tmp_path: Path) -> None:
    env = {
        "VOLAGENT_MQTT_URL": "mqtts://env-broker:9999",
        "VOLAGENT_MQTT_PASSWORD_FILE": "/run/secrets/mqtt",
        "VOLAGENT_STORAGE_DATASET_ROOT": "pool/env",
        "VOLAGENT_LOG_LEVEL": "debug",
    }
    cfg = config.load(write(tmp_path, minimal()), env=env)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("env-broker", 9999, True)
    assert cfg.mqtt.password_file == Path("/run/secrets/mqtt")
    assert cfg.storage.dataset_root == "pool/env"
    assert cfg.log.level == "debug"


def test_env_values_are_coerced(tmp_path: Path) -> None:
    env = {
        "VOLAGENT_ENGINE_MAX_CONCURRENT": "16",
        "VOLAGENT_CENTRAL_HEARTBEAT_S": "0.5",
        "VOLAGENT_ZONES_CPUS": "2",
        "VOLAGENT_ZONES_ROOT_SQUASH": "no",
        "VOLAGENT_HTTP_ALLOW_NON_LOOPBACK": "TRUE",
        "VOLAGENT_HTTP_LISTEN": "192.0.2.7:80",
    }
    cfg = config.load(write(tmp_path, minimal()), env=env)
    assert cfg.engine.max_concurrent == 16
    assert cfg.central.heartbeat_s == 0.5
    assert cfg.zones.cpus == 2.0
    assert cfg.zones.root_squash is False
    assert cfg.http.allow_non_loopback is True
    assert cfg.http.tcp_address == ("192.0.2.7", 80)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("yes", True), ("Yes", True), ("false", False),
     ("0", False), ("no", False), ("FALSE", False)],
)  # fmt: skip
def test_env_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    env = {"VOLAGENT_ZONES_ROOT_SQUASH": text}
    assert config.load(write(tmp_path, minimal()), env=env).zones.root_squash is expected


def test_env_only_config() -> None:
    env = {"VOLAGENT_NODE_UUID": UUID, "VOLAGENT_STORAGE_DATASET_ROOT": "tank/v"}
    cfg = config.load(None, env=env)
    assert (cfg.cn, cfg.storage.dataset_root) == (UUID, "tank/v")


def test_env_problems_name_the_variable(tmp_path: Path) -> None:
    env = {
        "VOLAGENT_ENGINE_MAX_CONCURRENT": "many",
        "VOLAGENT_ZONES_ROOT_SQUASH": "maybe",
        "VOLAGENT_MQTT_URL": "ftp://x",
        "VOLAGENT_CENTRAL_TIMEOUT_S": "0",
    }
    assert problems(write(tmp_path, minimal()), env) == {
        "engine.max_concurrent (from VOLAGENT_ENGINE_MAX_CONCURRENT)": (
            'expected an integer (got "many")'
        ),
        "zones.root_squash (from VOLAGENT_ZONES_ROOT_SQUASH)": (
            'expected true or false (got "maybe")'
        ),
        "mqtt.url (from VOLAGENT_MQTT_URL)": 'scheme must be mqtt:// or mqtts:// (got "ftp://x")',
        "central.timeout_s (from VOLAGENT_CENTRAL_TIMEOUT_S)": "must be greater than 0 (got 0.0)",
    }


def test_env_unknown_variables_are_problems(tmp_path: Path) -> None:
    env = {
        "VOLAGENT_MQTT_URLL": "mqtt://x",
        "VOLAGENT_MQQT_URL": "mqtt://x",
        "VOLAGENT_NETWORKS_BRIDGE": "br0",
        "VOLAGENT_NETWORKS_A_BRIGDE": "br0",
        "VOLAGENT_": "x",
    }
    found = problems(write(tmp_path, minimal()), env)
    assert set(found) == set(env)
    assert (
        found["VOLAGENT_MQTT_URLL"] == "not a setting: no key 'urll' in [mqtt]; did you mean 'url'?"
    )
    assert found["VOLAGENT_MQQT_URL"] == "not a setting: no section 'mqqt'; did you mean 'mqtt'?"
    assert "VOLAGENT_NETWORKS_<NAME>_<KEY>" in found["VOLAGENT_NETWORKS_BRIDGE"]
    assert "BRIDGE" in found["VOLAGENT_NETWORKS_A_BRIGDE"]


def test_env_reserved_and_foreign_variables_are_ignored(tmp_path: Path) -> None:
    env = {
        "VOLAGENT_CONFIG": "/somewhere/else.toml",
        "volagent_mqtt_urll": "x",
        "XVOLAGENT_MQTT_URL": "x",
        "PATH": "/usr/bin",
    }
    assert config.load(write(tmp_path, minimal()), env=env).mqtt.url == "mqtt://127.0.0.1:1883"


def test_env_networks(tmp_path: Path) -> None:
    data = {**minimal(), "networks": {"tenant_a": {"bridge": "br-file"}}}
    env = {
        "VOLAGENT_NETWORKS_TENANT_A_BRIDGE": "br-env",
        "VOLAGENT_NETWORKS_STORAGE_BRIDGE": "br-storage",
    }
    cfg = config.load(write(tmp_path, data), env=env)
    assert cfg.networks == {
        "tenant_a": NetworkConfig(bridge="br-env"),
        "storage": NetworkConfig(bridge="br-storage"),
    }


def test_env_network_problem_names_the_variable(tmp_path: Path) -> None:
    env = {
        "VOLAGENT_NETWORKS_LAN_BRIDGE": "bridge name too long",
        "VOLAGENT_NETWORKS__X_BRIDGE": "b",
    }
    found = problems(write(tmp_path, minimal()), env)
    assert set(found) == {
        "networks.lan.bridge (from VOLAGENT_NETWORKS_LAN_BRIDGE)",
        "networks._x (from VOLAGENT_NETWORKS__X_BRIDGE)",
    }


def test_env_override_into_a_non_table_leaves_the_file_problem(tmp_path: Path) -> None:
    data: dict[str, Any] = {**minimal(), "mqtt": "oops"}
    found = problems(write(tmp_path, data), {"VOLAGENT_MQTT_URL": "mqtt://x"})
    assert found == {"mqtt": 'expected a table (got "oops")'}


def test_default_path() -> None:
    assert config.default_path({}) == Path("/etc/volagent/config.toml")
    assert config.default_path({"VOLAGENT_CONFIG": ""}) == config.DEFAULT_PATH
    assert config.default_path({"VOLAGENT_CONFIG": "/x/c.toml"}) == Path("/x/c.toml")


# ---------------------------------------------------------------- properties

_ALLOWED = "abcXYZ019_.:-"
_FORBIDDEN = "@#%, "


@given(
    st.lists(
        st.just("..") | st.text(alphabet=_ALLOWED + _FORBIDDEN, max_size=8), min_size=1, max_size=5
    )
)
def test_dataset_root_refuses_forbidden_characters_and_dot_dot(components: list[str]) -> None:
    name = "/".join(components)
    assume(any(c in name for c in _FORBIDDEN) or ".." in components)
    with pytest.raises(ValidationError):
        StorageConfig(dataset_root=name)


def _no_dot_dot(component: str) -> bool:
    return ".." not in component  # the project refuses '..' anywhere in a name (domain.names)


@given(
    st.from_regex(r"[a-z][a-z0-9_.:-]{0,10}", fullmatch=True).filter(_no_dot_dot),
    st.lists(
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,10}", fullmatch=True).filter(_no_dot_dot),
        min_size=1,
        max_size=5,
    ),
)
def test_dataset_root_accepts_valid_names(pool: str, children: list[str]) -> None:
    name = "/".join([pool, *children])
    assert StorageConfig(dataset_root=name).dataset_root == name


def test_zone_restart_backoff_and_crash_loop_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[node]\nuuid = "0b6f3c6e-5c4e-4c0a-9d5e-3f1f8a2b7c10"\n'
        '[storage]\ndataset_root = "tank/volumes"\n'
        "[zones]\nrestart_backoff_initial_s = 2.0\nrestart_backoff_max_s = 1.0\n"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})
    assert [key for key, _ in caught.value.problems] == ["zones.restart_backoff_max_s"]
    cfg = config.load(path, env={"VOLAGENT_ZONES_RESTART_BACKOFF_MAX_S": "8"})
    assert (cfg.zones.restart_backoff_initial_s, cfg.zones.restart_backoff_max_s) == (2.0, 8.0)
    assert (cfg.zones.crash_loop_failures, cfg.zones.crash_loop_window_s) == (5, 600.0)


def test_task_retention_outlasts_the_broker_session(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[node]\nuuid = "0b6f3c6e-5c4e-4c0a-9d5e-3f1f8a2b7c10"\n'
        '[storage]\ndataset_root = "tank/volumes"\n[engine]\ntask_retention_days = 7\n'
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})
    assert [key for key, _ in caught.value.problems] == ["engine.task_retention_days"]
