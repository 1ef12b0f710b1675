"""Many simulated terminals in one asyncio process, awaitable milestones and a report.

Terminals start an update only when the controller sends them a `start` command, and a
campaign may take several attempts per terminal (a postponed or failed attempt is
followed by a later `start`). The milestones therefore follow each terminal's *latest*
attempt at a campaign: a terminal counts as final once that attempt reported a final
state.
"""

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from device_sim.config import SimConfig
from device_sim.device import CampaignRecord, Terminal, TerminalProfile
from device_sim.link import BrokerIdentity, Link
from device_sim.report import build_report
from device_sim.stats import Stats
from device_sim.wire_link import WireLink
from fleet import protocol
from fleet.protocol import DesiredState, MessageKind

logger = logging.getLogger(__name__)

LinkFactory = Callable[[TerminalProfile], Link]
DesiredMatch = Callable[[DesiredState], bool]


class _StoppedError(Exception):
    """Raised inside the task group to cancel every terminal at once."""


@dataclasses.dataclass(eq=False, slots=True)
class _DesiredWaiter:
    """One `wait_desired` call: which terminals match so far, kept up to date."""

    match: DesiredMatch
    count: int
    future: asyncio.Future[None]
    matched: set[str] = dataclasses.field(default_factory=set)

    def update(self, terminal: Terminal) -> None:
        if any(self.match(d) for d in terminal.desired.values()):
            self.matched.add(terminal.tid)
        else:
            self.matched.discard(terminal.tid)
        if len(self.matched) >= self.count and not self.future.done():
            self.future.set_result(None)


def _campaign_status(campaign_id: int, status: str) -> DesiredMatch:
    def match(desired: DesiredState) -> bool:
        return desired.campaign_id == campaign_id and desired.status == status

    return match


def wire_link_factory(config: SimConfig) -> LinkFactory:
    """Return a factory of real broker links for the configured broker and secret."""

    def make(profile: TerminalProfile) -> Link:
        tid = profile.tid
        will = protocol.Presence(tid=tid, online=False, ts=protocol.now())
        return WireLink(
            BrokerIdentity(
                host=config.broker_host,
                port=config.broker_port,
                client_id=tid,
                password=protocol.derive_terminal_password(config.secret, tid),
                will_topic=protocol.terminal_topic(tid, MessageKind.PRESENCE),
                will_payload=will.to_bytes(),
                keepalive_s=config.keepalive_s,
                session_expiry_s=config.session_expiry_s,
                incoming_queue_max=config.incoming_queue_max,
            )
        )

    return make


