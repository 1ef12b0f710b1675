"""The load publisher: QoS1 PUBLISH packets, encoded up front, on a sliding window.

It plays the part ``mosquitto_pub -l`` played in the ceiling measurements
(../shared/research/perf-limits.md), with what ingest needs and that tool lacks: every
message on its own topic (thousands of terminals, not one), MQTT v5 reason codes on
every PUBACK (a publish the ACLs refuse is counted, not silently dropped), and a paced
mode that stamps each message as it leaves. Packets are written straight onto the socket
(asyncio `Protocol`), so the publisher costs a few microseconds per message and the
broker, not Python, sets the pace. The same publisher feeds the bare subscriber (the
broker's ceiling) and the controller (ingest), so the two figures are comparable.
"""

import asyncio
import contextlib
import itertools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

#: Un-acknowledged QoS1 messages per connection; the broker's own limit
#: (``max_inflight_messages``, sent as Receive Maximum in its CONNACK) caps it further.
WINDOW: Final = 1000
_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _DISCONNECT = 1, 2, 3, 4, 14
_RECEIVE_MAXIMUM: Final = 0x21
_PACKET_IDS: Final = 65_535


@dataclass(frozen=True, slots=True)
class Message:
    """A message to publish: its topic and payload."""

    topic: str
    payload: bytes


@dataclass
class PublishStats:
    """What the broker acknowledged, and when the first send and the last ack happened."""

    sent: int = 0
    acked: int = 0
    refused: int = 0
    refusal_codes: dict[int, int] = field(default_factory=dict)
    first_send: float | None = None
    last_ack: float | None = None

    def merge(self, other: "PublishStats") -> None:
        """Add another connection's counts."""
        self.sent += other.sent
        self.acked += other.acked
        self.refused += other.refused
        for code, n in other.refusal_codes.items():
            self.refusal_codes[code] = self.refusal_codes.get(code, 0) + n
        starts = [t for t in (self.first_send, other.first_send) if t is not None]
        ends = [t for t in (self.last_ack, other.last_ack) if t is not None]
        self.first_send = min(starts) if starts else None
        self.last_ack = max(ends) if ends else None

    @property
    def rate(self) -> float | None:
        """Acknowledged messages per second, first send to last ack."""
        if self.first_send is None or self.last_ack is None or self.last_ack <= self.first_send:
            return None
        return self.acked / (self.last_ack - self.first_send)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def encode_connect(client_id: str, username: str, password: str, keepalive_s: int = 60) -> bytes:
    """An MQTT v5 CONNECT with clean start, username and password."""
    flags = 0x80 | 0x40 | 0x02
    body = (
        _string("MQTT")
        + bytes([5, flags])
        + struct.pack("!H", keepalive_s)
        + _varint(0)
        + _string(client_id)
        + _string(username)
        + _string(password)
    )
    return bytes([_CONNECT << 4]) + _varint(len(body)) + body


def encode_publish(topic: bytes, payload: bytes, packet_id: int, *, retain: bool = False) -> bytes:
    """An MQTT v5 QoS1 PUBLISH without properties."""
    body = _string(topic) + struct.pack("!H", packet_id) + b"\x00" + payload
    return bytes([(_PUBLISH << 4) | 0x02 | int(retain)]) + _varint(len(body)) + body


def _receive_maximum(properties: bytes) -> int | None:
    """The Receive Maximum of a CONNACK's properties, skipping the others by their type."""
    fixed = {1: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1, 0x17: 1, 0x19: 1}
    fixed |= {0x13: 2, 0x22: 2, 0x21: 2, 0x23: 2, 0x11: 4, 0x27: 4, 0x02: 4, 0x18: 4}
    pos = 0
    while pos < len(properties):
        kind = properties[pos]
        pos += 1
        if kind == _RECEIVE_MAXIMUM:
            return int(struct.unpack_from("!H", properties, pos)[0])
        if kind in fixed:
            pos += fixed[kind]
        elif kind == 0x26:  # user property: a string pair
            for _ in range(2):
                pos += 2 + struct.unpack_from("!H", properties, pos)[0]
        else:  # strings and binary data: a two-byte length
            pos += 2 + struct.unpack_from("!H", properties, pos)[0]
    return None


class _Connection(asyncio.Protocol):
    """One publisher connection: CONNECT, then a window of QoS1 PUBLISHes."""

    def __init__(self, connect: bytes, window: int) -> None:
        self._connect = connect
        self._window = window
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.stats = PublishStats()
        self.in_flight = 0
        self.on_acks: Callable[[int], None] = lambda _n: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._connect)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, acks = 0, 0
        while len(buffer) - pos >= 2:
            kind = buffer[pos] >> 4
            length, shift, index, complete = 0, 0, pos + 1, False
            while index < len(buffer):
                byte = buffer[index]
                index += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
            if not complete or len(buffer) - index < length:
                break
            body = bytes(buffer[index : index + length])
            pos = index + length
            if kind == _PUBACK:
                acks += 1
                if len(body) > 2 and body[2] >= 0x80:
                    self.stats.refused += 1
                    codes = self.stats.refusal_codes
                    codes[body[2]] = codes.get(body[2], 0) + 1
                else:
                    self.stats.acked += 1
            elif kind == _CONNACK:
                self._on_connack(body)
        del buffer[:pos]
        if acks:
            self.in_flight -= acks
            self.stats.last_ack = time.perf_counter()
            self.on_acks(acks)

    def _on_connack(self, body: bytes) -> None:
        if len(body) < 2 or body[1] != 0:
            code = body[1] if len(body) > 1 else -1
            self.connected.set_exception(ConnectionError(f"CONNACK refused: 0x{code:02x}"))
            return
        offset = 2
        length, shift = 0, 0
        while offset < len(body):
            byte = body[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        maximum = _receive_maximum(body[offset : offset + length])
        self.connected.set_result(min(self._window, maximum or self._window))

    def send(self, data: bytes, count: int) -> None:
        assert self.transport is not None
        if self.stats.first_send is None:
            self.stats.first_send = time.perf_counter()
        self.transport.write(data)
        self.stats.sent += count
        self.in_flight += count

    def disconnect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes([_DISCONNECT << 4, 0]))
            self.transport.close()


