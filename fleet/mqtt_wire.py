"""A small MQTT v5 client on `asyncio.Protocol`: the transport of both hot paths.

Why our own and not paho, aiomqtt or gmqtt (figures in docs/benchmarks.md):

* the controller must acknowledge a QoS1 message only after its row is committed. paho
  can (``manual_ack``) but costs a thread hop per message; gmqtt only acknowledges when a
  per-message coroutine returns, a task per message; here `ack` is one 4-byte write;
* the simulator holds 15,000 terminals in one process under a 20,000-file limit. paho
  (and aiomqtt on top of it) opens a socket pair per client besides the socket, three
  files per terminal; this client opens one and keeps a few hundred bytes of state.

It speaks the subset both ends use: CONNECT with a will and session expiry, QoS 0 and 1
in both directions, SUBSCRIBE with retain handling, UNSUBSCRIBE, keep-alive, DISCONNECT.
No QoS 2, no topic aliases (we announce a topic-alias maximum of 0, so the broker sends
none), no AUTH exchange. Reconnecting is the caller's business: a `Connection` lives for
one network connection, and `closed` says how it ended.
"""

import asyncio
import math
import struct
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from fleet.errors import FleetError

_CONNECT: Final = 0x10
_CONNACK: Final = 0x20
_PUBLISH: Final = 0x30
_PUBACK: Final = 0x40
_SUBSCRIBE: Final = 0x82
_SUBACK: Final = 0x90
_UNSUBSCRIBE: Final = 0xA2
_UNSUBACK: Final = 0xB0
_PINGREQ: Final = b"\xc0\x00"
_PINGRESP: Final = 0xD0
_DISCONNECT: Final = 0xE0

_PROP_MESSAGE_EXPIRY: Final = 0x02
_PROP_SESSION_EXPIRY: Final = 0x11
_PROP_SERVER_KEEPALIVE: Final = 0x13
_PROP_REASON_STRING: Final = 0x1F
_PROP_RECEIVE_MAXIMUM: Final = 0x21
_PROP_TOPIC_ALIAS_MAXIMUM: Final = 0x22

# How many bytes each property's value takes, by identifier (MQTT 5, 2.2.2.2); None marks
# the variable-length kinds, handled by name below.
_U8: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_U16: Final = frozenset({0x13, 0x21, 0x22, 0x23})
_U32: Final = frozenset({0x02, 0x11, 0x18, 0x27})
_VARINT: Final = frozenset({0x0B})
_STRING: Final = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F, 0x09, 0x16})
_PAIR: Final = 0x26

_U16_PACK = struct.Struct("!H").pack
#: How long a disconnecting client waits for the broker to close before it aborts.
CLOSE_WAIT_S: Final = 5.0
_PUBACK_OK_PREFIX: Final = bytes((_PUBACK, 2))
_NO_PROPERTIES: Final = b"\x00"
_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(256))

#: How finely `publish`'s `timeout_s` is kept: a deadline fires up to this much late.
DEADLINE_TICK_S: Final = 0.25


class MqttError(FleetError):
    """The broker refused something, or the connection is gone."""


