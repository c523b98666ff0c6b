"""A small ONC RPC client over TCP, enough to ask whether a zone's NFS server answers.

The wire format is RFC 5531 (RPC version 2) with XDR (RFC 4506) encoding: a call header with
AUTH_NONE credentials and verifier, and on TCP the record marking of RFC 5531 section 11 (each
fragment led by a 4-byte header: last-fragment bit and length). The pure functions
(:func:`encode_call`, :func:`frame`, :func:`decode_reply`, :func:`encode_getport`,
:func:`decode_getport`) carry the format; :class:`RpcClient` runs calls over one connection
opened inside the zone's network namespace (:mod:`volagent.adapters.nsnet`), one at a time,
each under ``asyncio.timeout``.

:func:`probe_nfs` is the zone health check: NULL calls (procedure 0) to NFS v3 and v4 on port
2049 and, for v3, to MOUNT v3 on the port the portmapper (port 111) gives for it.

Every failure is a :class:`RpcError`, a :class:`~volagent.errors.ZoneFailed`: the server that
does not answer a call as asked is the zone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import structlog

from volagent.adapters import nsnet
from volagent.errors import ZoneFailed

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")

RPC_VERSION: Final = 2
CALL: Final = 0
REPLY: Final = 1
MSG_ACCEPTED: Final = 0
MSG_DENIED: Final = 1
AUTH_NONE: Final = 0
#: Longest opaque body of an ``opaque_auth`` (RFC 5531 section 8.2).
MAX_AUTH_BYTES: Final = 400
#: Longest reply record accepted; a NULL or GETPORT reply is a few dozen bytes.
MAX_RECORD: Final = 1024 * 1024

PORTMAP_PROGRAM: Final = 100000
PORTMAP_VERSION: Final = 2
PORTMAP_PORT: Final = 111
PMAPPROC_GETPORT: Final = 3
NFS_PROGRAM: Final = 100003
NFS_PORT: Final = 2049
MOUNT_PROGRAM: Final = 100005
MOUNT_VERSION: Final = 3
IPPROTO_TCP: Final = 6
NULL_PROCEDURE: Final = 0

_LAST_FRAGMENT: Final = 0x80000000
_UINT32: Final = struct.Struct(">I")
_CALL_HEADER: Final = struct.Struct(">10I")


class AcceptStat(IntEnum):
    """``accept_stat`` of an accepted reply."""

    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(IntEnum):
    """``reject_stat`` of a denied reply."""

    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class RpcError(ZoneFailed):
    """An RPC server did not answer a call as asked."""


class RpcTimeout(RpcError):
    """No reply (or no connection) within the call's timeout; the connection is closed."""


class RpcConnectionLost(RpcError):
    """The server closed or reset the connection before replying."""


class RpcProtocolError(RpcError):
    """The reply is not a well-formed answer to the call (bad record, header or xid)."""


class RpcDenied(RpcError):
    """MSG_DENIED: RPC version mismatch (``low``/``high`` in details) or an auth error."""


class RpcUnsuccessful(RpcError):
    """The call was accepted but not carried out; ``stat`` says why."""

    def __init__(
        self, message: str, *, stat: AcceptStat, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message, details={**(details or {}), "accept_stat": stat.name})
        self.stat = stat


class ProgramUnavailable(RpcUnsuccessful):
    """PROG_UNAVAIL: the server does not serve the program (or the portmapper knows no port)."""


class ProgramMismatch(RpcUnsuccessful):
    """PROG_MISMATCH: the program is served, but only versions ``low`` to ``high``."""

    def __init__(self, message: str, *, low: int, high: int) -> None:
        super().__init__(message, stat=AcceptStat.PROG_MISMATCH, details={"low": low, "high": high})
        self.low = low
        self.high = high


# ------------------------------------------------------------------------------ wire format


def _check_uint(name: str, value: int) -> None:
    if not 0 <= value < 2**32:
        raise ValueError(f"{name} must fit in an unsigned 32-bit integer, not {value!r}")


