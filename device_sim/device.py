"""One simulated payment terminal: boot, heartbeats, commands and the update sequence.

The controller decides who updates when: a group's retained desired state only tells the
terminal what a campaign installs and whether it is live, and a `start` command admits
one numbered attempt. An attempt downloads and verifies every package of the bundle, then
installs them one by one in `KIND_ORDER`, each with its own backup, install, reboot
(firmware and app) and self-test; a failed package is rolled back alone, and the packages
after it are not attempted.

Storage is A/B (device_sim/storage.py): a package is written to the inactive slot, the
boot control block switches to it, and the new slot is confirmed only after its
self-test. An injected power loss at a named point (`PowerLossPoint`) ends every task of
the terminal at once; it boots again from what flash holds and reports what became of
the attempt: resumed on the new release, or failed/rolled back on the old one.

The terminal talks only through a `Link`, so the whole behaviour runs against an in-memory
fake in unit tests. Its message task notices a lost connection and reconnects; nothing
that task awaits waits for a reconnect (those link calls fail fast), so the terminal
always makes progress. Its randomness comes from the values of one `random.Random` seeded
with the run's seed and the terminal id (`device_sim.draws.Draws`, which builds that
generator only when needed), so a run is reproducible terminal by terminal.
"""

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime as dt
import logging
import math
import random
import time
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn, cast
from zoneinfo import ZoneInfo

import pydantic_core

from device_sim.config import PowerLossPoint, SimConfig
from device_sim.download import DownloadFailedError, DownloadPlan, download
from device_sim.draws import Draws
from device_sim.flag import Flag
from device_sim.link import Link, LinkLostError
from device_sim.stats import Stats
from device_sim.storage import Boot, Data, Flash, checksum
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
P = PowerLossPoint
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
# The heartbeat bounds of fleet/protocol.py that vary each beat (see `_heartbeat_payload`).
_TS_MIN, _TS_MAX = 1e9, 4.1e9
_SMALL_COUNT_MAX = 2**31 - 1
_PERCENT_MAX = 100

#: What the agent reports when the power went at a point and the terminal came back on
#: the old release: nothing of the package was live, so the attempt ends there. Before
#: the backup is complete nothing was changed (`failed`); from then on the package's
#: install had begun and its old version and data are what the terminal runs now
#: (`rolled_back`). The stage is the failure class the controller's retries go by.
#: After the switch, one power loss brings the terminal back on the new slot, which
#: resumes, unless it cut that slot's first start or self-test (the bootloader falls
#: back); the rows for later points keep the table total all the same.
_ON_OLD_AFTER_POWER_LOSS: dict[PowerLossPoint, tuple[ExecState, str]] = {
    P.AFTER_DOWNLOAD: (S.FAILED, "install"),
    P.DURING_BACKUP: (S.FAILED, "install"),
    P.DURING_WRITE_INACTIVE_SLOT: (S.ROLLED_BACK, "install"),
    P.AFTER_WRITE_BEFORE_SWITCH: (S.ROLLED_BACK, "install"),
    P.DURING_SLOT_SWITCH: (S.ROLLED_BACK, "install"),
    P.AFTER_SWITCH_BEFORE_REBOOT: (S.ROLLED_BACK, "install"),
    P.DURING_FIRST_BOOT: (S.ROLLED_BACK, "install"),
    P.DURING_SELF_TEST: (S.ROLLED_BACK, "self_test"),
    P.AFTER_CONFIRM: (S.ROLLED_BACK, "self_test"),
}


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _version(rng: random.Random, spec: str | Mapping[str, float]) -> str:
    return spec if isinstance(spec, str) else _pick(rng, spec)


def initial_data(profile: "TerminalProfile") -> Data:
    """The data store a terminal holds when the simulator starts."""
    return {
        "pending_txns": [dict(t) for t in profile.pending_txns],
        "config": {
            "merchant_id": profile.merchant_id,
            "timezone": profile.timezone,
            "receipt_footer": "Thank you",
        },
    }


