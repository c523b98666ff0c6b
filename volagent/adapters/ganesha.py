"""nfs-ganesha for one zone: the configuration file, written atomically, and its reload.

:func:`render` turns a :class:`~volagent.ports.zones.ZoneSpec` and :class:`GaneshaSettings`
into the text of ``ganesha.conf``. Every value is checked first and a bad one raises
:class:`~volagent.errors.InvalidParameter`: addresses and networks through :mod:`ipaddress`,
paths against a conservative character set (no quotes, spaces, newlines, ``;{}#,``...), the
NFS versions against (3, 4).

What the file says, and why:

* ``NFS_CORE_PARAM``: listen on the zone's address only, on the standard ports (every zone has
  an address, so nothing clashes): NFS on :data:`NFS_PORT`, MOUNT on :data:`MOUNT_PORT`
  (fixed, so that connected clients can be found by port). NLM, RQUOTA and UDP are off.
  ``Mount_Path_Pseudo = true`` makes an NFSv3 MOUNT use the pseudo path, so clients use the
  same export path on v3 and v4 while ``Path`` stays the dataset's mountpoint.
* ``NFSV4``: ``Graceless`` (no 90 s grace period after each start), a recovery directory per
  zone, and numeric owners only (tenant uids mean nothing to this host's passwd).
* One ``EXPORT``: ``Access_Type = None`` for everyone, then one ``CLIENT`` block granting RW
  (or RO when read-only) to the allowed clients; ``SecType = sys``; root squashed by default
  to an explicit anonymous uid/gid (ganesha's default of 4294967294 cannot be stored by
  zfs-fuse, which refuses uids above 2^31-1); FSAL VFS.

Changes: ganesha re-reads its exports on SIGHUP (``Reread exports complete`` in its log), which
covers the client list, access type, squash and anonymous ids. Everything else (address,
ports, protocols, paths, recovery directory) needs a restart. :class:`GaneshaConfig` carries
``restart_key``, a digest of exactly the part that needs a restart: two configurations with
the same key differ only in what a reload applies.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from volagent.domain.names import validate_volume_uuid
from volagent.errors import InvalidParameter, ZoneFailed
from volagent.ports.zones import ZoneSpec

#: The NFS port (v3 and v4) a zone listens on.
NFS_PORT: Final = 2049
#: The MOUNT (v3) port a zone listens on; fixed rather than chosen by ganesha.
MOUNT_PORT: Final = 20048
#: Highest uid/gid zfs-fuse stores as it is.
MAX_ID: Final = 2**31 - 1
#: ganesha's log line when a SIGHUP reload of the exports has finished.
RELOAD_DONE: Final = "Reread exports complete"
#: NFS versions a zone can serve.
VERSIONS: Final = frozenset({3, 4})

_MAX_PATH: Final = 1024
_PATH_RE: Final = re.compile(r"(/[A-Za-z0-9_.:@+=-]+)+")
_EXPORT_ID: Final = 1
_RELOAD_POLL_S: Final = 0.02


@dataclass(frozen=True, slots=True)
class GaneshaSettings:
    """Per-agent settings that go into every zone's configuration (from ``[zones]``)."""

    root_squash: bool = True
    anonymous_uid: int = 65534
    anonymous_gid: int = 65534


@dataclass(frozen=True, slots=True)
class GaneshaConfig:
    """A rendered configuration: its text, its digest and the digest of its restart part."""

    text: str
    digest: str
    restart_key: str


def _invalid(value: object, reason: str, *, param: str) -> InvalidParameter:
    return InvalidParameter(
        f"invalid {param} {value!r}: {reason}",
        details={"parameter": param, "reason": reason},
    )


def check_path(value: object, *, param: str) -> str:
    """An absolute, normalised path of safe characters (not ``/`` itself); else InvalidParameter.

    Safe: letters, digits and ``_ . : @ + = -`` between slashes. No ``.``/``..`` components,
    no doubled or trailing slash, at most 1024 characters.
    """
    if not isinstance(value, str):
        raise _invalid(value, "must be a string", param=param)
    if len(value) > _MAX_PATH:
        raise _invalid(value, f"must be at most {_MAX_PATH} characters", param=param)
    if not _PATH_RE.fullmatch(value):
        reason = "must be an absolute path of letters, digits and _ . : @ + = - (not /)"
        raise _invalid(value, reason, param=param)
    if any(part in {".", ".."} for part in value.split("/")):
        raise _invalid(value, "must not contain . or .. components", param=param)
    return value


