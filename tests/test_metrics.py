"""The metrics: documented, bounded, and refreshed from the database off the scrape path."""

import asyncio
import logging
import re
import time
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import REGISTRY

import fleet.api  # registers the REST API's metrics
import fleet.http  # registers the HTTP server's metrics
import fleet.runner
from fleet import campaigns, metrics
from fleet.clock import ManualClock, SystemClock, as_datetime
from fleet.db import Repository
from fleet.db.repository import TerminalCount
from fleet.embedded import free_port
from fleet.policy import CampaignPolicy, Wave
from fleet.protocol import ErrorCode
from tests.stack import eventually

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_every_metric_is_documented() -> None:
    text = OPERATIONS.read_text()
    section = text[text.index("## Metrics") : text.index("## Configuration reference")]
    names = {"fleet_heartbeat_age_seconds", "fleet_heartbeat_age_max_seconds"}
    for family in REGISTRY.collect():
        if family.name.startswith("fleet_"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    missing = sorted(name for name in names if f"`{name}" not in section)
    assert not missing, f"not in docs/operations.md, Metrics: {missing}"


def test_every_runner_decision_counts_from_zero() -> None:
    """A decision label created on first use makes `increase()` miss that first one."""
    source = (Path(fleet.runner.__file__)).read_text()
    actions = set(re.findall(r'_decide\(campaign, "([a-z_]+)"', source))
    actions |= set(re.findall(r'decisions\.append\(\("([a-z_]+)"', source))
    actions |= set(re.findall(r'CAMPAIGN_DECISIONS\.labels\("([a-z_]+)"\)', source))
    assert len(actions) >= 8
    for action in sorted(actions):
        value = REGISTRY.get_sample_value("fleet_campaign_decisions_total", {"action": action})
        assert value is not None, f"{action} is not initialised in fleet/metrics.py"


def test_failure_codes_are_a_bounded_label() -> None:
    assert metrics.failure_code("SELF_TEST_FAILED") == "SELF_TEST_FAILED"
    assert metrics.failure_code(None) == "none"
    assert metrics.failure_code("SOMETHING_NEW") == "other"
    for code in ErrorCode:
        # Present before the first failure, so increase() counts that one too.
        assert _value("fleet_update_failures_total", code=code.value) is not None


def test_models_and_versions_beyond_the_most_common_are_other() -> None:
    rows = [
        TerminalCount(model=f"M{m}", version=f"1.{v}", online=True, n=100 - v)
        for m in range(3)
        for v in range(metrics.MAX_VERSIONS + 5)
    ]
    metrics._set_terminals(rows)
    versions = {
        sample.labels["version"]
        for family in REGISTRY.collect()
        if family.name == "fleet_terminals"
        for sample in family.samples
    }
    assert len(versions) == metrics.MAX_VERSIONS + 1
    assert "other" in versions
    assert "1.0" in versions
    assert f"1.{metrics.MAX_VERSIONS + 4}" not in versions
    total = sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "fleet_terminals"
        for sample in family.samples
    )
    assert total == sum(row.n for row in rows)


