"""`Link` over our own MQTT v5 client (`fleet.mqtt_wire`): one socket per terminal.

The aiomqtt link this replaces opened three files per terminal (paho adds a socket pair to
each client) and cost about 200 microseconds of CPU per publish, which capped a process at
about 6,600 terminals under this machine's 20,000-file limit. Semantics are the ones
`Link` documents: at-least-once publishes that wait through reconnects, a lost
connection surfacing in `messages`, deliberate disconnects that keep the session.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

from device_sim.flag import Flag
from device_sim.link import BrokerIdentity, Incoming, LinkLostError
from fleet.mqtt_wire import (
    Connection,
    ConnectOptions,
    Message,
    MqttError,
    Will,
    open_connection,
)

logger = logging.getLogger(__name__)


class WireLink:
    """`Link` over `fleet.mqtt_wire`, MQTT v5, persistent session, retained last will.

    One lock serialises connecting and closing, so there is never more than one
    connection (two with one client id would take the session from each other, and the
    broker could publish the older one's "offline" will after the newer "online").
    """

    __slots__ = ("_arrived", "_changed", "_connection", "_identity", "_inbox", "_lock", "_lost")

    def __init__(self, identity: BrokerIdentity) -> None:
        """Prepare, without connecting."""
        self._identity = identity
        self._lock = asyncio.Lock()
        # `_connection` is set exactly while connected; `_lost` from an unexpected end of
        # a connection until the next `connect` (a deliberate `disconnect` clears it).
        self._connection: Connection | None = None
        self._lost = False
        # Flags and a list, not events and a deque: those allocate their buffers up front,
        # and most links never have anything in them (see device_sim/flag.py).
        self._changed = Flag()
        self._arrived = Flag()
        self._inbox: list[Incoming] = []

    def _options(self) -> ConnectOptions:
        ident = self._identity
        return ConnectOptions(
            client_id=ident.client_id,
            username=ident.client_id,
            password=ident.password,
            keepalive_s=ident.keepalive_s,
            clean_start=False,
            session_expiry_s=ident.session_expiry_s,
            # Commands are few; a small window keeps a stalled terminal's backlog in the
            # broker, not here.
            receive_maximum=min(ident.incoming_queue_max, 100),
            will=Will(ident.will_topic, ident.will_payload, qos=1, retain=True),
        )

    def _signal(self) -> None:
        """Wake everything waiting for the connection state to change."""
        self._changed.set()
        self._changed = Flag()
        self._arrived.set()

    def _deliver(self, connection: Connection, message: Message) -> None:
        # Acknowledged on arrival, like the aiomqtt link did: a terminal keeps no outbox of
        # commands, and a lost command is re-sent by the controller's reconciler.
        if message.qos:
            connection.ack(message.packet_id)
        self._inbox.append(Incoming(message.topic, message.payload, retain=message.retain))
        self._arrived.set()

    async def connect(self) -> None:
        """Connect unless connected; raises `ConnectionError` when the broker refuses."""
        async with self._lock:
            if self._connection is not None:
                return
            ident = self._identity
            try:
                connection = await open_connection(
                    ident.host,
                    ident.port,
                    self._options(),
                    self._deliver,
                    timeout_s=ident.timeout_s,
                )
            except MqttError as exc:
                raise ConnectionError(str(exc)) from exc
            self._connection = connection
            self._lost = False
            connection.closed.add_done_callback(lambda _: self._ended(connection))
            self._signal()

    def _ended(self, connection: Connection) -> None:
        """The network connection is gone; unless it was closed on purpose, it is lost."""
        if connection is not self._connection:
            return
        logger.info("%s: connection lost", self._identity.client_id)
        self._connection = None
        self._lost = True
        self._signal()

    async def disconnect(self) -> None:
        """Disconnect cleanly (a clean DISCONNECT does not fire the will)."""
        async with self._lock:
            self._lost = False
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.disconnect()
                self._signal()

    def power_off(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the will."""
        connection, self._connection = self._connection, None
        self._lost = False
        if connection is not None:
            connection.abort()
            self._signal()

    def _drop(self, connection: Connection) -> None:
        """Abort a connection that failed a request, and mark the link lost now.

        Not left to `_ended`, which runs a loop iteration later: a publish retrying in
        between would find the dead connection still current and spin on it.
        """
        connection.abort()
        self._ended(connection)

    async def _live(self, *, wait: bool) -> Connection:
        """The live connection; without `wait`, raise `LinkLostError` when there is none."""
        while self._connection is None:
            if not wait:
                raise LinkLostError(self._identity.client_id)
            await self._changed.wait()
        return self._connection

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        """Publish at QoS 1; a failure (even a timeout on a live connection) reconnects."""
        while True:
            # Awaiting `_live` only when down spares a coroutine on every publish.
            connection = self._connection or await self._live(wait=wait)
            try:
                # The connection's own coarse deadline, not `asyncio.timeout`: a timer
                # per publish was a tenth of the CPU of a heartbeat.
                await connection.publish(
                    topic, payload, qos=1, retain=retain, timeout_s=self._identity.timeout_s
                )
            except (MqttError, TimeoutError) as exc:
                if connection.is_open and isinstance(exc, MqttError):
                    # Refused by the broker (an ACL): sending again would be refused again.
                    logger.warning("%s: %s", self._identity.client_id, exc)
                    return
                # At least once: the same payload (same msg_id) goes again on the next
                # connection, which `messages`' consumer opens.
                self._drop(connection)
                if not wait:
                    raise LinkLostError(self._identity.client_id) from exc
                continue
            return

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe at QoS 1 to each topic."""
        if topics:
            await self._request(lambda c: c.subscribe([(t, 1, 0) for t in topics]))

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop the given subscriptions."""
        if topics:
            await self._request(lambda c: c.unsubscribe(list(topics)))

    async def _request(self, send: Callable[[Connection], Awaitable[list[int]]]) -> None:
        connection = await self._live(wait=False)
        try:
            async with asyncio.timeout(self._identity.timeout_s):
                await send(connection)
        except (MqttError, TimeoutError) as exc:
            self._drop(connection)
            raise LinkLostError(self._identity.client_id) from exc

    async def messages(self) -> AsyncGenerator[Incoming, None]:
        """Yield delivered messages; wait through deliberate disconnects."""
        inbox = self._inbox
        while True:
            while inbox:
                # Commands and desired states are few: popping the front of a short list
                # is cheap, and an empty list holds no buffer.
                yield inbox.pop(0)
            if self._connection is None and self._lost:
                raise LinkLostError(self._identity.client_id)
            self._arrived.clear()
            await self._arrived.wait()