def encode_call(xid: int, program: int, version: int, procedure: int, args: bytes = b"") -> bytes:
    """The XDR ``rpc_msg`` of a CALL with AUTH_NONE credentials and verifier.

    ``args`` are the procedure's arguments, already XDR-encoded (a multiple of 4 bytes).
    """
    for name, value in (("xid", xid), ("program", program), ("version", version)):
        _check_uint(name, value)
    _check_uint("procedure", procedure)
    if len(args) % 4:
        raise ValueError(f"XDR arguments are a multiple of 4 bytes, not {len(args)}")
    header = _CALL_HEADER.pack(
        xid, CALL, RPC_VERSION, program, version, procedure, AUTH_NONE, 0, AUTH_NONE, 0
    )
    return header + args


def frame(message: bytes) -> bytes:
    """``message`` as one record of a single, last fragment (RFC 5531 record marking)."""
    if len(message) >= _LAST_FRAGMENT:
        raise ValueError(f"a fragment holds less than 2 GiB, not {len(message)} bytes")
    return _UINT32.pack(_LAST_FRAGMENT | len(message)) + message


async def read_record(reader: asyncio.StreamReader, *, limit: int = MAX_RECORD) -> bytes:
    """Read one record (all its fragments) from ``reader``.

    Raises :class:`RpcConnectionLost` when the stream ends first, and
    :class:`RpcProtocolError` when the record would exceed ``limit`` bytes.
    """
    record = bytearray()
    last = False
    try:
        while not last:
            (header,) = _UINT32.unpack(await reader.readexactly(4))
            last = bool(header & _LAST_FRAGMENT)
            length = header & ~_LAST_FRAGMENT
            if len(record) + length > limit:
                raise RpcProtocolError(f"reply record larger than {limit} bytes")
            record += await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        msg = "the server closed the connection before replying"
        raise RpcConnectionLost(msg) from exc
    return bytes(record)