class ConnectionLostError(MqttError):
    """The network connection ended before the answer came."""


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes if the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Everything a CONNECT carries."""

    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 60
    clean_start: bool = False
    session_expiry_s: int = 0
    #: QoS1 messages the broker may have un-acknowledged towards us at once.
    receive_maximum: int = 65_535
    will: Will | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH the broker delivered; QoS1 ones must be `ack`ed by packet id."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _U16_PACK(len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    return _U16_PACK(len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return _ONE_BYTE[first_byte] + _varint(len(body)) + body


def _properties(raw: bytes) -> bytes:
    return _varint(len(raw)) + raw


def encode_connect(options: ConnectOptions) -> bytes:
    """The CONNECT packet for `options`."""
    flags = 0x02 if options.clean_start else 0
    payload = _string(options.client_id)
    will = options.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _properties(b"") + _string(will.topic) + _binary(will.payload)
    if options.username is not None:
        flags |= 0x80
        payload += _string(options.username)
    if options.password is not None:
        flags |= 0x40
        payload += _binary(options.password.encode())
    props = bytes((_PROP_SESSION_EXPIRY,)) + struct.pack("!I", options.session_expiry_s)
    props += bytes((_PROP_RECEIVE_MAXIMUM,)) + _U16_PACK(options.receive_maximum)
    props += bytes((_PROP_TOPIC_ALIAS_MAXIMUM,)) + _U16_PACK(0)
    header = _string("MQTT") + bytes((5, flags)) + _U16_PACK(options.keepalive_s)
    return _packet(_CONNECT, header + _properties(props) + payload)


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    packet_id: int = 0,
    expiry_s: int | None = None,
    dup: bool = False,
) -> bytes:
    """A PUBLISH packet."""
    first = _PUBLISH | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    props = (
        _NO_PROPERTIES
        if expiry_s is None
        else _properties(bytes((_PROP_MESSAGE_EXPIRY,)) + struct.pack("!I", expiry_s))
    )
    raw = topic.encode()
    head = _U16_PACK(len(raw)) + raw + (_U16_PACK(packet_id) if qos else b"") + props
    # One join instead of a chain of concatenations: this runs once per heartbeat.
    return b"".join((_ONE_BYTE[first], _varint(len(head) + len(payload)), head, payload))


def _read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None when `data` ends inside the number."""
    value = 0
    shift = 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            msg = "malformed variable byte integer"
            raise MqttError(msg)
    return None


def parse_properties(data: bytes, pos: int) -> tuple[dict[int, object], int]:
    """Decode a property block starting at `pos`; return it and the position after it."""
    found = _read_varint(data, pos)
    if found is None:
        msg = "truncated properties"
        raise MqttError(msg)
    length, pos = found
    end = pos + length
    props: dict[int, object] = {}
    while pos < end:
        ident = data[pos]
        pos += 1
        if ident in _U8:
            props[ident] = data[pos]
            pos += 1
        elif ident in _U16:
            props[ident] = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif ident in _U32:
            props[ident] = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
        elif ident in _VARINT:
            number = _read_varint(data, pos)
            if number is None:
                msg = "truncated property"
                raise MqttError(msg)
            props[ident], pos = number
        elif ident in _STRING:
            size = int.from_bytes(data[pos : pos + 2], "big")
            props[ident] = bytes(data[pos + 2 : pos + 2 + size])
            pos += 2 + size
        elif ident == _PAIR:
            for _ in range(2):
                size = int.from_bytes(data[pos : pos + 2], "big")
                pos += 2 + size
        else:
            msg = f"unknown property {ident:#x}"
            raise MqttError(msg)
    if pos != end:
        msg = "property block overruns its length"
        raise MqttError(msg)
    return props, end


def _reason_text(props: dict[int, object]) -> str:
    text = props.get(_PROP_REASON_STRING)
    return f" ({text.decode(errors='replace')})" if isinstance(text, bytes) else ""


MessageHandler = Callable[["Connection", Message], None]


class _Deadlines:
    """Fails futures still pending at their deadline: one timer per tick, not one per future.

    `asyncio.timeout` costs a timer handle per call, pushed onto the loop's heap and
    cancelled out of it again; at 2,500 heartbeats a second that was about a tenth of a
    simulator process's CPU. Here a deadline is rounded up to the next `DEADLINE_TICK_S`,
    and each tick that has futures due holds one timer.
    """

    __slots__ = ("_due", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[int, set[asyncio.Future[object]]] = {}

    def watch(
        self, future: "asyncio.Future[object]", timeout_s: float
    ) -> set["asyncio.Future[object]"]:
        """Fail `future` with `TimeoutError` unless done within `timeout_s` (up to a tick more).

        Returns the set it was put in: the caller discards it from there once done, so a
        finished future is not kept until its tick.
        """
        tick = math.ceil((self._loop.time() + timeout_s) / DEADLINE_TICK_S)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = set()
            self._loop.call_at(tick * DEADLINE_TICK_S, self._expire, tick)
        due.add(future)
        return due

    def _expire(self, tick: int) -> None:
        for future in self._due.pop(tick):
            if not future.done():
                future.set_exception(TimeoutError())


#: One `_Deadlines` per event loop (tests run many loops in one process).
_DEADLINES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines]" = (
    weakref.WeakKeyDictionary()
)


