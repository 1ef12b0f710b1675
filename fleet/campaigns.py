"""Campaigns: operator requests, the runner that widens waves or pauses, and status.

Operators (CLI, tests) only change rows and bump the campaign's desired revision; the
runner publishes a group's retained desired state whenever the revision it last published
differs from the database's, so a restarted controller re-publishes everything once and then
carries on from the database.
"""

import asyncio
import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from fleet import metrics
from fleet.db.repository import LiveCampaign, Queries, Repository, WaveRow
from fleet.errors import CampaignError, DatabaseUnavailableError, NotFoundError
from fleet.protocol import (
    BUCKETS,
    KIND_ORDER,
    MAX_PACKAGES,
    BucketRange,
    Command,
    CommandKind,
    DesiredState,
    MessageKind,
    PackageKind,
    PackageRef,
    desired_topic,
    new_message_id,
    now,
    terminal_topic,
)
from fleet.settings import FleetSettings
from fleet.states import FAILURE, FINAL, SUCCESS, ExecState

logger = logging.getLogger(__name__)


class Publisher(Protocol):
    """Where the controller's MQTT publishes go (the session, or a fake in unit tests)."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Publish one message and wait until the broker has it."""


# -- operator requests ------------------------------------------------------------------


def wave_bucket_limits(percentages: Sequence[float]) -> list[int]:
    """Turn cumulative wave percentages (e.g. 10, 50, 100) into bucket upper bounds."""
    if not percentages:
        raise CampaignError("bad_waves", "a campaign needs at least one wave")
    limits = [round(p * BUCKETS / 100) for p in percentages]
    if any(b <= a for a, b in itertools.pairwise(limits)) or limits[0] < 1:
        raise CampaignError("bad_waves", "wave percentages must increase and start above 0")
    if limits[-1] != BUCKETS:
        raise CampaignError("bad_waves", "the last wave must reach 100%")
    return limits


async def create_campaign(
    repo: Repository,
    *,
    name: str,
    groups: Sequence[str],
    packages: Sequence[tuple[str, str]],
    waves: Sequence[float],
    success_threshold: float,
    failure_threshold: float,
) -> int:
    """Create a draft campaign over groups, with (name, version) packages and waves in %."""
    limits = wave_bucket_limits(waves)
    if not 1 <= len(packages) <= MAX_PACKAGES:
        raise CampaignError("bad_packages", f"a campaign has 1 to {MAX_PACKAGES} packages")
    if not 0 < failure_threshold <= 1 or not 0 < success_threshold <= 1:
        raise CampaignError("bad_threshold", "thresholds are fractions in (0, 1]")
    async with repo.transaction() as q:
        package_rows = []
        for package_name, version in packages:
            row = await q.package_by_name(package_name, version)
            if row is None:
                raise NotFoundError("package", f"{package_name}={version}")
            package_rows.append(row)
        package_rows.sort(key=lambda r: KIND_ORDER[PackageKind(r["kind"])])
        campaign_id = await q.create_campaign(
            name=name,
            groups=groups,
            package_ids=[r["id"] for r in package_rows],
            wave_bucket_his=limits,
            success_threshold=success_threshold,
            failure_threshold=failure_threshold,
        )
        await q.log_campaign(
            campaign_id,
            "operator",
            "created",
            {"groups": list(groups), "waves": list(waves), "packages": [list(p) for p in packages]},
        )
    return campaign_id


_DESIRED_STATUS: dict[str, Literal["active", "paused", "canceled"]] = {
    "running": "active",
    "paused": "paused",
    "canceled": "canceled",
}


async def start_campaign(repo: Repository, campaign_id: int) -> int:
    """Start a draft campaign; return the number of executions created."""
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        busy = await q.overlapping_campaigns(campaign_id)
        if busy:
            raise CampaignError(
                "group_busy",
                f"campaign(s) {', '.join(busy)} still run on the same groups; "
                "finish, pause-and-cancel, or wait for them first",
            )
        started, count = await q.start_campaign(campaign_id)
        if not started:
            raise CampaignError("not_draft", f"campaign {campaign_id} has already been started")
        await q.log_campaign(campaign_id, "operator", "started", {"executions": count})
    return count


