"""The controller's session against the real broker: what it acknowledges is never sent again."""

import asyncio

from fleet import protocol
from fleet.embedded import Mosquitto
from fleet.mqtt import Incoming, MqttSession
from fleet.mqtt_wire import Connection, ConnectOptions, Message, open_connection
from fleet.settings import FleetSettings
from tests.conftest import CONTROLLER_PASSWORD, TERMINAL_SECRET
from tests.conftest import ONE_TERMINAL as TID

QUEUED = 3000


def settings_for(broker: Mosquitto) -> FleetSettings:
    return FleetSettings(
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_password=CONTROLLER_PASSWORD,
        mqtt_session_expiry_s=600,
        mqtt_receive_max=QUEUED,
    )


async def terminal(broker: Mosquitto) -> Connection:
    def ignore(_connection: Connection, _message: Message) -> None:
        return None

    return await open_connection(
        broker.host,
        broker.port,
        ConnectOptions(
            client_id=TID,
            username=TID,
            password=protocol.derive_terminal_password(TERMINAL_SECRET, TID),
        ),
        ignore,
    )


async def take(inbox: asyncio.Queue[Incoming], count: int) -> list[Incoming]:
    async with asyncio.timeout(20):
        return [await inbox.get() for _ in range(count)]


async def test_what_was_acknowledged_before_stop_is_not_delivered_again(
    terminal_broker: Mosquitto,
) -> None:
    """Queued while away, taken at the next CONNACK, acked, stopped: none comes back.

    The broker delivers a persistent session's queue right after the CONNACK, often in
    the same read; and a stop right after the acks must not lose them on the way out.
    """
    settings = settings_for(terminal_broker)
    topic = protocol.terminal_topic(TID, protocol.MessageKind.HEARTBEAT)
    first: asyncio.Queue[Incoming] = asyncio.Queue()
    session = MqttSession(settings, first)
    await session.start()  # creates the persistent session and its subscriptions
    await session.stop()

    sender = await terminal(terminal_broker)
    for n in range(QUEUED):
        await sender.publish(topic, str(n).encode(), qos=1)

    second: asyncio.Queue[Incoming] = asyncio.Queue()
    session = MqttSession(settings, second)
    await session.start()
    queued = await take(second, QUEUED)
    assert [m.payload for m in queued] == [str(n).encode() for n in range(QUEUED)]
    session.ack_many(queued)
    await session.stop()

    third: asyncio.Queue[Incoming] = asyncio.Queue()
    session = MqttSession(settings, third)
    await session.start()
    await sender.publish(topic, b"marker", qos=1)
    [next_one] = await take(third, 1)
    assert next_one.payload == b"marker", "an acknowledged message was delivered again"
    session.ack_many([next_one])
    await session.stop()
    sender.disconnect()
