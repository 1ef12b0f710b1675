"""Ingest: terminal messages from the MQTT session into PostgreSQL, acked after commit.

A batch is whatever arrived within ``ingest_batch_wait_ms`` (at most ``ingest_batch_max``
messages). It is validated, written in one transaction (state events idempotently on their
message id, heartbeats by COPY with last-seen coalesced per terminal, presence, hello,
dead letters) and only then acknowledged. If the database is away, the batch is retried
with backoff and nothing is acknowledged, so the broker keeps the messages.
"""

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, cast

from fleet import audit, metrics
from fleet.clock import Clock, SystemClock, as_datetime
from fleet.db.repository import EventRow, HeartbeatRow, Queries, Repository
from fleet.errors import DatabaseUnavailableError, QueryRefusedError
from fleet.mqtt import Incoming
from fleet.policy import valid_timezone
from fleet.protocol import (
    Heartbeat,
    Hello,
    MessageKind,
    Presence,
    ProtocolError,
    RejectReason,
    StateEvent,
    TerminalMessage,
    decode,
    terminal_topic,
)
from fleet.states import FAILURE, ExecState

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
# What one message can cause that retrying the same batch would only repeat.
_UNSTORABLE = (QueryRefusedError, ValueError, OverflowError)


class Acker(Protocol):
    """Acknowledges a received message once its effects are durable."""

    def ack_many(self, messages: Sequence[Incoming]) -> None:
        """Send the PUBACKs for `messages`."""


#: Told, after commit, each terminal that said hello and its groups; must not block.
HelloSink = Callable[[str, list[str]], None]


@dataclass
class _Batch:
    """One batch, sorted by kind; `refused` holds (topic, reason, detail, payload).

    `liveness` keeps, per terminal, the last presence or heartbeat in arrival order (and
    whether it was a retained copy): that one decides whether the terminal is online.
    """

    events: list[StateEvent] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    liveness: dict[str, tuple[Presence | Heartbeat, bool]] = field(default_factory=dict)
    hellos: list[Hello] = field(default_factory=list)
    refused: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    presences: int = 0

    def refuse(self, topic: str, reason: RejectReason, detail: str, payload: bytes) -> None:
        metrics.INGEST_REJECTED.labels(reason.value).inc()
        self.refused.append((topic, reason.value, detail, payload))


@dataclass(frozen=True)
class BatchResult:
    """What a written batch did; the groups of terminals that said hello."""

    hello_groups: dict[str, list[str]]


