"""MQTT transport of one simulated terminal: a small `Link` protocol and its aiomqtt form.

The update logic only sees `Link`, so unit tests drive it with an in-memory fake. All
publishes are QoS 1 and awaited (aiomqtt returns once the PUBACK arrives), so a
terminal's events leave in order. Every wait on the link is either bounded (aiomqtt's
own timeout on each broker round trip) or lasts until the terminal reconnects.
"""

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence
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
    """What a terminal needs from its broker connection.

    A connection can end two ways. `disconnect` ends it on purpose: `publish` then waits
    for the next `connect` and `messages` waits with it. Anything else makes the link
    *lost*: `messages` raises `LinkLostError`, and its consumer must reconnect and
    announce itself again; until it does, `publish` waits (so someone must always be
    consuming `messages`). Operations that must not wait for that reconnect (because the
    caller is the one that would reconnect, or holds something the reconnect needs) fail
    fast with `LinkLostError` instead.
    """

    async def connect(self) -> None:
        """Open the session (persistent: queued commands survive a disconnect).

        Calls are serialised with each other and with `disconnect`; connecting while
        already connected does nothing.
        """

    async def disconnect(self) -> None:
        """Close the connection on purpose; the broker keeps the session."""

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        """Publish at QoS 1 and return once the broker acknowledged it.

        With `wait`, a publish that finds the link down, or fails, waits for the next
        connection and sends again (at least once). Without it, it raises
        `LinkLostError` instead, after marking a failed connection lost.
        """

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe at QoS 1; raises `LinkLostError` when the link is down or fails."""

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop subscriptions; raises `LinkLostError` when the link is down or fails."""

    def messages(self) -> AsyncGenerator[Incoming, None]:
        """Yield delivered messages across deliberate reconnects.

        Raises `LinkLostError` when the connection drops unexpectedly.
        """


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
    timeout_s: float = 10.0


class AiomqttLink:
    """`Link` over aiomqtt, MQTT v5, persistent session, retained last will.

    One lock serialises connecting and closing, so there is never more than one client
    (two clients with one id would take the session over from each other, and the
    broker could publish the older one's "offline" will after the newer "online").
    """

    def __init__(self, identity: BrokerIdentity) -> None:
        """Prepare, without connecting."""
        self._identity = identity
        self._lock = asyncio.Lock()
        # `_client` is set exactly while connected; `_lost` from an unexpected end of a
        # connection until the next `connect` (a deliberate `disconnect` clears it).
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lost = False
        self._changed = asyncio.Event()

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
            timeout=ident.timeout_s,
        )

    def _signal(self) -> None:
        """Wake everything waiting for the connection state to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def connect(self) -> None:
        """Connect unless connected; raises `ConnectionError` when the broker refuses."""
        async with self._lock:
            if self._client is not None:
                return
            client = self._new_client()
            stack = contextlib.AsyncExitStack()
            try:
                await stack.enter_async_context(client)
            except aiomqtt.MqttError as exc:
                raise ConnectionError(str(exc)) from exc
            self._client, self._stack = client, stack
            self._lost = False
            self._signal()
        # Registered first, so that whoever handles the cancellation closes this client.
        _resurface_cancellation()

    async def disconnect(self) -> None:
        """Disconnect cleanly (a clean DISCONNECT does not fire the will)."""
        async with self._lock:
            self._lost = False
            await self._close()

    async def _drop(self, client: aiomqtt.Client) -> None:
        """Close `client` after it failed, and mark the link lost, unless already replaced."""
        async with self._lock:
            if client is not self._client:
                return
            logger.info("%s: connection failed, closing it", self._identity.client_id)
            self._lost = True
            await self._close()

    async def _close(self) -> None:
        """Close the current client, bounded; the caller holds the lock."""
        stack = self._stack
        self._client, self._stack = None, None
        self._signal()
        if stack is not None:
            try:
                async with asyncio.timeout(self._identity.timeout_s):
                    await stack.aclose()
            except (aiomqtt.MqttError, TimeoutError):
                logger.debug("%s: disconnect was not clean", self._identity.client_id)

    async def _connection(self, *, wait: bool) -> aiomqtt.Client:
        """The live client; without `wait`, raise `LinkLostError` when there is none."""
        while self._client is None:
            if not wait:
                raise LinkLostError(self._identity.client_id)
            await self._changed.wait()
        return self._client

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        """Publish at QoS 1; a failure (even a timeout on a live connection) reconnects."""
        while True:
            client = await self._connection(wait=wait)
            try:
                await client.publish(topic, payload, qos=1, retain=retain)
                _resurface_cancellation()
            except aiomqtt.MqttError as exc:
                # The connection may still be up (aiomqtt timed out waiting for the
                # PUBACK); close it anyway, so `messages` reports the loss and the terminal
                # reconnects. At least once: the same payload (same msg_id) goes again.
                await self._drop(client)
                if not wait:
                    raise LinkLostError(self._identity.client_id) from exc
                continue
            return

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe at QoS 1 to each topic."""
        if topics:
            client = await self._connection(wait=False)
            try:
                await client.subscribe([(t, 1) for t in topics])
                _resurface_cancellation()
            except aiomqtt.MqttError as exc:
                await self._drop(client)
                raise LinkLostError(self._identity.client_id) from exc

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop the given subscriptions."""
        if topics:
            client = await self._connection(wait=False)
            try:
                await client.unsubscribe(list(topics))
                _resurface_cancellation()
            except aiomqtt.MqttError as exc:
                await self._drop(client)
                raise LinkLostError(self._identity.client_id) from exc

    async def messages(self) -> AsyncGenerator[Incoming, None]:
        """Yield delivered messages; wait through deliberate disconnects."""
        while True:
            while self._client is None:
                if self._lost:
                    raise LinkLostError(self._identity.client_id)
                await self._changed.wait()
            client = self._client
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
                # Closed on purpose, replaced, or failed: `_drop` tells them apart.
                await self._drop(client)


def _resurface_cancellation() -> None:
    """Raise CancelledError if this task was cancelled during the await that just ended.

    aiomqtt waits with `asyncio.wait_for`, which on Python 3.11 returns the result and
    drops the cancellation when both happen at once (fixed in 3.12, gh-86296). A terminal
    task would then run on in "cancelling" state and a TaskGroup would wait on it forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
