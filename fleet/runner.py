"""The campaign runner: every automatic decision, once per tick, on the controller's clock.

Per live campaign, in order: enroll terminals that joined its groups; end executions past
their phase deadlines, mark those whose terminal vanished unreachable, judge the health
gate, finish cancels; re-send starts to silent terminals; check the failure thresholds
(pause or abort); advance waves after their soak time; admit terminals inside their
maintenance window under the rate limit and the download cap, and send them `start`.
Every decision is made in PostgreSQL first and recorded in the audit log; a publish that
fails is repaired by the reconciler, so a crash between the two loses nothing.
"""

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Coroutine, Iterable
from datetime import timedelta
from typing import Any, Literal, Protocol

from fleet import audit, metrics
from fleet.campaigns import (
    CANCELED,
    Enrollment,
    WaveStatus,
    enroll,
    stop_campaign,
    success_share,
    wave_statuses,
)
from fleet.clock import Clock, SystemClock, as_datetime
from fleet.db.repository import Admitted, LiveCampaign, Queries, Repository
from fleet.errors import CampaignError, DatabaseUnavailableError
from fleet.policy import CampaignPolicy, TargetFilter, zone
from fleet.protocol import (
    Command,
    CommandKind,
    DesiredState,
    ErrorCode,
    MessageKind,
    PackageKind,
    PackageRef,
    desired_topic,
    new_message_id,
    now,
    terminal_topic,
)
from fleet.settings import FleetSettings
from fleet.states import FAILURE

logger = logging.getLogger(__name__)

RUNNER = "runner"
#: Terminals admitted per campaign per tick at most, so one tick stays short. (10,000
#: at once left about a fifth of a 10,000-terminal simulated fleet stuck mid-update in
#: the campaign benchmark, not yet understood; see docs/benchmarks.md.)
_ADMIT_PER_TICK = 2000
# Commands in flight at once from one runner step.
_SEND_CONCURRENCY = 500
#: Terminal ids listed in one audit entry; the count is always complete.
_AUDIT_IDS = 50

_DESIRED_STATUS = {
    "running": "active",
    "paused": "paused",
    "canceled": "canceled",
    "aborted": "canceled",
}


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


