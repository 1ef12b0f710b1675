"""The controller's MQTT session over our own client (`fleet.mqtt_wire`), reconnecting.

Why not paho any more: ingest must PUBACK a QoS1 message only after its row is
committed. paho can (``manual_ack``), but each message crossed from paho's thread into
asyncio, which cost more CPU than the rest of ingest together; here a message is parsed
in the event loop and a whole batch is acknowledged with one write (docs/benchmarks.md).

Backpressure: the broker may only have ``receive_maximum`` un-acknowledged QoS1 messages
in flight to us [MQTT-3.3.4-7]; the rest wait in the broker's session queue, not in our
memory, and nothing is dropped. Should the inbox fill anyway, reading from the socket
pauses until ingest catches up.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fleet import metrics
from fleet.errors import FleetError
from fleet.mqtt_wire import Connection, ConnectOptions, Message, MqttError, open_connection
from fleet.protocol import MessageKind, terminal_subscription
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

_RECONNECT_MIN_S = 0.5
_RECONNECT_MAX_S = 30.0

SUBSCRIPTIONS = tuple(
    terminal_subscription(kind)
    for kind in (MessageKind.EVENTS, MessageKind.HEARTBEAT, MessageKind.PRESENCE, MessageKind.HELLO)
)


class PublishError(FleetError):
    """The broker did not accept a publish (not connected, or a failure reason code)."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """One received message and what is needed to acknowledge it later."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    # Message ids are per connection: an ack is only sent on the connection it came from.
    generation: int


class MqttSession:
    """One persistent MQTT v5 session: subscribe, receive into a queue, ack, publish."""

    def __init__(
        self,
        settings: FleetSettings,
        inbox: asyncio.Queue[Incoming],
        *,
        subscribe: bool = True,
        client_id: str | None = None,
    ) -> None:
        """Prepare; nothing connects until `start`."""
        self._settings = settings
        self._inbox = inbox
        self._subscribe = subscribe
        self._options = ConnectOptions(
            client_id=client_id or settings.mqtt_username,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            keepalive_s=settings.mqtt_keepalive_s,
            clean_start=False,
            session_expiry_s=settings.mqtt_session_expiry_s,
            receive_maximum=settings.mqtt_receive_max,
        )
        self._connection: Connection | None = None
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self._paused: list[Incoming] = []
        self.connected = asyncio.Event()
        #: False once the broker refused one of ingest's subscriptions (an ACL mistake):
        #: the controller would otherwise look healthy while receiving nothing.
        self.subscribed_ok = True

    async def start(self, connect_timeout_s: float = 30.0) -> None:
        """Start connecting (and reconnecting) and wait for the first session."""
        self._task = asyncio.create_task(self._keep_connected(), name="mqtt-session")
        async with asyncio.timeout(connect_timeout_s):
            await self.connected.wait()

    async def stop(self) -> None:
        """Disconnect cleanly; un-acked messages stay queued in the broker's session."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        connection, self._connection = self._connection, None
        self.connected.clear()
        if connection is not None:
            connection.disconnect()
            await connection.closed

    async def _keep_connected(self) -> None:
        delay = _RECONNECT_MIN_S
        settings = self._settings
        while True:
            try:
                connection = await open_connection(
                    settings.mqtt_host,
                    settings.mqtt_port,
                    self._options,
                    self._on_message,
                    timeout_s=settings.mqtt_publish_timeout_s,
                )
                if self._subscribe:
                    await self._subscribe_on(connection)
            except MqttError as exc:
                logger.warning("MQTT connect failed: %s", exc, extra={"action": "mqtt_refused"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
                continue
            delay = _RECONNECT_MIN_S
            metrics.MQTT_CONNECTS.inc()
            logger.info("MQTT connected", extra={"action": "mqtt_connected"})
            self.connected.set()
            # Shielded: cancelling this task must not cancel the future `stop` waits on.
            ended = await asyncio.shield(connection.closed)
            self._connection = None
            self.connected.clear()
            logger.warning("MQTT disconnected: %s", ended, extra={"action": "mqtt_lost"})

    async def _subscribe_on(self, connection: Connection) -> None:
        # Both set before the SUBSCRIBE: the session may already hold queued messages,
        # which the broker delivers right after CONNACK, and their acks need both.
        self._generation += 1
        self._connection = connection
        # Retain handling 1: retained presence only when the subscription is new, not
        # again on every reconnect of the same persistent session [MQTT-3.8.3-1].
        codes = await connection.subscribe([(topic, 1, 1) for topic in SUBSCRIPTIONS])
        refused = [
            f"{topic}: {code:#x}"
            for topic, code in zip(SUBSCRIPTIONS, codes, strict=True)
            if code >= 0x80
        ]
        if refused:
            self.subscribed_ok = False
            logger.error(
                "broker refused ingest subscriptions: %s",
                refused,
                extra={"action": "subscribe_refused"},
            )

    def _on_message(self, connection: Connection, message: Message) -> None:
        incoming = Incoming(
            message.topic,
            message.payload,
            message.packet_id,
            message.qos,
            message.retain,
            self._generation,
        )
        if self._paused:
            self._paused.append(incoming)
            return
        try:
            self._inbox.put_nowait(incoming)
        except asyncio.QueueFull:
            # Stop reading the socket: TCP pushes back on the broker until ingest drains.
            self._paused.append(incoming)
            connection.pause_reading()
            asyncio.get_running_loop().create_task(self._drain_paused(connection))

    async def _drain_paused(self, connection: Connection) -> None:
        while self._paused:
            await self._inbox.put(self._paused.pop(0))
        connection.resume_reading()

    def healthy(self) -> bool:
        """Connected, and every ingest subscription was granted."""
        return self.connected.is_set() and self.subscribed_ok

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS1 message; call only after its effects are committed."""
        self.ack_many([message])

    def ack_many(self, messages: Sequence[Incoming]) -> None:
        """Acknowledge committed messages with one write."""
        connection = self._connection
        if connection is None:
            return
        generation = self._generation
        connection.ack_many([m.mid for m in messages if m.qos and m.generation == generation])

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Publish and, for QoS1, wait for the broker's PUBACK.

        Waits up to the publish timeout for a connection first.

        Raises:
            PublishError: not connected in time, lost, or refused by the broker.
        """
        try:
            async with asyncio.timeout(self._settings.mqtt_publish_timeout_s):
                await self.connected.wait()
                connection = self._connection
                if connection is None:
                    msg = "not connected"
                    raise PublishError(msg)
                await connection.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)
        except TimeoutError:
            msg = f"no PUBACK for {topic} in time"
            raise PublishError(msg) from None
        except MqttError as exc:
            raise PublishError(f"publish to {topic} failed: {exc}") from exc
