"""The dry-run plan: who is in which wave, who is excluded and why, and when it ends.

The ETA replays the runner's own rules minute by minute on the remaining terminals,
grouped by wave and time zone: a terminal starts only inside its zone's maintenance
window, under the rate limit and the download cap, once its wave is open; a wave opens
after the previous one reaches the success threshold and soaks. It assumes every terminal
is online, succeeds, and takes the policy's `expected_duration_s`.
"""

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet.campaigns import count_wave_bounds, judge, wave_of
from fleet.clock import Clock, as_datetime
from fleet.db.repository import Repository
from fleet.errors import NotFoundError
from fleet.policy import CampaignPolicy, TargetFilter, zone

#: The ETA's time step; the runner's rate limit counts starts per minute.
STEP_S = 60.0
_HORIZON_S = 60 * 86_400.0
_SAMPLE = 20


@dataclass(frozen=True)
class WavePlan:
    """One wave: its remaining terminals by time zone, and when it should open and end."""

    wave: int
    by_timezone: dict[str, int]
    opens_at: float | None = None
    done_at: float | None = None

    @property
    def terminals(self) -> int:
        """Terminals still to update in this wave."""
        return sum(self.by_timezone.values())


@dataclass(frozen=True)
class Plan:
    """A campaign's plan as of `now`."""

    campaign_id: int
    now: float
    waves: list[WavePlan]
    excluded: dict[str, int]
    excluded_sample: list[dict[str, str]] = field(default_factory=list)
    #: Draft only: members not yet judged (no hello); planned as taking part.
    awaiting_inventory: int = 0
    #: When the last terminal should finish; None if that is beyond the horizon (60 days).
    eta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """For JSON output."""

        def iso(ts: float | None) -> str | None:
            return None if ts is None else as_datetime(ts).isoformat()

        return {
            "campaign_id": self.campaign_id,
            "now": iso(self.now),
            "eta": iso(self.eta),
            "eta_hours": None if self.eta is None else round((self.eta - self.now) / 3600, 2),
            "waves": [
                {
                    "wave": w.wave,
                    "terminals": w.terminals,
                    "by_timezone": w.by_timezone,
                    "opens_at": iso(w.opens_at),
                    "done_at": iso(w.done_at),
                }
                for w in self.waves
            ],
            "excluded": self.excluded,
            "excluded_sample": self.excluded_sample,
            "awaiting_inventory": self.awaiting_inventory,
        }


async def plan_campaign(repo: Repository, clock: Clock, campaign_id: int) -> Plan:
    """Plan a draft campaign (targeting it read-only) or re-plan one under way."""
    now = clock.now()
    async with repo.connection() as q:
        campaign = await q.campaign(campaign_id)
        if campaign is None:
            raise NotFoundError("campaign", str(campaign_id))
        policy = CampaignPolicy.model_validate(campaign["policy"])
        target = TargetFilter.model_validate(campaign["target"])
        waves: dict[int, Counter[str]] = defaultdict(Counter)
        sample: list[dict[str, str]] = []
        if campaign["control"] == "draft":
            verdicts = await judge(q, campaign_id, policy, target)
            # Members awaiting their first hello are planned as taking part.
            taking_part = [*verdicts.included, *verdicts.awaiting]
            bounds = [w["bucket_hi"] for w in await q.campaign_waves(campaign_id)]
            if policy.waves[0].count is not None:
                bounds = count_wave_bounds(policy, [r["bucket"] for r in taking_part])
            for row in taking_part:
                waves[wave_of(row["bucket"], bounds)][row["timezone"]] += 1
            excluded_counts = dict(Counter(reason for _, reason, _ in verdicts.excluded))
            sample = [
                {"terminal": tid, "reason": reason, "detail": detail}
                for tid, reason, detail in verdicts.excluded[:_SAMPLE]
            ]
            current_wave, ready_at = 0, None
            awaiting = len(verdicts.awaiting)
        else:
            for counted in await q.plan_terminals(campaign_id):
                waves[counted["wave"]][counted["timezone"]] += counted["n"]
            excluded_counts = await q.exclusion_counts(campaign_id)
            sample = [
                {"terminal": r["terminal_id"], "reason": r["reason"], "detail": r["detail"]}
                for r in await q.exclusions(campaign_id, _SAMPLE)
            ]
            current_wave = campaign["current_wave"]
            ready_at = campaign["wave_ready_at"]
            awaiting = 0
    remaining = [dict(waves.get(n, Counter())) for n in range(1, len(policy.waves) + 1)]
    schedule = simulate(
        policy,
        remaining,
        start=now,
        current_wave=current_wave,
        ready_at=None if ready_at is None else ready_at.timestamp(),
    )
    return Plan(
        campaign_id=campaign_id,
        now=now,
        waves=[
            WavePlan(n, remaining[n - 1], schedule.opens_at.get(n), schedule.done_at.get(n))
            for n in range(1, len(remaining) + 1)
        ],
        excluded=excluded_counts,
        excluded_sample=sample,
        awaiting_inventory=awaiting,
        eta=schedule.eta,
    )


