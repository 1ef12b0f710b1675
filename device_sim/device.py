"""One simulated payment terminal: boot, heartbeats, commands and the update sequence.

The controller decides who updates when: a group's retained desired state only tells the
terminal what a campaign installs and whether it is live, and a `start` command admits
one numbered attempt. An attempt downloads and verifies every package of the bundle, then
installs them one by one in `KIND_ORDER`, each with its own backup, install, reboot
(firmware and app) and self-test; a failed package is rolled back alone, and the packages
after it are not attempted.

The terminal talks only through a `Link`, so the whole behaviour runs against an in-memory
fake in unit tests. Its message task notices a lost connection and reconnects; nothing
that task awaits waits for a reconnect (those link calls fail fast), so the terminal
always makes progress. Its randomness comes from one `random.Random` seeded with the
run's seed and the terminal id, so a run is reproducible terminal by terminal.
"""

import asyncio
import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import random
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from device_sim.config import SimConfig
from device_sim.download import DownloadFailedError, DownloadPlan, download
from device_sim.link import Link, LinkLostError
from fleet import protocol
from fleet.protocol import (
    KIND_ORDER,
    Command,
    CommandKind,
    DesiredState,
    MessageKind,
    PackageKind,
    PackageRef,
    ProtocolError,
)
from fleet.states import FINAL, ExecState

logger = logging.getLogger(__name__)

S = ExecState
_QUEUE_MAX = 64
_HELD_MAX = 64
_REPLIES_MAX = 16
_RECORDS_MAX = 256
_CAMPAIGNS_MAX = 256
_SEEN_COMMANDS_MAX = 128
_PROGRESS_STEP = 25
_DETAIL_MAX = 200
_CURRENCIES = ("EUR", "USD", "GBP", "CHF")
#: Packages whose install only takes effect after a reboot (parameters apply at once).
_REBOOTS = frozenset({PackageKind.FIRMWARE, PackageKind.APP})

Data = dict[str, Any]