class Simulator:
    """A slice of a fleet: `config.count` terminals sharing one event loop."""

    def __init__(self, config: SimConfig, *, link_factory: LinkFactory | None = None) -> None:
        """Build every terminal (deterministically from the config), without connecting."""
        self.config = config
        make_link = link_factory or wire_link_factory(config)
        gate = asyncio.Semaphore(config.connect_concurrency)
        #: Faults, refusals and connection times, counted by every terminal as they happen.
        self.stats = Stats()
        self.terminals: dict[str, Terminal] = {}
        for index in range(config.start, config.start + config.count):
            profile = TerminalProfile.from_config(config, index)
            self.terminals[profile.tid] = Terminal(
                profile,
                config,
                make_link(profile),
                connect_gate=gate,
                on_connected=self._connected_one,
                on_record=self._record_changed,
                on_desired=self._desired_changed,
                stats=self.stats,
            )
        self._connected = 0
        self._all_connected = asyncio.Event()
        if not self.terminals:
            self._all_connected.set()
        # Per campaign: terminals that took part, and those whose latest attempt is final.
        self._participants: collections.defaultdict[int, set[str]] = collections.defaultdict(set)
        self._final: collections.defaultdict[int, set[str]] = collections.defaultdict(set)
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._desired_waiters: list[_DesiredWaiter] = []
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._all_connected_at: float | None = None

    # -- running ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run every terminal until `stop` is set, then power them all off."""
        self._started_at = time.monotonic()
        logger.info("starting %d terminals", len(self.terminals))
        try:
            async with asyncio.TaskGroup() as tg:
                for tid, terminal in self.terminals.items():
                    tg.create_task(terminal.run(), name=f"terminal/{tid}")
                tg.create_task(self._stop_on(stop), name="simulator/stop")
        except* _StoppedError:
            logger.info("stopped")
        finally:
            self._stopped_at = time.monotonic()

    @staticmethod
    async def _stop_on(stop: asyncio.Event) -> None:
        await stop.wait()
        raise _StoppedError

    def _connected_one(self, _terminal: Terminal) -> None:
        self._connected += 1
        if self._connected >= len(self.terminals):
            self._all_connected.set()
            self._all_connected_at = time.monotonic()
        self._notify()

    def _record_changed(self, record: CampaignRecord) -> None:
        # Called for the terminal's latest attempt only: when it starts and when it ends.
        self._participants[record.campaign_id].add(record.tid)
        final = self._final[record.campaign_id]
        if record.final_state is not None:
            final.add(record.tid)
        else:
            final.discard(record.tid)
        self._notify()

    def _desired_changed(self, terminal: Terminal) -> None:
        # Only the terminal that changed is checked again: O(waiters), not O(fleet).
        for waiter in self._desired_waiters:
            waiter.update(terminal)

    def _notify(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float | None) -> None:
        if predicate():
            return
        entry = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await entry[1]
        finally:
            self._waiters.remove(entry)

    # -- what tests wait for ----------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Wait until `predicate()` holds.

        It is checked whenever a terminal connects for the first time, or an attempt
        starts, settles or leaves its terminal bricked; never by polling.

        Raises:
            TimeoutError: it did not hold in time.
        """
        await self._wait_until(predicate, timeout_s)

    @property
    def connected_count(self) -> int:
        """How many terminals have connected at least once."""
        return self._connected

    @property
    def elapsed_s(self) -> float:
        """Seconds the simulator has run (until it stopped)."""
        if self._started_at is None:
            return 0.0
        return round((self._stopped_at or time.monotonic()) - self._started_at, 3)

    @property
    def all_connected_s(self) -> float | None:
        """Seconds from the start until every terminal had connected once, if they have."""
        if self._started_at is None or self._all_connected_at is None:
            return None
        return round(self._all_connected_at - self._started_at, 3)

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until every terminal has connected once (raises TimeoutError)."""
        async with asyncio.timeout(timeout_s):
            await self._all_connected.wait()

    async def wait_final(
        self, campaign_id: int, count: int | None = None, timeout_s: float | None = None
    ) -> list[CampaignRecord]:
        """Wait until terminals' latest attempts at a campaign reported a final state.

        With `count`, wait for that many terminals; without, for every terminal that has
        taken part so far (at least one, so the wait does not end before anyone started).
        A postponed attempt is not final: its terminal waits for a later `start`. A cancel
        honoured before installing is final (`canceled`).

        Returns:
            The latest record of each terminal whose latest attempt is final.

        Raises:
            TimeoutError: not enough terminals reached a final state in time.
        """

        def done() -> bool:
            final = self._final[campaign_id]
            if count is not None:
                return len(final) >= count
            return bool(final) and final >= self._participants[campaign_id]

        await self._wait_until(done, timeout_s)
        return self.campaign_records(campaign_id)

    async def wait_terminal_final(
        self,
        tid: str,
        campaign_id: int,
        timeout_s: float | None = None,
        *,
        attempt: int | None = None,
    ) -> CampaignRecord:
        """Wait until a terminal's latest attempt (or `attempt`) reported a final state."""
        return await self._wait_record(
            tid, campaign_id, attempt, lambda r: r.final_state is not None, timeout_s
        )

    async def wait_terminal_settled(
        self,
        tid: str,
        campaign_id: int,
        timeout_s: float | None = None,
        *,
        attempt: int | None = None,
    ) -> CampaignRecord:
        """Wait until a terminal's latest attempt (or `attempt`) is final or postponed."""
        return await self._wait_record(tid, campaign_id, attempt, lambda r: r.settled, timeout_s)

    async def _wait_record(
        self,
        tid: str,
        campaign_id: int,
        attempt: int | None,
        match: Callable[[CampaignRecord], bool],
        timeout_s: float | None,
    ) -> CampaignRecord:
        terminal = self.terminals[tid]

        def done() -> bool:
            record = terminal.record(campaign_id, attempt)
            return record is not None and match(record)

        await self._wait_until(done, timeout_s)
        record = terminal.record(campaign_id, attempt)
        assert record is not None
        return record

    async def wait_desired(
        self,
        match: DesiredMatch | tuple[int, str],
        count: int | None = None,
        timeout_s: float | None = None,
    ) -> list[str]:
        """Wait until `count` terminals (default: all) hold a matching desired state.

        A terminal matches when the latest desired state it received for any group it is
        in (`Terminal.desired`) satisfies `match`: a predicate, or a `(campaign_id,
        status)` pair such as `(7, "paused")`. To wait for a revision, pass a predicate,
        e.g. ``lambda d: d.campaign_id == 7 and d.revision >= 3``. Woken by the
        terminals as messages arrive, never by polling.

        Returns:
            The ids of the matching terminals, sorted.

        Raises:
            TimeoutError: fewer than `count` matched in time.
        """
        predicate = _campaign_status(*match) if isinstance(match, tuple) else match
        needed = len(self.terminals) if count is None else count
        waiter = _DesiredWaiter(predicate, needed, asyncio.get_running_loop().create_future())
        for terminal in self.terminals.values():
            waiter.update(terminal)
        self._desired_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.future
        finally:
            self._desired_waiters.remove(waiter)
        return sorted(waiter.matched)

    def records(self) -> list[CampaignRecord]:
        """Every attempt of every terminal."""
        return [r for t in self.terminals.values() for r in t.records()]

    def campaign_records(self, campaign_id: int) -> list[CampaignRecord]:
        """Each terminal's latest attempt at a campaign, where that attempt is final."""
        found = (self.terminals[tid].record(campaign_id) for tid in self._final[campaign_id])
        return [r for r in found if r is not None]

    # -- report -----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Summarise the run (device_sim/report.py; every key in docs/simulator.md)."""
        return build_report(self)
