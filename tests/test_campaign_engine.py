"""The campaign engine's rules, driven by the real simulator through the real broker and
database, with the controller on a `ManualClock`: windows, deadlines, soak times and
backoff pass by advancing the clock, never by sleeping.

Each test runs the controller in this event loop. `advance` moves the clock and waits for
two runner ticks (its tick counter), so every decision due at the new time has been made;
`settle` waits until no terminal holds an update the controller admitted.
"""

from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY

from device_sim.config import Faults, SimConfig
from device_sim.fleet import Simulator
from fleet import audit, campaigns, inventory
from fleet.broker_admin import BrokerAdmin
from fleet.clock import ManualClock
from fleet.db import Repository
from fleet.embedded import Mosquitto
from fleet.planning import plan_campaign
from fleet.policy import CampaignPolicy, TargetFilter, Window
from fleet.protocol import PackageKind
from fleet.states import FINAL
from tests.stack import FAST, Stack, eventually, make_settings, running, sim_config, terminal_ids

#: Thursday 2026-11-26 20:50 UTC: 05:50 in Tokyo, 21:50 in Berlin.
EVENING = datetime(2026, 11, 26, 20, 50, tzinfo=UTC).timestamp()
FINAL_VALUES = tuple(s.value for s in FINAL)


@pytest.fixture
async def stack(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    engine = Stack(
        make_settings(broker, database_url, tmp_path),
        repo,
        tmp_path,
        clock=ManualClock(EVENING),
    )
    await engine.start_controller()
    try:
        yield engine
    finally:
        await engine.stop_controller()


def _ticks() -> float:
    return REGISTRY.get_sample_value("fleet_campaign_ticks_total") or 0.0


async def ticks(count: int = 2) -> None:
    """Wait until the runner has completed `count` more ticks."""
    target = _ticks() + count

    async def ticked() -> bool:
        return _ticks() >= target

    await eventually(ticked, what=f"{count} runner ticks")


async def advance(stack: Stack, seconds: float) -> None:
    """Move the controller's clock and let the runner act on the new time."""
    assert isinstance(stack.clock, ManualClock)
    stack.clock.advance(seconds)
    await ticks()


async def settle(repo: Repository, campaign_id: int, within_s: float = 60.0) -> None:
    """Wait until no terminal holds an admitted, unfinished update of the campaign."""

    async def quiet() -> bool:
        async with repo.connection() as q:
            busy = await q._conn.fetchval(
                "SELECT count(*) FROM executions WHERE campaign_id = $1"
                " AND admitted_at IS NOT NULL AND state <> ALL($2::text[])",
                campaign_id,
                list(FINAL_VALUES),
            )
        return bool(busy == 0)

    await eventually(quiet, within_s=within_s, what="admitted terminals to finish")
    await ticks()


async def rows(repo: Repository, campaign_id: int) -> dict[str, dict[str, Any]]:
    async with repo.connection() as q:
        return {r["terminal_id"]: dict(r) for r in await q.executions(campaign_id)}


async def states(repo: Repository, campaign_id: int) -> dict[str, str]:
    return {t: r["state"] for t, r in (await rows(repo, campaign_id)).items()}


async def actions(repo: Repository, campaign_id: int) -> list[str]:
    async with repo.connection() as q:
        return [r["action"] for r in await q.campaign_audit(campaign_id)]


def config(
    broker: Mosquitto, count: int, groups: list[str], start: int = 0, **update: Any
) -> SimConfig:
    # Validated, not model_copy'd: a list of time zones becomes equal weights.
    return SimConfig.model_validate(
        dict(sim_config(broker, count, groups)) | {"start": start} | update
    )


async def test_a_release_failing_on_one_model_pauses_at_its_first_wave(
    stack: Stack, broker: Mosquitto
) -> None:
    """The issue's first scenario: pause before any later wave, exclude, resume, complete."""
    count = 120
    ids = terminal_ids(count)
    await stack.provision(ids, {"shops": ids}, model="unknown")
    await stack.add_package("os", "2.0.0", ["P400", "VX-690"])
    sim = Simulator(
        config(
            broker,
            count,
            ["shops"],
            models={"P400": 3.0, "VX-690": 1.0},
            faults=Faults(self_test_fail_models=frozenset({"VX-690"})),
        )
    )
    async with running(sim):
        await sim.wait_connected(timeout_s=60)
        await ticks()
        campaign_id = await stack.campaign(
            ["shops"],
            ("os", "2.0.0"),
            waves=[2, 10, 40, 100],
            success_threshold=0.9,
            failure_threshold=0.1,
        )
        vx = {tid for tid, t in sim.terminals.items() if t.model == "VX-690"}
        waves = {t: r["wave"] for t, r in (await rows(stack.repo, campaign_id)).items()}
        first_vx_wave = min(waves[t] for t in vx)

        async def paused() -> bool:
            status = await campaigns.campaign_status(stack.repo, campaign_id)
            return status.status == "paused"

        await eventually(paused, what="the campaign to pause")
        await settle(stack.repo, campaign_id)
        status = await campaigns.campaign_status(stack.repo, campaign_id)
        assert status.current_wave == first_vx_wave
        assert (status.paused_reason or "").startswith(f"wave {first_vx_wave}:")
        later = {t for t, w in waves.items() if w > first_vx_wave}
        assert later, "the scenario needs waves after the failing one"
        assert not [r for r in sim.records() if r.tid in later], "a later wave started"
        failed = {r.tid for r in sim.records() if r.final_state == "rolled_back"}
        assert failed
        assert failed <= vx
        assert all(r.data_intact for r in sim.records() if r.final_state is not None)

        await campaigns.exclude_model(stack.repo, stack.clock, campaign_id, "VX-690")
        await campaigns.resume_campaign(stack.repo, stack.clock, campaign_id)
        await advance(stack, 1)  # the cancel grace of executions taken out

        async def completed() -> bool:
            status = await campaigns.campaign_status(stack.repo, campaign_id)
            return status.status == "completed"

        await eventually(completed, within_s=60, what="the campaign to complete")
    final = await states(stack.repo, campaign_id)
    p400 = set(ids) - vx
    assert {final[t] for t in p400} == {"succeeded"}
    assert {sim.terminals[t].versions["os"] for t in p400} == {"2.0.0"}
    assert {sim.terminals[t].versions["os"] for t in vx} == {"1.0.0"}
    async with stack.repo.connection() as q:
        excluded = {r["terminal_id"]: r["reason"] for r in await q.exclusions(campaign_id, 500)}
    assert set(excluded.values()) <= {"operator"}
    assert set(excluded) | failed | {t for t in vx if final.get(t) == "canceled"} == vx
    log = await actions(stack.repo, campaign_id)
    assert log.count("threshold_tripped") == 1
    assert "model_excluded" in log
    assert (await audit.verify(stack.repo)).intact


async def test_three_time_zones_update_inside_their_windows_and_the_eta_holds(
    stack: Stack, broker: Mosquitto
) -> None:
    """The issue's second scenario: local windows, a rate limit, and the plan's ETA."""
    zones = ["Asia/Tokyo", "Europe/Berlin", "UTC"]
    per_zone = 20
    ids = terminal_ids(per_zone * len(zones))
    await stack.provision(ids, {"shops": ids}, model="unknown")
    await stack.add_package("os", "2.0.0", ["P400"])
    sims = [
        Simulator(config(broker, per_zone, ["shops"], start=n * per_zone, timezones=[z]))
        for n, z in enumerate(zones)
    ]
    async with running(sims[0]), running(sims[1]), running(sims[2]):
        for sim in sims:
            await sim.wait_connected(timeout_s=60)
        await ticks()
        window = Window(start="22:00", end="06:00")
        campaign_id = await stack.campaign(
            ["shops"],
            ("os", "2.0.0"),
            waves=[100],
            start=False,
            window=window,
            rate_per_min=5,
            expected_duration_s=60,
        )
        plan = await plan_campaign(stack.repo, stack.clock, campaign_id)
        assert plan.waves[0].by_timezone == dict.fromkeys(zones, per_zone)
        assert plan.eta is not None
        started = stack.clock.now()
        await campaigns.start_campaign(stack.repo, stack.clock, campaign_id)
        await ticks()
        for _ in range(24 * 60):
            await settle(stack.repo, campaign_id)
            current = await states(stack.repo, campaign_id)
            if set(current.values()) == {"succeeded"}:
                break
            await advance(stack, 60)
        done = await rows(stack.repo, campaign_id)
    assert {r["state"] for r in done.values()} == {"succeeded"}
    zone_of = {tid: zones[n // per_zone] for n, tid in enumerate(ids)}
    for tid, row in done.items():
        local = row["admitted_at"].astimezone(ZoneInfo(zone_of[tid]))
        assert window.contains(local), f"{tid} started at {local} local time"
    per_minute = Counter(r["admitted_at"] for r in done.values())
    assert max(per_minute.values()) <= 5
    finished = max(r["finished_at"].timestamp() for r in done.values())
    actual, predicted = finished - started, plan.eta - started
    assert actual > 3600, "the UTC terminals had to wait for their window"
    assert abs(predicted - actual) <= 0.1 * actual, (predicted, actual)


async def test_ordered_bundle_stops_at_the_failed_step_and_dependencies_exclude(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(6)
    await stack.provision(ids, {"bundle": ids[:4], "app-only": ids[4:]})
    await stack.add_package("os", "2.0.0", ["P400"])
    await stack.add_package(
        "pay", "3.0.0", ["P400"], kind=PackageKind.APP, requires={"os": "2.0.0"}
    )
    await stack.add_package("cfg", "7", ["P400"], kind=PackageKind.PARAMS)
    faults = Faults(self_test_fail_versions={"pay": "3.0.0"})
    sim = Simulator(
        config(
            broker,
            6,
            ["bundle"],
            initial_versions={"os": "1.0.0", "pay": "2.0.0", "cfg": "6"},
            group_map={t: ["app-only"] for t in ids[4:]},
            faults=faults,
        )
    )
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        bundle = await stack.campaign(
            ["bundle"],
            [("cfg", "7"), ("pay", "3.0.0"), ("os", "2.0.0")],
            waves=[100],
            failure_threshold=1.0,
            name="bundle",
        )
        await sim.wait_final(bundle, 4, timeout_s=60)
        await settle(stack.repo, bundle)
        # pay 3.0.0 needs os >= 2.0.0, which these terminals do not have and the bundle
        # does not bring: excluded before anything is sent to them.
        app_only = await stack.campaign(["app-only"], ("pay", "3.0.0"), waves=[100], name="app")
    done = await rows(stack.repo, bundle)
    for tid in ids[:4]:
        row = done[tid]
        assert (row["state"], row["stage"], row["package"]) == ("rolled_back", "self_test", "pay")
        assert "not attempted: cfg" in row["detail"]
        assert sim.terminals[tid].versions == {"os": "2.0.0", "pay": "2.0.0", "cfg": "6"}
        record = sim.terminals[tid].record(bundle)
        assert record is not None
        assert record.data_intact
        order = [e.package for e in record.events if e.state == "installing"]
        assert order == ["os", "pay"]
    async with stack.repo.connection() as q:
        excluded = await q.exclusions(app_only, 10)
    assert {r["terminal_id"]: r["reason"] for r in excluded} == dict.fromkeys(
        ids[4:], "unmet_dependency"
    )


async def test_health_gate_and_a_release_that_never_boots(stack: Stack, broker: Mosquitto) -> None:
    ids = terminal_ids(12)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    fast = FAST.model_copy(update={"heartbeat_s": 0.5})
    healthy = Simulator(config(broker, 4, ["g"], timing=fast))
    degraded = Simulator(
        config(
            broker,
            4,
            ["g"],
            start=4,
            timing=fast,
            faults=Faults(degraded_versions={"os": "2.0.0"}),
        )
    )
    bricked = Simulator(
        config(
            broker,
            4,
            ["g"],
            start=8,
            timing=fast,
            faults=Faults(bricked_versions={"os": "2.0.0"}),
        )
    )
    async with running(healthy), running(degraded), running(bricked):
        for sim in (healthy, degraded, bricked):
            await sim.wait_connected(timeout_s=30)
        await ticks(4)  # a heartbeat of each: the baseline error rate
        campaign_id = await stack.campaign(
            ["g"], ("os", "2.0.0"), waves=[100], failure_threshold=1.0, retries={"timeout": 0}
        )

        async def judged() -> bool:
            current = await states(stack.repo, campaign_id)
            return [current[t] for t in ids[:8]] == ["succeeded"] * 4 + ["failed"] * 4

        await eventually(judged, what="the health gate to judge")
        current = await states(stack.repo, campaign_id)
        # Rebooted into a release that never comes back: silent, yet not "unreachable".
        assert {current[t] for t in ids[8:]} == {"rebooting"}
        await advance(stack, 601)
    done = await rows(stack.repo, campaign_id)
    for tid in ids[4:8]:
        assert (done[tid]["stage"], done[tid]["error_code"]) == ("health", "HEALTH_DEGRADED")
        assert degraded.terminals[tid].record(campaign_id).final_state == "succeeded"  # type: ignore[union-attr]
    for tid in ids[8:]:
        assert (done[tid]["state"], done[tid]["stage"]) == ("timed_out", "reboot")
    assert {"health_gate_failed", "timed_out"} <= set(await actions(stack.repo, campaign_id))


async def test_unreachable_terminal_resumes_and_the_reconciler_resends(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(3)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"], size=400_000)
    slow = FAST.model_copy(update={"download_bps": 100_000, "chunk_bytes": 8192})
    first = Simulator(config(broker, 3, ["g"], timing=slow))
    async with running(first):
        await first.wait_connected(timeout_s=30)
        await ticks()
        campaign_id = await stack.campaign(
            ["g"], ("os", "2.0.0"), waves=[100], resend_after_s=120, failure_threshold=1.0
        )

        async def downloading() -> bool:
            return set((await states(stack.repo, campaign_id)).values()) == {"downloading"}

        await eventually(downloading, what="every terminal to download")
    # The whole simulator powered off mid-download: the terminals are unreachable, not
    # failed, and no deadline runs while they are away.
    await ticks()

    async def unreachable() -> bool:
        return set((await states(stack.repo, campaign_id)).values()) == {"unreachable"}

    await eventually(unreachable, what="executions to become unreachable")
    await advance(stack, 7200)
    assert set((await states(stack.repo, campaign_id)).values()) == {"unreachable"}
    # They come back with no memory of the update (a fresh boot): the reconciler sends the
    # start again, and they carry on to the end.
    second = Simulator(config(broker, 3, ["g"]))
    async with running(second):
        await second.wait_connected(timeout_s=30)
        await ticks()
        await advance(stack, 121)
        await second.wait_final(campaign_id, 3, timeout_s=60)
        await settle(stack.repo, campaign_id)
    done = await rows(stack.repo, campaign_id)
    assert {r["state"] for r in done.values()} == {"succeeded"}
    assert {r["attempt"] for r in done.values()} == {1}
    log = await actions(stack.repo, campaign_id)
    assert "unreachable" in log
    assert "start_resent" in log


async def test_retries_back_off_and_wait_for_the_next_window(
    stack: Stack, broker: Mosquitto
) -> None:
    # 05:55 in Tokyo: five minutes of window left.
    assert isinstance(stack.clock, ManualClock)
    ids = terminal_ids(2)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    sim = Simulator(
        config(
            broker,
            2,
            ["g"],
            timezones=["Asia/Tokyo"],
            faults=Faults(corrupt_rate=1.0),
        )
    )
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        stack.clock.advance(5 * 60)  # 20:55 UTC = 05:55 in Tokyo
        campaign_id = await stack.campaign(
            ["g"],
            ("os", "2.0.0"),
            waves=[100],
            failure_threshold=1.0,
            window={"start": "22:00", "end": "06:00"},
            retries={"verify": 1, "backoff_s": 600},
        )
        await sim.wait_final(campaign_id, 2, timeout_s=30)
        await settle(stack.repo, campaign_id)
        assert set((await states(stack.repo, campaign_id)).values()) == {"retry_wait"}
        await advance(stack, 601)  # the backoff is over, but it is 06:05 in Tokyo
        assert set((await states(stack.repo, campaign_id)).values()) == {"retry_wait"}
        await advance(stack, 16 * 3600 - 10 * 60)  # 21:55 local
        assert set((await states(stack.repo, campaign_id)).values()) == {"retry_wait"}
        await advance(stack, 5 * 60)  # 22:00 local: the window opens
        for tid in ids:
            await sim.wait_terminal_final(tid, campaign_id, timeout_s=30, attempt=2)
        await settle(stack.repo, campaign_id)
    done = await rows(stack.repo, campaign_id)
    assert {(r["state"], r["stage"], r["attempt"]) for r in done.values()} == {
        ("failed", "verify", 2)
    }
    assert "retry_scheduled" in await actions(stack.repo, campaign_id)


async def test_merchants_postpone_until_the_update_is_forced(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(3)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    always = FAST.model_copy(update={"postpone_probability": 1.0})
    sim = Simulator(config(broker, 3, ["g"], timing=always))
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        campaign_id = await stack.campaign(
            ["g"], ("os", "2.0.0"), waves=[100], max_postpones=2, postpone_delay_s=900
        )
        for attempt in (1, 2):
            for tid in ids:
                record = await sim.wait_terminal_settled(
                    tid, campaign_id, timeout_s=30, attempt=attempt
                )
                assert record.postponed
            await settle(stack.repo, campaign_id)
            await advance(stack, 899)
            assert set((await states(stack.repo, campaign_id)).values()) == {"deferred"}
            await advance(stack, 2)
        records = await sim.wait_final(campaign_id, 3, timeout_s=30)
        await settle(stack.repo, campaign_id)
    assert {(r.attempt, r.final_state) for r in records} == {(3, "succeeded")}
    done = await rows(stack.repo, campaign_id)
    assert {(r["state"], r["postpones"]) for r in done.values()} == {("succeeded", 2)}


async def test_rate_limit_and_download_cap_hold_on_the_terminals(
    stack: Stack, broker: Mosquitto
) -> None:
    count = 24
    ids = terminal_ids(count)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"], size=200_000)
    timing = FAST.model_copy(update={"download_bps": 1_000_000})
    sim = Simulator(config(broker, count, ["g"], timing=timing))
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        campaign_id = await stack.campaign(
            ["g"], ("os", "2.0.0"), waves=[100], rate_per_min=10, max_concurrent_downloads=4
        )
        minutes = 0
        while len(sim.campaign_records(campaign_id)) < count:
            await settle(stack.repo, campaign_id)
            if len(sim.campaign_records(campaign_id)) == count:
                break
            await advance(stack, 60)
            minutes += 1
            assert minutes < 10
    done = await rows(stack.repo, campaign_id)
    per_minute = Counter(r["admitted_at"] for r in done.values())
    # 24 terminals at most 10 a minute: at least three minutes of starts.
    assert max(per_minute.values()) <= 10
    assert len(per_minute) >= 3
    # On the terminals' own clocks: never more than 4 downloading at once.
    spans = []
    for record in sim.campaign_records(campaign_id):
        started = next(e.ts for e in record.events if e.state == "downloading")
        ended = next(e.ts for e in record.events if e.state == "verified")
        spans.append((started, ended))
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running_now = peak = 0
    for _, step in edges:
        running_now += step
        peak = max(peak, running_now)
    assert 1 < peak <= 4


async def test_waves_by_count_soak_before_the_next(stack: Stack, broker: Mosquitto) -> None:
    ids = terminal_ids(20)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    sim = Simulator(config(broker, 20, ["g"]))
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        campaign_id = await campaigns.create_campaign(
            stack.repo,
            stack.clock,
            name="by-count",
            groups=["g"],
            packages=[("os", "2.0.0")],
            policy=_policy(waves=[{"count": 5, "soak_s": 3600}, {"count": 20}]),
        )
        await campaigns.start_campaign(stack.repo, stack.clock, campaign_id)
        await sim.wait_final(campaign_id, 5, timeout_s=30)
        await settle(stack.repo, campaign_id)
        waves = Counter(r["wave"] for r in (await rows(stack.repo, campaign_id)).values())
        assert waves == {1: 5, 2: 15}
        await advance(stack, 3599)
        assert (await campaigns.campaign_status(stack.repo, campaign_id)).current_wave == 1
        assert len(sim.records()) == 5
        await advance(stack, 2)
        await sim.wait_final(campaign_id, 20, timeout_s=30)
        await settle(stack.repo, campaign_id)
    status = await campaigns.campaign_status(stack.repo, campaign_id)
    assert status.status == "completed"
    assert {"wave_succeeded", "wave_advanced"} <= set(await actions(stack.repo, campaign_id))


def _policy(**rules: Any) -> CampaignPolicy:
    return CampaignPolicy.model_validate({"window": None} | rules)


async def test_cancel_stops_downloads_lets_installs_finish_and_ends_the_rest(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(9)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"], size=300_000)
    installing = Simulator(
        config(
            broker,
            3,
            ["g"],
            timing=FAST.model_copy(update={"install_s": 3.0}),
        )
    )
    downloading = Simulator(
        config(
            broker,
            3,
            ["g"],
            start=3,
            timing=FAST.model_copy(update={"download_bps": 20_000, "chunk_bytes": 4096}),
        )
    )
    async with running(installing), running(downloading):
        await installing.wait_connected(timeout_s=30)
        await downloading.wait_connected(timeout_s=30)
        await ticks()
        # ids[6:] never connect: the controller holds them, unadmitted.
        campaign_id = await stack.campaign(["g"], ("os", "2.0.0"), waves=[100])

        async def mid_way() -> bool:
            current = await states(stack.repo, campaign_id)
            return [current[t] for t in ids[:6]] == ["installing"] * 3 + ["downloading"] * 3

        await eventually(mid_way, what="three installing and three downloading")
        await campaigns.cancel_campaign(stack.repo, stack.clock, campaign_id)
        await installing.wait_final(campaign_id, 3, timeout_s=30)
        await downloading.wait_final(campaign_id, 3, timeout_s=30)
        await settle(stack.repo, campaign_id)
    current = await states(stack.repo, campaign_id)
    assert [current[t] for t in ids] == ["succeeded"] * 3 + ["canceled"] * 6
    assert {downloading.terminals[t].versions["os"] for t in ids[3:6]} == {"1.0.0"}
    assert all(r.data_intact for r in downloading.records())
    assert (await campaigns.campaign_status(stack.repo, campaign_id)).status == "canceled"


async def test_rollback_campaign_takes_terminals_back(stack: Stack, broker: Mosquitto) -> None:
    ids = terminal_ids(6)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    await stack.add_package("os", "1.0.0", ["P400"])
    sim = Simulator(config(broker, 6, ["g"]))
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        forward = await stack.campaign(["g"], ("os", "2.0.0"), waves=[100], name="forward")
        await sim.wait_final(forward, 6, timeout_s=30)
        await settle(stack.repo, forward)
        back = await campaigns.create_rollback(
            stack.repo, stack.clock, forward, name="back", policy=_policy()
        )
        await campaigns.start_campaign(stack.repo, stack.clock, back)
        await sim.wait_final(back, 6, timeout_s=30)
        await settle(stack.repo, back)
    assert {t.versions["os"] for t in sim.terminals.values()} == {"1.0.0"}
    assert set((await states(stack.repo, back)).values()) == {"succeeded"}
    async with stack.repo.connection() as q:
        campaign = await q.campaign(back)
    assert campaign is not None
    assert campaign["rollback_of"] == forward
    assert campaign["policy"]["allow_downgrade"] is True


async def test_filter_and_terminals_that_join_during_the_campaign(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(8)
    regions = {t: "eu" if n % 2 == 0 else "us" for n, t in enumerate(ids)}
    await stack.provision(ids[:6], {"g": ids[:6]}, attributes=lambda t: {"region": regions[t]})
    await stack.provision(ids[6:], {}, attributes=lambda t: {"region": regions[t]})
    await stack.add_package("os", "2.0.0", ["P400"])
    sim = Simulator(config(broker, 8, ["g"], group_map={t: [] for t in ids[6:]}))
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        campaign_id = await stack.campaign(
            ["g"], ("os", "2.0.0"), waves=[100], target=TargetFilter(regions=["eu"])
        )
        await sim.wait_final(campaign_id, 3, timeout_s=30)
        # Two more terminals join the group while the campaign runs.
        async with BrokerAdmin.from_settings(stack.settings) as admin:
            await inventory.assign_group(stack.repo, admin, "g", ids[6:])
        await sim.wait_final(campaign_id, 4, timeout_s=30)
        await settle(stack.repo, campaign_id)
    eu = {t for t in ids if regions[t] == "eu"}
    assert set(await states(stack.repo, campaign_id)) == eu
    async with stack.repo.connection() as q:
        excluded = {r["terminal_id"]: r["reason"] for r in await q.exclusions(campaign_id, 50)}
    assert excluded == dict.fromkeys(set(ids) - eu, "filter")
    assert {sim.terminals[t].versions["os"] for t in eu} == {"2.0.0"}
    assert {sim.terminals[t].versions["os"] for t in set(ids) - eu} == {"1.0.0"}
    assert "terminals_joined" in await actions(stack.repo, campaign_id)


async def test_a_campaign_started_before_its_terminals_said_hello_waits_for_them(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(30)
    await stack.provision(ids, {"g": ids}, model="unknown")
    await stack.add_package("os", "2.0.0", ["P400"])
    campaign_id = await stack.campaign(["g"], ("os", "2.0.0"), waves=[10, 50, 100])
    await ticks(3)
    # Nobody is known yet: no wave can be judged, so none opens and nothing completes.
    status = await campaigns.campaign_status(stack.repo, campaign_id)
    assert (status.status, status.current_wave, status.totals) == ("running", 1, {})
    sim = Simulator(config(broker, 30, ["g"]))
    async with running(sim):
        await sim.wait_final(campaign_id, 30, timeout_s=60)
        await settle(stack.repo, campaign_id)
    status = await campaigns.campaign_status(stack.repo, campaign_id)
    assert (status.status, status.totals) == ("completed", {"succeeded": 30})


async def test_cumulative_threshold_aborts_and_stops_the_terminals(
    stack: Stack, broker: Mosquitto
) -> None:
    ids = terminal_ids(40)
    await stack.provision(ids, {"g": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    sim = Simulator(
        config(broker, 40, ["g"], faults=Faults(self_test_fail_versions={"os": "2.0.0"}))
    )
    async with running(sim):
        await sim.wait_connected(timeout_s=30)
        await ticks()
        campaign_id = await stack.campaign(
            ["g"],
            ("os", "2.0.0"),
            waves=[100],
            failure_threshold=1.0,
            cumulative_failure_threshold=0.1,
            threshold_action="abort",
            rate_per_min=8,
        )
        await sim.wait_final(campaign_id, 8, timeout_s=30)
        await settle(stack.repo, campaign_id)
        await advance(stack, 1)  # past the cancel grace
    status = await campaigns.campaign_status(stack.repo, campaign_id)
    assert status.status == "aborted"
    assert (status.paused_reason or "").startswith("campaign: ")
    # Eight started (the rate limit): those past their download when the trip came rolled
    # back, the rest stopped; the other 32 never started.
    totals = status.totals
    assert set(totals) <= {"rolled_back", "canceled"}
    assert totals["rolled_back"] >= 5
    assert totals["rolled_back"] + totals.get("canceled", 0) == 40
    assert len(sim.records()) == 8
    async with stack.repo.connection() as q:
        trips = [
            r for r in await q.campaign_audit(campaign_id) if r["action"] == "threshold_tripped"
        ]
    assert len(trips) == 1
    assert '"action":"abort"' in trips[0]["detail"]
