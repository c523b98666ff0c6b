"""The MQTT adapter: one persistent MQTT 5 session with the broker, kept up for as long as it runs.

:class:`MqttAdapter` connects as ``volagent-<cn>`` with ``clean_start=False`` and a session
expiry of :data:`SESSION_EXPIRY_S`, so the broker keeps the subscription and queues tasks while
the agent is away. On every (re)connect it subscribes to ``<root>/cn/<cn>/tasks`` at QoS 1 and
publishes the retained ``online`` status document; the last will sets that document to
``{"v":1,"cn":"<cn>","state":"offline"}``, and a clean :meth:`MqttAdapter.stop` publishes the
same document before disconnecting. Lost connections are retried forever with jittered
exponential backoff; the password file is read anew at every attempt.

Delivery (the reasoning, with the evidence, is in ``docs/protocol.md``): paho-mqtt normally
sends the PUBACK of a QoS 1 message as soon as its ``on_message`` callback returns, and aiomqtt's
callback only puts the message in a queue, so a crash before the engine has journaled a task
would lose it. The adapter therefore switches paho to manual acknowledgement: every
:class:`Incoming` carries an :meth:`~Incoming.ack` that the engine calls once the message's fate
is durable. Until then the broker holds the message and delivers it again after a crash or a
lost connection. Acknowledgements go out in arrival order, as MQTT requires.

The daemon runs :meth:`MqttAdapter.run` as one task of its TaskGroup (name it
``volagent.mqtt``), takes messages with :meth:`MqttAdapter.receive` or
:meth:`MqttAdapter.messages`, and publishes events with :meth:`MqttAdapter.publish_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypeVar, cast

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import CallbackOnConnect_v2, ConnectFlags
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from volagent import __version__
from volagent.config import Config, MqttConfig
from volagent.errors import VolagentError

__all__ = [
    "MAX_PACKET_BYTES",
    "RECEIVE_MAXIMUM",
    "SESSION_EXPIRY_S",
    "BrokerState",
    "BrokerUnavailable",
    "Incoming",
    "MqttAdapter",
]

#: How long the broker keeps the session (subscription and queued tasks) after a disconnect.
SESSION_EXPIRY_S: Final = 7 * 24 * 3600
#: MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send us at once.
RECEIVE_MAXIMUM: Final = 16
#: MQTT 5 Maximum Packet Size: larger messages are dropped by the broker and never reach us.
MAX_PACKET_BYTES: Final = 4 * 1024 * 1024

_AIOMQTT_TIMEOUT: Final = "Operation timed out"  # aiomqtt's MqttError when its own timeout ends
_AUTH_CODES: Final = frozenset({4, 5, 134, 135})  # bad user name or password / not authorised

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")


class BrokerUnavailable(VolagentError):
    """The broker could not be reached, refused us, or did not confirm in time; retry later."""

    code: ClassVar[str] = "BrokerUnavailable"
    retryable: bool = True


@dataclass(frozen=True, slots=True, eq=False)
class Incoming:
    """A message from the tasks topic with the handle that acknowledges it to the broker.

    Call :meth:`ack` once the message's fate is durable: the task is in the journal, or the
    message was found invalid and its failed event published (or it was logged and counted
    when no id could be read). Every message must be acknowledged eventually: the broker sends
    at most a few unacknowledged messages at a time, and acknowledgements are released in
    arrival order, so one forgotten message holds back those behind it.

    ``oversize`` is true when the payload exceeds ``limits.max_task_bytes`` (256 KiB by
    default); it is handed over whole so that the engine can still read an id and publish a
    failed event.
    """

    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool
    oversize: bool
    #: Number of the connection the message came on (1 for the first one).
    connection: int
    _ack: Callable[[], None] = field(repr=False)

    def ack(self) -> None:
        """Send the PUBACK (in arrival order); idempotent; a no-op once the connection is gone.

        After a lost connection the broker delivers the message again on the next one, with the
        same payload; the engine recognises the task id and acknowledges that copy.
        """
        self._ack()


@dataclass(frozen=True, slots=True)
class BrokerState:
    """What the adapter knows about its broker connection (for /ready, /status and metrics)."""

    connected: bool
    #: Sessions established (connected, subscribed, status published) since start.
    connects: int
    #: Attempts that failed before a session was established.
    failed_attempts: int
    #: The latest connection failure or loss, in words; None until something went wrong.
    last_error: str | None
    #: Whether the broker still had our session at the latest connect (None before one).
    session_present: bool | None
    #: Messages handed to the engine.
    received: int

    @property
    def reconnects(self) -> int:
        """Sessions established after the first one."""
        return max(self.connects - 1, 0)


class _ClosingSSLSocket(ssl.SSLSocket):
    """A TLS socket that closes itself when its handshake fails.

    paho's ``_ssl_wrap_socket`` does not close the socket when ``do_handshake`` raises (a
    broker with an untrusted certificate), which leaks one descriptor per attempt until the
    garbage collector finds it.
    """

    def do_handshake(self, block: bool = False) -> None:
        """Handshake; on failure close the socket and re-raise."""
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class _ConnectionLost(Exception):
    """The connection an operation was waiting on went away."""


class _Acks:
    """The PUBACKs of one connection, released in the order their messages arrived.

    MQTT 5 section 4.6 (and 3.1.1 likewise) requires a client to send PUBACKs in the order the
    PUBLISH packets were received, so an acknowledgement waits for those of earlier messages.
    """

    def __init__(self, paho: PahoClient, number: int) -> None:
        self._paho = paho
        self._number = number
        self._waiting: OrderedDict[int, bool] = OrderedDict()  # mid -> acknowledged by engine
        self.open = True

    def track(self, mid: int) -> Callable[[], None]:
        """Register a received QoS 1 message; return the function that acknowledges it."""
        self._waiting[mid] = False
        return lambda: self._ack(mid)

    def _ack(self, mid: int) -> None:
        if not self.open:
            _log.debug("mqtt ack after its connection closed", mid=mid, connection=self._number)
            return
        if self._waiting.get(mid) is not False:
            return
        self._waiting[mid] = True
        while self._waiting:
            first, acknowledged = next(iter(self._waiting.items()))
            if not acknowledged:
                break
            del self._waiting[first]
            rc = self._paho.ack(first, 1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                _log.warning("mqtt puback not sent", mid=first, rc=int(rc))


@dataclass(eq=False)
class _Connection:
    """One established connection and what hangs on it."""

    client: aiomqtt.Client
    number: int
    acks: _Acks
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    #: Subscribed and announced online: the session counts as up.
    established: bool = False


class MqttAdapter:
    """The agent's broker connection: tasks in (with manual acks), events and status out."""

    def __init__(
        self,
        config: Config,
        *,
        receive_maximum: int = RECEIVE_MAXIMUM,
        max_payload_bytes: int | None = None,
        max_packet_bytes: int | None = None,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 30.0,
        op_timeout_s: float = 10.0,
        online_status: Callable[[], Mapping[str, Any]] | None = None,
        on_state: Callable[[BrokerState], None] | None = None,
    ) -> None:
        """Prepare the adapter; nothing touches the network before :meth:`run`.

        A payload above ``max_payload_bytes`` (default ``limits.max_task_bytes``) is handed
        over marked ``oversize``; a packet above ``max_packet_bytes`` (default the larger of
        :data:`MAX_PACKET_BYTES` and twice the payload limit) is dropped by the broker.
        ``online_status`` returns the retained status document published at every connect
        (default: ``v``, ``cn``, ``state: online``, ``agent_version``, ``since``).
        ``on_state`` is called with a fresh :class:`BrokerState` whenever it changes.
        ``op_timeout_s`` bounds one broker round trip (CONNACK, SUBACK, PUBACK, DISCONNECT);
        a connection attempt (TCP, TLS and CONNACK) gets twice as long.
        """
        self._mqtt = config.mqtt
        self._cn = config.cn
        self._client_id = config.client_id
        self._tasks_topic = config.tasks_topic
        self._events_topic = config.events_topic
        self._status_topic = config.status_topic
        self._receive_maximum = receive_maximum
        self._max_payload = max_payload_bytes or config.limits.max_task_bytes
        self._max_packet = max_packet_bytes or max(MAX_PACKET_BYTES, 2 * self._max_payload)
        self._retry_base = retry_base_s
        self._retry_cap = retry_cap_s
        self._op_timeout = op_timeout_s
        self._online_status = online_status or self._default_online_status
        self._on_state = on_state
        self._offline = _encode({"v": 1, "cn": self._cn, "state": "offline"})

        # The pump blocks on this queue when the engine is behind; together with the broker's
        # Receive Maximum (and acks sent only after journaling) that bounds what is buffered.
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=receive_maximum)
        self._stopping = asyncio.Event()
        self._up = asyncio.Event()
        self._current: _Connection | None = None
        self._numbers = 0
        self._connects = 0
        self._failed_attempts = 0
        self._last_error: str | None = None
        self._session_present: bool | None = None
        self._received = 0

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> BrokerState:
        """A snapshot of the connection state."""
        return BrokerState(
            connected=self._current is not None,
            connects=self._connects,
            failed_attempts=self._failed_attempts,
            last_error=self._last_error,
            session_present=self._session_present,
            received=self._received,
        )

    @property
    def connected(self) -> bool:
        """Whether a session is established right now."""
        return self._current is not None

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109  # a deadline per call is the API
        """Return once a session is established, or raise :class:`BrokerUnavailable`."""
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"not connected to the MQTT broker after {timeout:g}s",
                details={"last_error": self._last_error},
            ) from exc

    async def receive(self) -> Incoming:
        """The next task message, waiting as long as it takes."""
        return await self._queue.get()

    async def messages(self) -> AsyncIterator[Incoming]:
        """Task messages, forever, in arrival order."""
        while True:
            yield await self.receive()

    async def publish_event(
        self,
        payload: bytes,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109  # a deadline per call is the API
    ) -> None:
        """Publish one event at QoS 1 and return once the broker has confirmed it (PUBACK).

        Waits for a connection and tries again after a lost one, all within ``timeout``; then
        raises :class:`BrokerUnavailable`. A retried event may reach subscribers twice.
        """
        await self._publish(self._events_topic, payload, timeout=timeout)

    def stop(self) -> None:
        """Ask :meth:`run` to publish the offline status, disconnect cleanly and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Keep a session with the broker until :meth:`stop`; reconnect after every loss.

        Broker and network errors never escape: they are logged, recorded in :attr:`state`
        and retried with jittered exponential backoff. Cancellation is honoured (the offline
        document is still attempted on the way out).
        """
        failures = 0
        while not self._stopping.is_set():
            if await self._session():
                failures = 0
            else:
                failures += 1
            if self._stopping.is_set():
                break
            delay = self._backoff(failures)
            _log.info("mqtt reconnecting", in_s=round(delay, 2), failures=failures)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
        _log.info("mqtt stopped")

    # ------------------------------------------------------------------ session

    async def _session(self) -> bool:
        """Connect and serve until stopped or disconnected; return whether the session got up."""
        attempt = self._failed_attempts + self._connects + 1
        _log.info(
            "mqtt connecting",
            host=self._mqtt.host,
            port=self._mqtt.port,
            tls=self._mqtt.tls,
            client_id=self._client_id,
            attempt=attempt,
        )
        conn: _Connection | None = None
        try:
            client = self._make_client()
            paho = client._client  # noqa: SLF001 -- aiomqtt exposes no manual ack (aiomqtt#345)
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(2 * self._op_timeout):
                        await stack.enter_async_context(client)
                except BaseException:
                    # aiomqtt leaves the socket open when the CONNACK does not come in time.
                    paho._sock_close()  # noqa: SLF001 -- paho has no public close without DISCONNECT
                    raise
                self._numbers += 1
                conn = _Connection(client, self._numbers, _Acks(paho, self._numbers))
                try:
                    await self._start(conn)
                    self._connected(conn)
                    await self._serve(conn)
                finally:
                    self._disconnected(conn)
                    await self._say_offline(conn)
        except (aiomqtt.MqttError, OSError, TimeoutError, BrokerUnavailable) as exc:
            self._last_error = _describe(exc)
            established = conn is not None and conn.established
            if established:
                _log.warning("mqtt connection lost", error=self._last_error)
            else:
                self._failed_attempts += 1
                log = _log.error if _is_auth_failure(exc) else _log.warning
                log("mqtt connect failed", error=self._last_error, attempt=attempt)
            self._notify()
            return established
        return True

    def _make_client(self) -> aiomqtt.Client:
        """A fresh aiomqtt client for one attempt, in manual-ack mode."""
        username, password = credentials(self._mqtt)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = self._receive_maximum
        properties.MaximumPacketSize = self._max_packet
        client = aiomqtt.Client(
            self._mqtt.host,
            self._mqtt.port,
            username=username,
            password=password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            will=aiomqtt.Will(self._status_topic, self._offline, qos=1, retain=True),
            keepalive=self._mqtt.keepalive_s,
            timeout=self._op_timeout,
            tls_context=tls_context(self._mqtt),
            # Small packets (PUBACKs, events) go out at once instead of waiting for the
            # peer's delayed ACK (Nagle): that wait added about 40 ms to a task's round trip.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        paho = client._client  # noqa: SLF001 -- aiomqtt exposes no manual ack (aiomqtt#345)
        # Without this, paho sends the PUBACK as soon as aiomqtt has queued the message.
        paho.manual_ack_set(on=True)
        aiomqtt_on_connect = cast("CallbackOnConnect_v2", paho.on_connect)

        def on_connect(
            c: PahoClient, userdata: Any, flags: ConnectFlags, rc: ReasonCode, p: Properties | None
        ) -> None:
            if not rc.is_failure:
                self._session_present = flags.session_present
            aiomqtt_on_connect(c, userdata, flags, rc, p)

        paho.on_connect = on_connect
        return client

    async def _start(self, conn: _Connection) -> None:
        """Subscribe to the tasks topic at QoS 1 and publish the online status."""
        async with asyncio.timeout(self._op_timeout):
            granted = await conn.client.subscribe(self._tasks_topic, qos=1, timeout=math.inf)
        codes = [code.value if isinstance(code, ReasonCode) else code for code in granted]
        if codes != [1]:
            raise BrokerUnavailable(
                f"the broker did not grant QoS 1 on {self._tasks_topic}",
                details={"granted": [str(code) for code in granted]},
            )
        document = _encode(self._online_status())
        async with asyncio.timeout(self._op_timeout):
            await conn.client.publish(
                self._status_topic, document, qos=1, retain=True, timeout=math.inf
            )

    def _connected(self, conn: _Connection) -> None:
        self._current = conn
        conn.established = True
        self._connects += 1
        self._up.set()
        if self._connects > 1 and self._session_present is False:
            _log.warning(
                "mqtt session was not present: tasks published while away may be lost",
                connection=conn.number,
            )
        _log.info(
            "mqtt connected",
            connection=conn.number,
            session_present=self._session_present,
            topic=self._tasks_topic,
        )
        self._notify()

    def _disconnected(self, conn: _Connection) -> None:
        conn.acks.open = False
        conn.lost.set()
        if self._current is conn:
            self._current = None
            self._up.clear()
            self._notify()

    async def _serve(self, conn: _Connection) -> None:
        """Feed the queue until :meth:`stop` (return) or the connection drops (raise)."""
        pump = asyncio.create_task(self._pump(conn), name=f"volagent.mqtt.pump-{conn.number}")
        stop = asyncio.create_task(self._stopping.wait(), name="volagent.mqtt.stop-wait")
        try:
            await asyncio.wait((pump, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            stop.cancel()
            await asyncio.wait((pump, stop))
        if not pump.cancelled():
            pump.result()  # the disconnection (pump only ends by raising)

    async def _pump(self, conn: _Connection) -> None:
        """Move messages from aiomqtt to the bounded queue, waiting while it is full."""
        async for message in conn.client.messages:
            ack = conn.acks.track(message.mid) if message.qos > 0 else _no_ack
            topic = message.topic.value
            if topic != self._tasks_topic:
                # A subscription left in the persistent session by an earlier configuration.
                _log.warning("mqtt message on an unexpected topic dropped", topic=topic)
                ack()
                continue
            payload = message.payload
            incoming = Incoming(
                topic=topic,
                payload=payload,
                qos=message.qos,
                retain=message.retain,
                oversize=len(payload) > self._max_payload,
                connection=conn.number,
                _ack=ack,
            )
            await self._queue.put(incoming)
            self._received += 1

    async def _say_offline(self, conn: _Connection) -> None:
        """Publish the offline status before a clean disconnect (which discards the will)."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(self._op_timeout):
                await conn.client.publish(
                    self._status_topic, self._offline, qos=1, retain=True, timeout=math.inf
                )
                _log.info("mqtt offline status published", connection=conn.number)

    # ------------------------------------------------------------------ publishing

    async def publish_status(self) -> bool:
        """Publish the online status document again (retained) if connected; return whether.

        Called when what the document says changes; a disconnected adapter publishes it at
        its next connect anyway.
        """
        conn = self._current
        if conn is None:
            return False
        try:
            async with asyncio.timeout(self._op_timeout):
                publishing = conn.client.publish(
                    self._status_topic,
                    _encode(self._online_status()),
                    qos=1,
                    retain=True,
                    timeout=math.inf,
                )
                await _unless_lost(conn, publishing)
        except (aiomqtt.MqttError, _ConnectionLost, TimeoutError) as exc:
            _log.info("status not refreshed; it is sent at the next connect", error=_describe(exc))
            return False
        return True

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        timeout: float,  # noqa: ASYNC109  # a deadline per call is the API
    ) -> None:
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    conn = await self._live()
                    try:
                        publishing = conn.client.publish(topic, payload, qos=1, timeout=math.inf)
                        await _unless_lost(conn, publishing)
                    except (aiomqtt.MqttError, _ConnectionLost) as exc:
                        failure = exc
                        await conn.lost.wait()  # the run loop reconnects; then try again
                    else:
                        return
        except TimeoutError as exc:
            reason = _describe(failure) if failure is not None else "not connected"
            raise BrokerUnavailable(
                f"no PUBACK for a message to {topic} within {timeout:g}s: {reason}",
                details={"topic": topic},
            ) from failure or exc

    async def _live(self) -> _Connection:
        while self._current is None:
            await self._up.wait()
        return self._current

    # ------------------------------------------------------------------ helpers

    def _backoff(self, failures: int) -> float:
        """Full delay doubles per failure up to the cap; half of it is random (equal jitter)."""
        ceiling = min(self._retry_cap, self._retry_base * 2.0 ** min(failures, 32))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 -- jitter, not a secret

    def _default_online_status(self) -> dict[str, Any]:
        since = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return {
            "v": 1,
            "cn": self._cn,
            "state": "online",
            "agent_version": __version__,
            "since": since,
        }

    def _notify(self) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(self.state)
        except Exception:  # noqa: BLE001 -- a faulty observer must not take the connection down
            _log.exception("mqtt state observer failed")


def credentials(mqtt: MqttConfig) -> tuple[str | None, str | None]:
    """Username and password for the broker from ``[mqtt]`` (the password file read now).

    A username is sent when one is set or a password is; raises :class:`BrokerUnavailable`
    when the password file cannot be read.
    """
    password = None
    path = mqtt.password_file
    if path is not None:
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise BrokerUnavailable(f"cannot read mqtt.password_file {path}: {exc}") from exc
    username = mqtt.username if mqtt.username or password is not None else None
    return username, password


def tls_context(mqtt: MqttConfig) -> ssl.SSLContext | None:
    """Verify the broker against ``mqtt.ca_file`` (or the system CAs), host name included."""
    if not mqtt.tls:
        return None
    ca_file = mqtt.ca_file
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except OSError as exc:  # ssl.SSLError is an OSError
        raise BrokerUnavailable(f"cannot load mqtt.ca_file {ca_file}: {exc}") from exc
    context.sslsocket_class = _ClosingSSLSocket
    return context


def _no_ack() -> None:
    """QoS 0 messages have nothing to acknowledge."""


async def _unless_lost(conn: _Connection, work: Coroutine[Any, Any, _T]) -> _T:
    """Await ``work``; raise :class:`_ConnectionLost` instead if the connection goes first."""
    task = asyncio.ensure_future(work)
    lost = asyncio.ensure_future(conn.lost.wait())
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise _ConnectionLost


def _encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _reason(exc: BaseException) -> int | None:
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        return rc.value
    return rc if isinstance(rc, int) else None


def _is_auth_failure(exc: BaseException) -> bool:
    return isinstance(exc, MqttConnectError) and _reason(exc) in _AUTH_CODES


def _describe(exc: BaseException) -> str:
    """Say what went wrong in words an operator can act on."""
    if _is_auth_failure(exc):
        hint = "check mqtt.username and mqtt.password_file"
        return f"the broker refused the connection: {exc} ({hint})"
    if isinstance(exc, MqttConnectError):
        return f"the broker refused the connection: {exc}"
    if isinstance(exc, TimeoutError) or str(exc) == _AIOMQTT_TIMEOUT:
        return "the broker did not answer in time"
    if isinstance(exc, VolagentError):
        return exc.message
    return str(exc) or type(exc).__name__