class Ingest:
    """Consumes the session's inbox; one batch in flight at a time, in arrival order."""

    def __init__(
        self,
        repo: Repository,
        acker: Acker,
        *,
        batch_max: int,
        batch_wait_s: float,
        on_hello: HelloSink | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Wire ingest to the repository and to the session that acks."""
        self._repo = repo
        self._clock = clock or SystemClock()
        self._acker = acker
        self._batch_max = batch_max
        self._batch_wait_s = batch_wait_s
        self._on_hello = on_hello

    async def run(self, inbox: asyncio.Queue[Incoming], stop: asyncio.Event) -> None:
        """Take batches from `inbox` until `stop` is set; what is left stays un-acked."""
        while True:
            batch = await self._take(inbox, stop)
            if batch is None:
                return
            metrics.INGEST_QUEUE_DEPTH.set(inbox.qsize())
            result = await self._write_until_done(batch, stop)
            if result is None:
                return
            self._acker.ack_many(batch)
            if self._on_hello is not None:
                for tid, groups in result.hello_groups.items():
                    self._on_hello(tid, groups)

    async def _take(
        self, inbox: asyncio.Queue[Incoming], stop: asyncio.Event
    ) -> list[Incoming] | None:
        first = await _get_or_stop(inbox, stop)
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self._batch_wait_s
        while len(batch) < self._batch_max:
            try:
                batch.append(inbox.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await inbox.get())
            except TimeoutError:
                break
        return batch

    async def _write_until_done(
        self, messages: list[Incoming], stop: asyncio.Event
    ) -> BatchResult | None:
        backoff = 0.1
        while True:
            try:
                return await self.write(messages)
            except _UNSTORABLE as exc:
                logger.warning(
                    "batch of %d refused by the database (%s); writing one by one",
                    len(messages),
                    exc,
                    extra={"action": "batch_refused"},
                )
                return await self._write_singly(messages)
            except DatabaseUnavailableError as exc:
                metrics.DB_BATCH_RETRIES.inc()
                logger.warning(
                    "database unavailable, batch of %d kept un-acked: %s",
                    len(messages),
                    exc,
                    extra={"action": "ingest_retry"},
                )
            try:
                async with asyncio.timeout(backoff):
                    await stop.wait()
            except TimeoutError:
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            # Stopping: leave the batch un-acked; the broker redelivers it next time.
            return None

    async def _write_singly(self, messages: list[Incoming]) -> BatchResult:
        """Isolate the message the database refuses, so one terminal cannot stall ingest.

        Each message gets its own transaction; one refused again is kept as a dead letter
        (`unstorable`) and acknowledged like any other refused input. A database outage
        still propagates, and the whole batch is then retried as usual.
        """
        hello_groups: dict[str, list[str]] = {}
        for message in messages:
            try:
                result = await self.write([message])
            except _UNSTORABLE as exc:
                metrics.INGEST_REJECTED.labels(RejectReason.UNSTORABLE.value).inc()
                async with self._repo.transaction() as q:
                    await q.add_dead_letters(
                        [(message.topic, RejectReason.UNSTORABLE.value, str(exc), message.payload)]
                    )
                continue
            hello_groups.update(result.hello_groups)
        return BatchResult(hello_groups=hello_groups)

    async def write(self, messages: list[Incoming]) -> BatchResult:
        """Validate and store one batch in one transaction; ack nothing."""
        batch = _sort(messages)
        started = time.perf_counter()
        hello_groups: dict[str, list[str]] = {}
        async with self._repo.transaction() as q:
            await q.plan_each_run()
            await self._write_events(q, batch)
            await self._write_heartbeats(q, batch)
            await self._write_presence(q, batch)
            for hello in batch.hellos:
                groups = await q.record_hello(
                    terminal_id=hello.tid,
                    model=hello.model,
                    versions=hello.versions,
                    merchant_id=hello.merchant_id,
                    # Maintenance windows are computed in this zone; an unknown name
                    # would make every window check guess, so it is stored as UTC.
                    timezone=hello.timezone if valid_timezone(hello.timezone) else "UTC",
                    attributes=hello.attributes,
                    boot_id=hello.boot_id,
                )
                if groups is None:
                    batch.refuse(
                        _topic_of(hello), RejectReason.UNKNOWN_TERMINAL, hello.tid, hello.to_bytes()
                    )
                else:
                    hello_groups[hello.tid] = groups
            if batch.refused:
                await q.add_dead_letters(batch.refused)
        metrics.DB_BATCH_SECONDS.observe(time.perf_counter() - started)
        return BatchResult(hello_groups=hello_groups)

    async def _write_events(self, q: Queries, batch: _Batch) -> None:
        at = self._clock.now()
        retries: dict[int, list[str]] = {}
        for round_ in _rounds(batch.events):
            rows = [
                EventRow(
                    msg_id=e.msg_id,
                    terminal_id=e.tid,
                    campaign_id=e.campaign_id,
                    seq=e.seq,
                    state=e.state.value,
                    progress=e.progress,
                    stage=e.stage,
                    error_code=e.error_code,
                    detail=e.detail,
                    device_ts=e.ts,
                    attempt=e.attempt,
                    package=e.package,
                )
                for e in round_
            ]
            outcomes = await q.record_events(rows, as_datetime(at))
            for event, outcome in zip(round_, outcomes, strict=True):
                if not outcome.known:
                    batch.refuse(
                        _topic_of(event),
                        RejectReason.UNKNOWN_EXECUTION,
                        f"{event.tid} has no execution in campaign {event.campaign_id}",
                        event.to_bytes(),
                    )
                elif not outcome.inserted:
                    metrics.EVENT_DUPLICATES.inc()
                elif outcome.moved:
                    metrics.UPDATE_TRANSITIONS.labels(event.state.value).inc()
                    if outcome.new_state in FAILURE:
                        metrics.UPDATE_FAILURES.labels(metrics.failure_code(event.error_code)).inc()
                    if outcome.new_state == ExecState.RETRY_WAIT:
                        retries.setdefault(event.campaign_id, []).append(event.tid)
                else:
                    metrics.EVENT_NOT_APPLIED.inc()
        for campaign_id, terminals in retries.items():
            # A retry is an automatic decision; it is audited with the report that caused it.
            await audit.append(
                q,
                at=at,
                actor="ingest",
                action="retry_scheduled",
                campaign_id=campaign_id,
                detail={"terminals": terminals[:50], "count": len(terminals)},
            )

    async def _write_heartbeats(self, q: Queries, batch: _Batch) -> None:
        if not batch.heartbeats:
            return
        received = datetime.now(UTC)
        latest: dict[str, Heartbeat] = {}
        for hb in batch.heartbeats:
            if hb.tid not in latest or hb.ts >= latest[hb.tid].ts:
                latest[hb.tid] = hb
        # Most terminals run the same few version sets: encode each set once per batch.
        versions_json: dict[tuple[tuple[str, str], ...], str] = {}

        def encoded_versions(hb: Heartbeat) -> str:
            key = tuple(hb.versions.items())
            text = versions_json.get(key)
            if text is None:
                text = versions_json[key] = json.dumps(hb.versions)
            return text

        health_json: dict[int, str] = {}

        def encoded_health(hb: Heartbeat) -> str:
            text = health_json.get(id(hb))
            if text is None:
                text = health_json[id(hb)] = json.dumps(hb.health)
            return text

        known = await q.touch_terminals(
            list(latest),
            [received] * len(latest),
            [encoded_versions(hb) for hb in latest.values()],
            [encoded_health(hb) for hb in latest.values()],
            as_datetime(self._clock.now()),
        )
        rows = []
        for hb in batch.heartbeats:
            if hb.tid not in known:
                batch.refuse(_topic_of(hb), RejectReason.UNKNOWN_TERMINAL, hb.tid, hb.to_bytes())
                continue
            rows.append(
                HeartbeatRow(
                    terminal_id=hb.tid,
                    received_at=received,
                    device_ts=datetime.fromtimestamp(hb.ts, UTC),
                    versions=encoded_versions(hb),
                    battery_pct=hb.battery_pct,
                    storage_free_mb=hb.storage_free_mb,
                    busy=hb.busy,
                    health=encoded_health(hb),
                )
            )
        if rows:
            await q.copy_heartbeats(rows)

    async def _write_presence(self, q: Queries, batch: _Batch) -> None:
        # A heartbeat already marked its terminal online; only a presence message that was
        # the terminal's last word in this batch changes that.
        last = [
            (message, retained)
            for message, retained in batch.liveness.values()
            if isinstance(message, Presence)
        ]
        if not last:
            return
        known = await q.set_presence(
            [p.tid for p, _ in last],
            [p.online for p, _ in last],
            # A retained presence is the broker's memory, not news: it says whether the
            # terminal is online, not that it was seen now.
            [not retained for _, retained in last],
        )
        for p, _ in last:
            if p.tid not in known:
                batch.refuse(_topic_of(p), RejectReason.UNKNOWN_TERMINAL, p.tid, p.to_bytes())


def _rounds(events: list[StateEvent]) -> list[list[StateEvent]]:
    """Split events so each round names a terminal, and a message id, once.

    Within a terminal arrival order is kept, so each event is applied after the one the
    terminal sent before it, as if they were written one by one. A message id seen twice
    (a replay, even under another terminal) goes to a later round, where the first copy
    is already stored and the second counts as the duplicate it is.
    """
    rounds: list[list[StateEvent]] = []
    ids: list[set[str]] = []
    next_round: dict[str, int] = {}
    for event in events:
        depth = next_round.get(event.tid, 0)
        while depth < len(rounds) and event.msg_id in ids[depth]:
            depth += 1
        if depth == len(rounds):
            rounds.append([])
            ids.append(set())
        rounds[depth].append(event)
        ids[depth].add(event.msg_id)
        next_round[event.tid] = depth + 1
    return rounds


def _sort(messages: list[Incoming]) -> _Batch:
    batch = _Batch()
    for message in messages:
        try:
            decoded: TerminalMessage = decode(message.topic, message.payload)
        except ProtocolError as exc:
            batch.refuse(message.topic, exc.reason, exc.detail, message.payload)
            logger.info(
                "refused message on %s: %s",
                message.topic,
                exc,
                extra={"action": "message_refused"},
            )
            continue
        if message.retain and not isinstance(decoded, Presence):
            # Only presence is meant to be retained; a retained heartbeat or event would be
            # replayed as news on every controller reconnect.
            batch.refuse(message.topic, RejectReason.RETAINED, "retained", message.payload)
            continue
        # Dispatch on the exact type: `match` on pydantic models goes through ABC checks,
        # which cost more than the rest of sorting.
        kind = type(decoded)
        if kind is Heartbeat:
            heartbeat = cast("Heartbeat", decoded)
            batch.heartbeats.append(heartbeat)
            batch.liveness[heartbeat.tid] = (heartbeat, False)
        elif kind is StateEvent:
            batch.events.append(cast("StateEvent", decoded))
        elif kind is Presence:
            presence = cast("Presence", decoded)
            batch.liveness[presence.tid] = (presence, message.retain)
            batch.presences += 1
        else:
            batch.hellos.append(cast("Hello", decoded))
    # Counted per batch: a labelled counter costs about a microsecond per call.
    for label, count in (
        ("events", len(batch.events)),
        ("heartbeat", len(batch.heartbeats)),
        ("presence", batch.presences),
        ("hello", len(batch.hellos)),
    ):
        if count:
            metrics.INGEST_MESSAGES.labels(label).inc(count)
    return batch


_KIND_OF = {
    StateEvent: MessageKind.EVENTS,
    Heartbeat: MessageKind.HEARTBEAT,
    Presence: MessageKind.PRESENCE,
    Hello: MessageKind.HELLO,
}


def _topic_of(message: TerminalMessage) -> str:
    return terminal_topic(message.tid, _KIND_OF[type(message)])


async def _get_or_stop(inbox: asyncio.Queue[Incoming], stop: asyncio.Event) -> Incoming | None:
    """Wait for the next message; None once `stop` is set.

    Messages still in the inbox at a stop are simply not acknowledged: the broker keeps
    them in the session and delivers them again to the next controller.
    """
    if stop.is_set():
        return None
    try:
        return inbox.get_nowait()
    except asyncio.QueueEmpty:
        pass
    getter = asyncio.ensure_future(inbox.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None
