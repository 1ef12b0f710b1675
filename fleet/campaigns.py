"""Campaigns: operator requests, enrollment of terminals, and derived status.

Operators (CLI, tests) change rows and bump the campaign's desired revision; the runner
(fleet/runner.py) does everything that happens on its own. Every request here appends to
the audit log in the same transaction as the change it records.
"""

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fleet import audit
from fleet.clock import Clock, as_datetime
from fleet.db.repository import Queries, Repository, WaveRow
from fleet.errors import CampaignError, NotFoundError
from fleet.policy import CampaignPolicy, TargetFilter
from fleet.protocol import BUCKETS, KIND_ORDER, MAX_PACKAGES, PackageKind
from fleet.states import FAILURE, FINAL, SUCCESS, ExecState
from fleet.targeting import Package, Terminal, exclusion

OPERATOR = "operator"
#: Executions that were never attempts: they count toward neither threshold.
CANCELED = frozenset({ExecState.CANCELED, ExecState.CANCELING})

# -- operator requests ------------------------------------------------------------------


def percent_bucket_limits(policy: CampaignPolicy) -> list[int]:
    """Upper bucket bound of each wave; waves by count get theirs at start."""
    if policy.waves[0].percent is None:
        return [BUCKETS] * len(policy.waves)
    limits = [round((w.percent or 0) * BUCKETS / 100) for w in policy.waves]
    if limits[0] < 1 or any(b <= a for a, b in itertools.pairwise(limits)):
        raise CampaignError("bad_waves", "waves must be at least 0.01% apart")
    return limits


async def create_campaign(
    repo: Repository,
    clock: Clock,
    *,
    name: str,
    groups: Sequence[str],
    packages: Sequence[tuple[str, str]],
    policy: CampaignPolicy,
    target: TargetFilter | None = None,
    rollback_of: int | None = None,
    actor: str = OPERATOR,
) -> int:
    """Create a draft campaign over groups, with (name, version) packages."""
    limits = percent_bucket_limits(policy)
    if not groups:
        raise CampaignError("bad_groups", "a campaign targets at least one group")
    if not 1 <= len(packages) <= MAX_PACKAGES:
        raise CampaignError("bad_packages", f"a campaign has 1 to {MAX_PACKAGES} packages")
    if len({n for n, _ in packages}) != len(packages):
        raise CampaignError("bad_packages", "a bundle holds one version of each package")
    target = target or TargetFilter()
    async with repo.transaction() as q:
        missing = sorted(set(groups) - await q.existing_groups(groups))
        if missing:
            raise NotFoundError("group", ", ".join(missing))
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
            wave_soaks=[w.soak_s for w in policy.waves],
            success_threshold=policy.success_threshold,
            failure_threshold=policy.failure_threshold,
            policy=policy.model_dump_json(),
            target=target.model_dump_json(exclude_defaults=True),
            rollback_of=rollback_of,
        )
        await audit.append(
            q,
            at=clock.now(),
            actor=actor,
            action="campaign_created",
            campaign_id=campaign_id,
            detail={
                "name": name,
                "groups": list(groups),
                "packages": [f"{r['name']}={r['version']}" for r in package_rows],
                "policy": policy.model_dump(mode="json"),
                "target": target.model_dump(mode="json", exclude_defaults=True),
                "rollback_of": rollback_of,
            },
        )
    return campaign_id


@dataclass(frozen=True)
class Enrollment:
    """Terminals a targeting pass added and left out."""

    added: int
    excluded: dict[str, int]
    #: Members whose inventory is unknown yet (no hello): targeted once it arrives.
    awaiting_inventory: int = 0
    #: The waves those members' buckets fall into: a wave is not judged while any wait.
    awaiting_waves: frozenset[int] = frozenset()

    def as_detail(self) -> dict[str, Any]:
        """For the audit log."""
        return {"added": self.added, "excluded": self.excluded}


@dataclass(frozen=True)
class Verdicts:
    """Group members not yet in a campaign, judged: in, out (and why), or not known yet."""

    included: list[dict[str, Any]]
    excluded: list[tuple[str, str, str]]
    #: Members whose inventory is unknown yet (no hello): judged once it arrives.
    awaiting: list[dict[str, Any]]