@dataclasses.dataclass(frozen=True, slots=True)
class TerminalProfile:
    """What a terminal is and holds when the simulator starts.

    `versions` is shared with the terminal's flash slots: it is never changed in place.
    `busy_hours`, `merchant_kind` and `link_class` are the scenario's own objects, not
    per-terminal copies.
    """

    tid: str
    model: str
    versions: dict[str, str]
    groups: tuple[str, ...]
    merchant_id: str
    timezone: str
    pending_txns: tuple[dict[str, Any], ...]
    merchant_kind: str = ""
    #: Local-time ranges (minutes since midnight) when the merchant is selling.
    busy_hours: tuple[tuple[int, int], ...] = ()
    link_class: str = ""
    link_bps: int = 1_000_000
    battery_pct: int = 100
    charging: bool = False
    clock_skew_s: float = 0.0

    @classmethod
    def from_config(cls, config: SimConfig, index: int) -> "TerminalProfile":
        """Derive terminal number `index` deterministically from the configuration.

        Only the seed and the absolute number matter, so processes that share a fleet by
        id range derive the same terminal. The draws keep their order (model,
        transactions, time zone first), so a seed keeps its fleet as options are added.
        """
        tid = config.terminal_id(index)
        rng = random.Random(f"{config.seed}:{tid}:profile")
        model = _pick(rng, config.models)
        txns = tuple(
            {
                "id": f"{tid}-{n}",
                "amount": rng.randint(100, 50_000),
                "currency": rng.choice(_CURRENCIES),
            }
            for n in range(rng.randint(0, config.pending_txns_max))
        )
        timezone = _pick(rng, config.timezones) if config.timezones else "UTC"
        specs = config.initial_versions | config.model_versions.get(model, {})
        versions = {name: _version(rng, spec) for name, spec in specs.items()}
        groups = _groups(config, index, tid, model, timezone, rng)
        if config.merchants:
            merchant_id = config.merchants[index % len(config.merchants)]
        else:
            merchant_id = f"M{index // config.terminals_per_merchant:06d}"
        merchant_kind, busy_hours = "", cast("tuple[tuple[int, int], ...]", ())
        if config.merchant_profiles:
            # Drawn per merchant, so all of a merchant's terminals share its hours.
            kinds = {m.name: m.weight for m in config.merchant_profiles}
            kind = _pick(random.Random(f"{config.seed}:{merchant_id}:merchant"), kinds)
            merchant = next(m for m in config.merchant_profiles if m.name == kind)
            merchant_kind, busy_hours = merchant.name, merchant.busy_hours
        link_class, link_bps = "", config.timing.download_bps
        if config.link_classes:
            link_class = _pick(rng, {n: c.weight for n, c in config.link_classes.items()})
            chosen = config.link_classes[link_class]
            factor = 1 + chosen.jitter * (2 * rng.random() - 1)
            link_bps = max(1, round(chosen.bytes_per_s * factor))
        battery = config.battery
        charging = battery.charging_share > 0 and rng.random() < battery.charging_share
        faults = config.faults
        skew = 0.0
        if faults.clock_skew_share > 0 and rng.random() < faults.clock_skew_share:
            skew = rng.uniform(-faults.clock_skew_max_s, faults.clock_skew_max_s)
        return cls(
            tid=tid,
            model=model,
            versions=versions,
            groups=groups,
            merchant_id=merchant_id,
            timezone=timezone,
            pending_txns=txns,
            merchant_kind=merchant_kind,
            busy_hours=busy_hours,
            link_class=link_class,
            link_bps=link_bps,
            battery_pct=rng.randint(battery.start_min_pct, battery.start_max_pct),
            charging=charging,
            clock_skew_s=skew,
        )


def _groups(
    config: SimConfig, index: int, tid: str, model: str, timezone: str, rng: random.Random
) -> tuple[str, ...]:
    if tid in config.group_map:
        return tuple(config.group_map[tid])
    rule = config.group_rule
    if rule == "all":
        return tuple(config.groups)
    if rule == "random":
        return (_pick(rng, config.groups),)
    key = model if rule == "by_model" else timezone if rule == "by_timezone" else None
    if key is not None and key in config.group_by:
        return tuple(config.group_by[key])
    names = list(config.groups)
    return (names[index % len(names)],)


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
    local config). `power_losses` names the points where the power went during it.
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
    power_losses: tuple[str, ...] = ()

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


@dataclasses.dataclass(slots=True)
class _Journal:
    """The update agent's notes on flash: which package of which attempt got how far."""

    record: CampaignRecord
    packages: tuple[PackageRef, ...]
    index: int = 0
    step: PowerLossPoint = P.AFTER_DOWNLOAD


class _CanceledError(Exception):
    """A cancel arrived before the first install began; report `canceled` and stop."""


class _Finished(Exception):  # noqa: N818 - control flow, not an error
    """The attempt reached a final state, or was postponed."""


class _BrickedError(Exception):
    """The terminal rebooted into a release that never boots."""


class _PowerLossError(Exception):
    """The power went (an injected fault): every task of the terminal ends at once."""


Callback = Callable[["Terminal"], None]
RecordCallback = Callable[[CampaignRecord], None]

_REBOOT = 0  # queue markers: campaign ids start at 1
_RESUME = -1  # carry on with the attempt the journal holds, after a power loss


