"""The campaign runner's rules on a real database, with a publisher and a clock of our own.

These drive executions by writing terminal reports through the same `record_event` ingest
uses; tests/test_campaign_engine.py drives the same rules with the real simulator.
"""

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet import audit, campaigns
from fleet.clock import ManualClock, as_datetime
from fleet.db import Repository
from fleet.db.repository import EventRow
from fleet.errors import CampaignError
from fleet.policy import CampaignPolicy, TargetFilter, Wave
from fleet.protocol import (
    Command,
    CommandKind,
    DesiredState,
    decode_command,
    decode_desired,
    new_message_id,
)
from fleet.runner import CampaignRunner
from fleet.settings import FleetSettings

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC


@dataclass
class FakePublisher:
    """Records what the runner publishes (the `Publisher` seam)."""

    sent: list[tuple[str, bytes, bool]] = field(default_factory=list)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        self.sent.append((topic, payload, retain))

    def desired(self, group: str) -> list[DesiredState]:
        return [
            decode_desired(payload)
            for topic, payload, _ in self.sent
            if topic == f"fleet/v1/g/{group}/desired"
        ]

    def commands(self, kind: CommandKind) -> list[Command]:
        found = [decode_command(p) for t, p, _ in self.sent if t.endswith("/cmd")]
        return [c for c in found if c.kind == kind]


@dataclass
class Rig:
    repo: Repository
    clock: ManualClock
    publisher: FakePublisher
    runner: CampaignRunner
    seq: int = 0

    async def report(self, campaign_id: int, tid: str, state: str, **fields: Any) -> str | None:
        self.seq += 1
        async with self.repo.transaction() as q:
            outcome = await q.record_event(
                EventRow(
                    msg_id=new_message_id(),
                    terminal_id=tid,
                    campaign_id=campaign_id,
                    seq=self.seq,
                    state=state,
                    progress=fields.get("progress"),
                    stage=fields.get("stage"),
                    error_code=fields.get("error_code"),
                    detail=None,
                    device_ts=T0,
                ),
                at=as_datetime(self.clock.now()),
            )
        return outcome.new_state

    async def states(self, campaign_id: int) -> dict[str, str]:
        async with self.repo.connection() as q:
            return {t: s for t, (s, _) in (await q.execution_states(campaign_id)).items()}

    async def audit_actions(self, campaign_id: int) -> list[str]:
        async with self.repo.connection() as q:
            return [r["action"] for r in await q.campaign_audit(campaign_id)]

    async def set_online(self, ids: list[str], online: bool) -> None:
        async with self.repo.connection() as q:
            await q.set_presence(ids, [online] * len(ids), [True] * len(ids))


@pytest.fixture
def rig(repo: Repository, tmp_path: Path) -> Rig:
    clock = ManualClock(T0)
    publisher = FakePublisher()
    settings = FleetSettings(
        artifact_dir=tmp_path, campaign_tick_s=0.1, cancel_grace_s=30, enroll_every_s=0.001
    )
    return Rig(repo, clock, publisher, CampaignRunner(repo, publisher, settings, clock))


async def _fleet(rig: Rig, count: int, group: str = "g", **terminal: Any) -> list[str]:
    ids = [f"T{n:06d}" for n in range(count)]
    async with rig.repo.transaction() as q:
        await q.upsert_terminals([{"id": t, "model": "P400"} | terminal for t in ids])
        await q.create_group(group)
        await q.assign_group(group, ids)
        if await q.package_by_name("os", "2.0.0") is None:
            await q.add_package("os", "firmware", "2.0.0", 10, "a" * 64, ["P400"])
    await rig.set_online(ids, True)
    return ids


