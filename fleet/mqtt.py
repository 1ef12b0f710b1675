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
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fleet import metrics
from fleet.errors import FleetError
from fleet.mqtt_wire import Connection, ConnectOptions, Message, MqttError, open_connection
from fleet.protocol import TOPIC_ROOT, MessageKind, terminal_subscription
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

_RECONNECT_MIN_S = 0.5
_RECONNECT_MAX_S = 30.0

SUBSCRIPTIONS = tuple(
    terminal_subscription(kind)
    for kind in (MessageKind.EVENTS, MessageKind.HEARTBEAT, MessageKind.PRESENCE, MessageKind.HELLO)
)


def subscriptions(shared_group: str = "") -> tuple[str, ...]:
    """Ingest's topic filters; as ``$share/{group}/...`` when replicas share the work.

    Only one member of a shared group receives each message [MQTT-4.8.2]. Retained
    messages are not sent to shared subscriptions [MQTT-3.8.4-4]: retained presence then
    arrives only with the terminal's next change.
    """
    if not shared_group:
        return SUBSCRIPTIONS
    return tuple(f"$share/{shared_group}/{topic}" for topic in SUBSCRIPTIONS)


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
    # Packet ids are per connection: an ack only goes back on the connection it came by
    # (None: not from the network, nothing to acknowledge).
    connection: Connection | None = None


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
        self._filters = subscriptions(settings.mqtt_shared_group)
        self._left = False
        self._barrier: asyncio.Future[None] | None = None
        self._options = ConnectOptions(
            client_id=client_id or settings.mqtt_client_id or settings.mqtt_username,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            keepalive_s=settings.mqtt_keepalive_s,
            clean_start=False,
            session_expiry_s=settings.mqtt_session_expiry_s,
            receive_maximum=settings.mqtt_receive_max,
        )
        self._barrier_topic = f"{TOPIC_ROOT}/c/{self._options.client_id}/barrier"
        self._connection: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._paused: list[Incoming] = []
        self._draining: asyncio.Task[None] | None = None
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
        await self.leave_shared_group()
        for task in (self._task, self._draining):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        connection, self._connection = self._connection, None
        self.connected.clear()
        metrics.MQTT_CONNECTED.set(0)
        if connection is not None:
            connection.disconnect()
            await connection.closed

    async def leave_shared_group(self) -> None:
        """Cluster mode: unsubscribe ingest's shared filters, so others get every message.

        Mosquitto keeps handing a shared group's messages to a member whose session is
        offline (they queue for its return): leaving the group first sends them to the
        replicas still running. A replica that crashes does not leave; its share waits
        in its session until it is back (docs/operations.md, "Cluster mode").
        """
        connection = self._connection
        if not (self._settings.mqtt_shared_group and self._subscribe and connection):
            return
        if self._left:
            return
        self._left = True
        # A barrier: Mosquitto may still send messages it routed to this session before the
        # UNSUBACK. A message to our own topic, published after it, is queued behind them.
        self._barrier = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self._settings.mqtt_publish_timeout_s):
                await connection.subscribe([(self._barrier_topic, 1, 0)])
                await connection.unsubscribe(self._filters)
                await connection.publish(self._barrier_topic, b"", qos=1)
                await self._barrier
        except (MqttError, TimeoutError) as exc:
            logger.warning("shared subscriptions not left: %s", exc, extra={"action": "mqtt_lost"})

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
                self._connection = connection
                if self._subscribe:
                    await self._subscribe_on(connection)
            except MqttError as exc:
                logger.warning("MQTT connect failed: %s", exc, extra={"action": "mqtt_refused"})
                metrics.MQTT_CONNECT_FAILURES.inc()
                # Jittered, so controllers restarted together do not reconnect in step.
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, _RECONNECT_MAX_S)
                continue
            connected_at = time.monotonic()
            metrics.MQTT_CONNECTS.inc()
            metrics.MQTT_CONNECTED.set(1)
            logger.info("MQTT connected", extra={"action": "mqtt_connected"})
            self.connected.set()
            # Shielded: cancelling this task must not cancel the future `stop` waits on.
            ended = await asyncio.shield(connection.closed)
            self._connection = None
            self.connected.clear()
            metrics.MQTT_DISCONNECTS.inc()
            metrics.MQTT_CONNECTED.set(0)
            logger.warning("MQTT disconnected: %s", ended, extra={"action": "mqtt_lost"})
            if time.monotonic() - connected_at > _RECONNECT_MAX_S:
                # A connection that lasted is a fresh start; one the broker dropped at once
                # (say, another controller with our client id) keeps backing off.
                delay = _RECONNECT_MIN_S

    async def _subscribe_on(self, connection: Connection) -> None:
        if self._left:
            return  # handing over: a reconnect must not take a share of new messages again
        # Retain handling 1: retained presence only when the subscription is new, not
        # again on every reconnect of the same persistent session [MQTT-3.8.3-1].
        codes = await connection.subscribe([(topic, 1, 1) for topic in self._filters])
        refused = [
            f"{topic}: {code:#x}"
            for topic, code in zip(self._filters, codes, strict=True)
            if code >= 0x80
        ]
        self.subscribed_ok = not refused
        if refused:
            logger.error(
                "broker refused ingest subscriptions: %s",
                refused,
                extra={"action": "subscribe_refused"},
            )

    def _on_message(self, connection: Connection, message: Message) -> None:
        if message.topic == self._barrier_topic:
            if message.qos:
                connection.ack(message.packet_id)
            if self._barrier is not None and not self._barrier.done():
                self._barrier.set_result(None)
            return
        # Stamped with its connection here, in `data_received`: a persistent session's
        # queued messages can arrive in the very read that carries the CONNACK.
        incoming = Incoming(
            message.topic,
            message.payload,
            message.packet_id,
            message.qos,
            message.retain,
            connection,
        )
        if not self._paused:
            try:
                self._inbox.put_nowait(incoming)
            except asyncio.QueueFull:
                pass
            else:
                return
        # Stop reading the socket: TCP pushes back on the broker until ingest drains.
        self._paused.append(incoming)
        connection.pause_reading()
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(
                self._drain_paused(), name="mqtt-drain"
            )

    async def _drain_paused(self) -> None:
        while self._paused:
            incoming = self._paused.pop(0)
            await self._inbox.put(incoming)
            if not self._paused and incoming.connection is not None:
                incoming.connection.resume_reading()

    def drained(self) -> bool:
        """Nothing received is waiting outside the inbox (reading is not paused)."""
        return not self._paused

    def healthy(self) -> bool:
        """Connected, and every ingest subscription was granted."""
        return self.connected.is_set() and self.subscribed_ok

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS1 message; call only after its effects are committed."""
        self.ack_many([message])

    def ack_many(self, messages: Sequence[Incoming]) -> None:
        """Acknowledge committed messages, one write per connection they came by.

        Those of a connection already gone are not: the broker delivers them again on
        the next one (its session keeps them), and storing them again is idempotent.
        """
        by_connection: dict[Connection, list[int]] = {}
        for m in messages:
            if m.qos and m.connection is not None:
                by_connection.setdefault(m.connection, []).append(m.mid)
        for connection, packet_ids in by_connection.items():
            if connection.is_open:
                connection.ack_many(packet_ids)

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
