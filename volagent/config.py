"""The agent's configuration: a TOML file plus ``VOLAGENT_<SECTION>_<KEY>`` environment overrides.

:func:`load` reads the file, applies the environment, validates everything at once and returns
a frozen :class:`Config`, or raises :class:`~volagent.errors.ConfigError` listing every problem
as a ``(key, message)`` pair. Loading has no side effects: it creates no directories, reads no
password or token files and touches no network. ``docs/config.example.toml`` documents every key.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from volagent.domain import names
from volagent.errors import ConfigError, InvalidParameter

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic_core import ErrorDetails

__all__ = [
    "DEFAULT_PATH",
    "ENV_CONFIG",
    "ENV_PREFIX",
    "CentralConfig",
    "Config",
    "EngineConfig",
    "HttpConfig",
    "LimitsConfig",
    "LogConfig",
    "MqttConfig",
    "NetworkConfig",
    "NodeConfig",
    "StateConfig",
    "StorageConfig",
    "ZonesConfig",
    "default_path",
    "load",
]

DEFAULT_PATH: Final = Path("/etc/volagent/config.toml")
ENV_PREFIX: Final = "VOLAGENT_"
#: Names the configuration file (read by the command line); not an override.
ENV_CONFIG: Final = "VOLAGENT_CONFIG"

_DATASET_MAX_LEN: Final = 200
_IFNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_CGROUP_COMPONENT_RE: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
_NETWORK_NAME_PATTERN: Final = f"^{names.NETWORK_NAME_PATTERN}$"
_UNIX_PREFIX: Final = "unix:"
_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes including the terminating NUL
_MAX_PORT: Final = 65535


# ---------------------------------------------------------------- value checks


class _FieldError(ValueError):
    """A check across fields of a section that blames one field (pydantic would blame all)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def _reason(exc: InvalidParameter) -> str:
    return str(exc.details.get("reason", exc.message))


def _check_uuid(value: str) -> str:
    try:
        return names.validate_volume_uuid(value.lower())
    except InvalidParameter:
        msg = "must be a UUID like 123e4567-e89b-12d3-a456-426614174000"
        raise ValueError(msg) from None


def _check_dataset_root(value: str) -> str:
    # Volumes live at <root>/<uuid>: leave room for the 37 characters of "/<uuid>".
    if len(value) > _DATASET_MAX_LEN:
        raise ValueError(f"must be at most {_DATASET_MAX_LEN} characters")
    if "/" not in value:
        msg = "must name a dataset below the pool, like tank/volumes"
        raise ValueError(msg)
    try:
        return names.validate_dataset_name(value)
    except InvalidParameter as exc:
        raise ValueError(_reason(exc)) from None


def _check_topic_root(value: str) -> str:
    if not value:
        msg = "must not be empty"
        raise ValueError(msg)
    if any(char in value for char in "+#\0"):
        msg = "must not contain the wildcards + or # (or NUL)"
        raise ValueError(msg)
    if value.startswith("/") or value.endswith("/"):
        msg = "must not begin or end with /"
        raise ValueError(msg)
    if value.startswith("$"):
        msg = "must not begin with $ (reserved for the broker)"
        raise ValueError(msg)
    return value


def _check_ifname(value: str) -> str:
    if not _IFNAME_RE.fullmatch(value) or value in {".", ".."}:
        msg = "must be a Linux interface name: 1 to 15 of A-Z a-z 0-9 _ . -"
        raise ValueError(msg)
    return value


def _check_cgroup_parent(value: str) -> str:
    parts = value.removeprefix("/").split("/")
    if not all(_CGROUP_COMPONENT_RE.fullmatch(p) and p not in {".", ".."} for p in parts):
        msg = (
            "must be a cgroup path like /volagent (absolute) or volagent-zones (relative):"
            " components of letters, digits and _ . : @ -, not . or .."
        )
        raise ValueError(msg)
    return value


def _check_not_empty(value: str) -> str:
    if not value:
        msg = "must not be empty"
        raise ValueError(msg)
    return value