async def _campaign(
    rig: Rig, name: str = "c", group: str = "g", start: bool = True, **rules: Any
) -> int:
    policy = CampaignPolicy.model_validate(
        {
            "waves": [Wave(percent=50), Wave(percent=100)],
            "success_threshold": 0.8,
            "failure_threshold": 0.2,
            "cumulative_failure_threshold": 1.0,
            "window": None,
            "health_gate": {"enabled": False},
        }
        | rules
    )
    campaign_id = await campaigns.create_campaign(
        rig.repo, rig.clock, name=name, groups=[group], packages=[("os", "2.0.0")], policy=policy
    )
    if start:
        await campaigns.start_campaign(rig.repo, rig.clock, campaign_id)
    return campaign_id


async def _wave(rig: Rig, campaign_id: int, wave: int) -> list[str]:
    async with rig.repo.connection() as q:
        rows = await q.executions(campaign_id)
    return [r["terminal_id"] for r in rows if r["wave"] == wave]


async def _finish(rig: Rig, campaign_id: int, tids: list[str], final: str, **f: Any) -> None:
    """Walk each terminal through a whole update to `final`, as its reports would."""
    path = ["queued", "downloading", "downloaded", "verifying", "verified", "backing_up"]
    path += ["installing", "rebooting", "self_testing"]
    for tid in tids:
        for state in path:
            await rig.report(campaign_id, tid, state)
        await rig.report(campaign_id, tid, final, **f)


