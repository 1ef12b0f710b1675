"""End to end: real Mosquitto, real PostgreSQL, the controller and simulated terminals."""

from collections import Counter
from pathlib import Path

from device_sim.config import Faults, Timing
from device_sim.fleet import Simulator
from fleet import campaigns
from fleet.db import Repository
from fleet.embedded import Mosquitto
from fleet.states import FINAL
from tests.stack import (
    FAST,
    Stack,
    eventually,
    make_settings,
    running,
    sim_config,
    terminal_ids,
    wait_status,
)


async def _db_states(repo: Repository, campaign_id: int) -> dict[str, str]:
    async with repo.connection() as q:
        return {tid: state for tid, (state, _) in (await q.execution_states(campaign_id)).items()}


async def test_small_rollout_completes_and_db_matches_terminals(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    ids = terminal_ids(20)
    await stack.provision(ids, {"g1": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    await stack.start_controller()
    try:
        fast_heartbeats = FAST.model_copy(update={"heartbeat_s": 0.2})
        simulator = Simulator(sim_config(broker, 20, ["g1"], timing=fast_heartbeats))
        async with running(simulator):
            await simulator.wait_connected(timeout_s=30)
            campaign_id = await stack.campaign(["g1"], ("os", "2.0.0"), waves=[50, 100])
            records = await simulator.wait_final(campaign_id, 20, timeout_s=60)
            assert await wait_status(repo, campaign_id, {"completed"}) == "completed"
            db = await _db_states(repo, campaign_id)
            assert db == {r.tid: r.final_state.value for r in records if r.final_state}
            assert Counter(db.values()) == {"succeeded": 20}

            async def heartbeats_on_new_version() -> bool:
                async with repo.connection() as q:
                    rows = await q._conn.fetch("SELECT versions->>'os' AS os FROM terminals")
                return {r["os"] for r in rows} == {"2.0.0"}

            await eventually(heartbeats_on_new_version, what="inventory to show 2.0.0")

        async def all_offline() -> bool:
            async with repo.connection() as q:
                online = await q._conn.fetchval("SELECT count(*) FROM terminals WHERE online")
                stored = await q._conn.fetchval("SELECT count(*) FROM heartbeats")
            return online == 0 and stored >= 20

        await eventually(all_offline, what="presence to go offline when the fleet stops")
    finally:
        await stack.stop_controller()


async def test_failures_above_threshold_pause_before_the_last_wave(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    count = 300
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    ids = terminal_ids(count)
    await stack.provision(ids, {"north": ids[0::2], "south": ids[1::2]})
    await stack.add_package("os", "2.0.0", ["P400"])
    await stack.start_controller()
    try:
        faults = Faults(self_test_fail_rate=0.5)
        simulator = Simulator(sim_config(broker, count, ["north", "south"], faults=faults))
        async with running(simulator):
            await simulator.wait_connected(timeout_s=60)
            campaign_id = await stack.campaign(
                ["north", "south"], ("os", "2.0.0"), waves=[10, 50, 100], failure_threshold=0.2
            )
            assert await wait_status(repo, campaign_id, {"paused", "completed"}) == "paused"
            status = await campaigns.campaign_status(repo, campaign_id)
            assert status.current_wave < 3, "paused only after the last wave had opened"
            # Terminals already under way finish; nobody new starts.
            started = simulator.records()
            await simulator.wait_final(campaign_id, len(started), timeout_s=60)

            async def db_caught_up() -> bool:
                db = await _db_states(repo, campaign_id)
                return all(
                    db[r.tid] == r.final_state for r in simulator.campaign_records(campaign_id)
                )

            await eventually(db_caught_up, what="database to reflect every terminal")
        db = await _db_states(repo, campaign_id)
        records = {r.tid: r for r in simulator.campaign_records(campaign_id)}
        assert len(simulator.records()) == len(records), "a terminal started twice"
        assert set(db) == set(ids)
        final_values = {s.value for s in FINAL}
        for tid, state in db.items():
            if tid in records:
                assert state == records[tid].final_state.value  # type: ignore[union-attr]
                finals_sent = [e for e in records[tid].events if e.state.value in final_values]
                assert len(finals_sent) == 1, f"{tid} reported {len(finals_sent)} final states"
                assert records[tid].data_intact, f"{tid} lost local data"
            else:
                assert state == "pending", f"{tid} never started but is {state}"
        wave3 = next(w for w in status.waves if w.wave == 3)
        assert wave3.counts == {"pending": wave3.size}
        assert Counter(db.values())["rolled_back"] > 0
        async with repo.connection() as q:
            log = await q.campaign_audit(campaign_id)
        tripped = [row for row in log if row["action"] == "threshold_tripped"]
        assert len(tripped) == 1
        assert [row["actor"] for row in log if row["action"] == "campaign_paused"] == ["runner"]
    finally:
        await stack.stop_controller()


async def test_controller_killed_mid_campaign_loses_and_duplicates_nothing(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    count = 120
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    ids = terminal_ids(count)
    await stack.provision(ids, {"g1": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    # Slow enough that the kill lands mid-campaign; downloads retry through the outage.
    timing = Timing(
        heartbeat_s=1.0,
        download_bps=2_000_000,
        install_s=0.3,
        reboot_s=0.2,
        self_test_s=0.1,
        download_retry_s=0.2,
        reconnect_max_s=1.0,
    )
    faults = Faults(self_test_fail_rate=0.05, max_download_attempts=100)
    stack.spawn_controller()
    simulator = Simulator(sim_config(broker, count, ["g1"], faults=faults, timing=timing))
    try:
        async with running(simulator):
            await simulator.wait_connected(timeout_s=60)
            campaign_id = await stack.campaign(
                ["g1"],
                ("os", "2.0.0"),
                waves=[20, 60, 100],
                failure_threshold=0.5,
                success_threshold=0.5,
            )

            installing = {"backing_up", "installing", "rebooting", "self_testing"}

            async def mid_campaign() -> bool:
                # Some executions finished, and enough terminals are past their download
                # right now (their own records, not the database, which lags): those go on
                # reporting while the controller (and its artifacts) is gone.
                states = list((await _db_states(repo, campaign_id)).values())
                finished = sum(s in {f.value for f in FINAL} for s in states)
                now_installing = sum(
                    1
                    for r in simulator.records()
                    if not r.settled and r.events and r.events[-1].state in installing
                )
                return finished >= 15 and now_installing >= 8

            await eventually(mid_campaign, within_s=60, what="a wave in the middle of installing")
            stack.kill_controller_process()
            sent_before_kill = _sent_ids(simulator)

            async def fleet_carried_on() -> bool:
                return len(_sent_ids(simulator) - sent_before_kill) >= 8

            # Terminals past their download keep installing and reporting with no
            # controller: those reports wait in the controller's session at the broker.
            await eventually(fleet_carried_on, what="terminals to report during the outage")
            sent_while_dead = _sent_ids(simulator) - sent_before_kill
            stack.spawn_controller()
            assert await wait_status(repo, campaign_id, {"completed"}, within_s=120) == "completed"
            await simulator.wait_final(campaign_id, count, timeout_s=60)
        assert stack.terminate_controller_process() == 0
        sent = [e.msg_id for r in simulator.records() for e in (*r.events, *r.resent)]
        conn_rows = await _stored_events(repo)
        assert len(sent) == len(set(sent))
        assert sorted(conn_rows) == sorted(sent), "an event was lost or stored twice"
        db = await _db_states(repo, campaign_id)
        assert db == {r.tid: r.final_state.value for r in simulator.campaign_records(campaign_id)}  # type: ignore[union-attr]
        assert sent_while_dead <= set(conn_rows), "a report sent during the outage was lost"
    finally:
        if stack._process is not None:
            stack.kill_controller_process()


def _sent_ids(simulator: Simulator) -> set[str]:
    return {e.msg_id for r in simulator.records() for e in (*r.events, *r.resent)}


async def _stored_events(repo: Repository) -> list[str]:
    async with repo.connection() as q:
        rows = await q._conn.fetch("SELECT msg_id FROM update_events")
    return [r["msg_id"] for r in rows]


async def test_pause_holds_new_starts_resume_completes_cancel_ends_pending(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    count = 30
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    ids = terminal_ids(count)
    await stack.provision(ids, {"g1": ids[:20], "g2": ids[20:]})
    await stack.add_package("os", "2.0.0", ["P400"])
    try:
        paused_id = await stack.campaign(["g1"], ("os", "2.0.0"), waves=[100], name="paused")
        await campaigns.pause_campaign(repo, stack.clock, paused_id)
        canceled_id = await stack.campaign(["g2"], ("os", "2.0.0"), waves=[100], name="doomed")
        await campaigns.cancel_campaign(repo, stack.clock, canceled_id)
        assert (await campaigns.campaign_status(repo, canceled_id)).status == "canceled"
        # Only now does the controller publish: the first desired states are paused/canceled.
        await stack.start_controller()
        simulator = Simulator(
            sim_config(broker, count, ["g1"]).model_copy(
                update={"group_map": {tid: ["g2"] for tid in ids[20:]}}
            )
        )
        async with running(simulator):
            await simulator.wait_connected(timeout_s=30)
            await simulator.wait_desired((paused_id, "paused"), count=20, timeout_s=30)
            await simulator.wait_desired((canceled_id, "canceled"), count=10, timeout_s=30)
            assert simulator.records() == []
            assert Counter((await _db_states(repo, paused_id)).values()) == {"pending": 20}
            await campaigns.resume_campaign(repo, stack.clock, paused_id)
            records = await simulator.wait_final(paused_id, 20, timeout_s=60)
            assert await wait_status(repo, paused_id, {"completed"}) == "completed"
        assert {r.final_state for r in records} == {"succeeded"}
        assert Counter((await _db_states(repo, canceled_id)).values()) == {"canceled": 10}
        assert [r for r in simulator.records() if r.campaign_id == canceled_id] == []
    finally:
        await stack.stop_controller()
