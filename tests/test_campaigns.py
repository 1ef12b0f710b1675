"""The campaign runner's rules on a real database, with an in-memory publisher of our own."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet import campaigns
from fleet.campaigns import CampaignRunner
from fleet.db import Repository
from fleet.errors import CampaignError
from fleet.protocol import DesiredState, decode_desired, new_message_id
from fleet.settings import FleetSettings


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


def _runner(
    repo: Repository, publisher: FakePublisher, tmp_path: Path, **overrides: float
) -> CampaignRunner:
    settings = FleetSettings(artifact_dir=tmp_path, campaign_tick_s=0.1, **overrides)  # type: ignore[arg-type]
    return CampaignRunner(repo, publisher, settings)


async def _fleet(repo: Repository, count: int, group: str = "g") -> list[str]:
    ids = [f"T{n:06d}" for n in range(count)]
    async with repo.transaction() as q:
        await q.upsert_terminals([{"id": t} for t in ids])
        await q.create_group(group)
        await q.assign_group(group, ids)
        if await q.package_by_name("os", "2.0.0") is None:
            await q.add_package("os", "firmware", "2.0.0", 10, "a" * 64, ["P400"])
    return ids


async def _campaign(repo: Repository, name: str = "c", group: str = "g", **kw: object) -> int:
    campaign_id = await campaigns.create_campaign(
        repo,
        name=name,
        groups=[group],
        packages=[("os", "2.0.0")],
        waves=kw.get("waves", [50, 100]),  # type: ignore[arg-type]
        success_threshold=kw.get("success_threshold", 0.8),  # type: ignore[arg-type]
        failure_threshold=kw.get("failure_threshold", 0.2),  # type: ignore[arg-type]
    )
    await campaigns.start_campaign(repo, campaign_id)
    return campaign_id


async def _set_states(repo: Repository, campaign_id: int, wave: int, states: list[str]) -> None:
    """Move the wave's executions to final states directly, as terminals' reports would."""
    async with repo.connection() as q:
        ids = await q._conn.fetch(
            "SELECT terminal_id FROM executions WHERE campaign_id = $1 AND wave = $2"
            " AND state = 'pending' ORDER BY terminal_id",
            campaign_id,
            wave,
        )
        for row, state in zip(ids, states, strict=False):
            await q._conn.execute(
                "UPDATE executions SET state = $3, finished_at = now()"
                " WHERE campaign_id = $1 AND terminal_id = $2",
                campaign_id,
                row["terminal_id"],
                state,
            )


async def _wave_size(repo: Repository, campaign_id: int, wave: int) -> int:
    async with repo.connection() as q:
        return int(
            await q._conn.fetchval(
                "SELECT count(*) FROM executions WHERE campaign_id = $1 AND wave = $2",
                campaign_id,
                wave,
            )
        )


async def test_failures_pause_and_resume_accepts_them(repo: Repository, tmp_path: Path) -> None:
    await _fleet(repo, 100)
    campaign_id = await _campaign(repo)
    publisher = FakePublisher()
    runner = _runner(repo, publisher, tmp_path)
    await runner.tick()
    first = publisher.desired("g")[-1]
    assert (first.status, first.buckets.hi) == ("active", 5000)
    size = await _wave_size(repo, campaign_id, 1)
    failed = size // 3
    await _set_states(repo, campaign_id, 1, ["rolled_back"] * failed)
    await runner.tick()
    status = await campaigns.campaign_status(repo, campaign_id)
    assert status.status == "paused"
    assert f"{failed} of {size} failed" in (status.paused_reason or "")
    assert publisher.desired("g")[-1].status == "paused"
    async with repo.connection() as q:
        log = [r["action"] for r in await q.campaign_log(campaign_id)]
    assert log.count("paused_on_failures") == 1

    await campaigns.resume_campaign(repo, campaign_id)
    await runner.tick()
    assert (await campaigns.campaign_status(repo, campaign_id)).status == "running"
    # The rest of wave 1 succeeds: 100% of what counts, so wave 2 opens.
    await _set_states(repo, campaign_id, 1, ["succeeded"] * size)
    await runner.tick()
    status = await campaigns.campaign_status(repo, campaign_id)
    assert (status.status, status.current_wave) == ("running", 2)
    assert publisher.desired("g")[-1].buckets.hi == 10_000
    # New failures beyond the accepted ones trip the threshold again.
    wave2 = await _wave_size(repo, campaign_id, 2)
    await _set_states(repo, campaign_id, 2, ["failed"] * (wave2 // 2 + 1))
    await runner.tick()
    assert (await campaigns.campaign_status(repo, campaign_id)).status == "paused"


async def test_stale_executions_time_out_and_count_as_failures(
    repo: Repository, tmp_path: Path
) -> None:
    await _fleet(repo, 20)
    campaign_id = await _campaign(repo, waves=[100], failure_threshold=0.5)
    async with repo.connection() as q:
        await q._conn.execute(
            "UPDATE executions SET state = 'installing', updated_at = now() - interval '2 hours'"
            " WHERE campaign_id = $1 AND terminal_id IN ('T000000', 'T000001')",
            campaign_id,
        )
    await _runner(repo, FakePublisher(), tmp_path, execution_timeout_s=3600).tick()
    async with repo.connection() as q:
        states = await q.execution_states(campaign_id)
        log = await q.campaign_log(campaign_id)
    assert states["T000000"] == ("timed_out", "DEADLINE_EXCEEDED")
    assert states["T000002"] == ("pending", None)
    timed_out = [json.loads(r["detail"]) for r in log if r["action"] == "timed_out"]
    assert timed_out == [{"terminals": ["T000000", "T000001"], "count": 2}]


async def test_cancel_lets_a_first_report_in_flight_win(repo: Repository, tmp_path: Path) -> None:
    await _fleet(repo, 4)
    campaign_id = await _campaign(repo, waves=[100])
    await campaigns.cancel_campaign(repo, campaign_id)
    async with repo.transaction() as q:
        outcome = await q.record_event(
            msg_id=new_message_id(), terminal_id="T000000", campaign_id=campaign_id, seq=1,
            state="queued", progress=None, stage=None, error_code=None, detail=None,
            device_ts=1_764_000_000.0,
        )  # fmt: skip
    assert outcome.moved
    await _runner(repo, FakePublisher(), tmp_path, cancel_grace_s=0).tick()
    async with repo.connection() as q:
        states = {t: s for t, (s, _) in (await q.execution_states(campaign_id)).items()}
    assert states == {
        "T000000": "queued",
        "T000001": "canceled",
        "T000002": "canceled",
        "T000003": "canceled",
    }


async def test_one_unfinished_campaign_per_group(repo: Repository, tmp_path: Path) -> None:
    await _fleet(repo, 10)
    first = await _campaign(repo, name="first", waves=[100])
    second = await campaigns.create_campaign(
        repo, name="second", groups=["g"], packages=[("os", "2.0.0")], waves=[100],
        success_threshold=0.8, failure_threshold=0.2,
    )  # fmt: skip
    with pytest.raises(CampaignError) as caught:
        await campaigns.start_campaign(repo, second)
    assert caught.value.code == "group_busy"
    await _set_states(repo, first, 1, ["succeeded"] * 10)
    await campaigns.start_campaign(repo, second)
    publisher = FakePublisher()
    runner = _runner(repo, publisher, tmp_path)
    await runner.tick()
    # Only the newest campaign speaks for the group, even after a restart republishes all.
    assert {d.campaign_id for d in publisher.desired("g")} == {second}


async def test_create_refuses_bad_waves_and_thresholds(repo: Repository) -> None:
    await _fleet(repo, 1)
    for waves, threshold, code in (
        ([50, 40, 100], 0.2, "bad_waves"),
        ([50], 0.2, "bad_waves"),
        ([100], 0.0, "bad_threshold"),
    ):
        with pytest.raises(CampaignError) as caught:
            await campaigns.create_campaign(
                repo, name="x", groups=["g"], packages=[("os", "2.0.0")], waves=waves,
                success_threshold=0.9, failure_threshold=threshold,
            )  # fmt: skip
        assert caught.value.code == code