async def test_refresh_reads_the_database_and_drops_campaigns_long_over(
    repo: Repository,
) -> None:
    clock = ManualClock(time.time())
    async with repo.transaction() as q:
        await q.upsert_terminals(
            [
                {"id": "T1", "model": "P400", "versions": {"os": "1.0.0"}},
                {"id": "T2", "model": "A920", "versions": {"os": "2.0.0", "pay": "3.1"}},
                {"id": "T3"},
            ]
        )
        await q.create_group("g")
        await q.assign_group("g", ["T1", "T2", "T3"])
        await q.add_package("os", "firmware", "2.0.0", 1, "0" * 64, ["P400", "A920"])
        await q.add_package("pay", "app", "3.1", 1, "1" * 64, ["P400", "A920"])
        await q.set_presence(["T1", "T2"], [True, True], [True, True])
        await q.touch_terminals(
            ["T1"],
            [as_datetime(clock.now())],
            ['{"os": "1.0.0"}'],
            ["{}"],
            as_datetime(clock.now() - 10),
        )
    policy = CampaignPolicy(waves=[Wave(percent=100)], window=None, failure_threshold=0.25)
    campaign_id = await campaigns.create_campaign(
        repo, clock, name="m1", groups=["g"], packages=[("os", "2.0.0")], policy=policy
    )
    await campaigns.start_campaign(repo, clock, campaign_id)

    await metrics.refresh(repo, clock)
    assert _value("fleet_terminals", model="P400", version="1.0.0", presence="online") == 1
    assert _value("fleet_terminals", model="A920", version="2.0.0", presence="online") == 1
    assert _value("fleet_terminals", model="unknown", version="none", presence="offline") == 1
    # T1 heartbeat 10 s ago; T2 is online without a heartbeat, so it has no age.
    assert _value("fleet_heartbeat_age_seconds_bucket", le="5.0") == 0
    assert _value("fleet_heartbeat_age_seconds_bucket", le="15.0") == 1
    assert _value("fleet_heartbeat_age_seconds_bucket", le="+Inf") == 1
    assert _value("fleet_heartbeat_age_max_seconds") == pytest.approx(10, abs=0.01)
    async with repo.connection() as q:
        executions = await q.execution_states(campaign_id)
    shown = sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "fleet_campaign_executions"
        for sample in family.samples
        if sample.labels["campaign"] == "m1"
    )
    assert shown == len(executions) > 0
    assert _value("fleet_campaign_current_wave", campaign="m1") == 1
    assert _value("fleet_campaign_failure_ratio", campaign="m1", scope="wave") == 0
    assert _value("fleet_campaign_failure_threshold_ratio", campaign="m1", scope="wave") == 0.25
    assert _value("fleet_campaign_failure_threshold_ratio", campaign="m1", scope="campaign") == 0.05

    await campaigns.cancel_campaign(repo, clock, campaign_id)
    clock.advance(metrics.RECENT_CAMPAIGN_S - 60)
    await metrics.refresh(repo, clock)
    assert _value("fleet_campaign_current_wave", campaign="m1") == 1, "a recent end stays"
    clock.advance(120)
    await metrics.refresh(repo, clock)
    for family in REGISTRY.collect():
        if family.name.startswith("fleet_campaign_") and family.type == "gauge":
            assert not [s for s in family.samples if s.labels.get("campaign") == "m1"], family.name
    assert _value("fleet_terminals", model="P400", version="1.0.0", presence="online") == 1


async def test_refresh_survives_an_unavailable_database_and_stops_promptly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens there: every acquire is refused, as when PostgreSQL is down.
    pool = await asyncpg.create_pool(
        f"postgresql://fleet@127.0.0.1:{free_port()}/fleet", min_size=0, max_size=1
    )
    repo = Repository(pool, acquire_timeout_s=1.0)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="fleet.metrics")
    task = asyncio.create_task(metrics.refresh_forever(repo, 0.05, SystemClock(), stop))
    try:

        async def skipped_twice() -> bool:
            assert not task.done(), "the refresh loop ended"
            return sum("metrics not refreshed" in r.message for r in caplog.records) >= 2

        await eventually(skipped_twice, what="two refreshes skipped")
        stop.set()
        async with asyncio.timeout(1):
            await task
    finally:
        task.cancel()
        await repo.close()


def test_error_codes_the_simulator_sends_are_known_and_every_code_is_documented() -> None:
    root = Path(__file__).parent.parent
    source = "\n".join(path.read_text() for path in (root / "device_sim").glob("*.py"))
    sent = set(re.findall(r'error_code="([A-Z0-9_]+)"', source))
    sent |= set(re.findall(r'DownloadFailedError\(\s*"([A-Z0-9_]+)"', source))
    assert sent, "no error codes found in the simulator"
    assert sent <= {code.value for code in ErrorCode}, sent - set(ErrorCode)
    docs = (root / "docs" / "protocol.md").read_text() + OPERATIONS.read_text()
    assert not [code for code in ErrorCode if f"`{code.value}`" not in docs]