class _Reader:
    """Unsigned integers and opaques read off an XDR buffer; short data is a protocol error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uint(self, what: str) -> int:
        end = self.pos + 4
        if end > len(self.data):
            raise RpcProtocolError(f"reply ends before its {what}")
        (value,) = _UINT32.unpack_from(self.data, self.pos)
        self.pos = end
        return int(value)

    def opaque(self, what: str, limit: int) -> bytes:
        length = self.uint(f"{what} length")
        if length > limit:
            raise RpcProtocolError(f"{what} of {length} bytes is longer than {limit}")
        end = self.pos + length
        padded = end + (-length % 4)
        if padded > len(self.data):
            raise RpcProtocolError(f"reply ends inside its {what}")
        body = self.data[self.pos : end]
        self.pos = padded
        return body

    def rest(self) -> bytes:
        return self.data[self.pos :]


def decode_reply(data: bytes, *, xid: int) -> bytes:
    """The results of a successful reply to call ``xid`` (still XDR-encoded).

    Raises :class:`RpcProtocolError` for anything but a well-formed REPLY to ``xid``,
    :class:`RpcDenied` for MSG_DENIED, :class:`ProgramUnavailable`, :class:`ProgramMismatch`
    or :class:`RpcUnsuccessful` for an accepted reply whose status is not SUCCESS.
    """
    r = _Reader(data)
    if (got := r.uint("xid")) != xid:
        raise RpcProtocolError(f"reply to xid {got:#010x}, expected {xid:#010x}")
    if (mtype := r.uint("message type")) != REPLY:
        raise RpcProtocolError(f"message type {mtype} is not REPLY")
    stat = r.uint("reply status")
    if stat == MSG_DENIED:
        reject = r.uint("reject status")
        if reject == RejectStat.RPC_MISMATCH:
            low, high = r.uint("lowest RPC version"), r.uint("highest RPC version")
            raise RpcDenied(
                f"RPC version {RPC_VERSION} refused: server speaks {low} to {high}",
                details={"reject_stat": RejectStat.RPC_MISMATCH.name, "low": low, "high": high},
            )
        if reject == RejectStat.AUTH_ERROR:
            auth = r.uint("auth status")
            raise RpcDenied(
                f"call refused: authentication error {auth}",
                details={"reject_stat": RejectStat.AUTH_ERROR.name, "auth_stat": auth},
            )
        raise RpcProtocolError(f"unknown reject status {reject}")
    if stat != MSG_ACCEPTED:
        raise RpcProtocolError(f"unknown reply status {stat}")
    r.uint("verifier flavor")
    r.opaque("verifier", MAX_AUTH_BYTES)
    accept = r.uint("accept status")
    try:
        status = AcceptStat(accept)
    except ValueError as exc:
        raise RpcProtocolError(f"unknown accept status {accept}") from exc
    if status is AcceptStat.SUCCESS:
        return r.rest()
    if status is AcceptStat.PROG_MISMATCH:
        low, high = r.uint("lowest version"), r.uint("highest version")
        raise ProgramMismatch(
            f"program version not served (only {low} to {high})", low=low, high=high
        )
    if status is AcceptStat.PROG_UNAVAIL:
        msg = "program not served"
        raise ProgramUnavailable(msg, stat=status)
    raise RpcUnsuccessful(f"call not carried out: {status.name}", stat=status)


def encode_getport(program: int, version: int, protocol: int = IPPROTO_TCP) -> bytes:
    """The XDR ``mapping`` argument of PMAPPROC_GETPORT (the port field is ignored: 0)."""
    for name, value in (("program", program), ("version", version), ("protocol", protocol)):
        _check_uint(name, value)
    return struct.pack(">4I", program, version, protocol, 0)


def decode_getport(results: bytes) -> int:
    """The port of a PMAPPROC_GETPORT reply; 0 means the program is not registered."""
    if len(results) != 4:
        raise RpcProtocolError(f"GETPORT result of {len(results)} bytes, expected 4")
    port = int(_UINT32.unpack(results)[0])
    if port > 65535:
        raise RpcProtocolError(f"GETPORT answered port {port}")
    return port


# ---------------------------------------------------------------------------------- client


class RpcClient:
    """One TCP connection to an RPC server inside a network namespace; one call at a time.

    A call that times out, loses its connection or gets a malformed reply leaves the stream
    out of step, so the connection is closed and later calls raise :class:`RpcConnectionLost`.
    A refusal (denied or unsuccessful reply) leaves it usable.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._xid = secrets.randbits(32)
        self._closed = False
        self.peer = peer

    @classmethod
    async def connect(
        cls,
        netns: str,
        host: str,
        port: int,
        *,
        timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    ) -> Self:
        """Connect to ``host``:``port`` inside ``netns`` (see :func:`nsnet.open_connection`)."""
        reader, writer = await nsnet.open_connection(netns, host, port, timeout=timeout)
        return cls(reader, writer, peer=f"{host}:{port} in {netns}")

    async def call(
        self,
        program: int,
        version: int,
        procedure: int,
        args: bytes = b"",
        *,
        timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    ) -> bytes:
        """Call ``procedure`` and return its XDR results; raise an :class:`RpcError` if not."""
        what = f"program {program} v{version} procedure {procedure} at {self.peer}"
        context = {"peer": self.peer, "program": program, "version": version}
        async with self._lock:
            if self._closed:
                raise RpcConnectionLost(f"{what}: connection already closed", details=context)
            self._xid = (self._xid + 1) % 2**32
            xid = self._xid
            message = frame(encode_call(xid, program, version, procedure, args))
            try:
                async with asyncio.timeout(timeout):
                    self._writer.write(message)
                    await self._writer.drain()
                    record = await read_record(self._reader)
                return decode_reply(record, xid=xid)
            except TimeoutError as exc:
                self._abort()
                raise RpcTimeout(
                    f"{what}: no reply within {timeout:.3g} s", details=context
                ) from exc
            except OSError as exc:
                self._abort()
                raise RpcConnectionLost(f"{what}: {exc}", details=context) from exc
            except RpcError as exc:
                if isinstance(exc, RpcConnectionLost | RpcProtocolError):
                    self._abort()
                raise _in_context(exc, what, context) from exc.__cause__
            except BaseException:
                self._abort()
                raise

    async def null(
        self,
        program: int,
        version: int,
        *,
        timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    ) -> None:
        """Call procedure 0 (NULL): it does nothing and answers nothing, when the server runs."""
        results = await self.call(program, version, NULL_PROCEDURE, timeout=timeout)
        if results:
            msg = f"NULL of program {program} v{version} at {self.peer} returned data"
            raise RpcProtocolError(msg, details={"peer": self.peer, "program": program})

    async def getport(
        self,
        program: int,
        version: int,
        *,
        protocol: int = IPPROTO_TCP,
        timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    ) -> int:
        """Ask this portmapper for the port of ``program``/``version`` over ``protocol``.

        Raises :class:`ProgramUnavailable` when the program is not registered (port 0).
        """
        args = encode_getport(program, version, protocol)
        results = await self.call(
            PORTMAP_PROGRAM, PORTMAP_VERSION, PMAPPROC_GETPORT, args, timeout=timeout
        )
        if port := decode_getport(results):
            return port
        raise ProgramUnavailable(
            f"program {program} v{version} is not registered with the portmapper at {self.peer}",
            stat=AcceptStat.PROG_UNAVAIL,
            details={"peer": self.peer, "program": program, "version": version},
        )

    def _abort(self) -> None:
        """Drop the connection at once (a hung peer never reads what is still buffered)."""
        self._closed = True
        self._writer.transport.abort()

    async def close(self) -> None:
        """Close the connection; idempotent."""
        if not self._closed:
            self._closed = True
            self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        """The client itself; :meth:`close` on leaving."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        await self.close()


def _in_context(exc: RpcError, what: str, context: Mapping[str, Any]) -> RpcError:
    """``exc`` with the call it answers named in its message and details."""
    exc.message = f"{what}: {exc.message}"
    exc.args = (exc.message,)
    exc.details = {**context, **exc.details}
    return exc


# ----------------------------------------------------------------------------------- probe


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One health probe: whether every check answered, their round trips, the first failure.

    ``latencies`` maps the checks that answered (``nfs3``, ``nfs4``, ``portmap``, ``mount3``)
    to the seconds their call took, in the order they ran. ``error`` names the check that
    failed and why; it is empty when ``ok``.
    """

    ok: bool
    latencies: Mapping[str, float] = field(default_factory=dict)
    error: str = ""