class CampaignRunner:
    """Publishes desired states and makes each campaign's automatic decisions."""

    def __init__(
        self,
        repo: Repository,
        publisher: Publisher,
        settings: FleetSettings,
        clock: Clock | None = None,
    ) -> None:
        """Wire the runner to the repository, the MQTT publisher and the clock."""
        self._repo = repo
        self._publisher = publisher
        self._clock = clock or SystemClock()
        self._artifact_base_url = settings.artifact_base_url.rstrip("/")
        self._tick_s = settings.campaign_tick_s
        self._cancel_grace_s = settings.cancel_grace_s
        self._command_expiry_s = settings.command_expiry_s
        self._enroll_every_s = settings.enroll_every_s
        self._published: dict[int, int] = {}
        # Per campaign: when members were last enrolled (monotonic), and the waves whose
        # members were then still awaiting their first hello.
        self._enrolled: dict[int, tuple[float, frozenset[int]]] = {}
        # Settled campaigns that a last enrollment pass found nothing more for; one that
        # becomes unsettled again (a member awaiting its hello) leaves the set.
        self._finished: set[int] = set()
        # Campaigns whose completion this process has checked (and recorded, if it was due).
        self._completed: set[int] = set()
        self.ticked = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate every live campaign each tick until `stop` is set."""
        while not stop.is_set():
            try:
                await self.tick()
            except DatabaseUnavailableError as exc:
                logger.warning("campaign tick skipped: %s", exc, extra={"action": "tick_skipped"})
            else:
                metrics.CAMPAIGN_TICKS.inc()
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
                await self._step(campaign)
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

    async def _step(self, campaign: LiveCampaign) -> None:
        policy = CampaignPolicy.model_validate(campaign.policy)
        if campaign.settled:
            if (
                campaign.id in self._finished
                or campaign.id not in self._enrolled
                or campaign.control not in ("running", "paused")
            ):
                await self._complete(campaign)
                return
            # A member whose hello landed after the last pass is neither awaiting its hello
            # nor enrolled, so the campaign looks settled: judge such members once before
            # believing it. Joiners after this pass find a finished campaign. Only for
            # campaigns this process saw unsettled: after a restart, an old finished
            # campaign must not start enrolling whoever joined its groups since.
            joined = await self._enroll_joiners(campaign, policy)
            if not (joined.added or joined.excluded or joined.awaiting_waves):
                self._finished.add(campaign.id)
                await self._complete(campaign)
            return
        self._finished.discard(campaign.id)
        awaiting_waves: frozenset[int] = frozenset()
        if campaign.control in ("running", "paused"):
            # A full pass over the groups' members is the costliest query of a tick (0.6 s
            # for 100,000 members here), so it runs every `enroll_every_s`, not every tick.
            last, awaiting_waves = self._enrolled.get(campaign.id, (-math.inf, frozenset()))
            if time.monotonic() - last >= self._enroll_every_s:
                awaiting_waves = (await self._enroll_joiners(campaign, policy)).awaiting_waves
                self._enrolled[campaign.id] = (time.monotonic(), awaiting_waves)
        await self._expire(campaign)
        await self._send_cancels(campaign)
        if campaign.control in ("canceled", "aborted"):
            return
        await self._reconcile(campaign, policy)
        if campaign.control != "running":
            return
        async with self._repo.connection() as q:
            waves = wave_statuses(await q.wave_counts(campaign.id), campaign.current_wave)
        if await self._check_thresholds(campaign, policy, waves):
            return
        # A wave whose members have not all said hello yet cannot be judged complete.
        if not any(w <= campaign.current_wave for w in awaiting_waves):
            await self._advance(campaign, policy, waves)
        await self._admit(campaign, policy)

    async def _audit(
        self,
        q: Queries,
        campaign: LiveCampaign,
        action: str,
        detail: dict[str, Any],
        at: float,
    ) -> None:
        """Record one automatic decision in the audit log, in the caller's transaction."""
        await audit.append(
            q, at=at, actor=RUNNER, action=action, campaign_id=campaign.id, detail=detail
        )

    async def _decide(
        self, campaign: LiveCampaign, action: str, detail: dict[str, Any], *, count: int = 1
    ) -> None:
        metrics.CAMPAIGN_DECISIONS.labels(action).inc(count)
        logger.info("campaign %s: %s %s", campaign.name, action, detail, extra={"action": action})

    # -- membership --------------------------------------------------------------------

    async def _enroll_joiners(self, campaign: LiveCampaign, policy: CampaignPolicy) -> Enrollment:
        """Enroll members not yet in the campaign; say who joined and who still awaits."""
        at = self._clock.now()
        async with self._repo.transaction() as q:
            joined: Enrollment = await enroll(
                q, campaign.id, policy, TargetFilter.model_validate(campaign.target), at
            )
            if not joined.added and not joined.excluded:
                return joined
            await self._audit(q, campaign, "terminals_joined", joined.as_detail(), at)
        await self._decide(campaign, "terminals_joined", joined.as_detail())
        return joined

    # -- what time decides -------------------------------------------------------------

    async def _expire(self, campaign: LiveCampaign) -> None:
        at = self._clock.now()
        when = as_datetime(at)
        async with self._repo.transaction() as q:
            expired = await q.expire_deadlines(campaign.id, when)
            # Only a running campaign waits for its open waves' offline terminals.
            open_waves = campaign.current_wave if campaign.control == "running" else 0
            lost = await q.mark_unreachable(campaign.id, when, open_waves)
            await q.back_online(campaign.id, when)
            judged = await q.judge_health(campaign.id, when)
            canceled = await q.finish_canceling(campaign.id, self._cancel_grace_s, when)
            decisions: list[tuple[str, dict[str, Any], int]] = []
            timed_out = [r for r in expired if r["state"] == "timed_out"]
            retried = [r for r in expired if r["state"] == "retry_wait"]
            if timed_out:
                decisions.append(("timed_out", _terminals(timed_out, "phase"), len(timed_out)))
            if retried:
                detail = _terminals(retried, "phase") | {"failure_class": "timeout"}
                decisions.append(("retry_scheduled", detail, len(retried)))
            if lost:
                decisions.append(("unreachable", _ids(lost), len(lost)))
            unhealthy = [r for r in judged if r["state"] != "succeeded"]
            if unhealthy:
                detail = {
                    "terminals": [
                        {"id": r["terminal_id"], "txn_error_rate": r["rate"], "now": r["state"]}
                        for r in unhealthy[:_AUDIT_IDS]
                    ],
                    "count": len(unhealthy),
                }
                decisions.append(("health_gate_failed", detail, len(unhealthy)))
            if canceled:
                decisions.append(("canceled_unanswered", _ids(canceled), len(canceled)))
            for action, detail, _ in decisions:
                await self._audit(q, campaign, action, detail, at)
        # Failures the controller decides itself, counted like those terminals report.
        failures = (
            (ErrorCode.DEADLINE_EXCEEDED, sum(r["state"] in FAILURE for r in expired)),
            (ErrorCode.HEALTH_DEGRADED, sum(r["state"] in FAILURE for r in judged)),
        )
        for code, n in failures:
            if n:
                metrics.UPDATE_FAILURES.labels(code.value).inc(n)
        for action, detail, count in decisions:
            await self._decide(campaign, action, detail, count=count)

    # -- cancel ------------------------------------------------------------------------

    async def _send_cancels(self, campaign: LiveCampaign) -> None:
        async with self._repo.transaction() as q:
            terminals = await q.cancels_to_send(
                campaign.id,
                as_datetime(self._clock.now()),
                whole_campaign=campaign.control in ("canceled", "aborted"),
            )
        await _all(self._command(tid, CommandKind.CANCEL, campaign.id) for tid in terminals)

    # -- the reconciler ----------------------------------------------------------------

    async def _reconcile(self, campaign: LiveCampaign, policy: CampaignPolicy) -> None:
        at = self._clock.now()
        async with self._repo.transaction() as q:
            again = await q.resends_due(
                campaign.id, as_datetime(at), policy.resend_after_s, policy.max_resends
            )
            if again:
                await self._audit(
                    q, campaign, "start_resent", _ids([a.terminal_id for a in again]), at
                )
        await self._send_starts(campaign, policy, again)

    # -- thresholds and waves ----------------------------------------------------------

    async def _check_thresholds(
        self, campaign: LiveCampaign, policy: CampaignPolicy, waves: list[WaveStatus]
    ) -> bool:
        trip: dict[str, Any] | None = None
        for wave in waves:
            accepted = campaign.acknowledged_failures.get(wave.wave, 0)
            _, counted = success_share(wave, accepted)
            failed = max(0, wave.count(FAILURE) - accepted)
            if wave.opened and counted > 0 and failed / counted > policy.failure_threshold:
                trip = {
                    "scope": f"wave {wave.wave}",
                    "failed": failed,
                    "counted": counted,
                    "threshold": policy.failure_threshold,
                    "counts": wave.counts,
                }
                break
        if trip is None:
            accepted = sum(campaign.acknowledged_failures.values())
            counted = sum(w.size - w.count(CANCELED) for w in waves) - accepted
            failed = max(0, sum(w.count(FAILURE) for w in waves) - accepted)
            if counted > 0 and failed / counted > policy.cumulative_failure_threshold:
                trip = {
                    "scope": "campaign",
                    "failed": failed,
                    "counted": counted,
                    "threshold": policy.cumulative_failure_threshold,
                }
        if trip is None:
            return False
        trip["action"] = policy.threshold_action
        reason = (
            f"{trip['scope']}: {trip['failed']} of {trip['counted']} failed "
            f"({trip['failed'] / trip['counted']:.1%} > {trip['threshold']:.1%})"
        )
        at = self._clock.now()
        control: Literal["paused", "aborted"] = (
            "aborted" if policy.threshold_action == "abort" else "paused"
        )
        try:
            async with self._repo.transaction() as q:
                await self._audit(q, campaign, "threshold_tripped", trip, at)
                await stop_campaign(q, campaign.id, control, reason, at=at, actor=RUNNER)
        except CampaignError:
            return True  # an operator paused or canceled it meanwhile
        await self._decide(campaign, "threshold_tripped", trip)
        logger.warning(
            "campaign %s %s: %s",
            campaign.name,
            "aborted" if policy.threshold_action == "abort" else "paused",
            reason,
            extra={"action": "threshold_tripped"},
        )
        return True

    async def _advance(
        self, campaign: LiveCampaign, policy: CampaignPolicy, waves: list[WaveStatus]
    ) -> None:
        if campaign.current_wave >= campaign.wave_count:
            return
        current = waves[campaign.current_wave - 1]
        succeeded, counted = success_share(
            current, campaign.acknowledged_failures.get(current.wave, 0)
        )
        if counted > 0 and succeeded / counted < policy.success_threshold:
            return
        at = self._clock.now()
        ready_at = campaign.wave_ready_at
        soak_s = policy.waves[campaign.current_wave - 1].soak_s
        facts = {
            "wave": current.wave,
            "succeeded": succeeded,
            "counted": counted,
            "success_threshold": policy.success_threshold,
            "soak_s": soak_s,
        }
        if ready_at is None:
            async with self._repo.transaction() as q:
                if not await q.mark_wave_ready(campaign.id, as_datetime(at)):
                    return
                await self._audit(q, campaign, "wave_succeeded", facts, at)
            await self._decide(campaign, "wave_succeeded", facts)
            ready_at = as_datetime(at)
        if as_datetime(at) < ready_at + timedelta(seconds=soak_s):
            return
        async with self._repo.transaction() as q:
            revision = await q.open_wave(campaign.id, campaign.current_wave + 1, as_datetime(at))
            if revision is None:
                return
            await self._audit(
                q, campaign, "wave_advanced", facts | {"opened": campaign.current_wave + 1}, at
            )
        await self._decide(campaign, "wave_advanced", facts)

    async def _complete(self, campaign: LiveCampaign) -> None:
        """Record, once, that a running campaign has nothing left to do.

        Called for settled campaigns this process finished, and (after a restart) for those
        it never saw unsettled: the guarded update makes it once per campaign, whichever
        runner gets there. Campaigns done before the webhooks migration count as recorded.
        """
        if campaign.control != "running" or campaign.id in self._completed:
            return
        at = self._clock.now()
        facts: dict[str, Any] | None = None
        async with self._repo.transaction() as q:
            if await q.mark_completed(campaign.id, as_datetime(at)):
                totals: dict[str, int] = defaultdict(int)
                for row in await q.wave_counts(campaign.id):
                    if row.state is not None:
                        totals[row.state] += row.n
                facts = {"waves": campaign.wave_count, "counts": dict(totals)}
                await self._audit(q, campaign, "campaign_completed", facts, at)
        self._completed.add(campaign.id)
        if facts is not None:
            await self._decide(campaign, "campaign_completed", facts)

    # -- admission ---------------------------------------------------------------------

    async def _admit(self, campaign: LiveCampaign, policy: CampaignPolicy) -> None:
        at = self._clock.now()
        when = as_datetime(at)
        budget = _ADMIT_PER_TICK
        async with self._repo.transaction() as q:
            if policy.rate_per_min is not None or policy.max_concurrent_downloads is not None:
                recent, downloading = await q.admission_load(campaign.id, when)
                if policy.rate_per_min is not None:
                    budget = min(budget, policy.rate_per_min - recent)
                if policy.max_concurrent_downloads is not None:
                    budget = min(budget, policy.max_concurrent_downloads - downloading)
            if budget <= 0:
                return
            open_zones: list[str] | None = None
            if policy.window is not None:
                window = policy.window
                zones = await q.admissible_timezones(campaign.id, when, campaign.current_wave)
                open_zones = [z for z in zones if window.contains(when.astimezone(zone(z)))]
                if not open_zones:
                    return
            admitted = await q.admit(campaign.id, when, campaign.current_wave, open_zones, budget)
            if not admitted:
                return
            retries = [a for a in admitted if a.attempt > 1]
            detail = _ids([a.terminal_id for a in admitted]) | {"retries": len(retries)}
            await self._audit(q, campaign, "admitted", detail, at)
        metrics.CAMPAIGN_DECISIONS.labels("admitted").inc(len(admitted))
        await self._send_starts(campaign, policy, admitted)

    async def _send_starts(
        self, campaign: LiveCampaign, policy: CampaignPolicy, admitted: list[Admitted]
    ) -> None:
        await _all(
            self._command(
                a.terminal_id,
                CommandKind.START,
                campaign.id,
                attempt=a.attempt,
                may_postpone=a.postpones < policy.max_postpones,
            )
            for a in admitted
        )

    async def _command(
        self,
        terminal_id: str,
        kind: CommandKind,
        campaign_id: int,
        *,
        attempt: int | None = None,
        may_postpone: bool | None = None,
    ) -> None:
        try:
            await send_command(
                self._publisher,
                terminal_id,
                kind,
                self._command_expiry_s,
                campaign_id=campaign_id,
                attempt=attempt,
                may_postpone=may_postpone,
            )
        except Exception as exc:
            logger.warning(
                "%s command to %s not sent: %s",
                kind.value,
                terminal_id,
                exc,
                extra={"action": "command_failed"},
            )

    # -- desired state -----------------------------------------------------------------

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
                status=status,  # type: ignore[arg-type]
                packages=packages,
                issued_at=now(),
            )
            await self._publisher.publish(
                desired_topic(group), message.to_bytes(), qos=1, retain=True
            )
            metrics.DESIRED_PUBLISHED.inc()
        self._published[campaign_id] = source.revision


