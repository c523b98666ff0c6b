"""The raw MQTT echo: answers each message on one topic with the same bytes on another.

Usage: ``python -m bench.echo PORT IN_TOPIC OUT_TOPIC``. QoS 1 both ways, like the agent's
tasks and events; each answer is published as soon as its message is read, without waiting
for the previous answer's PUBACK. Prints ``ready`` once subscribed.
"""

from __future__ import annotations

import asyncio
import sys

from bench.exchange import client


async def echo(port: int, topic_in: str, topic_out: str) -> None:
    """Answer every message on ``topic_in`` on ``topic_out`` until killed."""
    async with client(port, "vbecho") as echo_client:
        await echo_client.subscribe(topic_in, qos=1)
        print("ready", flush=True)
        async with asyncio.TaskGroup() as tg:
            async for message in echo_client.messages:
                tg.create_task(echo_client.publish(topic_out, message.payload, qos=1))


if __name__ == "__main__":
    asyncio.run(echo(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
