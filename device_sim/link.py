"""MQTT transport of one simulated terminal: a small `Link` protocol and its aiomqtt form.

The update logic only sees `Link`, so unit tests drive it with an in-memory fake. All
publishes are QoS 1 and awaited (aiomqtt returns once the PUBACK arrives), so a
terminal's events leave in order.
"""

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Incoming:
    """One message the broker delivered to the terminal."""

    topic: str
    payload: bytes
    retain: bool = False


class LinkLostError(ConnectionError):
    """The connection dropped without the terminal asking for it."""


class Link(Protocol):
    """What a terminal needs from its broker connection."""

    async def connect(self) -> None:
        """Open the session (persistent: queued commands survive a disconnect)."""

    async def disconnect(self) -> None:
        """Close the connection on purpose; the broker keeps the session."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and return once the broker acknowledged it."""

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe at QoS 1."""

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop subscriptions."""

    def messages(self) -> AsyncIterator[Incoming]:
        """Yield delivered messages across deliberate reconnects.

        Raises `LinkLostError` when the connection drops unexpectedly.
        """
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerIdentity:
    """Where and as whom a terminal connects."""

    host: str
    port: int
    client_id: str
    password: str
    will_topic: str
    will_payload: bytes
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    incoming_queue_max: int = 1000


class AiomqttLink:
    """`Link` over aiomqtt, MQTT v5, persistent session, retained last will."""

    def __init__(self, identity: BrokerIdentity) -> None:
        """Prepare, without connecting."""
        self._identity = identity
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._up = asyncio.Event()
        self._deliberate = False

    def _new_client(self) -> aiomqtt.Client:
        ident = self._identity
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = ident.session_expiry_s
        return aiomqtt.Client(
            ident.host,
            ident.port,
            username=ident.client_id,
            password=ident.password,
            identifier=ident.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(ident.will_topic, ident.will_payload, qos=1, retain=True),
            keepalive=ident.keepalive_s,
            clean_start=False,
            properties=connect_props,
            max_queued_incoming_messages=ident.incoming_queue_max,
        )

    async def connect(self) -> None:
        """Connect; raises `ConnectionError` when the broker is unreachable or refuses."""
        await self._close()
        client = self._new_client()
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(client)
        except aiomqtt.MqttError as exc:
            raise ConnectionError(str(exc)) from exc
        self._client, self._stack = client, stack
        self._deliberate = False
        self._up.set()

    async def disconnect(self) -> None:
        """Disconnect cleanly (a clean DISCONNECT does not fire the will)."""
        self._deliberate = True
        await self._close()

    async def _close(self) -> None:
        self._up.clear()
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                async with asyncio.timeout(5):
                    await stack.aclose()
            except (aiomqtt.MqttError, TimeoutError):
                logger.debug("%s: disconnect was not clean", self._identity.client_id)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1; while the link is down, wait for it and send again."""
        while True:
            await self._up.wait()
            client = self._client
            assert client is not None
            try:
                await client.publish(topic, payload, qos=1, retain=retain)
            except aiomqtt.MqttError:
                # At least once: the same payload (same msg_id) goes again after reconnect.
                if client is self._client:
                    self._up.clear()
                continue
            return

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe at QoS 1 to each topic."""
        if topics:
            client = await self._current()
            await client.subscribe([(t, 1) for t in topics])

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop the given subscriptions."""
        if topics:
            client = await self._current()
            await client.unsubscribe(list(topics))

    async def _current(self) -> aiomqtt.Client:
        await self._up.wait()
        assert self._client is not None
        return self._client

    async def messages(self) -> AsyncIterator[Incoming]:
        """Yield delivered messages; wait through deliberate disconnects."""
        while True:
            client = await self._current()
            try:
                async for message in client.messages:
                    payload = message.payload
                    data = (
                        bytes(payload)
                        if isinstance(payload, bytes | bytearray)
                        else str(payload).encode()
                    )
                    yield Incoming(str(message.topic), data, retain=bool(message.retain))
            except aiomqtt.MqttError:
                if self._deliberate or client is not self._client:
                    continue
                self._up.clear()
                raise LinkLostError(self._identity.client_id) from None