async def pause_campaign(repo: Repository, campaign_id: int, reason: str = "operator") -> None:
    """Stop widening and stop terminals that have not begun from beginning."""
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        if await q.set_control(campaign_id, "paused", reason, ["running"]) is None:
            raise CampaignError("not_running", f"campaign {campaign_id} is not running")
        await q.log_campaign(campaign_id, "operator", "paused", {"reason": reason})


async def resume_campaign(repo: Repository, campaign_id: int) -> None:
    """Resume a paused campaign, accepting the failures so far.

    Without that, an automatic pause would trip again on the very next tick: the failures
    that caused it are final and do not go away. Thresholds count only new failures.
    """
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        revision = await q.set_control(campaign_id, "running", None, ["paused"])
        if revision is None:
            raise CampaignError("not_paused", f"campaign {campaign_id} is not paused")
        waves = _waves(await q.wave_counts(campaign_id), current_wave=0)
        accepted = {w.wave: w.count(FAILURE) for w in waves if w.count(FAILURE)}
        await q.acknowledge_failures(campaign_id, accepted)
        await q.log_campaign(
            campaign_id, "operator", "resumed", {"acknowledged_failures": accepted}
        )


async def cancel_campaign(repo: Repository, campaign_id: int) -> None:
    """Cancel: executions not yet begun end as canceled; the rest run to their end."""
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        revision = await q.set_control(campaign_id, "canceled", "operator", ["running", "paused"])
        if revision is None:
            raise CampaignError(
                "not_cancelable", f"campaign {campaign_id} is not running or paused"
            )
        await q.cancel_pending_executions(campaign_id)
        await q.log_campaign(campaign_id, "operator", "canceled", {})


async def _require(q: Queries, campaign_id: int) -> None:
    if await q.campaign(campaign_id) is None:
        raise NotFoundError("campaign", str(campaign_id))


# -- status ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveStatus:
    """One wave's executions by state."""

    wave: int
    bucket_hi: int
    opened: bool
    counts: dict[str, int]

    @property
    def size(self) -> int:
        """Executions in this wave."""
        return sum(self.counts.values())

    def count(self, states: frozenset[ExecState]) -> int:
        """Executions in any of `states`."""
        return sum(n for state, n in self.counts.items() if state in states)


@dataclass(frozen=True)
class CampaignStatus:
    """A campaign's status, derived from its executions, never stored."""

    id: int
    name: str
    control: str
    current_wave: int
    paused_reason: str | None
    waves: list[WaveStatus]

    @property
    def totals(self) -> dict[str, int]:
        """Executions by state over all waves."""
        totals: dict[str, int] = defaultdict(int)
        for wave in self.waves:
            for state, n in wave.counts.items():
                totals[state] += n
        return dict(totals)

    @property
    def status(self) -> str:
        """draft, running, paused, canceled, or completed once every execution is final."""
        everything_final = all(
            wave.count(FINAL) == wave.size for wave in self.waves
        ) and self.current_wave == len(self.waves)
        if self.control in ("running", "canceled") and everything_final:
            return "completed" if self.control == "running" else "canceled"
        return self.control


def _waves(rows: list[WaveRow], current_wave: int) -> list[WaveStatus]:
    by_wave: dict[int, WaveStatus] = {}
    for row in rows:
        wave = by_wave.setdefault(
            row.wave,
            WaveStatus(
                wave=row.wave,
                bucket_hi=row.bucket_hi,
                opened=row.wave <= current_wave,
                counts={},
            ),
        )
        if row.state is not None:
            wave.counts[row.state] = row.n
    return [by_wave[w] for w in sorted(by_wave)]