async def _open(
    host: str, port: int, username: str, password: str, window: int
) -> tuple[_Connection, int]:
    loop = asyncio.get_running_loop()
    connect = encode_connect(username, username, password)
    _, connection = await loop.create_connection(lambda: _Connection(connect, window), host, port)
    return connection, await connection.connected


async def _close(connection: _Connection) -> None:
    connection.disconnect()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await connection.closed


async def _burst_one(
    host: str,
    port: int,
    username: str,
    password: str,
    messages: Sequence[Message],
    timeout_s: float,
) -> PublishStats:
    """Publish every message on one connection, `WINDOW` at a time, until all are acked."""
    connection, window = await _open(host, port, username, password, WINDOW)
    # Encoded before the clock starts: the window then moves by slicing one buffer.
    packets = [
        encode_publish(m.topic.encode(), m.payload, (i % _PACKET_IDS) + 1)
        for i, m in enumerate(messages)
    ]
    ends = list(itertools.accumulate(len(p) for p in packets))
    blob = b"".join(packets)
    done = asyncio.get_running_loop().create_future()
    position = 0

    def send_more(_acks: int) -> None:
        nonlocal position
        room = min(window - connection.in_flight, len(packets) - position)
        if room > 0:
            start = ends[position - 1] if position else 0
            connection.send(blob[start : ends[position + room - 1]], room)
            position += room
        if position == len(packets) and connection.in_flight == 0 and not done.done():
            done.set_result(None)

    connection.on_acks = send_more
    try:
        if packets:
            send_more(0)
            async with asyncio.timeout(timeout_s):
                await asyncio.wait({done, connection.closed}, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        pass
    finally:
        await _close(connection)
    return connection.stats


async def burst(
    host: str,
    port: int,
    identities: Sequence[tuple[str, str]],
    batches: Sequence[Sequence[Message]],
    *,
    timeout_s: float = 120.0,
) -> PublishStats:
    """Publish each batch on its own connection (one identity each), all at once.

    Messages that must stay in order (one terminal's events) belong in the same batch.
    Returns the counts over all connections; a timeout leaves the rest unsent.
    """
    results = await asyncio.gather(
        *(
            _burst_one(host, port, user, password, batch, timeout_s)
            for (user, password), batch in zip(identities, batches, strict=True)
        )
    )
    total = PublishStats()
    for stats in results:
        total.merge(stats)
    return total


async def paced(
    host: str,
    port: int,
    identities: Sequence[tuple[str, str]],
    make: Callable[[int], Message],
    *,
    rate_per_s: float,
    duration_s: float,
    tick_s: float = 0.01,
) -> PublishStats:
    """Publish `rate_per_s` messages a second for `duration_s`, over the connections.

    `make(n)` builds message n when it is due, so a timestamp in it is its send time. If
    a connection's window is full the message waits in this process, and that wait is
    part of any latency measured from the timestamp.
    """
    opened = [await _open(host, port, u, p, WINDOW) for u, p in identities]
    pending: list[list[bytes]] = [[] for _ in opened]
    ids = [0 for _ in opened]

    def flush(index: int) -> None:
        connection, window = opened[index]
        room = min(window - connection.in_flight, len(pending[index]))
        if room > 0:
            connection.send(b"".join(pending[index][:room]), room)
            del pending[index][:room]

    def flusher(index: int) -> Callable[[int], None]:
        return lambda _acks: flush(index)

    for index, (connection, _) in enumerate(opened):
        connection.on_acks = flusher(index)
    started = time.perf_counter()
    total_due = int(rate_per_s * duration_s)
    made = 0
    try:
        while made < total_due:
            elapsed = time.perf_counter() - started
            due = min(total_due, int(elapsed * rate_per_s) + 1)
            while made < due:
                message = make(made)
                index = made % len(opened)
                ids[index] = ids[index] % _PACKET_IDS + 1
                pending[index].append(
                    encode_publish(message.topic.encode(), message.payload, ids[index])
                )
                made += 1
            for index in range(len(opened)):
                flush(index)
            await asyncio.sleep(tick_s)
        # Drain: acks keep flushing what is pending; poll for the end of it, bounded.
        async with asyncio.timeout(30):
            while any(pending) or any(c.in_flight for c, _ in opened):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    finally:
        for connection, _ in opened:
            await _close(connection)
    total = PublishStats()
    for connection, _ in opened:
        total.merge(connection.stats)
    return total


async def publish_retained(
    host: str, port: int, identity: tuple[str, str], topic: str, payload: bytes
) -> None:
    """Publish one retained QoS1 message and wait for its PUBACK."""
    connection, _ = await _open(host, port, *identity, 1)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def acked(_acks: int) -> None:
        if not done.done():
            done.set_result(None)

    connection.on_acks = acked
    try:
        connection.send(encode_publish(topic.encode(), payload, 1, retain=True), 1)
        async with asyncio.timeout(10):
            await done
    finally:
        await _close(connection)