async def judge(
    q: Queries, campaign_id: int, policy: CampaignPolicy, target: TargetFilter
) -> Verdicts:
    """Judge the members of the campaign's groups that have no execution or exclusion yet.

    A member whose model and versions are not known yet is left for a later pass, after
    its first hello: judging it on guesses would exclude (or include) it wrongly.
    """
    bundle = [Package.from_row(p) for p in await q.campaign_packages(campaign_id)]
    verdicts = Verdicts([], [], [])
    for row in await q.candidates(campaign_id, target.from_campaign):
        if not row["known"]:
            verdicts.awaiting.append(row)
            continue
        verdict = exclusion(
            Terminal(
                id=row["id"],
                model=row["model"],
                merchant_id=row["merchant_id"],
                versions=row["versions"],
                attributes=row["attributes"],
            ),
            target,
            bundle,
            allow_downgrade=policy.allow_downgrade,
            in_source_campaign=row["in_source"],
        )
        if verdict is None:
            verdicts.included.append(row)
        else:
            verdicts.excluded.append((row["id"], verdict[0].value, verdict[1]))
    return verdicts


async def enroll(
    q: Queries,
    campaign_id: int,
    policy: CampaignPolicy,
    target: TargetFilter,
    at: float,
    verdicts: Verdicts | None = None,
) -> Enrollment:
    """Target the group members not yet in the campaign: executions or exclusions.

    Runs at start and on every runner tick, so a terminal that joins a group while the
    campaign is under way takes part (in the wave its bucket falls into).
    """
    if verdicts is None:
        verdicts = await judge(q, campaign_id, policy, target)
    if not (verdicts.included or verdicts.excluded or verdicts.awaiting):
        return Enrollment(0, {})
    bounds = [w["bucket_hi"] for w in await q.campaign_waves(campaign_id)]
    awaiting_waves = frozenset(wave_of(r["bucket"], bounds) for r in verdicts.awaiting)
    if not verdicts.included and not verdicts.excluded:
        return Enrollment(0, {}, len(verdicts.awaiting), awaiting_waves)
    included = [
        (row["id"], wave_of(row["bucket"], bounds), row["bucket"]) for row in verdicts.included
    ]
    when = as_datetime(at)
    if included:
        await q.add_executions(campaign_id, included, when)
    if verdicts.excluded:
        await q.add_exclusions(campaign_id, verdicts.excluded, when)
    reasons: dict[str, int] = defaultdict(int)
    for _, reason, _ in verdicts.excluded:
        reasons[reason] += 1
    return Enrollment(len(included), dict(reasons), len(verdicts.awaiting), awaiting_waves)


def wave_of(bucket: int, bounds: Sequence[int]) -> int:
    """The wave (1-based) whose bucket range holds `bucket`."""
    return next(n for n, hi in enumerate(bounds, 1) if bucket < hi)


def count_wave_bounds(policy: CampaignPolicy, buckets: Sequence[int]) -> list[int]:
    """Bucket bounds that put about each wave's count of terminals into it.

    The last wave always reaches every bucket, so later joiners fall into some wave.
    """
    ordered = sorted(buckets)
    bounds: list[int] = []
    for wave in policy.waves[:-1]:
        count = wave.count or 0
        hi = BUCKETS if count >= len(ordered) else ordered[count - 1] + 1
        bounds.append(max(hi, bounds[-1] if bounds else 1))
    return [*bounds, BUCKETS]