async def campaign_status(repo: Repository, campaign_id: int) -> CampaignStatus:
    """Read a campaign's status."""
    async with repo.connection() as q:
        row = await q.campaign(campaign_id)
        if row is None:
            raise NotFoundError("campaign", str(campaign_id))
        rows = await q.wave_counts(campaign_id)
    return CampaignStatus(
        id=row["id"],
        name=row["name"],
        control=row["control"],
        current_wave=row["current_wave"],
        paused_reason=row["paused_reason"],
        waves=_waves(rows, row["current_wave"]),
    )


# -- the runner -----------------------------------------------------------------------


class CampaignRunner:
    """Publishes desired states and decides, every tick, to widen or to pause."""

    def __init__(self, repo: Repository, publisher: Publisher, settings: FleetSettings) -> None:
        """Wire the runner to the repository and the MQTT publisher."""
        self._repo = repo
        self._publisher = publisher
        self._artifact_base_url = settings.artifact_base_url.rstrip("/")
        self._tick_s = settings.campaign_tick_s
        self._cancel_grace_s = settings.cancel_grace_s
        self._execution_timeout_s = settings.execution_timeout_s
        self._published: dict[int, int] = {}
        self.ticked = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate every live campaign each tick until `stop` is set."""
        while not stop.is_set():
            try:
                await self.tick()
            except DatabaseUnavailableError as exc:
                logger.warning("campaign tick skipped: %s", exc, extra={"action": "tick_skipped"})
            self.ticked.set()
            try:
                async with asyncio.timeout(self._tick_s):
                    await stop.wait()
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Evaluate every live campaign once and publish what changed."""
        async with self._repo.connection() as q:
            campaigns = await q.live_campaigns()
        for campaign in campaigns:
            try:
                await self._expire(campaign)
                if campaign.control == "running":
                    await self._evaluate(campaign)
            except DatabaseUnavailableError:
                raise
            except Exception:
                # One broken campaign must not stop the others, nor ingest beside it.
                logger.exception(
                    "campaign %s not evaluated", campaign.name, extra={"action": "tick_failed"}
                )
        async with self._repo.connection() as q:
            campaigns = await q.live_campaigns()
        for campaign in campaigns:
            if self._published.get(campaign.id) != campaign.desired_revision:
                try:
                    await self._publish_desired(campaign.id)
                except DatabaseUnavailableError:
                    raise
                except Exception as exc:
                    # Not marked as published: the next tick tries again.
                    logger.warning(
                        "desired state of campaign %s not published: %s",
                        campaign.name,
                        exc,
                        extra={"action": "desired_publish_failed"},
                    )

    async def _expire(self, campaign: LiveCampaign) -> None:
        async with self._repo.transaction() as q:
            timed_out = await q.time_out_stale_executions(campaign.id, self._execution_timeout_s)
            canceled = await q.finish_canceling(campaign.id, self._cancel_grace_s)
            if timed_out:
                await q.log_campaign(
                    campaign.id,
                    "runner",
                    "timed_out",
                    {"terminals": timed_out[:100], "count": len(timed_out)},
                )
        if timed_out:
            metrics.CAMPAIGN_DECISIONS.labels("timed_out").inc(len(timed_out))
            logger.warning(
                "campaign %s: %d executions timed out",
                campaign.name,
                len(timed_out),
                extra={"action": "timed_out"},
            )
        if canceled:
            metrics.CAMPAIGN_DECISIONS.labels("canceled").inc(len(canceled))

    async def _evaluate(self, campaign: LiveCampaign) -> None:
        async with self._repo.connection() as q:
            waves = _waves(await q.wave_counts(campaign.id), campaign.current_wave)
        for wave in waves:
            accepted = campaign.acknowledged_failures.get(wave.wave, 0)
            counted = wave.size - accepted
            if not wave.opened or counted <= 0:
                continue
            failures = wave.count(FAILURE) - accepted
            if failures / counted > campaign.failure_threshold:
                await self._pause_on_failures(campaign, wave, failures, counted)
                return
        current = waves[campaign.current_wave - 1]
        succeeded = current.count(SUCCESS)
        # Failures an operator accepted by resuming count neither for nor against.
        counted = current.size - campaign.acknowledged_failures.get(current.wave, 0)
        ready = counted <= 0 or succeeded / counted >= campaign.success_threshold
        if ready and campaign.current_wave < campaign.wave_count:
            async with self._repo.transaction() as q:
                revision = await q.open_wave(campaign.id, campaign.current_wave + 1)
                if revision is None:
                    return
                await q.log_campaign(
                    campaign.id,
                    "runner",
                    "wave_opened",
                    {
                        "wave": campaign.current_wave + 1,
                        "previous_wave_succeeded": succeeded,
                        "previous_wave_counted": counted,
                        "success_threshold": campaign.success_threshold,
                    },
                )
            metrics.CAMPAIGN_DECISIONS.labels("wave_opened").inc()
            logger.info(
                "campaign %s: wave %d opened (%d/%d succeeded)",
                campaign.name,
                campaign.current_wave + 1,
                succeeded,
                counted,
                extra={"action": "wave_opened"},
            )

    async def _pause_on_failures(
        self, campaign: LiveCampaign, wave: WaveStatus, failures: int, counted: int
    ) -> None:
        reason = (
            f"wave {wave.wave}: {failures} of {counted} failed "
            f"({failures / counted:.1%} > {campaign.failure_threshold:.1%})"
        )
        async with self._repo.transaction() as q:
            revision = await q.set_control(campaign.id, "paused", reason, ["running"])
            if revision is None:
                return
            await q.log_campaign(
                campaign.id,
                "runner",
                "paused_on_failures",
                {
                    "wave": wave.wave,
                    "failed": failures,
                    "counted": counted,
                    "size": wave.size,
                    "failure_threshold": campaign.failure_threshold,
                    "counts": wave.counts,
                },
            )
        metrics.CAMPAIGN_DECISIONS.labels("paused_on_failures").inc()
        logger.warning(
            "campaign %s paused: %s", campaign.name, reason, extra={"action": "paused_on_failures"}
        )

    async def _publish_desired(self, campaign_id: int) -> None:
        async with self._repo.connection() as q:
            source = await q.campaign_desired(campaign_id)
        if source is None or source.revision == 0:
            return
        status = _DESIRED_STATUS[source.control]
        packages = [
            PackageRef(
                name=p["name"],
                kind=PackageKind(p["kind"]),
                version=p["version"],
                url=f"{self._artifact_base_url}/artifacts/{p['sha256']}",
                size=p["size"],
                sha256=p["sha256"],
                models=p["models"],
            )
            for p in source.packages
        ]
        for group in source.groups:
            message = DesiredState(
                group=group,
                campaign_id=source.campaign_id,
                revision=source.revision,
                status=status,
                packages=packages,
                buckets=BucketRange(lo=0, hi=source.bucket_hi),
                issued_at=now(),
            )
            await self._publisher.publish(
                desired_topic(group), message.to_bytes(), qos=1, retain=True
            )
            metrics.DESIRED_PUBLISHED.inc()
        self._published[campaign_id] = source.revision


async def send_groups(
    publisher: Publisher, terminal_id: str, groups: list[str], expiry_s: int
) -> None:
    """Tell a terminal which groups it belongs to (sent after each hello)."""
    issued = now()
    command = Command(
        msg_id=new_message_id(),
        tid=terminal_id,
        kind=CommandKind.GROUPS,
        issued_at=issued,
        expires_at=issued + expiry_s,
        groups=groups,
    )
    await publisher.publish(
        terminal_topic(terminal_id, MessageKind.CMD),
        command.to_bytes(),
        qos=1,
        expiry_s=expiry_s,
    )
    metrics.COMMANDS_PUBLISHED.labels(CommandKind.GROUPS.value).inc()