def check_address(value: object, *, param: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 or IPv6 address (no zone index); else InvalidParameter."""
    if not isinstance(value, str):
        raise _invalid(value, "must be a string", param=param)
    try:
        address = ipaddress.ip_address(value)
    except ValueError as exc:
        raise _invalid(value, "must be an IPv4 or IPv6 address", param=param) from exc
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise _invalid(value, "must not carry a zone index", param=param)
    return address


def check_client(value: object, *, param: str) -> str:
    """An address or a network in CIDR form without host bits; returned in canonical form."""
    if not isinstance(value, str):
        raise _invalid(value, "must be a string", param=param)
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        reason = "must be an IP address or a network like 10.0.0.0/24 (no host bits set)"
        raise _invalid(value, reason, param=param) from exc
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def check_versions(value: object, *, param: str = "nfs_versions") -> tuple[int, ...]:
    """A non-empty collection of 3 and/or 4, returned sorted without repeats."""
    if not isinstance(value, tuple | list) or not value:
        raise _invalid(value, "must be a non-empty list of 3 and/or 4", param=param)
    if any(isinstance(v, bool) or not isinstance(v, int) or v not in VERSIONS for v in value):
        raise _invalid(value, "only NFS versions 3 and 4 are served", param=param)
    return tuple(sorted(set(value)))


def check_id(value: object, *, param: str) -> int:
    """A uid or gid from 0 to 2^31-1 (what zfs-fuse stores)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise _invalid(value, f"must be an integer from 0 to {MAX_ID}", param=param)
    return value


def check_spec(spec: ZoneSpec) -> None:
    """Check every value of ``spec`` that reaches a file or a command line.

    Raises InvalidParameter naming the first bad field. The network name is not checked
    here: whether it is mapped to a bridge is the runtime's question.
    """
    validate_volume_uuid(spec.volume_uuid, param="volume_uuid")
    check_path(spec.source, param="source")
    check_path(spec.export_path, param="export_path")
    address = check_address(spec.nic.ip, param="nic.ip")
    prefix = spec.nic.prefix
    if isinstance(prefix, bool) or not isinstance(prefix, int):
        raise _invalid(prefix, "must be an integer", param="nic.prefix")
    if not 1 <= prefix <= address.max_prefixlen:
        raise _invalid(prefix, f"must be from 1 to {address.max_prefixlen}", param="nic.prefix")
    if spec.nic.gateway is not None:
        gateway = check_address(spec.nic.gateway, param="nic.gateway")
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        if gateway.version != address.version or gateway not in network:
            raise _invalid(
                spec.nic.gateway, f"must be an address in {network}", param="nic.gateway"
            )
        if gateway == address:
            raise _invalid(
                spec.nic.gateway, "must not be the zone's own address", param="nic.gateway"
            )
    if not isinstance(spec.allowed_clients, tuple | list):
        raise _invalid(spec.allowed_clients, "must be a list", param="allowed_clients")
    for client in spec.allowed_clients:
        check_client(client, param="allowed_clients")
    if not isinstance(spec.read_only, bool):
        raise _invalid(spec.read_only, "must be true or false", param="read_only")
    check_versions(spec.nfs_versions)


def _quote(text: str) -> str:
    """A checked value as a ganesha string (the checks leave nothing that needs escaping)."""
    return f'"{text}"'


def render(spec: ZoneSpec, settings: GaneshaSettings, *, recovery_root: Path) -> GaneshaConfig:
    """The configuration of the zone serving ``spec``; InvalidParameter for any bad value."""
    check_spec(spec)
    recovery = check_path(str(recovery_root), param="recovery_root")
    anon_uid = check_id(settings.anonymous_uid, param="anonymous_uid")
    anon_gid = check_id(settings.anonymous_gid, param="anonymous_gid")
    versions = ", ".join(str(v) for v in check_versions(spec.nfs_versions))
    clients = sorted({check_client(c, param="allowed_clients") for c in spec.allowed_clients})
    restart_part = f"""\
NFS_CORE_PARAM {{
    Bind_addr = {check_address(spec.nic.ip, param="nic.ip")};
    NFS_Port = {NFS_PORT};
    MNT_Port = {MOUNT_PORT};
    Protocols = {versions};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;
}}

NFS_KRB5 {{
    Active_krb5 = false;
}}

NFSV4 {{
    Graceless = true;
    RecoveryRoot = {_quote(recovery)};
    Only_Numeric_Owners = true;
}}

EXPORT {{
    Export_Id = {_EXPORT_ID};
    Path = {_quote(spec.source)};
    Pseudo = {_quote(spec.export_path)};
    Protocols = {versions};
    Transports = TCP;
    FSAL {{
        Name = VFS;
    }}
"""
    squash = "root_squash" if settings.root_squash else "no_root_squash"
    access_part = f"""\
    SecType = sys;
    Access_Type = None;
    Squash = {squash};
    Anonymous_Uid = {anon_uid};
    Anonymous_Gid = {anon_gid};
"""
    if clients:
        access_part += f"""\
    CLIENT {{
        Clients = {", ".join(clients)};
        Access_Type = {"RO" if spec.read_only else "RW"};
    }}
"""
    header = f"# nfs-ganesha for volume {spec.volume_uuid}; written by volagent, do not edit.\n\n"
    text = header + restart_part + access_part + "}\n"
    return GaneshaConfig(
        text=text,
        digest=hashlib.sha256(text.encode()).hexdigest(),
        restart_key=hashlib.sha256(restart_part.encode()).hexdigest(),
    )


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` so that readers see the old file or the new, never half.

    A temporary file in the same directory is written, flushed to disk and renamed over
    ``path``; the directory is synced so that the rename survives a crash.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def argv(ganesha_bin: str, *, conf: Path, log: Path, pidfile: Path) -> list[str]:
    """The command line of ganesha in the foreground with its config, log and pid file."""
    return [ganesha_bin, "-F", "-f", str(conf), "-L", str(log), "-p", str(pidfile)]


async def reload(pid: int, log: Path, *, timeout: float) -> None:  # noqa: ASYNC109  # a deadline per call is the API
    """SIGHUP ganesha ``pid`` and wait until its ``log`` says the exports were re-read.

    Raises ZoneFailed when the process is gone or no reload is logged within ``timeout`` s.
    """
    offset = _size(log)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise ZoneFailed(f"ganesha (pid {pid}) is gone", details={"pid": pid}) from exc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while RELOAD_DONE.encode() not in _read_from(log, offset):
        if loop.time() > deadline:
            msg = f"ganesha (pid {pid}) did not reload its exports within {timeout:g} s"
            raise ZoneFailed(msg, details={"pid": pid, "log": str(log)})
        await asyncio.sleep(_RELOAD_POLL_S)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read()
    except FileNotFoundError:
        return b""
