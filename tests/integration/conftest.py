"""Fixtures shared by the integration tests that run an agent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.mqtt import Mosquitto, free_port
from tests.support.node import AgentNode
from tests.support.zones import ZoneBed


@pytest.fixture
async def node(mosquitto: Mosquitto, zone_bed: ZoneBed, tmp_path: Path) -> AsyncIterator[AgentNode]:
    """An agent node with its local HTTP API on a free port; stopped and closed at the end.

    A module that needs more configuration overrides this fixture, asks for this one and adds
    to its ``overrides``.
    """
    n = AgentNode(broker=mosquitto, bed=zone_bed, tmp=tmp_path)
    n.overrides = {"http": {"listen": f"127.0.0.1:{free_port()}"}}
    try:
        yield n
    finally:
        if n.agent is not None:
            await n.stop()
        n.close()
