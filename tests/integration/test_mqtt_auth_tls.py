"""The MQTT adapter's credentials: a password file read at each connect; TLS with a private CA."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MQTT_USER
from tests.support.agent import WAIT, mqtt_config, running, until
from tests.support.mqtt import Mosquitto, TlsFiles
from tests.support.run import sh
from volagent.adapters.mqtt import MqttAdapter
from volagent.config import Config

pytestmark = pytest.mark.mqtt

USER, PASSWORD = next(iter(MQTT_USER.items()))
AUTH = {"username": USER, "password": PASSWORD}


async def round_trip(broker: Mosquitto, adapter: MqttAdapter, config: Config) -> bytes:
    """Publish a task with mosquitto_pub and return what the adapter hands over."""
    auth = AUTH if broker.users else None
    await asyncio.to_thread(broker.pub, config.tasks_topic, '{"id":"t-1"}', auth=auth)
    async with asyncio.timeout(WAIT):
        message = await adapter.receive()
    message.ack()
    return message.payload


# ---------------------------------------------------------------------------- passwords


async def test_the_password_file_authenticates(mosquitto_auth: Mosquitto, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    config = mqtt_config(mosquitto_auth.url, username=USER, password_file=str(password_file))
    adapter = MqttAdapter(config)
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        assert await round_trip(mosquitto_auth, adapter, config) == b'{"id":"t-1"}'
    assert adapter.state.failed_attempts == 0


async def test_a_wrong_password_is_reported_and_retried_until_the_file_is_fixed(
    mosquitto_auth: Mosquitto, tmp_path: Path
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("not-the-password\n")
    config = mqtt_config(mosquitto_auth.url, username=USER, password_file=str(password_file))
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter) as task:
        await until(lambda: adapter.state.failed_attempts >= 3)
        state = adapter.state
        assert not task.done()
        password_file.write_text(PASSWORD + "\n")  # read again at the next attempt
        await adapter.wait_connected(WAIT)
        assert await round_trip(mosquitto_auth, adapter, config) == b'{"id":"t-1"}'
    assert not state.connected
    assert state.connects == 0
    # mosquitto 2.0.11 answers a wrong password to an MQTT 5 client with 135, not 134.
    assert state.last_error == (
        "the broker refused the connection: [code:135] Not authorized"
        " (check mqtt.username and mqtt.password_file)"
    )
    assert adapter.state.connects == 1


async def test_a_missing_password_file_is_reported_and_retried(
    mosquitto_auth: Mosquitto, tmp_path: Path
) -> None:
    password_file = tmp_path / "absent"
    config = mqtt_config(mosquitto_auth.url, username=USER, password_file=str(password_file))
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter):
        await until(lambda: adapter.state.failed_attempts >= 2)
        error = adapter.state.last_error or ""
        password_file.write_text(PASSWORD)
        await adapter.wait_connected(WAIT)
    assert error.startswith(f"cannot read mqtt.password_file {password_file}:")
    assert "No such file" in error


# ---------------------------------------------------------------------------- TLS


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    sh(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        ]
    )
    return key, cert


def make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> TlsFiles:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    sh(
        [
            *("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)),
            *("-out", str(csr), "-subj", "/CN=127.0.0.1"),
        ]
    )
    sh(
        [
            *("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert)),
            *("-CAkey", str(ca_key), "-CAcreateserial", "-days", "2", "-out", str(cert)),
            *("-extfile", str(extensions)),
        ]
    )
    return TlsFiles(ca=ca_cert, cert=cert, key=key)


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Any:
    if shutil.which("openssl") is None:
        pytest.skip("mqtt: openssl not installed (needed to make a test CA)")
    ca_key, ca_cert = make_ca(tmp_path / "pki", "volagent-test-ca")
    broker = Mosquitto(
        tmp_path / "mosquitto-tls", tls=make_server_cert(tmp_path / "pki", ca_key, ca_cert)
    )
    broker.start()
    yield broker
    broker.close()


async def test_tls_with_a_private_ca(mosquitto_tls: Mosquitto) -> None:
    assert mosquitto_tls.tls is not None
    assert mosquitto_tls.url.startswith("mqtts://127.0.0.1:")
    config = mqtt_config(mosquitto_tls.url, ca_file=str(mosquitto_tls.tls.ca))
    mosquitto_tls.open_session(config.events_topic, "observer")
    adapter = MqttAdapter(config)
    async with running(adapter):
        await adapter.wait_connected(WAIT)
        assert await round_trip(mosquitto_tls, adapter, config) == b'{"id":"t-1"}'
        await adapter.publish_event(b'{"seq":1}', timeout=WAIT)
    assert mosquitto_tls.sub(config.events_topic, count=1, session="observer") == ['{"seq":1}']


async def test_tls_refuses_a_broker_signed_by_another_ca(
    mosquitto_tls: Mosquitto, tmp_path: Path
) -> None:
    _, other_ca = make_ca(tmp_path / "other", "someone-else")
    config = mqtt_config(mosquitto_tls.url, ca_file=str(other_ca))
    adapter = MqttAdapter(config, retry_base_s=0.1, retry_cap_s=0.5)
    async with running(adapter) as task:
        await until(lambda: adapter.state.failed_attempts >= 2)
        assert not task.done()
    assert adapter.state.connects == 0
    assert "certificate verify failed" in (adapter.state.last_error or "")