async def probe_nfs(
    netns: str,
    ip: str,
    *,
    versions: Sequence[int],
    timeout: float,  # noqa: ASYNC109  # a deadline per probe is the API
) -> ProbeResult:
    """Whether the NFS server at ``ip`` inside ``netns`` answers, within ``timeout`` s in all.

    NULL calls go to NFS (port 2049) for each of ``versions`` (3 and/or 4); with v3, MOUNT v3
    is looked up with the portmapper (port 111) and called too. The first check that fails
    ends the probe. A zone that does not answer is reported (``ok`` false), never raised.
    """
    if not versions or not set(versions) <= {3, 4}:
        raise ValueError(f"NFS versions must be a non-empty subset of (3, 4), not {versions!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    latencies: dict[str, float] = {}
    check = "nfs connect"

    def left() -> float:
        return deadline - loop.time()

    async def timed(name: str, call: Awaitable[_T]) -> _T:
        nonlocal check
        check = name
        started = time.perf_counter()
        result = await call
        latencies[name] = time.perf_counter() - started
        return result

    try:
        async with await RpcClient.connect(netns, ip, NFS_PORT, timeout=left()) as nfs:
            for version in sorted(set(versions)):
                await timed(f"nfs{version}", nfs.null(NFS_PROGRAM, version, timeout=left()))
        if 3 in versions:
            check = "portmap connect"
            async with await RpcClient.connect(netns, ip, PORTMAP_PORT, timeout=left()) as pmap:
                port = await timed(
                    "portmap", pmap.getport(MOUNT_PROGRAM, MOUNT_VERSION, timeout=left())
                )
            check = "mount connect"
            async with await RpcClient.connect(netns, ip, port, timeout=left()) as mount:
                await timed("mount3", mount.null(MOUNT_PROGRAM, MOUNT_VERSION, timeout=left()))
    except ZoneFailed as exc:
        result = ProbeResult(ok=False, latencies=latencies, error=f"{check}: {exc.message}")
    else:
        result = ProbeResult(ok=True, latencies=latencies)
    _log.debug("nfs_probe", netns=netns, ip=ip, ok=result.ok, error=result.error, **latencies)
    return result