async def start_campaign(
    repo: Repository, clock: Clock, campaign_id: int, actor: str = OPERATOR
) -> Enrollment:
    """Start a draft campaign: target its terminals and open wave 1."""
    now = clock.now()
    async with repo.transaction() as q:
        campaign = await _require(q, campaign_id)
        busy = await q.overlapping_campaigns(campaign_id)
        if busy:
            raise CampaignError(
                "group_busy",
                f"campaign(s) {', '.join(busy)} still run on the same groups; "
                "finish, pause-and-cancel, or wait for them first",
            )
        if not await q.mark_started(campaign_id, as_datetime(now)):
            raise CampaignError("not_draft", f"campaign {campaign_id} has already been started")
        policy = CampaignPolicy.model_validate(campaign["policy"])
        target = TargetFilter.model_validate(campaign["target"])
        verdicts = await judge(q, campaign_id, policy, target)
        if policy.waves[0].count is not None:
            # Counts are of terminals taking part (those awaiting inventory likely will).
            buckets = [r["bucket"] for r in (*verdicts.included, *verdicts.awaiting)]
            await q.set_wave_bounds(campaign_id, count_wave_bounds(policy, buckets))
        enrollment = await enroll(q, campaign_id, policy, target, now, verdicts)
        await audit.append(
            q,
            at=now,
            actor=actor,
            action="campaign_started",
            campaign_id=campaign_id,
            detail=enrollment.as_detail(),
        )
    return enrollment


async def pause_campaign(
    repo: Repository,
    clock: Clock,
    campaign_id: int,
    reason: str = "operator",
    actor: str = OPERATOR,
) -> None:
    """Stop starting terminals; those already under way run to their end."""
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        await stop_campaign(q, campaign_id, "paused", reason, at=clock.now(), actor=actor)


async def resume_campaign(
    repo: Repository, clock: Clock, campaign_id: int, actor: str = OPERATOR
) -> None:
    """Resume a paused campaign, accepting the failures so far.

    Without that, an automatic pause would trip again on the very next tick: the failures
    that caused it are final and do not go away. Thresholds count only new failures.
    """
    now = clock.now()
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        revision = await q.set_control(campaign_id, "running", None, ["paused"], as_datetime(now))
        if revision is None:
            raise CampaignError("not_paused", f"campaign {campaign_id} is not paused")
        waves = wave_statuses(await q.wave_counts(campaign_id), current_wave=0)
        # Final failures only: one waiting for its retry may still succeed.
        final_failures = FAILURE & FINAL
        accepted = {w.wave: w.count(final_failures) for w in waves if w.count(final_failures)}
        await q.acknowledge_failures(campaign_id, accepted)
        await q.restart_start_phase(campaign_id, as_datetime(now))
        await audit.append(
            q,
            at=now,
            actor=actor,
            action="campaign_resumed",
            campaign_id=campaign_id,
            detail={"acknowledged_failures": {str(k): v for k, v in accepted.items()}},
        )


async def cancel_campaign(
    repo: Repository,
    clock: Clock,
    campaign_id: int,
    *,
    reason: str | None = None,
    actor: str = OPERATOR,
) -> None:
    """Cancel: nothing more starts; terminals not yet installing are told to stop.

    Executions the controller still holds end canceled at once; a terminal that is queued,
    deferred or downloading gets a cancel command and reports canceled; one already
    installing runs to its end (an install is never interrupted).
    """
    async with repo.transaction() as q:
        await _require(q, campaign_id)
        await stop_campaign(q, campaign_id, "canceled", reason, at=clock.now(), actor=actor)


async def stop_campaign(
    q: Queries,
    campaign_id: int,
    control: Literal["paused", "canceled", "aborted"],
    reason: str | None,
    *,
    at: float,
    actor: str,
) -> None:
    """Pause, cancel or abort inside the caller's transaction, and audit it there.

    The runner uses it to stop a campaign in the same transaction that records the
    threshold trip, so neither can happen without the other.
    """
    allowed_from = ["running"] if control == "paused" else ["running", "paused"]
    if await q.set_control(campaign_id, control, reason, allowed_from, as_datetime(at)) is None:
        raise CampaignError(
            "not_running" if control == "paused" else "not_cancelable",
            f"campaign {campaign_id} is not {' or '.join(allowed_from)}",
        )
    if control != "paused":
        await q.cancel_unstarted(campaign_id, as_datetime(at))
    await audit.append(
        q,
        at=at,
        actor=actor,
        action=f"campaign_{control}",
        campaign_id=campaign_id,
        detail={"reason": reason},
    )


