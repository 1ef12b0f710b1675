"""MQTT transport of one simulated terminal: the small `Link` protocol it is driven through.

The update logic only sees `Link`, so unit tests drive it with an in-memory fake; the
real one is `device_sim.wire_link.WireLink`. All publishes are QoS 1 and awaited (they
return once the PUBACK arrives), so a terminal's events leave in order. Every wait on
the link is either bounded (a timeout on each broker round trip) or lasts until the
terminal reconnects.
"""

import dataclasses
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol


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

    def power_off(self) -> None:
        """Drop the connection as a power cut would: no DISCONNECT, so the will fires."""

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