def _absolute_path(value: object) -> Path:
    if not isinstance(value, str):
        msg = "expected a string"
        raise ValueError(msg)  # noqa: TRY004 -- pydantic reports only ValueError
    if not value.startswith("/"):
        msg = "must be an absolute path"
        raise ValueError(msg)
    return Path(value)


def _optional_absolute_path(value: object) -> Path | None:
    return None if value == "" else _absolute_path(value)


def _split_url(url: str, schemes: tuple[str, ...]) -> SplitResult:
    """Split ``url`` and check what the MQTT and central URLs have in common."""
    if any(char.isspace() for char in url):
        msg = "must not contain whitespace"
        raise ValueError(msg)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from exc
    if parts.scheme not in schemes:
        raise ValueError(f"scheme must be {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        msg = "a host is required"
        raise ValueError(msg)
    if parts.username is not None or parts.password is not None:
        msg = "must not contain credentials (they belong in their own keys)"
        raise ValueError(msg)
    if port == 0:
        raise ValueError(f"port must be 1..{_MAX_PORT}")
    if parts.query or parts.fragment:
        msg = "must not have a query or fragment"
        raise ValueError(msg)
    return parts


def _parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """Return ``(host, port, tls)`` of a broker URL."""
    parts = _split_url(url, ("mqtt", "mqtts"))
    if parts.path not in {"", "/"}:
        msg = "must not have a path"
        raise ValueError(msg)
    tls = parts.scheme == "mqtts"
    port = parts.port or (8883 if tls else 1883)
    return str(parts.hostname), port, tls


def _check_mqtt_url(value: str) -> str:
    _parse_mqtt_url(value)
    return value


def _check_central_url(value: str) -> str:
    if value:
        _split_url(value, ("http", "https"))
    return value


def parse_listen(value: str, *, min_port: int = 1) -> tuple[str, int] | Path:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/abs/path``; ValueError says what is wrong.

    ``min_port`` 0 lets the kernel pick a free port (the local API's tests use it).
    """
    if value.startswith(_UNIX_PREFIX):
        path = value.removeprefix(_UNIX_PREFIX)
        if not path.startswith("/"):
            msg = "unix: needs an absolute path, like unix:/run/volagent/http.sock"
            raise ValueError(msg)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ValueError(f"unix socket path is longer than {_UNIX_PATH_MAX} bytes")
        return Path(path)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        msg = 'must be "host:port", "[ipv6]:port" or "unix:/absolute/path"'
        raise ValueError(msg)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{host!r} is not an IPv6 address") from exc
    elif ":" in host:
        msg = "an IPv6 address needs brackets, like [::1]:5310"
        raise ValueError(msg)
    if not (port_text.isascii() and port_text.isdigit()) or not (
        min_port <= int(port_text) <= _MAX_PORT
    ):
        raise ValueError(f"port must be {min_port}..{_MAX_PORT}")
    return host, int(port_text)


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address; hostnames other than localhost count as not."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# ---------------------------------------------------------------- field types

_NonEmpty = Annotated[str, AfterValidator(_check_not_empty)]
_AbsolutePath = Annotated[Path, BeforeValidator(_absolute_path)]
_OptionalPath = Annotated[Path | None, BeforeValidator(_optional_absolute_path)]
_PositiveFloat = Annotated[float, Field(gt=0)]
_NetworkName = Annotated[str, Field(pattern=_NETWORK_NAME_PATTERN)]
#: A uid/gid zfs-fuse can store (it refuses ids above 2^31-1).
_AnonymousId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Section(BaseModel):
    """Common settings of every configuration model."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- sections


class NodeConfig(_Section):
    """``[node]``: who this compute node is."""

    uuid: Annotated[str, AfterValidator(_check_uuid)]


class MqttConfig(_Section):
    """``[mqtt]``: the broker tasks arrive through."""

    url: Annotated[str, AfterValidator(_check_mqtt_url)] = "mqtt://127.0.0.1:1883"
    username: str = ""
    password_file: _OptionalPath = None
    topic_root: Annotated[str, AfterValidator(_check_topic_root)] = "volagent/v1"
    keepalive_s: Annotated[int, Field(ge=1, le=65535)] = 30
    ca_file: _OptionalPath = None
    client_id: str = ""

    @model_validator(mode="after")
    def _ca_file_needs_tls(self) -> MqttConfig:
        if self.ca_file is not None and not self.tls:
            msg = "only used with an mqtts:// url"
            raise _FieldError(msg, field="ca_file")
        return self

    @property
    def host(self) -> str:
        """The broker's host name or address (without IPv6 brackets)."""
        return _parse_mqtt_url(self.url)[0]

    @property
    def port(self) -> int:
        """The broker's port: the URL's, else 1883 for ``mqtt://`` and 8883 for ``mqtts://``."""
        return _parse_mqtt_url(self.url)[1]

    @property
    def tls(self) -> bool:
        """Whether the URL is ``mqtts://``."""
        return _parse_mqtt_url(self.url)[2]


class StorageConfig(_Section):
    """``[storage]``: where the volumes' datasets live and how ZFS is driven."""

    dataset_root: Annotated[str, AfterValidator(_check_dataset_root)]
    backend: Literal["cli", "pyzfs"] = "cli"
    zfs_bin: _NonEmpty = "zfs"
    zpool_bin: _NonEmpty = "zpool"
    command_timeout_s: _PositiveFloat = 60.0


class NetworkConfig(_Section):
    """``[networks.<name>]``: the host bridge a zone's nic joins for network ``<name>``."""

    bridge: Annotated[str, AfterValidator(_check_ifname)]


class CentralConfig(_Section):
    """``[central]``: the central volume API the node reports to (disabled when url is empty)."""

    url: Annotated[str, AfterValidator(_check_central_url)] = ""
    token_file: _OptionalPath = None
    heartbeat_s: _PositiveFloat = 5.0
    timeout_s: _PositiveFloat = 10.0


class HttpConfig(_Section):
    """``[http]``: the local HTTP API (health, status, metrics)."""

    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:5310"
    allow_non_loopback: bool = False

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> HttpConfig:
        tcp = self.tcp_address
        if tcp is not None and not self.allow_non_loopback and not is_loopback(tcp[0]):
            msg = (
                "not a loopback address; set http.allow_non_loopback = true to serve"
                " the HTTP API beyond this host"
            )
            raise _FieldError(msg, field="listen")
        return self

    @property
    def unix_path(self) -> Path | None:
        """The socket path of a ``unix:`` listen address, else None."""
        parsed = parse_listen(self.listen)
        return parsed if isinstance(parsed, Path) else None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of a TCP listen address (IPv6 without brackets), else None."""
        parsed = parse_listen(self.listen)
        return parsed if isinstance(parsed, tuple) else None


class StateConfig(_Section):
    """``[state]``: where the agent keeps its state between runs."""

    dir: _AbsolutePath = Path("/var/lib/volagent")


class EngineConfig(_Section):
    """``[engine]``: how tasks are run."""

    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = 8
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 20.0
    task_retention_days: Annotated[float, Field(ge=8)] = 14.0


class LimitsConfig(_Section):
    """``[limits]``: bounds on what tasks may ask for."""

    max_volume_mib: Annotated[int, Field(ge=1)] = 1048576
    max_snapshots_per_volume: Annotated[int, Field(ge=1)] = 100
    max_task_bytes: Annotated[int, Field(ge=1)] = 262144


class ZonesConfig(_Section):
    """``[zones]``: the resources and programs of each volume's NFS server zone."""

    memory_mib: Annotated[int, Field(ge=1)] = 256
    cpus: _PositiveFloat = 1.0
    pids: Annotated[int, Field(ge=1)] = 1024
    root_squash: bool = True
    anonymous_uid: _AnonymousId = 65534
    anonymous_gid: _AnonymousId = 65534
    ganesha_bin: _NonEmpty = "ganesha.nfsd"
    rpcbind_bin: _NonEmpty = "rpcbind"
    cgroup_parent: Annotated[str, AfterValidator(_check_cgroup_parent)] = "/volagent"
    name_prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,5}$")] = "vz"
    probe_interval_s: _PositiveFloat = 5.0
    probe_timeout_s: _PositiveFloat = 2.0
    start_timeout_s: _PositiveFloat = 30.0
    stop_timeout_s: _PositiveFloat = 10.0
    command_timeout_s: _PositiveFloat = 30.0
    restart_backoff_initial_s: _PositiveFloat = 1.0
    restart_backoff_max_s: _PositiveFloat = 60.0
    crash_loop_failures: Annotated[int, Field(ge=1)] = 5
    crash_loop_window_s: _PositiveFloat = 600.0

    @model_validator(mode="after")
    def _backoff_bounds(self) -> ZonesConfig:
        if self.restart_backoff_max_s < self.restart_backoff_initial_s:
            msg = "must be at least restart_backoff_initial_s"
            raise _FieldError(msg, field="restart_backoff_max_s")
        return self


class LogConfig(_Section):
    """``[log]``: log level and output format."""

    level: Literal["trace", "debug", "info", "warn", "error", "fatal"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Section):
    """The whole configuration; sections are attributes named like the TOML tables."""

    node: NodeConfig
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    storage: StorageConfig
    networks: dict[_NetworkName, NetworkConfig] = Field(default_factory=dict)
    central: CentralConfig = Field(default_factory=CentralConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    zones: ZonesConfig = Field(default_factory=ZonesConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @property
    def cn(self) -> str:
        """The compute node's id: ``node.uuid`` in lower case."""
        return self.node.uuid

    @property
    def client_id(self) -> str:
        """The effective MQTT client id: ``mqtt.client_id``, or ``volagent-<cn>`` when empty."""
        return self.mqtt.client_id or f"volagent-{self.cn}"

    @property
    def tasks_topic(self) -> str:
        """``<root>/cn/<cn>/tasks``: central to agent."""
        return f"{self.mqtt.topic_root}/cn/{self.cn}/tasks"

    @property
    def events_topic(self) -> str:
        """``<root>/cn/<cn>/events``: agent to central."""
        return f"{self.mqtt.topic_root}/cn/{self.cn}/events"

    @property
    def status_topic(self) -> str:
        """``<root>/cn/<cn>/status``: the retained node status document."""
        return f"{self.mqtt.topic_root}/cn/{self.cn}/status"


_SECTIONS: Final[dict[str, type[_Section]]] = {
    name: field.annotation
    for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)
}

# ---------------------------------------------------------------- loading


def default_path(env: Mapping[str, str] | None = None) -> Path:
    """Return the configuration file to use: ``$VOLAGENT_CONFIG`` if set, else the default."""
    env = os.environ if env is None else env
    return Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else DEFAULT_PATH


def load(path: Path | None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the configuration.

    ``path`` is the TOML file; None means there is no file and everything comes from the
    environment. ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` with every
    problem found.
    """
    env = os.environ if env is None else env
    where = str(path) if path is not None else "the environment"
    data = _read_toml(path) if path is not None else {}
    sources, problems = _apply_env(data, env)
    for section in Config.model_fields:
        data.setdefault(section, {})
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problem(error, sources) for error in exc.errors())
        raise _invalid(where, problems) from exc
    if problems:
        raise _invalid(where, problems)
    return config


def _invalid(where: str, problems: list[tuple[str, str]]) -> ConfigError:
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return ConfigError(f"invalid configuration in {where}: {count}", problems)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        problem = (str(path), "file not found")
        raise ConfigError(f"configuration file {path} not found", [problem]) from exc
    except OSError as exc:
        problem = (str(path), f"cannot read: {exc.strerror or exc}")
        raise ConfigError(f"cannot read configuration file {path}", [problem]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problem = (str(path), f"not valid TOML: {exc}")
        raise ConfigError(f"configuration file {path} is not valid TOML", [problem]) from exc


# ---------------------------------------------------------------- environment


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[tuple[str, ...], str], list[tuple[str, str]]]:
    """Apply ``VOLAGENT_*`` overrides to ``data`` in place.

    Returns where each overridden key came from and the problems with the variables' names.
    """
    sources: dict[tuple[str, ...], str] = {}
    problems: list[tuple[str, str]] = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        key = _env_key(var)
        if isinstance(key, str):
            problems.append((var, key))
            continue
        *tables, leaf = key
        table = data
        for name in tables:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                break  # the file has a non-table here; validation reports it
        else:
            table[leaf] = _coerce(env[var], _field_model(key).model_fields[leaf].annotation)
            sources[key] = var
    return sources, problems


def _env_key(var: str) -> tuple[str, ...] | str:
    """Return the key path a variable overrides, or a message saying why it names none."""
    rest = var.removeprefix(ENV_PREFIX).lower()
    section, _, key = rest.partition("_")
    if section == "networks":
        for field in NetworkConfig.model_fields:
            name = key.removesuffix(f"_{field}")
            if name and name != key:
                return ("networks", name, field)
        return f"not a setting: use {ENV_PREFIX}NETWORKS_<NAME>_<KEY>, KEY one of " + ", ".join(
            f.upper() for f in NetworkConfig.model_fields
        )
    model = _SECTIONS.get(section)
    if model is None:
        return f"not a setting: no section {section!r}{_suggest(section, Config.model_fields)}"
    if key not in model.model_fields:
        return f"not a setting: no key {key!r} in [{section}]{_suggest(key, model.model_fields)}"
    return (section, key)


_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def _coerce(value: str, annotation: object) -> object:
    """Turn an environment string into the field's type; leave it as is when it does not fit."""
    try:
        if annotation is bool:
            lowered = value.strip().lower()
            return True if lowered in _TRUE else False if lowered in _FALSE else value
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
    except ValueError:
        pass  # the string reaches validation, which reports the wrong type
    return value


# ---------------------------------------------------------------- problems


def _field_model(path: tuple[str, ...]) -> type[BaseModel]:
    """Return the model that holds the last element of ``path``."""
    if len(path) == 1:
        return Config
    if path[0] == "networks":
        return NetworkConfig
    return _SECTIONS[path[0]]


_MESSAGES: Final = {
    "missing": "required key is missing",
    "model_type": "expected a table",
    "dict_type": "expected a table",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
}


def _problem(error: ErrorDetails, sources: Mapping[tuple[str, ...], str]) -> tuple[str, str]:
    """Turn one pydantic error into a ``(key, message)`` problem."""
    path = tuple(str(part) for part in error["loc"])
    kind = error["type"]
    value = error["input"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        path = (*path, cause.field)
        value = value.get(cause.field) if isinstance(value, dict) else value
    if kind == "missing":
        message = _MESSAGES[kind]
    elif kind == "extra_forbidden":
        model = _field_model(path)
        what = "section" if model is Config and isinstance(value, dict) else "key"
        message = f"unknown {what}{_suggest(path[-1], model.model_fields)}"
    else:
        if kind == "value_error" and cause is not None:
            message = str(cause)
        elif kind in _MESSAGES:
            message = _MESSAGES[kind]
        else:
            message = error["msg"].replace("Input should be", "must be")
            message = message.replace("String should match", "must match")
        if path[-1] == "[key]":
            path = path[:-1]
            message = f"invalid network name: {message}"
        message = f"{message} (got {_show(value)})"
    return _display_key(path, sources), message


def _display_key(path: tuple[str, ...], sources: Mapping[tuple[str, ...], str]) -> str:
    """Return the dotted key (TOML-quoted where needed) and the variable it came from, if any."""
    key = ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in path)
    var = sources.get(path) or next((v for k, v in sources.items() if k[: len(path)] == path), None)
    return f"{key} (from {var})" if var else key


def _suggest(word: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _show(value: object) -> str:
    """Render a value for a message, short and TOML-like."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)