async def exclude_model(
    repo: Repository, clock: Clock, campaign_id: int, model: str, actor: str = OPERATOR
) -> int:
    """Take a terminal model out of a campaign; return how many executions left it.

    Executions of that model not yet started leave as exclusions (reason `operator`), and
    later joiners of that model are excluded too; those under way or final stay.
    """
    now = clock.now()
    async with repo.transaction() as q:
        campaign = await _require(q, campaign_id)
        target = TargetFilter.model_validate(campaign["target"])
        if model not in target.exclude_models:
            target = target.model_copy(update={"exclude_models": [*target.exclude_models, model]})
            await q.set_target(campaign_id, target.model_dump_json(exclude_defaults=True))
        removed = await q.exclude_unstarted_of_model(campaign_id, model, as_datetime(now))
        await audit.append(
            q,
            at=now,
            actor=actor,
            action="model_excluded",
            campaign_id=campaign_id,
            detail={"model": model, "executions_removed": len(removed)},
        )
    return len(removed)


async def create_rollback(
    repo: Repository,
    clock: Clock,
    source_id: int,
    *,
    name: str,
    versions: dict[str, str] | None = None,
    policy: CampaignPolicy | None = None,
    actor: str = OPERATOR,
) -> int:
    """Create a draft campaign that takes the source campaign's terminals back.

    It targets the source's groups, limited to terminals that had an execution in it, and
    installs, for each package of the source bundle, the version those terminals ran
    before (or `versions`, when they ran several). Downgrades are allowed; terminals
    already on the old version report already_installed. A source still under way must be
    canceled first.
    """
    async with repo.connection() as q:
        source = await _require(q, source_id)
        groups = await q.campaign_groups(source_id)
        previous = await q.previous_versions(source_id)
    chosen = dict(versions or {})
    for package_name, seen in previous.items():
        if package_name in chosen:
            continue
        if len(seen) > 1:
            raise CampaignError(
                "ambiguous_rollback",
                f"terminals ran {package_name} {', '.join(sorted(seen))} before; "
                f"name the version to go back to",
            )
        chosen[package_name] = next(iter(seen))
    if not chosen:
        raise CampaignError("nothing_to_roll_back", f"campaign {source_id} changed no terminal")
    base = policy or CampaignPolicy.model_validate(source["policy"])
    return await create_campaign(
        repo,
        clock,
        name=name,
        groups=groups,
        packages=sorted(chosen.items()),
        policy=base.model_copy(update={"allow_downgrade": True}),
        target=TargetFilter(from_campaign=source_id),
        rollback_of=source_id,
        actor=actor,
    )


async def _require(q: Queries, campaign_id: int) -> dict[str, Any]:
    campaign = await q.campaign(campaign_id)
    if campaign is None:
        raise NotFoundError("campaign", str(campaign_id))
    return campaign


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
    excluded: dict[str, int] = field(default_factory=dict)

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
        """draft, running, paused, canceled, aborted, or completed once all is final."""
        return derived_status(
            self.control,
            every_wave_open=self.current_wave == len(self.waves),
            everything_final=all(wave.count(FINAL) == wave.size for wave in self.waves),
        )


def derived_status(control: str, *, every_wave_open: bool, everything_final: bool) -> str:
    """A campaign's status: its control, or completed when running with nothing left."""
    if control == "running" and every_wave_open and everything_final:
        return "completed"
    return control


def wave_statuses(rows: list[WaveRow], current_wave: int) -> list[WaveStatus]:
    """Fold per-(wave, state) counts into waves."""
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
        row = await _require(q, campaign_id)
        rows = await q.wave_counts(campaign_id)
        excluded = await q.exclusion_counts(campaign_id)
    return CampaignStatus(
        id=row["id"],
        name=row["name"],
        control=row["control"],
        current_wave=row["current_wave"],
        paused_reason=row["paused_reason"],
        waves=wave_statuses(rows, row["current_wave"]),
        excluded=excluded,
    )


def success_share(wave: WaveStatus, acknowledged: int) -> tuple[int, int]:
    """(succeeded, counted) of a wave.

    Failures an operator accepted by resuming, and canceled executions (never attempts),
    count neither way.
    """
    return wave.count(SUCCESS), wave.size - acknowledged - wave.count(CANCELED)