def _chance(per_hour: float, seconds: float) -> float:
    """Probability of at least one event in `seconds` at `per_hour` events an hour."""
    return -math.expm1(-per_hour * seconds / 3600)


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

    # Slots: with this many attributes the instance dict took 1.6 KB per terminal.
    __slots__ = (
        "_admitted",
        "_after_running",
        "_battery",
        "_battery_at",
        "_boot_id",
        "_booted_at",
        "_boots",
        "_bricked",
        "_busy_forced",
        "_busy_until",
        "_cancel_requested",
        "_checked",
        "_config",
        "_cut_at",
        "_desired",
        "_desired_view",
        "_faults",
        "_flash",
        "_gate",
        "_groups",
        "_heartbeat_topic",
        "_held",
        "_highest",
        "_jobs",
        "_journal",
        "_latest",
        "_lifecycle",
        "_link",
        "_on_connected",
        "_on_desired_changed",
        "_on_record",
        "_records",
        "_replies",
        "_replying",
        "_rng",
        "_running",
        "_seen_commands",
        "_sending",
        "_seq",
        "_stale_topics",
        "_stats",
        "_subscribing",
        "_tasks",
        "_timing",
        "_wake",
        "_working",
        "connected",
        "heartbeats_sent",
        "model",
        "profile",
        "tid",
    )

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
        stats: Stats | None = None,
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
        self._rng = Draws(f"{config.seed}:{profile.tid}")
        self._stats = stats or Stats()

        # Kept on flash, so they survive a power loss: the slots and data (`_flash`), the
        # install journal, the event seq, the attempts taken (`_highest`) and the groups.
        self._flash = Flash(profile.versions, initial_data(profile))
        self._journal: _Journal | None = None
        self._groups: set[str] = set(profile.groups)
        self._seq = 0
        self._boot_id = protocol.new_message_id()
        self._booted_at = time.monotonic()
        self._boots = 0
        self._battery = float(profile.battery_pct)
        self._battery_at = time.monotonic()
        self._bricked = False
        # The point where this package's install loses power (fault injection), if any.
        self._cut_at: PowerLossPoint | None = None

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
        self._jobs: list[int] = []
        self._running: _Admission | None = None
        self._cancel_requested = False
        # Final states to report again (a repeated `start`), sent by the reply task.
        self._replies: list[CampaignRecord] = []
        # The worker and the reply task run only while they have something to do: most
        # terminals never get a job, and a task waiting for one costs about 1.5 KB.
        # `_tasks` is the powered terminal's task group, once it has booted.
        self._tasks: asyncio.TaskGroup | None = None
        self._working = False
        self._replying = False
        # Built on first use, like the flags below: an idle terminal holds no buffers.
        self._seen_commands: collections.deque[str] | None = None
        self._records: collections.deque[CampaignRecord] | None = None
        self._busy_until = 0.0
        self._busy_forced = False
        self._wake = Flag()
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
        self.connected = Flag()
        self.heartbeats_sent = 0
        self._heartbeat_topic = self._topic(MessageKind.HEARTBEAT)
        # The version map last validated in a heartbeat, and its error rate.
        self._checked: tuple[Mapping[str, str], float] | None = None

    # -- inspection -------------------------------------------------------------------

    @property
    def versions(self) -> dict[str, str]:
        """Installed versions by package name (the active slot's release)."""
        return dict(self._flash.versions)

    @property
    def inactive_versions(self) -> dict[str, str] | None:
        """The release in the inactive slot (None while it is written, or torn)."""
        inactive = self._flash.inactive
        return None if inactive is None else dict(inactive)

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
        return copy.deepcopy(self._flash.data.get("pending_txns", []))

    @property
    def data_checksum(self) -> str:
        """Checksum of the working data store."""
        return checksum(self._flash.data)

    def data_intact(self) -> bool | None:
        """Tell whether the data store holds what it did at start-up.

        None while that cannot be judged: an update is under way (the store may be mid-
        migration), or the terminal is bricked. Nothing but an update touches the store.
        """
        if self.updating or self._bricked:
            return None
        return self._flash.data_complete and self.data_checksum == checksum(
            initial_data(self.profile)
        )

    def storage_settled(self) -> bool | None:
        """Tell whether flash is settled: one complete, confirmed slot, whole data.

        None while an update is under way or the terminal is bricked.
        """
        if self.updating or self._bricked:
            return None
        return self._flash.consistent()

    @property
    def battery_pct(self) -> int:
        """The battery level now."""
        return round(self._battery_level())

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
        return list(self._records or ())

    def record(self, campaign_id: int, attempt: int | None = None) -> CampaignRecord | None:
        """The latest attempt at a campaign (or the given attempt), if any."""
        for rec in reversed(self._records or ()):
            if rec.campaign_id == campaign_id and attempt in (None, rec.attempt):
                return rec
        return None

    @property
    def updating(self) -> bool:
        """Tell whether an attempt is under way (its data store may be mid-migration)."""
        return self._running is not None or self._journal is not None

    def set_busy(self, busy: bool) -> None:
        """Hold (or release) the terminal as if a merchant were mid-transaction."""
        self._busy_forced = busy
        self._wake.set()

    @property
    def busy(self) -> bool:
        """Tell whether the merchant is selling: a transaction, or their busy hours."""
        return self._in_sale or self.in_busy_hours()

    @property
    def _in_sale(self) -> bool:
        return self._busy_forced or time.monotonic() < self._busy_until

    def in_busy_hours(self) -> bool:
        """Tell whether it is now one of the merchant's busy hours, in local time.

        Real local time, not the terminal's (possibly skewed) clock: customers come when
        they come.
        """
        hours = self.profile.busy_hours
        if not hours:
            return False
        local = dt.datetime.fromtimestamp(protocol.now(), ZoneInfo(self.profile.timezone))
        minute = local.hour * 60 + local.minute
        return any(
            start <= minute < end if start < end else (minute >= start or minute < end)
            for start, end in hours
        )

    @property
    def txn_error_rate(self) -> float:
        """Fraction of card transactions failing now: degraded by a listed version."""
        return (
            self._faults.degraded_error_rate
            if self._runs_any(self._faults.degraded_versions)
            else self._faults.txn_error_rate
        )

    def _runs_any(self, releases: Mapping[str, str]) -> bool:
        versions = self._flash.versions
        return any(versions.get(name) == version for name, version in releases.items())

    def _now(self) -> float:
        """The terminal's own wall clock, skewed by its profile: every timestamp it sends."""
        return protocol.now() + self.profile.clock_skew_s

    def _battery_level(self) -> float:
        battery, now = self._config.battery, time.monotonic()
        hours = (now - self._battery_at) / 3600
        if self.profile.charging:
            level = min(100.0, self._battery + battery.charge_pct_per_h * hours)
        else:
            level = max(0.0, self._battery - battery.drain_pct_per_h * hours)
        self._battery, self._battery_at = level, now
        return level

    def _battery_low(self) -> bool:
        floor = self._config.battery.min_install_pct
        return floor > 0 and not self.profile.charging and self._battery_level() < floor

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Boot, then serve messages, heartbeats and updates until cancelled.

        A power loss ends every task of the terminal at once, as a power cut ends its
        processes; the terminal then boots again from what its flash holds.
        """
        try:
            while True:
                try:
                    await self._run_powered()
                except* _PowerLossError:
                    await self._lose_power()
        finally:
            await self._power_off()

    async def _run_powered(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                # From the start, so a connection lost while booting is noticed and resumed.
                tg.create_task(self._message_loop(), name=f"{self.tid}/messages")
                await self._boot()
                if not self.connected.is_set():
                    self.connected.set()
                    if self._on_connected is not None:
                        self._on_connected(self)
                if self._journal is not None:
                    self._enqueue_job(_RESUME)
                tg.create_task(self._heartbeat_loop(), name=f"{self.tid}/heartbeat")
                # Jobs and replies queued while booting are taken up from here on.
                self._tasks = tg
                self._start_worker()
                self._start_replies()
        finally:
            self._tasks = None
            self._working = self._replying = False

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> bool:
        """Run `coro` as a task of the powered terminal; False (and closed) if not booted."""
        tasks = self._tasks
        if tasks is not None:
            try:
                tasks.create_task(coro, name=f"{self.tid}/{name}")
            except RuntimeError:  # the group is shutting down (a power loss, a stop)
                pass
            else:
                return True
        coro.close()
        return False

    def _start_worker(self) -> None:
        if self._jobs and not self._working and self._tasks is not None:
            self._working = self._spawn(self._worker_loop(), "worker")

    def _start_replies(self) -> None:
        if self._replies and not self._replying and self._tasks is not None:
            self._replying = self._spawn(self._reply_loop(), "replies")

    async def _lose_power(self) -> None:
        """What a power cut leaves: the broker sees the connection die, and RAM is gone."""
        self._link.power_off()
        self._latest.clear()
        if self._desired:
            self._desired.clear()
            if self._on_desired_changed is not None:
                self._on_desired_changed(self)
        self._held.clear()
        self._admitted.clear()
        self._after_running = None
        self._running = None
        self._cancel_requested = False
        self._jobs.clear()
        self._replies.clear()
        self._seen_commands = None
        self._stale_topics.clear()
        self._busy_until = 0.0
        await asyncio.sleep(self._timing.reboot_s)

    async def _power_off(self) -> None:
        # Runs while the task is being cancelled: every await is bounded, and a further
        # cancellation still propagates (only `Exception`s are suppressed), which can end
        # the presence publish early, so the disconnect sits in `finally` or a real
        # broker would never see it.
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._publish_presence(online=False, wait=False)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._link.disconnect()

    async def _connect(self) -> None:
        delay, started = 0.05, time.monotonic()
        while True:
            try:
                async with self._gate:
                    await self._link.connect()
            except ConnectionError as exc:
                logger.debug("%s: connect failed: %s", self.tid, exc)
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, self._timing.reconnect_max_s)
                continue
            self._stats.connected(time.monotonic() - started)
            return

    async def _power_on(self) -> None:
        """Start a new boot and connect; the caller holds `_lifecycle`."""
        self._boot_id = protocol.new_message_id()
        self._booted_at = time.monotonic()
        self._boots += 1
        await self._connect()

    async def _boot(self) -> None:
        async with self._lifecycle:
            bricked = self._start_software()
            if not bricked:
                await self._power_on()
        if bricked:
            self._brick()
            await _forever()
        await self._announce_or_leave_it()
        await self._publish_heartbeat()

    def _start_software(self) -> bool:
        """Start the slot the bootloader picks; return whether it is a bricked release.

        A new slot's first start migrates the local data; it is also where a bricked
        release hangs (and where a power cut can catch the migration).
        """
        outcome = self._flash.boot()
        if outcome is Boot.FELL_BACK:
            self._stats.recovery("fell_back")
        elif outcome is Boot.FIRST:
            self._flash.start_migration()
            self._at(P.DURING_FIRST_BOOT)
            self._flash.finish_migration()
            return self._runs_any(self._faults.bricked_versions)
        return False

    def _brick(self) -> None:
        """The release never comes back: it marked its slot good, then never connects."""
        self._bricked = True
        self._flash.confirm()
        self._stats.fault("bricked")
        logger.warning("%s: rebooted into a bricked release", self.tid)
        if self._journal is not None:
            record = self._journal.record
            record.bricked = True
            if self._on_record is not None:
                self._on_record(record)

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

    async def _reboot(self) -> None:
        """Restart into the slot the bootloader picks; raises `_BrickedError` if it never boots."""
        async with self._lifecycle:
            with contextlib.suppress(LinkLostError):
                await self._publish_presence(online=False, wait=False)
            await self._link.disconnect()
            await asyncio.sleep(self._timing.reboot_s)
            if self._start_software():
                # Disconnected on purpose, so nothing reconnects: the terminal is gone.
                self._brick()
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
            versions=dict(self._flash.versions),
            merchant_id=self.profile.merchant_id,
            timezone=self.profile.timezone,
            attributes={"simulated": "true", "boots": str(self._boots)},
            ts=self._now(),
        )
        await self._link.publish(self._topic(MessageKind.HELLO), hello.to_bytes(), wait=wait)

    async def _publish_presence(self, *, online: bool, wait: bool = True) -> None:
        presence = protocol.Presence(tid=self.tid, online=online, ts=self._now())
        await self._link.publish(
            self._topic(MessageKind.PRESENCE), presence.to_bytes(), retain=True, wait=wait
        )

    def heartbeat(self) -> protocol.Heartbeat:
        """Build the heartbeat the terminal would send now."""
        return protocol.Heartbeat(**self._heartbeat_fields())

    def _heartbeat_fields(self) -> dict[str, Any]:
        """The heartbeat's fields, in the model's order (`v` first), versions not copied."""
        versions = self._flash.versions
        checked = self._checked
        if checked is not None and checked[0] is versions:
            error_rate = checked[1]
        else:
            error_rate = self.txn_error_rate
        pending = len(self._flash.data.get("pending_txns", []))
        return {
            "v": protocol.PROTOCOL_VERSION,
            "tid": self.tid,
            "ts": self._now(),
            "versions": versions,
            "battery_pct": self.battery_pct,
            "storage_free_mb": 512 - 8 * pending,
            "busy": self.busy,
            "health": {
                protocol.HEALTH_TXN_ERROR_RATE: error_rate,
                "uptime_s": int(time.monotonic() - self._booted_at),
                "pending_txns": pending,
                "boots": self._boots,
            },
        }

    def _heartbeat_payload(self) -> bytes:
        """The heartbeat as `heartbeat().to_bytes()` encodes it, validated only when it can fail.

        Building and validating the pydantic model took a tenth of a heartbeat's CPU. The
        version map (replaced, never changed in place) and the error rate it implies are
        validated through the model once per release; the numbers that vary each beat
        are range-checked here, and anything out of range takes the model's path, which
        raises as it always did. The bytes come from pydantic's own serializer either way.
        """
        fields = self._heartbeat_fields()
        versions = fields["versions"]
        checked = self._checked
        if (
            checked is not None
            and checked[0] is versions
            and _TS_MIN <= fields["ts"] <= _TS_MAX
            and 0 <= fields["storage_free_mb"] <= _SMALL_COUNT_MAX
            and 0 <= fields["battery_pct"] <= _PERCENT_MAX
        ):
            return pydantic_core.to_json(fields)
        payload = protocol.Heartbeat(**fields).to_bytes()
        self._checked = (versions, fields["health"][protocol.HEALTH_TXN_ERROR_RATE])
        return payload

    async def _publish_heartbeat(self) -> None:
        await self._link.publish(self._heartbeat_topic, self._heartbeat_payload())
        self.heartbeats_sent += 1

    async def _heartbeat_loop(self) -> None:
        interval, faults = self._timing.heartbeat_s, self._faults
        # Spread the fleet's heartbeats over the interval instead of a thundering herd.
        await asyncio.sleep(self._rng.random() * interval)
        while True:
            await self._publish_heartbeat()
            await asyncio.sleep(interval)
            # Network faults are drawn here, once a beat, rather than in a task of their own.
            if faults.disconnect_per_h or faults.flap_per_h:
                await self._network_faults(interval)

    async def _network_faults(self, elapsed_s: float) -> None:
        """Drop the connection now and then, as a flaky network does, or flap it."""
        faults, rng = self._faults, self._rng
        if faults.disconnect_per_h and rng.random() < _chance(faults.disconnect_per_h, elapsed_s):
            self._stats.fault("disconnect")
            await self._drop_connection(faults.offline_s * (0.5 + rng.random()))
        if faults.flap_per_h and rng.random() < _chance(faults.flap_per_h, elapsed_s):
            self._stats.fault("flap")
            gap = faults.flap_window_s / (2 * faults.flap_count)
            for _ in range(faults.flap_count):
                await self._drop_connection(gap)
                await asyncio.sleep(gap)

    async def _drop_connection(self, offline_s: float) -> None:
        """Lose the connection without DISCONNECT (the will fires), reconnect later."""
        async with self._lifecycle:
            if self._bricked:
                return
            self._link.power_off()
            await asyncio.sleep(offline_s)
            await self._connect()
        await self._announce_or_leave_it()

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
                ts=self._now(),
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
        seen = self._seen_commands
        if command.tid != self.tid or (seen is not None and command.msg_id in seen):
            return
        if seen is None:
            seen = self._seen_commands = collections.deque(maxlen=_SEEN_COMMANDS_MAX)
        seen.append(command.msg_id)
        if command.expires_at < self._now():  # by its own clock, skewed or not
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
                if len(self._replies) >= _REPLIES_MAX:
                    logger.warning("%s: reply queue full, not repeating c%d", self.tid, cid)
                else:
                    self._replies.append(record)
                    self._start_replies()
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
        if len(self._jobs) >= _QUEUE_MAX:
            logger.warning("%s: job queue full, dropping job %d", self.tid, job)
            return False
        self._jobs.append(job)
        self._start_worker()
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
        """Send the queued repeats of final states, then end (`_start_replies`)."""
        try:
            while self._replies:
                record = self._replies.pop(0)
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
        finally:
            self._replying = False

    async def _worker_loop(self) -> None:
        """Run the queued jobs in order, then end (`_start_worker`)."""
        try:
            while self._jobs:
                await self._run_job(self._jobs.pop(0))
        finally:
            self._working = False

    async def _run_job(self, job: int) -> None:
        if job == _REBOOT:
            try:
                await self._reboot()
            except _BrickedError:
                await _forever()
            return
        if job == _RESUME:
            journal = self._journal
            if journal is not None:
                record = journal.record
                again = _Admission(record.campaign_id, record.attempt, may_postpone=False)
                await self._attempt(again, record, self._install_all(journal, resume=True))
            return
        admission = self._admitted.pop(job, None)
        if admission is None:
            return  # canceled while queued
        desired = self._latest.get(job)
        if desired is None or desired.status != "active":
            # Paused (or forgotten) since: wait for it to be active again.
            if desired is None or desired.status == "paused":
                self._hold(admission)
            return
        record = CampaignRecord(
            tid=self.tid,
            campaign_id=admission.campaign_id,
            attempt=admission.attempt,
            started_at=time.monotonic(),
            data_before=self.data_checksum,
            versions_before=dict(self._flash.versions),
        )
        if self._records is None:
            self._records = collections.deque(maxlen=_RECORDS_MAX)
        self._records.append(record)
        if self._on_record is not None:
            self._on_record(record)
        steps = self._run_update(record, desired, may_postpone=admission.may_postpone)
        await self._attempt(admission, record, steps)
        following, self._after_running = self._after_running, None
        if following is not None and following.campaign_id == job:
            self._enqueue(following)

    async def _attempt(
        self, admission: _Admission, record: CampaignRecord, steps: Coroutine[Any, Any, None]
    ) -> None:
        """Run an attempt's steps to their end (a power loss ends them without settling)."""
        self._running = admission
        self._cancel_requested = False
        try:
            await self._settle(record, steps)
        except _BrickedError:
            await _forever()  # the attempt never settles
        finally:
            self._running = None
            self._cancel_requested = False

    async def _settle(self, record: CampaignRecord, steps: Coroutine[Any, Any, None]) -> None:
        try:
            await steps
        except _CanceledError:
            logger.info("%s: c%d canceled, abandoned", self.tid, record.campaign_id)
            record.abandoned = True
            await self._emit(record, S.CANCELED, stage=record.events[-1].state.value)
            record.final_state = S.CANCELED
        except _Finished:
            pass
        # The attempt is over (a power loss or a brick propagates past this point).
        self._journal = None
        self._flash.discard_backup()
        record.finished_at = time.monotonic()
        record.data_after = self.data_checksum
        record.versions_after = dict(self._flash.versions)
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
        versions = self._flash.versions
        todo = [p for p in packages if versions.get(p.name) != p.version]
        if not todo:
            await self._finish(record, S.ALREADY_INSTALLED)
        await self._emit(record, S.QUEUED)
        if may_postpone:
            await self._maybe_postpone(record)
        elif self._battery_low():
            await self._refuse_low_battery(record, todo)
        self._check_cancel()
        await self._wait_idle(record)
        for index, package in enumerate(todo):
            self._check_cancel()
            await self._fetch(record, package, later=todo[index + 1 :])
        # The last moment a cancel is honoured: an install is never interrupted.
        self._check_cancel()
        if self._battery_low():
            await self._refuse_low_battery(record, todo)
        self._journal = _Journal(record, tuple(todo))
        await self._install_all(self._journal)

    async def _maybe_postpone(self, record: CampaignRecord) -> None:
        """The merchant (or the terminal, on a low battery) says "later" if they may."""
        if self._battery_low():
            reason, error_code = "low_battery", "LOW_BATTERY"
            detail = f"battery {self.battery_pct}% below {self._config.battery.min_install_pct}%"
        elif self.in_busy_hours():
            reason, error_code, detail = "busy_hours", None, "merchant busy selling"
        elif self._rng.random() < self._timing.postpone_probability:
            reason, error_code, detail = "merchant", None, None
        else:
            return
        self._stats.refusal(f"postponed.{reason}")
        # No final state: the controller starts a new attempt later.
        await self._emit(
            record, S.DEFERRED, stage="postponed", error_code=error_code, detail=detail
        )
        record.postponed = True
        raise _Finished

    async def _refuse_low_battery(
        self, record: CampaignRecord, todo: Sequence[PackageRef]
    ) -> NoReturn:
        self._stats.refusal("failed.low_battery")
        floor = self._config.battery.min_install_pct
        await self._finish(
            record,
            S.FAILED,
            package=todo[0].name,
            stage="install",
            error_code="LOW_BATTERY",
            detail=_detail(f"battery {self.battery_pct}% below {floor}%", todo[1:]),
        )

    async def _install_all(self, journal: _Journal, *, resume: bool = False) -> None:
        """Install the journal's packages from its current one; `resume` after a power loss."""
        record, packages = journal.record, journal.packages
        while journal.index < len(packages):
            package = packages[journal.index]
            later, first = packages[journal.index + 1 :], journal.index == 0
            if resume:
                resume = False
                await self._resume_package(journal, package, later=later, first=first)
            else:
                await self._install(record, package, later=later, first=first)
            journal.index += 1
        await self._finish(record, S.SUCCEEDED)

    async def _resume_package(
        self,
        journal: _Journal,
        package: PackageRef,
        *,
        later: Sequence[PackageRef],
        first: bool,
    ) -> None:
        """Report what a power loss left of this package's install, and go on if it took."""
        record, name = journal.record, package.name
        if self._flash.versions.get(name) == package.version:
            self._stats.recovery("resumed")
            if not self._flash.confirmed:
                # Booted into the new slot: its self-test decides, as without the loss.
                await self._emit(record, S.SELF_TESTING, package=name)
                await self._self_test(record, package, later=later, first=first)
            return
        self._stats.recovery("reported_power_loss")
        state, stage = _ON_OLD_AFTER_POWER_LOSS[journal.step]
        old = self._flash.versions.get(name, "none")
        await self._finish(
            record,
            state,
            package=name,
            stage=stage,
            error_code="POWER_LOSS",
            detail=_detail(f"power lost {journal.step.value}; {name} {old} kept", later),
        )

    def _at(self, point: PowerLossPoint) -> None:
        """Note on flash how far the install got; the power goes here if the fault says so."""
        journal = self._journal
        if journal is not None:
            journal.step = point
        if self._cut_at is point:
            self._cut_at = None
            self._stats.fault(f"power_loss.{point.value}")
            if journal is not None:
                journal.record.power_losses += (point.value,)
            logger.info("%s: power lost %s", self.tid, point.value)
            raise _PowerLossError(point)

    def _plan_power_loss(self) -> None:
        faults = self._faults
        self._cut_at = None
        if faults.power_loss_rate and self._rng.random() < faults.power_loss_rate:
            points = [p for p in PowerLossPoint if p in faults.power_loss_points]
            if points:
                self._cut_at = self._rng.choice(points)

    async def _install(
        self,
        record: CampaignRecord,
        package: PackageRef,
        *,
        later: Sequence[PackageRef],
        first: bool,
    ) -> None:
        """Back up, write the inactive slot, switch, (reboot,) self-test, confirm one package.

        A failed package is rolled back alone: the terminal keeps (or returns to) the slot
        it ran before, and its data as it was.
        """
        name, flash = package.name, self._flash
        self._plan_power_loss()
        self._at(P.AFTER_DOWNLOAD)
        await self._emit(record, S.BACKING_UP, package=name)
        flash.start_backup()
        self._at(P.DURING_BACKUP)
        flash.finish_backup()

        await self._emit(record, S.INSTALLING, package=name)
        flash.start_write()
        await asyncio.sleep(self._timing.install_s / 2)
        self._at(P.DURING_WRITE_INACTIVE_SLOT)
        await asyncio.sleep(self._timing.install_s / 2)
        if self._rng.random() < self._faults.install_fail_rate:
            # The write failed: the inactive slot stays unbootable, nothing else changed.
            self._stats.fault("install_fail")
            await self._finish(
                record,
                S.ROLLED_BACK,
                package=name,
                stage="install",
                error_code="INSTALL_FAILED",
                detail=_not_attempted(later),
            )
        flash.finish_write({**flash.versions, name: package.version})
        self._at(P.AFTER_WRITE_BEFORE_SWITCH)
        # The boot control block is written atomically: a cut lands before or after it.
        landed = self._cut_at is P.DURING_SLOT_SWITCH and self._rng.random() < 0.5
        if landed:
            flash.switch()
        self._at(P.DURING_SLOT_SWITCH)
        if not landed:
            flash.switch()
        self._at(P.AFTER_SWITCH_BEFORE_REBOOT)
        cost = self._config.battery.install_cost_pct
        if cost:
            self._battery = max(0.0, self._battery_level() - cost)
        if package.kind in _REBOOTS:
            await self._emit(record, S.REBOOTING, package=name)
            await self._reboot()
        elif self._start_software():
            # Parameters apply without a reboot, in place; a bricked release hangs there.
            self._brick()
            self._link.power_off()
            raise _BrickedError
        await self._emit(record, S.SELF_TESTING, package=name)
        await self._self_test(record, package, later=later, first=first)

    async def _self_test(
        self,
        record: CampaignRecord,
        package: PackageRef,
        *,
        later: Sequence[PackageRef],
        first: bool,
    ) -> None:
        """Test the new slot: confirm it, or roll this package alone back."""
        name, faults = package.name, self._faults
        await asyncio.sleep(self._timing.self_test_s / 2)
        self._at(P.DURING_SELF_TEST)
        await asyncio.sleep(self._timing.self_test_s / 2)
        if (
            (first and self.model in faults.self_test_fail_models)
            or faults.self_test_fail_versions.get(name) == package.version
            or self._rng.random() < faults.self_test_fail_rate
        ):
            # Back to this package's previous slot; earlier packages stay installed.
            self._stats.fault("self_test_fail")
            self._flash.roll_back()
            await self._finish(
                record,
                S.ROLLED_BACK,
                package=name,
                stage="self_test",
                error_code="SELF_TEST_FAILED",
                detail=_not_attempted(later),
            )
        self._flash.confirm()
        self._at(P.AFTER_CONFIRM)

    async def _wait_idle(self, record: CampaignRecord) -> None:
        if self._rng.random() < self._timing.busy_probability or self.in_busy_hours():
            # A sale under way (during busy hours there always is one): it finishes first.
            self._busy_until = time.monotonic() + self._timing.busy_s
        if not self._in_sale:
            return
        self._stats.refusal("deferred.busy")
        await self._emit(record, S.DEFERRED, stage="busy")
        while self._in_sale:
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
        truncate = faults.truncate_rate > 0 and rng.random() < faults.truncate_rate
        plan = DownloadPlan(
            url=package.url,
            size=package.size,
            chunk_bytes=self._timing.chunk_bytes,
            bytes_per_s=self.profile.link_bps,
            timeout_s=self._timing.http_timeout_s,
            max_attempts=faults.max_download_attempts,
            retry_s=self._timing.download_retry_s,
            drop_at=rng.randrange(1, package.size) if drop else None,
            corrupt_at=rng.randrange(package.size) if corrupt else None,
            truncate_at=rng.randrange(package.size) if truncate and package.size > 1 else None,
        )
        try:
            result = await download(plan, progress, on_fault=self._stats.fault)
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
