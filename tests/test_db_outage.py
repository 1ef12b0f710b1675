"""PostgreSQL goes away mid-campaign: ingest holds its acks, retries, and loses nothing."""

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from device_sim.config import Faults, Timing
from device_sim.fleet import Simulator
from fleet.db import Repository
from fleet.embedded import Mosquitto, Postgres, PostgresServer
from tests.stack import (
    Stack,
    eventually,
    make_settings,
    running,
    sim_config,
    terminal_ids,
    wait_status,
)


def _retries() -> float:
    return REGISTRY.get_sample_value("fleet_db_batch_retries_total") or 0.0


async def test_database_crash_during_ingest_loses_nothing(
    broker: Mosquitto,
    pg_server: PostgresServer,
    repo: Repository,
    database_url: str,
    tmp_path: Path,
) -> None:
    if not isinstance(pg_server, Postgres):
        pytest.skip("needs the private PostgreSQL server to crash it")
    count = 40
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    ids = terminal_ids(count)
    await stack.provision(ids, {"g1": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    campaign_id = await stack.campaign(["g1"], ("os", "2.0.0"), waves=[100])
    await stack.start_controller()
    timing = Timing(
        heartbeat_s=0.2,
        install_s=0.5,
        reboot_s=0.2,
        self_test_s=0.1,
        download_retry_s=0.2,
        reconnect_max_s=1.0,
    )
    simulator = Simulator(
        sim_config(broker, count, ["g1"], timing=timing, faults=Faults(max_download_attempts=100))
    )
    try:
        async with running(simulator):
            await simulator.wait_connected(timeout_s=30)
            retries_before = _retries()
            # Immediate shutdown: no checkpoint, sessions cut mid-transaction.
            await asyncio.to_thread(pg_server.kill)

            async def retried() -> bool:
                return _retries() > retries_before

            await eventually(retried, what="ingest to notice the database is gone")
            await asyncio.to_thread(pg_server.restart)
            await simulator.wait_final(campaign_id, count, timeout_s=90)
            assert await wait_status(repo, campaign_id, {"completed"}) == "completed"
        sent = sorted(e.msg_id for r in simulator.records() for e in r.events)
        async with repo.connection() as q:
            stored = sorted(
                r["msg_id"] for r in await q._conn.fetch("SELECT msg_id FROM update_events")
            )
            heartbeats = await q._conn.fetchval("SELECT count(*) FROM heartbeats")
            seen = await q._conn.fetchval(
                "SELECT count(*) FROM terminals WHERE last_seen IS NOT NULL"
            )
        assert stored == sent
        assert heartbeats > count
        assert seen == count
    finally:
        await stack.stop_controller()
