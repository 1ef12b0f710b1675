"""The controller's MQTT session: paho-mqtt with manual acknowledgement, bridged to asyncio.

Why paho and not aiomqtt here: ingest must PUBACK a QoS1 message only after its row is
committed, which needs paho's ``manual_ack``; and paho's network thread costs a third of
aiomqtt's CPU per message (docs/benchmarks.md).

Backpressure: paho's thread hands each message to asyncio and *blocks* while the bounded
inbox is full. The broker may only have ``receive_maximum`` un-acknowledged QoS1 messages
in flight to us [MQTT-3.3.4-7], so the rest wait in the broker's session queue, not in our
memory, and nothing is dropped.
"""

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet import metrics
from fleet.errors import FleetError
from fleet.protocol import MessageKind, terminal_subscription
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

_MAX_QUEUED_PUBLISHES = 10_000

SUBSCRIPTIONS = tuple(
    terminal_subscription(kind)
    for kind in (MessageKind.EVENTS, MessageKind.HEARTBEAT, MessageKind.PRESENCE, MessageKind.HELLO)
)


class PublishError(FleetError):
    """The broker did not accept a publish (not connected, or a failure reason code)."""


@dataclass(frozen=True)
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
        """Prepare the client; nothing connects until `start`."""
        self._settings = settings
        self._inbox = inbox
        self._subscribe = subscribe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0
        self._closing = threading.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self.connected = asyncio.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or settings.mqtt_username,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        self._client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
        self._client.max_inflight_messages_set(1000)
        # Bounded: while disconnected, paho keeps what we publish; past this, publish fails.
        self._client.max_queued_messages_set(_MAX_QUEUED_PUBLISHES)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        #: False once the broker refused one of ingest's subscriptions (an ACL mistake):
        #: the controller would otherwise look healthy while receiving nothing.
        self.subscribed_ok = True

    async def start(self, connect_timeout_s: float = 30.0) -> None:
        """Connect (in paho's thread) and wait for the first CONNACK."""
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        props.ReceiveMaximum = self._settings.mqtt_receive_max
        self._client.connect_async(
            self._settings.mqtt_host,
            self._settings.mqtt_port,
            keepalive=self._settings.mqtt_keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        async with asyncio.timeout(connect_timeout_s):
            await self.connected.wait()

    async def stop(self) -> None:
        """Disconnect cleanly; un-acked messages stay queued in the broker's session."""
        self._closing.set()
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PublishError("session closed"))
        self._pending.clear()

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS1 message; call only after its effects are committed."""
        if message.qos == 0 or message.generation != self._generation:
            return
        self._client.ack(message.mid, message.qos)

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

        Raises:
            PublishError: not connected, or the broker refused the message.
        """
        loop = asyncio.get_running_loop()
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        # Registered before this coroutine yields; the PUBACK callback is marshalled onto
        # this loop, so it can only run after the future is in place.
        future: asyncio.Future[None] = loop.create_future()
        self._pending[info.mid] = future
        try:
            async with asyncio.timeout(self._settings.mqtt_publish_timeout_s):
                await future
        except TimeoutError:
            raise PublishError(f"no PUBACK for {topic} in time") from None
        finally:
            self._pending.pop(info.mid, None)

    # -- paho thread ------------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            logger.error("MQTT connect refused: %s", reason, extra={"action": "mqtt_refused"})
            return
        self._generation += 1
        metrics.MQTT_CONNECTS.inc()
        # Re-sent on every CONNACK: cheap, and correct even if the session was lost.
        if self._subscribe:
            # Retain handling 1: retained presence only when the subscription is new, not
            # again on every reconnect of the same persistent session [MQTT-3.8.3-1].
            options = SubscribeOptions(qos=1, retainHandling=1)
            client.subscribe([(topic, options) for topic in SUBSCRIPTIONS])
        logger.info("MQTT connected", extra={"action": "mqtt_connected"})
        self._call_soon(self.connected.set)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._call_soon(self.connected.clear)
        if not self._closing.is_set():
            logger.warning("MQTT disconnected: %s", reason, extra={"action": "mqtt_lost"})

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        incoming = Incoming(
            topic=msg.topic,
            payload=bytes(msg.payload),
            mid=msg.mid,
            qos=msg.qos,
            retain=bool(msg.retain),
            generation=self._generation,
        )
        loop = self._loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(self._inbox.put(incoming), loop)
        # Block this thread (and so the socket) until there is room; wake up now and then
        # to notice a shutdown, so the thread can always be joined.
        while not self._closing.is_set():
            try:
                future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                continue
            else:
                return
        future.cancel()

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        refused = [str(code) for code in reasons if code.is_failure]
        if refused:
            self.subscribed_ok = False
            logger.error(
                "broker refused ingest subscriptions: %s",
                refused,
                extra={"action": "subscribe_refused"},
            )

    def healthy(self) -> bool:
        """Connected, and every ingest subscription was granted."""
        return self.connected.is_set() and self.subscribed_ok

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _props: Properties,
    ) -> None:
        # paho calls this holding its internal message lock: take no lock of ours here.
        self._call_soon(self._settle, mid, reason.value)

    def _settle(self, mid: int, reason: int) -> None:
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason >= 0x80:
            future.set_exception(PublishError(f"broker refused publish: reason {reason:#x}"))
        else:
            future.set_result(None)

    def _call_soon(self, callback: object, *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)  # type: ignore[arg-type]