def checksum(data: Data) -> str:
    """Return the SHA-256 of a data store's canonical JSON."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class TerminalProfile:
    """What a terminal is and holds when the simulator starts."""

    tid: str
    model: str
    versions: dict[str, str]
    groups: tuple[str, ...]
    merchant_id: str
    timezone: str
    pending_txns: tuple[dict[str, Any], ...]

    @classmethod
    def from_config(cls, config: SimConfig, index: int) -> "TerminalProfile":
        """Derive terminal number `index` deterministically from the configuration."""
        tid = config.terminal_id(index)
        rng = random.Random(f"{config.seed}:{tid}:profile")
        models = sorted(config.models)
        model = rng.choices(models, weights=[config.models[m] for m in models])[0]
        if tid in config.group_map:
            groups = tuple(config.group_map[tid])
        elif config.group_rule == "all":
            groups = tuple(config.groups)
        else:
            groups = (config.groups[index % len(config.groups)],)
        merchants = config.merchants or [f"M{index // 4:06d}"]
        txns = tuple(
            {
                "id": f"{tid}-{n}",
                "amount": rng.randint(100, 50_000),
                "currency": rng.choice(_CURRENCIES),
            }
            for n in range(rng.randint(0, config.pending_txns_max))
        )
        return cls(
            tid=tid,
            model=model,
            versions=dict(config.initial_versions),
            groups=groups,
            merchant_id=merchants[index % len(merchants)],
            timezone=rng.choice(config.timezones) if config.timezones else "UTC",
            pending_txns=txns,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SentEvent:
    """One state event as the terminal published it."""

    msg_id: str
    seq: int
    state: ExecState
    ts: float
    attempt: int | None = None
    package: str | None = None
    progress: int | None = None
    stage: str | None = None
    error_code: str | None = None
    detail: str | None = None


@dataclasses.dataclass(slots=True)
class CampaignRecord:
    """The simulator's own account of one attempt at one campaign on one terminal.

    `final_state` is None while the attempt runs, and stays None when the merchant
    postponed it (`postponed`: the controller starts a later attempt) or when the
    terminal rebooted into a release that never boots (`bricked`). A cancel before
    installing ends it as `canceled` and sets `abandoned`. `events` are the states the
    attempt went through; `resent` are repeats of its final state, each answering a
    `start` the controller sent again because it missed the report. `data_before` and
    `data_after` are checksums of the terminal's data store (pending transactions and
    local config).
    """

    tid: str
    campaign_id: int
    attempt: int
    started_at: float
    data_before: str
    versions_before: dict[str, str]
    events: list[SentEvent] = dataclasses.field(default_factory=list)
    resent: list[SentEvent] = dataclasses.field(default_factory=list)
    final_state: ExecState | None = None
    error_code: str | None = None
    abandoned: bool = False
    postponed: bool = False
    bricked: bool = False
    finished_at: float | None = None
    data_after: str | None = None
    versions_after: dict[str, str] | None = None

    @property
    def settled(self) -> bool:
        """Tell whether the attempt is over (a final state reported, or postponed)."""
        return self.final_state is not None or self.postponed

    @property
    def duration_s(self) -> float | None:
        """Seconds from picking the attempt up to settling it."""
        return None if self.finished_at is None else self.finished_at - self.started_at

    @property
    def data_intact(self) -> bool | None:
        """Tell whether the data store came out of the attempt unchanged."""
        return None if self.data_after is None else self.data_after == self.data_before

    @property
    def states(self) -> list[ExecState]:
        """The states the attempt went through, in order (repeats in `resent` excluded)."""
        return [e.state for e in self.events]


@dataclasses.dataclass(frozen=True, slots=True)
class _Admission:
    """A `start` the terminal took: which attempt, and whether it may be postponed."""

    campaign_id: int
    attempt: int
    may_postpone: bool


@dataclasses.dataclass(frozen=True, slots=True)
class _Backup:
    data: Data
    checksum: str
    versions: dict[str, str]


class _CanceledError(Exception):
    """A cancel arrived before the first install began; report `canceled` and stop."""


class _Finished(Exception):  # noqa: N818 - control flow, not an error
    """The attempt reached a final state, or was postponed."""


class _BrickedError(Exception):
    """The terminal rebooted into a release that never boots."""


Callback = Callable[["Terminal"], None]
RecordCallback = Callable[[CampaignRecord], None]

_REBOOT = 0  # queue marker: campaign ids start at 1


def _not_attempted(later: Sequence[PackageRef]) -> str | None:
    if not later:
        return None
    return "not attempted: " + ", ".join(p.name for p in later)


def _detail(reason: str, later: Sequence[PackageRef]) -> str:
    """`reason`, then the packages not attempted; the list survives the length cap."""
    tail = _not_attempted(later)
    if tail is None:
        return reason[:_DETAIL_MAX]
    tail = tail[: _DETAIL_MAX - 2]
    return f"{reason[: _DETAIL_MAX - len(tail) - 2]}; {tail}"


class Terminal:
    """A simulated terminal; `run` it until cancelled."""

    def __init__(
        self,
        profile: TerminalProfile,
        config: SimConfig,
        link: Link,
        *,
        connect_gate: asyncio.Semaphore | None = None,
        on_connected: Callback | None = None,
        on_record: RecordCallback | None = None,
        on_desired: Callback | None = None,
    ) -> None:
        """Set the terminal up in its factory state, without connecting."""
        self.profile = profile
        self.tid = profile.tid
        self.model = profile.model
        self._config = config
        self._timing = config.timing
        self._faults = config.faults
        self._link = link
        self._gate = connect_gate or asyncio.Semaphore(1)
        self._on_connected = on_connected
        self._on_record = on_record
        self._on_desired_changed = on_desired
        self._rng = random.Random(f"{config.seed}:{profile.tid}")

        self._versions = dict(profile.versions)
        self._groups: set[str] = set(profile.groups)
        self._data: Data = {
            "pending_txns": [dict(t) for t in profile.pending_txns],
            "config": {
                "merchant_id": profile.merchant_id,
                "timezone": profile.timezone,
                "receipt_footer": "Thank you",
            },
        }
        self._seq = 0
        self._boot_id = protocol.new_message_id()
        self._booted_at = time.monotonic()
        self._boots = 0
        self._battery = self._rng.randint(40, 100)
        self._bricked = False

        # Desired states: the latest per campaign (what an attempt installs) and per group
        # (the read-only `desired` view).
        self._latest: dict[int, DesiredState] = {}
        self._desired: dict[str, DesiredState] = {}
        self._desired_view = types.MappingProxyType(self._desired)
        # Admissions: the highest attempt taken per campaign; those waiting for an active
        # desired state (`_held`), and those queued for the worker (`_admitted`, whose
        # campaign ids are in `_jobs`).
        self._highest: dict[int, int] = {}
        self._held: dict[int, _Admission] = {}
        # A newer start of the campaign that is running, taken once the running one ends.
        self._after_running: _Admission | None = None
        self._admitted: dict[int, _Admission] = {}
        self._jobs: asyncio.Queue[int] = asyncio.Queue(_QUEUE_MAX)
        self._running: _Admission | None = None
        self._cancel_requested = False
        self._replies: asyncio.Queue[CampaignRecord] = asyncio.Queue(_REPLIES_MAX)
        self._seen_commands: collections.deque[str] = collections.deque(maxlen=_SEEN_COMMANDS_MAX)
        self._records: collections.deque[CampaignRecord] = collections.deque(maxlen=_RECORDS_MAX)
        self._busy_until = 0.0
        self._busy_forced = False
        self._wake = asyncio.Event()
        # Held while the connection changes on purpose (connect, or a whole reboot), so a
        # reconnect after a loss never races a reboot. Never held across a waiting publish.
        self._lifecycle = asyncio.Lock()
        # Serialises (un)subscribing, so the last request reflects the latest groups.
        self._subscribing = asyncio.Lock()
        # Held from numbering a state event to its PUBACK, so events leave in `seq` order
        # although the worker and the reply task both send them. The message task, which
        # reconnects, never takes it.
        self._sending = asyncio.Lock()
        self._stale_topics: set[str] = set()
        self.connected = asyncio.Event()
        self.heartbeats_sent = 0

    # -- inspection -------------------------------------------------------------------

    @property
    def versions(self) -> dict[str, str]:
        """Installed versions by package name."""
        return dict(self._versions)

    @property
    def groups(self) -> frozenset[str]:
        """Groups the terminal currently listens to."""
        return frozenset(self._groups)

    @property
    def desired(self) -> Mapping[str, DesiredState]:
        """Read-only view of the latest desired state received per group it is in."""
        return self._desired_view

    @property
    def pending_txns(self) -> list[dict[str, Any]]:
        """A copy of the offline transactions waiting to be uploaded."""
        return copy.deepcopy(self._data.get("pending_txns", []))

    @property
    def data_checksum(self) -> str:
        """Checksum of the working data store."""
        return checksum(self._data)

    @property
    def boot_id(self) -> str:
        """Id of the current boot."""
        return self._boot_id

    @property
    def seq(self) -> int:
        """Sequence number of the last event sent."""
        return self._seq

    @property
    def bricked(self) -> bool:
        """Tell whether the terminal rebooted into a release that never boots."""
        return self._bricked

    def records(self) -> list[CampaignRecord]:
        """Every campaign attempt, oldest first."""
        return list(self._records)

    def record(self, campaign_id: int, attempt: int | None = None) -> CampaignRecord | None:
        """The latest attempt at a campaign (or the given attempt), if any."""
        for rec in reversed(self._records):
            if rec.campaign_id == campaign_id and attempt in (None, rec.attempt):
                return rec
        return None

    @property
    def updating(self) -> bool:
        """Tell whether an attempt is under way (its data store may be mid-migration)."""
        return self._running is not None

    def set_busy(self, busy: bool) -> None:
        """Hold (or release) the terminal as if a merchant were mid-transaction."""
        self._busy_forced = busy
        self._wake.set()

    @property
    def busy(self) -> bool:
        """Tell whether a (simulated) transaction is in progress."""
        return self._busy_forced or time.monotonic() < self._busy_until

    @property
    def txn_error_rate(self) -> float:
        """Fraction of card transactions failing now: degraded by a listed version."""
        degraded = any(
            self._versions.get(name) == version
            for name, version in self._faults.degraded_versions.items()
        )
        return self._faults.degraded_error_rate if degraded else self._faults.txn_error_rate

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Boot, then serve messages, heartbeats and updates until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                # From the start, so a connection lost while booting is noticed and resumed.
                tg.create_task(self._message_loop(), name=f"{self.tid}/messages")
                await self._boot()
                self.connected.set()
                if self._on_connected is not None:
                    self._on_connected(self)
                tg.create_task(self._heartbeat_loop(), name=f"{self.tid}/heartbeat")
                tg.create_task(self._worker_loop(), name=f"{self.tid}/worker")
                tg.create_task(self._reply_loop(), name=f"{self.tid}/replies")
        finally:
            await self._power_off()

    async def _power_off(self) -> None:
        # Runs while the task is being cancelled: every await is bounded, and a further
        # cancellation still propagates (only `Exception`s are suppressed). The publish
        # re-raises the pending cancellation once it is acknowledged (see link.py), so
        # the disconnect sits in `finally` or a real broker would never see it.
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._publish_presence(online=False, wait=False)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._link.disconnect()

    async def _connect(self) -> None:
        delay = 0.05
        while True:
            try:
                async with self._gate:
                    await self._link.connect()
            except ConnectionError as exc:
                logger.debug("%s: connect failed: %s", self.tid, exc)
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, self._timing.reconnect_max_s)
                continue
            return

    async def _power_on(self) -> None:
        """Start a new boot and connect; the caller holds `_lifecycle`."""
        self._boot_id = protocol.new_message_id()
        self._booted_at = time.monotonic()
        self._boots += 1
        await self._connect()

    async def _boot(self) -> None:
        async with self._lifecycle:
            await self._power_on()
        await self._announce_or_leave_it()
        await self._publish_heartbeat()

    async def _announce(self) -> None:
        """Listen, then tell the controller who we are; raises `LinkLostError`.

        Subscribing first matters: the controller answers a hello with the authoritative
        groups command and may admit the terminal to a campaign at once; a command
        published before the subscription exists would be lost on a new session.
        """
        await self._subscribe_all()
        await self._publish_hello(wait=False)
        await self._publish_presence(online=True, wait=False)

    async def _announce_or_leave_it(self) -> None:
        try:
            await self._announce()
        except LinkLostError:
            # The link is marked lost, so the message task reconnects and announces.
            logger.info("%s: connection lost while announcing", self.tid)

    async def _resume_link(self) -> None:
        """Reconnect after an unexpected drop and announce again, until that succeeds."""
        delay = 0.05
        while True:
            if self._bricked:
                await _forever()
            async with self._lifecycle:
                await self._connect()
            try:
                await self._announce()
            except LinkLostError:
                logger.info("%s: connection lost again while resuming", self.tid)
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, self._timing.reconnect_max_s)
                continue
            return

    async def _subscribe_all(self) -> None:
        async with self._subscribing:
            if self._stale_topics:
                stale = sorted(self._stale_topics)
                await self._link.unsubscribe(stale)
                self._stale_topics.difference_update(stale)
            topics = [protocol.terminal_topic(self.tid, MessageKind.CMD)]
            if not self._config.heartbeat_only:
                topics += [protocol.desired_topic(g) for g in sorted(self._groups)]
            await self._link.subscribe(topics)

    async def _reboot(self, new_versions: dict[str, str] | None = None) -> None:
        """Restart, into `new_versions` if given; raises `_BrickedError` if it never boots."""
        async with self._lifecycle:
            with contextlib.suppress(LinkLostError):
                await self._publish_presence(online=False, wait=False)
            await self._link.disconnect()
            await asyncio.sleep(self._timing.reboot_s)
            if new_versions is not None:
                self._versions = dict(new_versions)
            if any(
                self._versions.get(name) == version
                for name, version in self._faults.bricked_versions.items()
            ):
                # Disconnected on purpose, so nothing reconnects: the terminal is gone.
                self._bricked = True
                logger.warning("%s: rebooted into a bricked release", self.tid)
                raise _BrickedError
            await self._power_on()
        await self._announce_or_leave_it()
        # Besides the periodic ones: the controller sees the new versions at once.
        await self._publish_heartbeat()

    # -- publishing -------------------------------------------------------------------

    def _topic(self, kind: MessageKind) -> str:
        return protocol.terminal_topic(self.tid, kind)

    async def _publish_hello(self, *, wait: bool = True) -> None:
        hello = protocol.Hello(
            tid=self.tid,
            boot_id=self._boot_id,
            model=self.model,
            versions=dict(self._versions),
            merchant_id=self.profile.merchant_id,
            timezone=self.profile.timezone,
            attributes={"simulated": "true", "boots": str(self._boots)},
            ts=protocol.now(),
        )
        await self._link.publish(self._topic(MessageKind.HELLO), hello.to_bytes(), wait=wait)

    async def _publish_presence(self, *, online: bool, wait: bool = True) -> None:
        presence = protocol.Presence(tid=self.tid, online=online, ts=protocol.now())
        await self._link.publish(
            self._topic(MessageKind.PRESENCE), presence.to_bytes(), retain=True, wait=wait
        )

    def heartbeat(self) -> protocol.Heartbeat:
        """Build the heartbeat the terminal would send now."""
        return protocol.Heartbeat(
            tid=self.tid,
            ts=protocol.now(),
            versions=dict(self._versions),
            battery_pct=self._battery,
            storage_free_mb=512 - 8 * len(self._data.get("pending_txns", [])),
            busy=self.busy,
            health={
                protocol.HEALTH_TXN_ERROR_RATE: self.txn_error_rate,
                "uptime_s": int(time.monotonic() - self._booted_at),
                "pending_txns": len(self._data.get("pending_txns", [])),
                "boots": self._boots,
            },
        )

    async def _publish_heartbeat(self) -> None:
        await self._link.publish(self._topic(MessageKind.HEARTBEAT), self.heartbeat().to_bytes())
        self.heartbeats_sent += 1

    async def _heartbeat_loop(self) -> None:
        interval = self._timing.heartbeat_s
        # Spread the fleet's heartbeats over the interval instead of a thundering herd.
        await asyncio.sleep(self._rng.random() * interval)
        while True:
            self._battery = max(5, min(100, self._battery + self._rng.choice((-1, 0, 1))))
            await self._publish_heartbeat()
            await asyncio.sleep(interval)

    async def _emit(
        self,
        record: CampaignRecord,
        state: ExecState,
        *,
        package: str | None = None,
        progress: int | None = None,
        stage: str | None = None,
        error_code: str | None = None,
        detail: str | None = None,
        resend: bool = False,
    ) -> None:
        async with self._sending:
            self._seq += 1
            event = protocol.StateEvent(
                msg_id=protocol.new_message_id(),
                tid=self.tid,
                seq=self._seq,
                campaign_id=record.campaign_id,
                state=state,
                ts=protocol.now(),
                attempt=record.attempt,
                package=package,
                progress=progress,
                stage=stage,
                error_code=error_code,
                detail=detail,
            )
            sent = SentEvent(
                event.msg_id,
                event.seq,
                state,
                event.ts,
                attempt=record.attempt,
                package=package,
                progress=progress,
                stage=stage,
                error_code=error_code,
                detail=detail,
            )
            (record.resent if resend else record.events).append(sent)
            await self._link.publish(self._topic(MessageKind.EVENTS), event.to_bytes())

    # -- incoming ---------------------------------------------------------------------

    async def _message_loop(self) -> None:
        while True:
            try:
                async with contextlib.aclosing(self._link.messages()) as messages:
                    async for message in messages:
                        await self._dispatch(message.topic, message.payload)
            except LinkLostError:
                logger.info("%s: connection lost, reconnecting", self.tid)
                await self._resume_link()

    async def _dispatch(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            if topic == self._topic(MessageKind.CMD):
                await self._on_command(protocol.decode_command(payload))
            elif topic.startswith(f"{protocol.TOPIC_ROOT}/g/") and topic.endswith("/desired"):
                self._on_desired(protocol.decode_desired(payload))
            else:
                logger.debug("%s: ignoring message on %s", self.tid, topic)
        except ProtocolError as exc:
            logger.warning("%s: refused message on %s: %s", self.tid, topic, exc)

    def _on_desired(self, desired: DesiredState) -> None:
        if self._config.heartbeat_only or desired.group not in self._groups:
            return
        held = self._desired.get(desired.group)
        if held is None or (
            held.campaign_id != desired.campaign_id or held.revision < desired.revision
        ):
            self._desired[desired.group] = desired
            if self._on_desired_changed is not None:
                self._on_desired_changed(self)
        cid = desired.campaign_id
        previous = self._latest.get(cid)
        if previous is not None and previous.revision >= desired.revision:
            return
        self._latest[cid] = desired
        if len(self._latest) > _CAMPAIGNS_MAX:
            del self._latest[min(c for c in self._latest if c != self._running_campaign)]
        if desired.status == "active" and cid in self._held:
            # The start overtook the retained desired state (after a (re)subscribe).
            self._enqueue(self._held.pop(cid))
        elif desired.status == "canceled":
            self._held.pop(cid, None)

    @property
    def _running_campaign(self) -> int | None:
        return None if self._running is None else self._running.campaign_id

    async def _on_command(self, command: Command) -> None:
        if command.tid != self.tid or command.msg_id in self._seen_commands:
            return
        self._seen_commands.append(command.msg_id)
        if command.expires_at < protocol.now():
            logger.info("%s: ignoring expired %s command", self.tid, command.kind.value)
            return
        cid = command.campaign_id
        match command.kind:
            case CommandKind.GROUPS:
                await self._set_groups(set(command.groups or []))
            case CommandKind.START if cid is not None and command.attempt is not None:
                # Without `may_postpone` the start is taken as forced: nobody said "later".
                self._on_start(_Admission(cid, command.attempt, bool(command.may_postpone)))
            case CommandKind.CANCEL if cid is not None:
                self._on_cancel(cid)
            case CommandKind.REBOOT:
                self._enqueue_job(_REBOOT)
            case _:
                logger.info("%s: ignoring %s command", self.tid, command.kind.value)

    def _on_start(self, admission: _Admission) -> None:
        if self._config.heartbeat_only:
            return
        cid, attempt = admission.campaign_id, admission.attempt
        taken = self._highest.get(cid)
        if taken is not None and attempt <= taken:
            # The controller sends a start again when it missed the attempt's report:
            # repeat a final state; a running, postponed or forgotten attempt stays quiet.
            record = self.record(cid, attempt)
            if record is not None and record.final_state is not None:
                try:
                    self._replies.put_nowait(record)
                except asyncio.QueueFull:
                    logger.warning("%s: reply queue full, not repeating c%d", self.tid, cid)
            return
        if self._running_campaign == cid:
            # The controller gave up on the running attempt (a deadline) while it is still
            # under way here: finish it, then run the newer one.
            logger.info("%s: c%d attempt %d waits for the running one", self.tid, cid, attempt)
            self._highest[cid] = attempt
            self._after_running = admission
            return
        self._highest[cid] = attempt
        if len(self._highest) > _CAMPAIGNS_MAX:
            del self._highest[min(c for c in self._highest if c != cid)]
        if cid in self._admitted:
            self._admitted[cid] = admission  # already queued: run the newer attempt
            return
        self._held.pop(cid, None)
        desired = self._latest.get(cid)
        if desired is not None and desired.status == "active":
            self._enqueue(admission)
        else:
            self._hold(admission)

    def _on_cancel(self, cid: int) -> None:
        if self._after_running is not None and self._after_running.campaign_id == cid:
            self._after_running = None
        if self._running_campaign == cid:
            self._cancel_requested = True
            self._wake.set()
        else:
            self._held.pop(cid, None)
            self._admitted.pop(cid, None)  # its queue entry is skipped

    def _hold(self, admission: _Admission) -> None:
        self._held[admission.campaign_id] = admission
        if len(self._held) > _HELD_MAX:
            oldest = next(iter(self._held))
            logger.warning("%s: too many held starts, dropping c%d", self.tid, oldest)
            del self._held[oldest]

    def _enqueue(self, admission: _Admission) -> None:
        if self._enqueue_job(admission.campaign_id):
            self._admitted[admission.campaign_id] = admission

    def _enqueue_job(self, job: int) -> bool:
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            logger.warning("%s: job queue full, dropping job %d", self.tid, job)
            return False
        return True

    async def _set_groups(self, groups: set[str]) -> None:
        """Listen to exactly `groups`; raises `LinkLostError` (the resume finishes the job)."""
        added, removed = groups - self._groups, self._groups - groups
        self._groups = groups
        forgotten = [g for g in removed if self._desired.pop(g, None) is not None]
        if forgotten and self._on_desired_changed is not None:
            self._on_desired_changed(self)
        if self._config.heartbeat_only:
            return
        async with self._subscribing:
            self._stale_topics.update(protocol.desired_topic(g) for g in removed)
            self._stale_topics.difference_update(protocol.desired_topic(g) for g in added)
            stale = sorted(self._stale_topics)
            await self._link.unsubscribe(stale)
            self._stale_topics.difference_update(stale)
            await self._link.subscribe([protocol.desired_topic(g) for g in sorted(added)])

    # -- the update -------------------------------------------------------------------

    async def _reply_loop(self) -> None:
        while True:
            record = await self._replies.get()
            final = next(e for e in reversed(record.events) if e.state in FINAL)
            await self._emit(
                record,
                final.state,
                package=final.package,
                stage=final.stage,
                error_code=final.error_code,
                detail=final.detail,
                resend=True,
            )

    async def _worker_loop(self) -> None:
        while True:
            job = await self._jobs.get()
            if job == _REBOOT:
                try:
                    await self._reboot()
                except _BrickedError:
                    await _forever()
                continue
            admission = self._admitted.pop(job, None)
            if admission is None:
                continue  # canceled while queued
            desired = self._latest.get(job)
            if desired is None or desired.status != "active":
                # Paused (or forgotten) since: wait for it to be active again.
                if desired is None or desired.status == "paused":
                    self._hold(admission)
                continue
            self._running = admission
            self._cancel_requested = False
            try:
                await self._update(admission, desired)
            except _BrickedError:
                await _forever()  # the attempt never settles
            finally:
                self._running = None
                self._cancel_requested = False
            following, self._after_running = self._after_running, None
            if following is not None and following.campaign_id == job:
                self._enqueue(following)

    async def _update(self, admission: _Admission, desired: DesiredState) -> None:
        record = CampaignRecord(
            tid=self.tid,
            campaign_id=admission.campaign_id,
            attempt=admission.attempt,
            started_at=time.monotonic(),
            data_before=self.data_checksum,
            versions_before=dict(self._versions),
        )
        self._records.append(record)
        if self._on_record is not None:
            self._on_record(record)
        try:
            await self._run_update(record, desired, may_postpone=admission.may_postpone)
        except _CanceledError:
            logger.info("%s: c%d canceled, abandoned", self.tid, record.campaign_id)
            record.abandoned = True
            await self._emit(record, S.CANCELED, stage=record.events[-1].state.value)
            record.final_state = S.CANCELED
        except _Finished:
            pass
        except _BrickedError:
            record.bricked = True
            if self._on_record is not None:
                self._on_record(record)
            raise
        record.finished_at = time.monotonic()
        record.data_after = self.data_checksum
        record.versions_after = dict(self._versions)
        if self._on_record is not None:
            self._on_record(record)

    async def _finish(
        self,
        record: CampaignRecord,
        state: ExecState,
        *,
        package: str | None = None,
        stage: str | None = None,
        error_code: str | None = None,
        detail: str | None = None,
    ) -> NoReturn:
        await self._emit(
            record, state, package=package, stage=stage, error_code=error_code, detail=detail
        )
        record.final_state = state
        record.error_code = error_code
        # Real terminals heartbeat after an update ends, so the controller's health gate
        # need not wait for the next periodic one.
        with contextlib.suppress(LinkLostError):
            await self._publish_heartbeat()
        raise _Finished

    def _check_cancel(self) -> None:
        # Only ever called in states that may move to `canceled` (never in `verifying`).
        if self._cancel_requested:
            raise _CanceledError

    async def _run_update(
        self, record: CampaignRecord, desired: DesiredState, *, may_postpone: bool
    ) -> None:
        packages = sorted(desired.packages, key=lambda p: KIND_ORDER[p.kind])
        incompatible = [p.name for p in packages if p.models and self.model not in p.models]
        if incompatible:
            await self._finish(
                record,
                S.REJECTED,
                stage="check",
                error_code="INCOMPATIBLE_MODEL",
                detail=f"{self.model} not supported by {','.join(incompatible)}"[:_DETAIL_MAX],
            )
        todo = [p for p in packages if self._versions.get(p.name) != p.version]
        if not todo:
            await self._finish(record, S.ALREADY_INSTALLED)
        await self._emit(record, S.QUEUED)
        if may_postpone and self._rng.random() < self._timing.postpone_probability:
            # The merchant said "later": no final state; the controller starts a new attempt.
            await self._emit(record, S.DEFERRED, stage="postponed")
            record.postponed = True
            raise _Finished
        self._check_cancel()
        await self._wait_idle(record)
        for index, package in enumerate(todo):
            self._check_cancel()
            await self._fetch(record, package, later=todo[index + 1 :])
        # The last moment a cancel is honoured: an install is never interrupted.
        self._check_cancel()
        for index, package in enumerate(todo):
            await self._install(record, package, later=todo[index + 1 :], first=index == 0)
        await self._finish(record, S.SUCCEEDED)

    async def _install(
        self,
        record: CampaignRecord,
        package: PackageRef,
        *,
        later: Sequence[PackageRef],
        first: bool,
    ) -> None:
        """Back up, install, (reboot,) self-test one package; roll it alone back on failure."""
        name = package.name
        await self._emit(record, S.BACKING_UP, package=name)
        backup = _Backup(copy.deepcopy(self._data), self.data_checksum, dict(self._versions))

        await self._emit(record, S.INSTALLING, package=name)
        await asyncio.sleep(self._timing.install_s)
        # New software brings a new, empty data store; the data must be migrated into it.
        self._data = {"pending_txns": [], "config": {}}
        if self._rng.random() < self._faults.install_fail_rate:
            self._restore(backup, versions=True)
            await self._finish(
                record,
                S.ROLLED_BACK,
                package=name,
                stage="install",
                error_code="INSTALL_FAILED",
                detail=_not_attempted(later),
            )
        installed = self._versions | {name: package.version}
        if package.kind in _REBOOTS:
            await self._emit(record, S.REBOOTING, package=name)
            await self._reboot(installed)
        else:
            self._versions = installed

        await self._emit(record, S.SELF_TESTING, package=name)
        await asyncio.sleep(self._timing.self_test_s)
        faults = self._faults
        if (
            (first and self.model in faults.self_test_fail_models)
            or faults.self_test_fail_versions.get(name) == package.version
            or self._rng.random() < faults.self_test_fail_rate
        ):
            # Back to this package's previous version; earlier packages stay installed.
            self._restore(backup, versions=True)
            await self._finish(
                record,
                S.ROLLED_BACK,
                package=name,
                stage="self_test",
                error_code="SELF_TEST_FAILED",
                detail=_not_attempted(later),
            )
        self._restore(backup, versions=False)

    def _restore(self, backup: _Backup, *, versions: bool) -> None:
        if checksum(backup.data) != backup.checksum:
            msg = f"{self.tid}: backup corrupted"
            raise AssertionError(msg)
        self._data = copy.deepcopy(backup.data)
        if versions:
            self._versions = dict(backup.versions)

    async def _wait_idle(self, record: CampaignRecord) -> None:
        if self._rng.random() < self._timing.busy_probability:
            self._busy_until = time.monotonic() + self._timing.busy_s
        if not self.busy:
            return
        await self._emit(record, S.DEFERRED, stage="busy")
        while self.busy:
            self._check_cancel()
            self._wake.clear()
            timeout = None if self._busy_forced else self._busy_until - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _fetch(
        self, record: CampaignRecord, package: PackageRef, *, later: Sequence[PackageRef]
    ) -> None:
        name = package.name
        await self._emit(record, S.DOWNLOADING, package=name, progress=0)
        reported = 0

        async def progress(offset: int) -> None:
            nonlocal reported
            self._check_cancel()
            if package.size <= 0:
                return
            pct = offset * 100 // package.size // _PROGRESS_STEP * _PROGRESS_STEP
            if reported < pct < 100:
                reported = pct
                await self._emit(record, S.DOWNLOADING, package=name, progress=pct)

        rng, faults = self._rng, self._faults
        drop = rng.random() < faults.download_drop_rate and package.size > 1
        corrupt = rng.random() < faults.corrupt_rate and package.size > 0
        plan = DownloadPlan(
            url=package.url,
            size=package.size,
            chunk_bytes=self._timing.chunk_bytes,
            bytes_per_s=self._timing.download_bps,
            timeout_s=self._timing.http_timeout_s,
            max_attempts=faults.max_download_attempts,
            retry_s=self._timing.download_retry_s,
            drop_at=rng.randrange(1, package.size) if drop else None,
            corrupt_at=rng.randrange(package.size) if corrupt else None,
        )
        try:
            result = await download(plan, progress)
        except DownloadFailedError as exc:
            await self._finish(
                record,
                S.FAILED,
                package=name,
                stage="download",
                error_code=exc.code,
                detail=_detail(exc.detail, later),
            )
        await self._emit(record, S.DOWNLOADED, package=name, progress=100)
        await self._emit(record, S.VERIFYING, package=name)
        if result.length != package.size or result.sha256 != package.sha256:
            await self._finish(
                record,
                S.FAILED,
                package=name,
                stage="verify",
                error_code="HASH_MISMATCH",
                detail=_detail(f"got {result.length} bytes sha256 {result.sha256[:12]}", later),
            )
        await self._emit(record, S.VERIFIED, package=name)


async def _forever() -> NoReturn:
    """Wait until cancelled: what is left of a terminal that never boots again."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError  # pragma: no cover - the future never completes