def _ids(terminal_ids: list[str]) -> dict[str, Any]:
    return {"terminals": terminal_ids[:_AUDIT_IDS], "count": len(terminal_ids)}


def _terminals(rows: list[Any], key: str) -> dict[str, Any]:
    return {
        "terminals": [{"id": r["terminal_id"], key: r[key]} for r in rows[:_AUDIT_IDS]],
        "count": len(rows),
    }


async def _all(sends: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run independent sends concurrently, a slice at a time.

    Awaiting each PUBACK in turn made a wave of 10,000 starts take tens of seconds; the
    session itself keeps within the broker's receive maximum.
    """
    batch: list[Coroutine[Any, Any, None]] = []
    for send in sends:
        batch.append(send)
        if len(batch) == _SEND_CONCURRENCY:
            await asyncio.gather(*batch)
            batch = []
    if batch:
        await asyncio.gather(*batch)


async def send_command(
    publisher: Publisher,
    terminal_id: str,
    kind: CommandKind,
    expiry_s: int,
    **fields: Any,  # noqa: ANN401 - the optional fields of `Command`
) -> None:
    """Publish one command to one terminal, with a message expiry."""
    # Wire timestamps are wall-clock: the terminal checks expiry against its own clock.
    issued = now()
    command = Command(
        msg_id=new_message_id(),
        tid=terminal_id,
        kind=kind,
        issued_at=issued,
        expires_at=issued + expiry_s,
        **fields,
    )
    await publisher.publish(
        terminal_topic(terminal_id, MessageKind.CMD), command.to_bytes(), qos=1, expiry_s=expiry_s
    )
    metrics.COMMANDS_PUBLISHED.labels(kind.value).inc()


async def send_groups(
    publisher: Publisher, terminal_id: str, groups: list[str], expiry_s: int
) -> None:
    """Tell a terminal which groups it belongs to (sent after each hello)."""
    await send_command(publisher, terminal_id, CommandKind.GROUPS, expiry_s, groups=groups)