def _deadlines(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    found = _DEADLINES.get(loop)
    if found is None:
        found = _DEADLINES[loop] = _Deadlines(loop)
    return found


class Connection(asyncio.Protocol):
    """One MQTT v5 network connection.

    `on_message` runs inside `data_received` for every delivered PUBLISH, so it must not
    block; QoS1 messages stay un-acknowledged until `ack`, and the broker sends at most
    `receive_maximum` of them before waiting for acks, which bounds what a slow consumer
    can be handed.
    """

    __slots__ = (
        "_buffer",
        "_closing",
        "_connack",
        "_deadlines",
        "_inflight_free",
        "_keepalive_s",
        "_next_id",
        "_pending",
        "_ping_handle",
        "_pong_due",
        "_reading_paused",
        "_transport",
        "closed",
        "on_message",
        "receive_maximum",
        "session_present",
    )

    def __init__(self, on_message: MessageHandler) -> None:
        """Prepare; `open_connection` does the network part."""
        loop = asyncio.get_running_loop()
        self.on_message = on_message
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._closing = False
        self._connack: asyncio.Future[None] = loop.create_future()
        self._deadlines = _deadlines(loop)
        #: Resolves (never raises) when the connection is gone: None when we closed it,
        #: else the error that ended it.
        self.closed: asyncio.Future[MqttError | None] = loop.create_future()
        self._pending: dict[int, asyncio.Future[object]] = {}
        self._next_id = 0
        self.receive_maximum = 65_535
        self._inflight_free: asyncio.Event | None = None
        self.session_present = False
        self._keepalive_s = 0
        self._ping_handle: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._pong_due = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whatever waits for an answer, and resolve `closed`."""
        self._transport = None
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        error = ConnectionLostError(str(exc) if exc else "connection closed")
        if not self._connack.done():
            self._connack.set_exception(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self._inflight_free is not None:
            self._inflight_free.set()
        if not self.closed.done():
            self.closed.set_result(None if self._closing else error)

    def data_received(self, data: bytes) -> None:
        """Split the stream into packets and handle each."""
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        pos = 0
        end = len(view)
        try:
            while end - pos >= 2:
                found = _read_varint(view, pos + 1)
                if found is None:
                    break
                length, start = found
                if end - start < length:
                    break
                self._handle(view[pos], bytes(view[start : start + length]))
                pos = start + length
        except MqttError as exc:
            self._fail(exc)
            return
        except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError included
            self._fail(MqttError(f"malformed packet from the broker: {exc}"))
            return
        if pos == end:
            buffer.clear()
        elif view is buffer:
            del buffer[:pos]
        else:
            self._buffer = bytearray(view[pos:])

    # -- packets ----------------------------------------------------------------------

    def _handle(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == _PUBLISH:
            self._on_publish(first, body)
        elif kind == _PUBACK:
            packet_id = (body[0] << 8) | body[1]
            reason = body[2] if len(body) > 2 else 0
            future = self._pending.pop(packet_id, None)
            if self._inflight_free is not None:
                self._inflight_free.set()
            if future is not None and not future.done():
                future.set_result(reason)
        elif kind == _PINGRESP:
            self._pong_due = False
        elif kind == _CONNACK:
            self._on_connack(body)
        elif kind in (_SUBACK, _UNSUBACK):
            packet_id = (body[0] << 8) | body[1]
            _, pos = parse_properties(body, 2)
            future = self._pending.pop(packet_id, None)
            if future is not None and not future.done():
                future.set_result(list(body[pos:]))
        elif kind == _DISCONNECT:
            reason = body[0] if body else 0
            props = parse_properties(body, 1)[0] if len(body) > 1 else {}
            self._fail(MqttError(f"broker disconnected: reason {reason:#x}{_reason_text(props)}"))
        else:
            msg = f"unexpected packet type {first:#x}"
            raise MqttError(msg)

    def _on_publish(self, first: int, body: bytes) -> None:
        if self._closing:
            # Said DISCONNECT already: it could not be acknowledged here, so it is not
            # handed on; the broker's session delivers it again next time.
            return
        qos = (first >> 1) & 0x03
        size = (body[0] << 8) | body[1]
        pos = 2 + size
        topic = body[2:pos].decode()
        packet_id = 0
        if qos:
            packet_id = (body[pos] << 8) | body[pos + 1]
            pos += 2
        # Skip the property block without decoding it: nothing in it matters here.
        found = _read_varint(body, pos)
        if found is None:
            msg = "truncated PUBLISH"
            raise MqttError(msg)
        length, pos = found
        self.on_message(self, Message(topic, body[pos + length :], qos, bool(first & 1), packet_id))

    def _on_connack(self, body: bytes) -> None:
        if self._connack.done():
            return
        self.session_present = bool(body[0] & 1)
        reason = body[1]
        props, _ = parse_properties(body, 2) if len(body) > 2 else ({}, 0)
        if reason >= 0x80:
            self._connack.set_exception(
                MqttError(f"connection refused: reason {reason:#x}{_reason_text(props)}")
            )
            return
        maximum = props.get(_PROP_RECEIVE_MAXIMUM)
        if isinstance(maximum, int):
            self.receive_maximum = maximum
        keepalive = props.get(_PROP_SERVER_KEEPALIVE)
        if isinstance(keepalive, int):
            self._keepalive_s = keepalive
        self._connack.set_result(None)

    def _fail(self, error: MqttError) -> None:
        if not self.closed.done():
            self.closed.set_result(error)
        if self._transport is not None:
            self._transport.abort()

    # -- keep-alive -------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        if self._keepalive_s:
            loop = asyncio.get_running_loop()
            self._ping_handle = loop.call_later(self._keepalive_s, self._ping)

    def _ping(self) -> None:
        if self._transport is None:
            return
        if self._pong_due and not self._reading_paused:
            # A whole keep-alive period without an answer: the broker or the path is gone.
            # (Not while we stopped reading ourselves: the answer waits in the socket.)
            self._fail(ConnectionLostError("no PINGRESP within the keep-alive"))
            return
        self._pong_due = True
        self._transport.write(_PINGREQ)
        self._schedule_ping()

    # -- requests ---------------------------------------------------------------------

    async def handshake(self, options: ConnectOptions) -> None:
        """Send CONNECT and wait for a successful CONNACK."""
        self._keepalive_s = options.keepalive_s
        self._write(encode_connect(options))
        await self._connack
        self._schedule_ping()

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            msg = "not connected"
            raise ConnectionLostError(msg)
        self._transport.write(data)

    def _new_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._pending:
                return self._next_id
        msg = "no free packet identifier"
        raise MqttError(msg)

    @property
    def is_open(self) -> bool:
        """True while the network connection is up."""
        return self._transport is not None and not self._transport.is_closing()

    def ack(self, packet_id: int) -> None:
        """Acknowledge a delivered QoS1 message (do it once its effects are durable)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_PUBACK_OK_PREFIX + _U16_PACK(packet_id))

    def ack_many(self, packet_ids: Sequence[int]) -> None:
        """Acknowledge many delivered QoS1 messages with one write."""
        if packet_ids and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(_PUBACK_OK_PREFIX + _U16_PACK(i) for i in packet_ids))

    def pause_reading(self) -> None:
        """Stop reading the socket (TCP then pushes back on the broker)."""
        if self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    def resume_reading(self) -> None:
        """Read the socket again."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._reading_paused = False

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> "asyncio.Future[object] | None":
        """Send a PUBLISH; for QoS1, return the future of its PUBACK reason code.

        The caller keeps within the broker's receive maximum (`publish` does that).
        """
        if qos == 0:
            self._write(encode_publish(topic, payload, qos=0, retain=retain, expiry_s=expiry_s))
            return None
        packet_id = self._new_id()
        data = encode_publish(
            topic, payload, qos=1, retain=retain, packet_id=packet_id, expiry_s=expiry_s
        )
        self._write(data)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        return future

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Publish and, for QoS1, wait for the PUBACK; raises `MqttError` on a refusal.

        With `timeout_s`, raise `TimeoutError` when the whole call takes longer (checked
        every `DEADLINE_TICK_S`, so it can fire that much late). A timed-out publish is
        left un-acknowledged here: the caller is expected to drop the connection.
        """
        if qos and len(self._pending) >= self.receive_maximum:
            if timeout_s is None:
                await self._wait_inflight()
            else:
                # Rare (a full window), so the plain timer is fine here.
                loop = asyncio.get_running_loop()
                started = loop.time()
                async with asyncio.timeout(timeout_s):
                    await self._wait_inflight()
                timeout_s = max(0.0, timeout_s - (loop.time() - started))
        future = self.publish_nowait(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)
        if future is None:
            return
        if timeout_s is None:
            reason = await future
        else:
            due = self._deadlines.watch(future, timeout_s)
            try:
                reason = await future
            finally:
                due.discard(future)
        if isinstance(reason, int) and reason >= 0x80:
            msg = f"broker refused publish to {topic}: reason {reason:#x}"
            raise MqttError(msg)

    async def _wait_inflight(self) -> None:
        """Wait until fewer QoS1 publishes than the broker's receive maximum are in flight."""
        while len(self._pending) >= self.receive_maximum:
            if self._inflight_free is None:
                self._inflight_free = asyncio.Event()
            self._inflight_free.clear()
            await self._inflight_free.wait()
            if not self.is_open:
                msg = "not connected"
                raise ConnectionLostError(msg)

    async def subscribe(self, filters: Sequence[tuple[str, int, int]]) -> list[int]:
        """Subscribe to (filter, qos, retain handling) triples; return the reason codes."""
        packet_id = self._new_id()
        payload = b"".join(
            _string(f) + bytes((qos | (handling << 4),)) for f, qos, handling in filters
        )
        return await self._request(_SUBSCRIBE, packet_id, payload)

    async def unsubscribe(self, filters: Sequence[str]) -> list[int]:
        """Unsubscribe; return the reason codes."""
        packet_id = self._new_id()
        return await self._request(_UNSUBSCRIBE, packet_id, b"".join(map(_string, filters)))

    async def _request(self, first: int, packet_id: int, payload: bytes) -> list[int]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._write(_packet(first, _U16_PACK(packet_id) + _properties(b"") + payload))
        self._pending[packet_id] = future
        codes = await future
        assert isinstance(codes, list)
        return codes

    def disconnect(self) -> None:
        """Send DISCONNECT (the will is not published) and half-close; `closed` follows.

        Not a full close: anything the broker sent meanwhile would hit a closed socket,
        and the reset that answers it can make the broker drop what it had not read yet,
        our last acknowledgements included. The broker closes once it has read the
        DISCONNECT; if it does not within `CLOSE_WAIT_S`, the connection is aborted.
        """
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(bytes((_DISCONNECT, 0)))
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(CLOSE_WAIT_S, self.abort)
        else:
            transport.close()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a power loss would (the will fires)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


async def open_connection(
    host: str,
    port: int,
    options: ConnectOptions,
    on_message: MessageHandler,
    *,
    timeout_s: float = 10.0,
) -> Connection:
    """Connect, hand-shake and return the live connection.

    Raises:
        MqttError: refused by the broker, or no answer within `timeout_s`.
    """
    loop = asyncio.get_running_loop()
    connection = Connection(on_message)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: connection, host, port)
            await connection.handshake(options)
    except TimeoutError:
        connection.abort()
        msg = f"no CONNACK from {host}:{port} within {timeout_s} s"
        raise ConnectionLostError(msg) from None
    except OSError as exc:
        msg = f"cannot connect to {host}:{port}: {exc}"
        raise ConnectionLostError(msg) from exc
    except BaseException:
        connection.abort()
        raise
    return connection
