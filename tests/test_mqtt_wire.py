"""Our MQTT v5 client against the real broker: handshake, QoS1 both ways, manual ack, will."""

import asyncio

import pytest

from fleet import protocol
from fleet.embedded import Mosquitto
from fleet.mqtt_wire import (
    DEADLINE_TICK_S,
    Connection,
    ConnectionLostError,
    ConnectOptions,
    Message,
    MqttError,
    Will,
    encode_publish,
    open_connection,
    parse_properties,
)
from tests.conftest import CONTROLLER_PASSWORD, CONTROLLER_USERNAME, TERMINAL_SECRET
from tests.conftest import ONE_TERMINAL as TID


class Inbox:
    """Collects delivered messages; tests wait on it, never on sleeps."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    def __call__(self, _connection: Connection, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Message]:
        async with asyncio.timeout(10):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages


def controller_options(**changes: object) -> ConnectOptions:
    base = {
        "client_id": CONTROLLER_USERNAME,
        "username": CONTROLLER_USERNAME,
        "password": CONTROLLER_PASSWORD,
        "session_expiry_s": 600,
        "keepalive_s": 30,
    }
    base.update(changes)
    return ConnectOptions(**base)  # type: ignore[arg-type]


def terminal_options(will: Will | None = None) -> ConnectOptions:
    return ConnectOptions(
        client_id=TID,
        username=TID,
        password=protocol.derive_terminal_password(TERMINAL_SECRET, TID),
        keepalive_s=30,
        session_expiry_s=600,
        will=will,
    )


async def test_unacked_message_is_redelivered_to_the_next_session(
    terminal_broker: Mosquitto,
) -> None:
    """A QoS1 message not acked before the connection ends comes again: ack after commit."""
    topic = protocol.terminal_topic(TID, protocol.MessageKind.HEARTBEAT)
    first = Inbox()
    controller = await open_connection(
        terminal_broker.host, terminal_broker.port, controller_options(), first
    )
    codes = await controller.subscribe([(topic, 1, 0)])
    assert codes == [1]
    terminal = await open_connection(
        terminal_broker.host, terminal_broker.port, terminal_options(), Inbox()
    )
    await terminal.publish(topic, b"one", qos=1)
    [message] = await first.wait_for(1)
    assert (message.topic, message.payload, message.qos) == (topic, b"one", 1)
    controller.abort()  # as if the controller crashed before its commit
    await controller.closed

    second = Inbox()
    again = await open_connection(
        terminal_broker.host, terminal_broker.port, controller_options(), second
    )
    assert again.session_present
    [redelivered] = await second.wait_for(1)
    assert redelivered.payload == b"one"
    again.ack(redelivered.packet_id)
    await terminal.publish(topic, b"two", qos=1)
    await second.wait_for(2)
    assert [m.payload for m in second.messages] == [b"one", b"two"]
    terminal.disconnect()
    again.disconnect()
    assert await terminal.closed is None


async def test_broker_holds_back_beyond_our_receive_maximum(terminal_broker: Mosquitto) -> None:
    """With receive maximum 5 the broker hands us 5 un-acked messages, then waits."""
    topic = protocol.terminal_topic(TID, protocol.MessageKind.EVENTS)
    inbox = Inbox()
    controller = await open_connection(
        terminal_broker.host,
        terminal_broker.port,
        controller_options(receive_maximum=5, session_expiry_s=0, clean_start=True),
        inbox,
    )
    await controller.subscribe([(topic, 1, 0)])
    terminal = await open_connection(
        terminal_broker.host, terminal_broker.port, terminal_options(), Inbox()
    )
    for n in range(12):
        await terminal.publish(topic, str(n).encode(), qos=1)
    await inbox.wait_for(5)
    # A round trip through the broker proves nothing more was on its way.
    await controller.subscribe([("fleet/+/hello", 1, 0)])
    assert len(inbox.messages) == 5
    for message in list(inbox.messages):
        controller.ack(message.packet_id)
    await inbox.wait_for(10)
    for message in inbox.messages[5:10]:
        controller.ack(message.packet_id)
    await inbox.wait_for(12)
    assert [m.payload for m in inbox.messages] == [str(n).encode() for n in range(12)]
    terminal.disconnect()
    controller.disconnect()


async def test_abort_fires_the_retained_will_and_disconnect_does_not(
    terminal_broker: Mosquitto,
) -> None:
    """A power loss (abort) publishes the will; a clean DISCONNECT does not."""
    topic = protocol.terminal_topic(TID, protocol.MessageKind.PRESENCE)
    will = Will(topic, b"offline", qos=1, retain=True)
    inbox = Inbox()
    controller = await open_connection(
        terminal_broker.host,
        terminal_broker.port,
        controller_options(session_expiry_s=0, clean_start=True),
        inbox,
    )
    await controller.subscribe([(topic, 1, 0)])
    terminal = await open_connection(
        terminal_broker.host, terminal_broker.port, terminal_options(will), Inbox()
    )
    await terminal.publish(topic, b"online", qos=1, retain=True)
    terminal.disconnect()
    await terminal.closed
    terminal = await open_connection(
        terminal_broker.host, terminal_broker.port, terminal_options(will), Inbox()
    )
    terminal.abort()
    messages = await inbox.wait_for(2)
    assert [m.payload for m in messages] == [b"online", b"offline"]
    for message in messages:
        controller.ack(message.packet_id)
    controller.disconnect()


async def test_refusals_are_errors_with_the_reason(terminal_broker: Mosquitto) -> None:
    """Bad credentials, a forbidden subscription and a forbidden publish say why."""
    with pytest.raises(MqttError, match=r"refused: reason 0x8[67]"):
        await open_connection(
            terminal_broker.host,
            terminal_broker.port,
            ConnectOptions(client_id=TID, username=TID, password="wrong"),
            Inbox(),
        )
    terminal = await open_connection(
        terminal_broker.host, terminal_broker.port, terminal_options(), Inbox()
    )
    codes = await terminal.subscribe([("fleet/T999999/cmd", 1, 0)])
    assert codes[0] >= 0x80
    with pytest.raises(MqttError, match="refused publish"):
        await terminal.publish("fleet/T999999/heartbeat", b"x", qos=1)
    terminal.disconnect()


async def test_a_dead_broker_is_noticed(terminal_broker: Mosquitto) -> None:
    """Waiting requests fail when the broker goes away, and `closed` says so."""
    terminal = await open_connection(
        terminal_broker.host, terminal_broker.port, terminal_options(), Inbox()
    )
    terminal_broker.kill()
    error = await asyncio.wait_for(terminal.closed, 10)
    assert isinstance(error, ConnectionLostError)
    with pytest.raises(ConnectionLostError):
        await terminal.publish("fleet/T000001/heartbeat", b"x", qos=1)
    with pytest.raises(ConnectionLostError):
        await open_connection(
            terminal_broker.host, terminal_broker.port, terminal_options(), Inbox(), timeout_s=2
        )


def test_publish_encoding_round_trips_through_the_parser() -> None:
    """Length prefixes past 127 bytes and the expiry property encode as the spec says."""
    packet = encode_publish("a/b", b"x" * 300, qos=1, retain=True, packet_id=7, expiry_s=60)
    assert packet[0] == 0x33
    # 2 + 3 (topic) + 2 (id) + 1 + 5 (properties) + 300 = 313 = 0xB9 0x02 as a varint.
    assert packet[1:3] == bytes((0xB9, 0x02))
    props, end = parse_properties(packet, 3 + 5 + 2)
    assert props == {0x02: 60}
    assert packet[end:] == b"x" * 300


def test_publish_encoding_of_short_packets() -> None:
    """The one-byte length and the empty property block of a heartbeat-sized PUBLISH."""
    assert encode_publish("a/b", b"hi", qos=0, retain=False) == b"\x30\x08\x00\x03a/b\x00hi"
    assert encode_publish("a/b", b"hi", qos=1, retain=True, packet_id=258) == (
        b"\x33\x0a\x00\x03a/b\x01\x02\x00hi"
    )


class _Transport(asyncio.Transport):
    """Keeps what is written; the peer answers only when a test feeds the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


async def test_publish_timeout_fails_an_unanswered_publish() -> None:
    connection = Connection(Inbox())
    connection.connection_made(_Transport())
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await connection.publish("a/b", b"x", qos=1, timeout_s=0.05)
    # Kept on a coarse tick: late by at most one tick, never early.
    assert 0.05 <= asyncio.get_running_loop().time() - started < 0.05 + DEADLINE_TICK_S + 0.2


async def test_publish_timeout_lets_an_answered_publish_through() -> None:
    connection = Connection(Inbox())
    connection.connection_made(_Transport())
    publish = asyncio.create_task(connection.publish("a/b", b"x", qos=1, timeout_s=0.05))
    await asyncio.sleep(0)
    connection.data_received(b"\x40\x02\x00\x01")  # PUBACK for packet 1
    await publish
    # Past the deadline, the answered publish is not failed after the fact.
    await asyncio.sleep(0.05 + DEADLINE_TICK_S)
    assert publish.exception() is None