async def test_failures_pause_and_resume_accepts_them(rig: Rig) -> None:
    await _fleet(rig, 100)
    campaign_id = await _campaign(rig)
    await rig.runner.tick()
    assert rig.publisher.desired("g")[-1].status == "active"
    wave1 = await _wave(rig, campaign_id, 1)
    started = {c.tid for c in rig.publisher.commands(CommandKind.START)}
    assert started == set(wave1)
    failed = len(wave1) // 3
    await _finish(rig, campaign_id, wave1[:failed], "rolled_back", stage="self_test")
    await rig.runner.tick()
    status = await campaigns.campaign_status(rig.repo, campaign_id)
    assert status.status == "paused"
    assert f"{failed} of {len(wave1)} failed" in (status.paused_reason or "")
    assert rig.publisher.desired("g")[-1].status == "paused"
    async with rig.repo.connection() as q:
        trips = [
            r for r in await q.campaign_audit(campaign_id) if r["action"] == "threshold_tripped"
        ]
    assert len(trips) == 1
    assert json.loads(trips[0]["detail"])["failed"] == failed

    await campaigns.resume_campaign(rig.repo, rig.clock, campaign_id)
    await rig.runner.tick()
    assert (await campaigns.campaign_status(rig.repo, campaign_id)).status == "running"
    await _finish(rig, campaign_id, wave1[failed:], "succeeded")
    await rig.runner.tick()
    status = await campaigns.campaign_status(rig.repo, campaign_id)
    assert (status.status, status.current_wave) == ("running", 2)
    # New failures beyond the accepted ones trip the threshold again.
    await rig.runner.tick()
    wave2 = await _wave(rig, campaign_id, 2)
    await _finish(rig, campaign_id, wave2[: len(wave2) // 2 + 1], "failed", stage="install")
    await rig.runner.tick()
    assert (await campaigns.campaign_status(rig.repo, campaign_id)).status == "paused"


async def test_cumulative_threshold_aborts(rig: Rig) -> None:
    await _fleet(rig, 40)
    campaign_id = await _campaign(
        rig,
        waves=[Wave(percent=100)],
        failure_threshold=1.0,
        cumulative_failure_threshold=0.1,
        threshold_action="abort",
    )
    await rig.runner.tick()
    wave1 = await _wave(rig, campaign_id, 1)
    await _finish(rig, campaign_id, wave1[:5], "failed", stage="install")
    await rig.runner.tick()
    status = await campaigns.campaign_status(rig.repo, campaign_id)
    assert status.control == "aborted"
    assert "campaign: 5 of 40 failed" in (status.paused_reason or "")
    # Terminals told to start and still before installing are told to stop.
    await rig.runner.tick()
    # Their starts were sent but not answered: they may be in flight, so each terminal
    # is told to stop, and the execution waits out the grace period as canceling.
    cancels = {c.tid for c in rig.publisher.commands(CommandKind.CANCEL)}
    assert cancels == set(wave1[5:])
    states = await rig.states(campaign_id)
    assert {s for t, s in states.items() if t not in wave1[:5]} == {"canceling"}
    rig.clock.advance(31)
    await rig.runner.tick()
    assert {s for t, s in (await rig.states(campaign_id)).items() if t not in wave1[:5]} == {
        "canceled"
    }


async def test_phase_deadlines_time_out_and_unreachable_is_not_failed(rig: Rig) -> None:
    ids = await _fleet(rig, 4)
    campaign_id = await _campaign(
        rig,
        waves=[Wave(percent=100)],
        failure_threshold=1.0,
        deadlines={"download_s": 600, "reboot_s": 300},
        retries={"timeout": 0},
    )
    await rig.runner.tick()
    a, b, c, d = ids
    await rig.report(campaign_id, a, "queued")
    await rig.report(campaign_id, a, "downloading", progress=0)
    for state in ["queued", "downloading", "downloaded", "verifying", "verified"]:
        await rig.report(campaign_id, b, state)
    for state in ["backing_up", "installing", "rebooting"]:
        await rig.report(campaign_id, b, state)
    await rig.report(campaign_id, c, "queued")
    await rig.report(campaign_id, c, "downloading", progress=0)
    # c loses its connection while downloading: unreachable, and no deadline runs.
    await rig.set_online([c, b], False)
    rig.clock.advance(301)
    await rig.runner.tick()
    states = await rig.states(campaign_id)
    # b went silent in its reboot: the reboot deadline, not unreachable.
    assert (states[a], states[b], states[c], states[d]) == (
        "downloading",
        "timed_out",
        "unreachable",
        "pending",
    )
    rig.clock.advance(300)
    await rig.runner.tick()
    states = await rig.states(campaign_id)
    assert states[a] == "timed_out"
    assert states[c] == "unreachable"
    # c comes back and carries on from where it is.
    await rig.set_online([c], True)
    assert await rig.report(campaign_id, c, "downloaded") == "downloaded"
    async with rig.repo.connection() as q:
        rows = {r["terminal_id"]: r for r in await q.executions(campaign_id)}
    assert rows[b]["stage"] == "reboot"
    assert rows[a]["stage"] == "download"
    assert "timed_out" in await rig.audit_actions(campaign_id)
    assert "unreachable" in await rig.audit_actions(campaign_id)


async def test_retries_back_off_by_failure_class(rig: Rig) -> None:
    ids = await _fleet(rig, 2)
    campaign_id = await _campaign(
        rig,
        waves=[Wave(percent=100)],
        failure_threshold=1.0,
        retries={"download": 2, "self_test": 0, "backoff_s": 60, "backoff_factor": 2},
    )
    await rig.runner.tick()
    flaky, bad = ids
    await rig.report(campaign_id, flaky, "queued")
    assert (
        await rig.report(campaign_id, flaky, "failed", stage="download", error_code="X")
        == "retry_wait"
    )
    await _finish(rig, campaign_id, [bad], "rolled_back", stage="self_test")
    assert (await rig.states(campaign_id))[bad] == "rolled_back"
    rig.clock.advance(59)
    await rig.runner.tick()
    assert len([c for c in rig.publisher.commands(CommandKind.START) if c.tid == flaky]) == 1
    rig.clock.advance(2)
    await rig.runner.tick()
    starts = [c for c in rig.publisher.commands(CommandKind.START) if c.tid == flaky]
    assert [c.attempt for c in starts] == [1, 2]
    # The second failure waits twice as long; the third is final (two retries).
    await rig.report(campaign_id, flaky, "queued")
    await rig.report(campaign_id, flaky, "failed", stage="download", error_code="X")
    rig.clock.advance(119)
    await rig.runner.tick()
    assert len([c for c in rig.publisher.commands(CommandKind.START) if c.tid == flaky]) == 2
    rig.clock.advance(2)
    await rig.runner.tick()
    await rig.report(campaign_id, flaky, "queued")
    assert await rig.report(campaign_id, flaky, "failed", stage="download") == "failed"


async def test_rate_limit_download_cap_and_soak(rig: Rig) -> None:
    await _fleet(rig, 60)
    campaign_id = await _campaign(
        rig,
        waves=[Wave(percent=50, soak_s=600), Wave(percent=100)],
        rate_per_min=10,
        max_concurrent_downloads=15,
        success_threshold=1.0,
    )
    starts = lambda: rig.publisher.commands(CommandKind.START)  # noqa: E731
    await rig.runner.tick()
    await rig.runner.tick()
    assert len(starts()) == 10  # the rate: 10 per minute, however often it ticks
    rig.clock.advance(60)
    await rig.runner.tick()
    assert len(starts()) == 15  # the cap: 15 downloading or about to
    first = [c.tid for c in starts()[:10]]
    await _finish(rig, campaign_id, first, "succeeded")
    rig.clock.advance(60)
    await rig.runner.tick()
    assert len(starts()) == 25
    wave1 = await _wave(rig, campaign_id, 1)
    while len({c.tid for c in starts()}) < len(wave1):
        rig.clock.advance(60)
        await rig.runner.tick()
    await _finish(rig, campaign_id, [t for t in wave1 if t not in first], "succeeded")
    await rig.runner.tick()
    assert "wave_succeeded" in await rig.audit_actions(campaign_id)
    rig.clock.advance(599)
    await rig.runner.tick()
    assert (await campaigns.campaign_status(rig.repo, campaign_id)).current_wave == 1
    rig.clock.advance(2)
    await rig.runner.tick()
    assert (await campaigns.campaign_status(rig.repo, campaign_id)).current_wave == 2


async def test_windows_follow_each_terminal_time_zone(rig: Rig) -> None:
    tokyo = await _fleet(rig, 3, timezone="Asia/Tokyo")
    async with rig.repo.transaction() as q:
        await q.upsert_terminals([{"id": "B1", "model": "P400", "timezone": "Europe/Berlin"}])
        await q.assign_group("g", ["B1"])
    await rig.set_online(["B1"], True)
    # T0 is 14:13 UTC: 23:13 in Tokyo (inside 22:00-06:00), 16:13 in Berlin (outside).
    campaign_id = await _campaign(
        rig, waves=[Wave(percent=100)], window={"start": "22:00", "end": "06:00"}
    )
    await rig.runner.tick()
    assert {c.tid for c in rig.publisher.commands(CommandKind.START)} == set(tokyo)
    await _finish(rig, campaign_id, tokyo, "succeeded")
    rig.clock.advance(5 * 3600 + 40 * 60)  # 19:53 UTC: 21:53 Berlin, 04:53 Tokyo
    await rig.runner.tick()
    assert "B1" not in {c.tid for c in rig.publisher.commands(CommandKind.START)}
    rig.clock.advance(7 * 60)  # 20:00 UTC = 22:00 Berlin
    await rig.runner.tick()
    assert "B1" in {c.tid for c in rig.publisher.commands(CommandKind.START)}


async def test_cancel_lets_a_first_report_in_flight_win(rig: Rig) -> None:
    ids = await _fleet(rig, 4)
    campaign_id = await _campaign(rig, waves=[Wave(percent=100)])
    await rig.runner.tick()
    await rig.report(campaign_id, ids[1], "queued")
    await rig.report(campaign_id, ids[1], "downloading", progress=0)
    await campaigns.cancel_campaign(rig.repo, rig.clock, campaign_id)
    # T0's first report was already on its way: it wins over canceling.
    assert await rig.report(campaign_id, ids[0], "queued") == "queued"
    await rig.runner.tick()
    cancels = {c.tid for c in rig.publisher.commands(CommandKind.CANCEL)}
    assert cancels == set(ids)
    assert await rig.report(campaign_id, ids[1], "canceled", stage="downloading") == "canceled"
    rig.clock.advance(31)
    await rig.runner.tick()
    assert await rig.states(campaign_id) == {
        ids[0]: "queued",
        ids[1]: "canceled",
        ids[2]: "canceled",
        ids[3]: "canceled",
    }


async def test_one_unfinished_campaign_per_group(rig: Rig) -> None:
    ids = await _fleet(rig, 10)
    first = await _campaign(rig, name="first", waves=[Wave(percent=100)])
    second = await _campaign(rig, name="second", start=False, waves=[Wave(percent=100)])
    with pytest.raises(CampaignError) as caught:
        await campaigns.start_campaign(rig.repo, rig.clock, second)
    assert caught.value.code == "group_busy"
    await rig.runner.tick()
    await _finish(rig, first, ids, "succeeded")
    await campaigns.start_campaign(rig.repo, rig.clock, second)
    publisher = FakePublisher()
    settings = FleetSettings(campaign_tick_s=0.1)
    await CampaignRunner(rig.repo, publisher, settings, rig.clock).tick()
    # Only the newest campaign speaks for the group, even after a restart republishes all.
    assert {d.campaign_id for d in publisher.desired("g")} == {second}


async def test_targeting_excludes_with_reasons_and_enrolls_joiners(rig: Rig) -> None:
    await _fleet(rig, 6)
    async with rig.repo.transaction() as q:
        await q.upsert_terminals(
            [
                {"id": "V1", "model": "VX-690"},
                {"id": "OLD", "model": "P400", "versions": {"os": "0.9"}},
                {"id": "EU", "model": "P400", "attributes": {"region": "eu"}},
            ]
        )
        await q.assign_group("g", ["V1", "OLD", "EU"])
        await q.add_package("pay", "app", "3.0", 10, "b" * 64, ["P400"], requires={"os": "2.0.0"})
        await q.add_package(
            "os", "firmware", "2.1.0", 10, "c" * 64, ["P400", "VX-690"], from_versions=["2.0.0"]
        )
    policy = CampaignPolicy(waves=[Wave(percent=100)], window=None)
    campaign_id = await campaigns.create_campaign(
        rig.repo,
        rig.clock,
        name="bundle",
        groups=["g"],
        packages=[("pay", "3.0"), ("os", "2.0.0")],
        policy=policy,
        target=TargetFilter(models=["P400", "VX-690"], regions=None),
    )
    enrolled = await campaigns.start_campaign(rig.repo, rig.clock, campaign_id)
    # VX-690 has no os 2.0.0 build: excluded; pay 3.0 needs os 2.0.0, which the bundle
    # installs first, so the others take part.
    assert enrolled.excluded == {"incompatible_model": 1}
    assert enrolled.added == 8
    second = await campaigns.create_campaign(
        rig.repo,
        rig.clock,
        name="upgrade-path",
        groups=["g"],
        packages=[("os", "2.1.0")],
        policy=policy,
        target=TargetFilter(regions=["eu"]),
    )
    async with rig.repo.connection() as q:
        await q._conn.execute(
            "UPDATE campaigns SET control = 'canceled' WHERE id = $1", campaign_id
        )
        await q._conn.execute(
            "UPDATE executions SET state = 'canceled' WHERE campaign_id = $1", campaign_id
        )
        await q._conn.execute(
            "UPDATE terminals SET versions = '{\"os\": \"2.0.0\"}' WHERE id = 'EU'"
        )
    enrolled = await campaigns.start_campaign(rig.repo, rig.clock, second)
    assert (enrolled.added, enrolled.excluded) == (1, {"filter": 8})
    # A terminal that joins the group later is picked up on the next tick.
    async with rig.repo.transaction() as q:
        await q.upsert_terminals(
            [
                {
                    "id": "EU2",
                    "model": "P400",
                    "versions": {"os": "1.0"},
                    "attributes": {"region": "eu"},
                }
            ]
        )
        await q.assign_group("g", ["EU2"])
    await rig.runner.tick()
    async with rig.repo.connection() as q:
        reasons = {r["terminal_id"]: r["reason"] for r in await q.exclusions(second, 100)}
    assert reasons["EU2"] == "incompatible_version"
    assert "terminals_joined" in await rig.audit_actions(second)


async def test_create_refuses_bad_rules(rig: Rig) -> None:
    await _fleet(rig, 1)
    with pytest.raises(ValueError, match="grow"):
        CampaignPolicy(waves=[Wave(percent=50), Wave(percent=40), Wave(percent=100)])
    with pytest.raises(ValueError, match="100%"):
        CampaignPolicy(waves=[Wave(percent=50)])
    with pytest.raises(ValueError, match="HH:MM"):
        CampaignPolicy(window={"start": "25:00", "end": "06:00"})  # type: ignore[arg-type]
    with pytest.raises(CampaignError) as caught:
        await campaigns.create_campaign(
            rig.repo, rig.clock, name="x", groups=["g"], packages=[("os", "9")],
            policy=CampaignPolicy(),
        )  # fmt: skip
    assert caught.value.code == "not_found"


async def test_audit_chain_verifies_and_detects_a_row_altered_by_hand(rig: Rig) -> None:
    await _fleet(rig, 10)
    campaign_id = await _campaign(rig)
    await rig.runner.tick()
    await campaigns.pause_campaign(rig.repo, rig.clock, campaign_id)
    verdict = await audit.verify(rig.repo)
    assert verdict.intact
    assert verdict.entries >= 4
    async with rig.repo.connection() as q:
        # Append-only for everyone who does not switch the guard off.
        with pytest.raises(Exception, match="append-only"):
            await q._conn.execute("UPDATE audit_log SET actor = 'x' WHERE id = 2")
        async with q._conn.transaction():
            await q._conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change")
            await q._conn.execute(
                "UPDATE audit_log SET detail = replace(detail, 'operator', 'nothing')"
                " WHERE action = 'campaign_paused'"
            )
            await q._conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change")
        paused_id = await q._conn.fetchval(
            "SELECT id FROM audit_log WHERE action = 'campaign_paused'"
        )
    verdict = await audit.verify(rig.repo)
    assert not verdict.intact
    assert verdict.broken_at == paused_id
    assert verdict.problem == "content does not match its hash"


async def test_concurrent_audit_appends_keep_one_chain(rig: Rig) -> None:
    async def append(n: int) -> None:
        async with rig.repo.transaction() as q:
            await audit.append(q, at=T0 + n, actor="test", action="ping", detail={"n": n})

    await asyncio.gather(*(append(n) for n in range(20)))
    verdict = await audit.verify(rig.repo)
    assert (verdict.intact, verdict.entries) == (True, 20)


async def test_retry_outcomes_respect_the_gate_the_control_and_postponements(rig: Rig) -> None:
    ids = await _fleet(rig, 3)
    campaign_id = await _campaign(
        rig,
        waves=[Wave(percent=100)],
        failure_threshold=1.0,
        health_gate={"enabled": True},
        retries={"download": 1, "backoff_s": 10},
    )
    await rig.runner.tick()
    gated, postponer, canceled = ids
    # A retry's already_installed may be the earlier attempt's doing: it is health-checked.
    await rig.report(campaign_id, gated, "queued")
    assert await rig.report(campaign_id, gated, "failed", stage="download") == "retry_wait"
    rig.clock.advance(11)
    await rig.runner.tick()
    assert await rig.report(campaign_id, gated, "already_installed") == "health_check"
    # A postponement is not a retry: the one download retry is still there afterwards.
    await rig.report(campaign_id, postponer, "queued")
    assert await rig.report(campaign_id, postponer, "deferred", stage="postponed") == "deferred"
    rig.clock.advance(3601)
    await rig.runner.tick()
    await rig.report(campaign_id, postponer, "queued")
    assert await rig.report(campaign_id, postponer, "failed", stage="download") == "retry_wait"
    # Once the campaign is canceled, a failure is final: nothing would ever retry it.
    await rig.report(campaign_id, canceled, "queued")
    await campaigns.cancel_campaign(rig.repo, rig.clock, campaign_id)
    assert await rig.report(campaign_id, canceled, "failed", stage="download") == "failed"


async def test_a_pause_does_not_time_out_terminals_it_holds(rig: Rig) -> None:
    ids = await _fleet(rig, 2)
    campaign_id = await _campaign(rig, waves=[Wave(percent=100)], deadlines={"start_s": 600})
    await rig.runner.tick()
    await campaigns.pause_campaign(rig.repo, rig.clock, campaign_id)
    rig.clock.advance(7200)
    await rig.runner.tick()
    assert set((await rig.states(campaign_id)).values()) == {"pending"}
    await campaigns.resume_campaign(rig.repo, rig.clock, campaign_id)
    rig.clock.advance(599)
    await rig.runner.tick()
    assert set((await rig.states(campaign_id)).values()) == {"pending"}
    rig.clock.advance(2)
    await rig.runner.tick()
    assert {s for t, s in (await rig.states(campaign_id)).items() if t in ids} <= {
        "timed_out",
        "retry_wait",
    }


async def _say_hello(rig: Rig, ids: list[str]) -> None:
    """Record each terminal's first hello, as ingest would: a P400 on os 1.0.0."""
    async with rig.repo.transaction() as q:
        for tid in ids:
            await q.record_hello(
                terminal_id=tid,
                model="P400",
                versions={"os": "1.0.0"},
                merchant_id="M1",
                timezone="UTC",
                attributes={},
                boot_id=new_message_id(),
            )


async def test_members_whose_hello_lands_between_passes_are_still_enrolled(rig: Rig) -> None:
    """A campaign of members all awaiting their hello must not settle empty once they say it."""
    ids = ["H1", "H2", "H3"]
    async with rig.repo.transaction() as q:
        await q.upsert_terminals([{"id": t} for t in ids])  # provisioned, model unknown
        await q.create_group("g")
        await q.assign_group("g", ids)
        await q.add_package("os", "firmware", "2.0.0", 10, "a" * 64, ["P400"])
    settings = FleetSettings(artifact_dir=Path("unused"), enroll_every_s=3600)
    runner = CampaignRunner(rig.repo, rig.publisher, settings, rig.clock)
    campaign_id = await _campaign(rig, waves=[Wave(percent=100)])
    await runner.tick()  # the only regular enrollment pass for an hour: all still awaiting
    await _say_hello(rig, ids)
    await runner.tick()
    async with rig.repo.connection() as q:
        enrolled = [r["terminal_id"] for r in await q.executions(campaign_id)]
    assert sorted(enrolled) == ids
    status = await campaigns.campaign_status(rig.repo, campaign_id)
    assert status.totals == {"pending": 3}

    # Finished; then a provisioned terminal joins, unsettling it until its hello lands
    # between two passes again: it is enrolled like the first three.
    async with rig.repo.connection() as q:
        await q._conn.execute(
            "UPDATE executions SET state = 'succeeded', finished_at = now() WHERE campaign_id = $1",
            campaign_id,
        )
    await runner.tick()
    await runner.tick()
    async with rig.repo.transaction() as q:
        await q.upsert_terminals([{"id": "H4"}])
        await q.assign_group("g", ["H4"])
    await runner.tick()
    await _say_hello(rig, ["H4"])
    await runner.tick()
    async with rig.repo.connection() as q:
        enrolled = [r["terminal_id"] for r in await q.executions(campaign_id)]
    assert sorted(enrolled) == [*ids, "H4"]