@dataclass
class Schedule:
    """What `simulate` predicts."""

    opens_at: dict[int, float] = field(default_factory=dict)
    done_at: dict[int, float] = field(default_factory=dict)
    eta: float | None = None


def simulate(
    policy: CampaignPolicy,
    remaining: list[dict[str, int]],
    *,
    start: float,
    current_wave: int = 0,
    ready_at: float | None = None,
) -> Schedule:
    """Replay admission and wave advancement from `start` in one-minute steps.

    `remaining[n-1]` maps time zone -> terminals of wave n still to finish. A draft
    campaign has `current_wave` 0: wave 1 opens at `start`.
    """
    schedule = Schedule()
    sizes = [sum(w.values()) for w in remaining]
    todo = [dict(w) for w in remaining]
    finished = [0] * len(remaining)
    running: deque[tuple[float, int]] = deque()  # (finishes at, wave), in start order
    recent: deque[float] = deque()
    opened = max(current_wave, 1)
    for n in range(1, opened + 1):
        schedule.opens_at[n] = start
    t = start
    while t <= start + _HORIZON_S:
        while running and running[0][0] <= t:
            _, wave = running.popleft()
            finished[wave - 1] += 1
            if finished[wave - 1] == sizes[wave - 1]:
                schedule.done_at[wave] = t
        for n, size in enumerate(sizes, 1):
            if size == 0 and n <= opened:
                schedule.done_at.setdefault(n, t)
        if all(f == s for f, s in zip(finished, sizes, strict=True)):
            schedule.eta = max(schedule.done_at.values(), default=t)
            return schedule
        # Waves: the runner opens the next one once this one meets the threshold and soaked.
        if opened < len(sizes):
            size = sizes[opened - 1]
            if size == 0 or finished[opened - 1] / size >= policy.success_threshold:
                ready_at = t if ready_at is None else ready_at
                if t >= ready_at + policy.waves[opened - 1].soak_s:
                    opened += 1
                    ready_at = None
                    schedule.opens_at[opened] = t
                    continue
        # Admission, as in the runner: rate over the last minute, cap on downloads.
        while recent and recent[0] <= t - 60:
            recent.popleft()
        budget = sum(sum(w.values()) for w in todo)
        if policy.rate_per_min is not None:
            budget = min(budget, policy.rate_per_min - len(recent))
        if policy.max_concurrent_downloads is not None:
            in_flight = sum(1 for end, _ in running if end > t)
            budget = min(budget, policy.max_concurrent_downloads - in_flight)
        for n in range(1, opened + 1):
            for tz in sorted(todo[n - 1]):
                if budget <= 0:
                    break
                if policy.window is not None and not policy.window.contains(
                    datetime.fromtimestamp(t, zone(tz))
                ):
                    continue
                take = min(budget, todo[n - 1][tz])
                if take == 0:
                    continue
                todo[n - 1][tz] -= take
                budget -= take
                running.extend((t + policy.expected_duration_s, n) for _ in range(take))
                recent.extend(t for _ in range(take))
        t += STEP_S
    return schedule
