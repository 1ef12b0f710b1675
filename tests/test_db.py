"""The database layer on a real PostgreSQL: migrations, named SQL, the guarded state machine."""

import os
from pathlib import Path

import asyncpg
import pytest

from fleet import campaigns
from fleet.clock import ManualClock, as_datetime
from fleet.db import SCHEMA_VERSION, Repository, connect, migrate
from fleet.db.migrate import load_migrations
from fleet.db.repository import QUERIES, EventRow, parse_queries
from fleet.embedded import PostgresServer
from fleet.errors import SchemaVersionError
from fleet.policy import CampaignPolicy, HealthGate
from fleet.protocol import bucket_of, new_message_id
from fleet.runner import CampaignRunner
from fleet.settings import FleetSettings
from fleet.states import ALLOWED, FINAL, PHASE, ExecState, transition_pairs
from tests.test_protocol import BUCKET_VECTORS

CLOCK = ManualClock(1_790_000_000.0)
AT = as_datetime(CLOCK.now())


def test_query_file_parser() -> None:
    parsed = parse_queries("-- name: a\nSELECT 1;\n\n-- name: b_c\n-- why\nSELECT 2;\n")
    assert parsed == {"a": "SELECT 1;", "b_c": "-- why\nSELECT 2;"}
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    assert "record_events" in QUERIES


async def test_state_machine_in_sql_equals_python(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        pairs = await conn.fetch("SELECT from_state, to_state FROM state_transitions")
        finals = await conn.fetch("SELECT state FROM execution_states WHERE final")
        states = await conn.fetch("SELECT state, phase FROM execution_states")
    finally:
        await conn.close()
    assert sorted((r[0], r[1]) for r in pairs) == transition_pairs()
    assert {r[0] for r in finals} == {s.value for s in FINAL}
    assert {r[0]: r[1] for r in states} == {s.value: PHASE[s] for s in ExecState}
    assert all(not ALLOWED[s] for s in FINAL)


async def test_bucket_function_in_sql_equals_python(database_url: str) -> None:
    ids = [*BUCKET_VECTORS, *(f"T{n:06d}" for n in range(500))]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, fleet_bucket(id) AS b FROM unnest($1::text[]) id", ids)
    finally:
        await conn.close()
    assert {r["id"]: r["b"] for r in rows} == {i: bucket_of(i) for i in ids}


async def test_migrate_is_idempotent_and_versioned(database_url: str) -> None:
    assert await migrate(database_url) == []
    repo = await connect(database_url)
    await repo.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM schema_version WHERE version = $1", SCHEMA_VERSION)
    finally:
        await conn.close()
    with pytest.raises(SchemaVersionError) as caught:
        await connect(database_url)
    assert caught.value.expected == SCHEMA_VERSION


async def _one_execution(repo: Repository, ids: tuple[str, ...] = ("T1",)) -> int:
    """A started campaign with one execution per terminal of `ids`."""
    async with repo.transaction() as q:
        await q.upsert_terminals([{"id": t, "model": "P400"} for t in ids])
        await q.create_group("g")
        await q.assign_group("g", list(ids))
        await q.add_package("fw", "firmware", "2.0", 10, "a" * 64, ["P400"])
    campaign_id = await campaigns.create_campaign(
        repo,
        CLOCK,
        name="c",
        groups=["g"],
        packages=[("fw", "2.0")],
        policy=CampaignPolicy(health_gate=HealthGate(enabled=False)),
    )
    assert (await campaigns.start_campaign(repo, CLOCK, campaign_id)).added == len(ids)
    return campaign_id


async def _report(
    repo: Repository,
    campaign_id: int,
    seq: int,
    state: ExecState,
    msg_id: str | None = None,
    progress: int | None = None,
) -> tuple[bool, bool]:
    async with repo.transaction() as q:
        outcome = await q.record_event(
            EventRow(
                msg_id=msg_id or new_message_id(),
                terminal_id="T1",
                campaign_id=campaign_id,
                seq=seq,
                state=state.value,
                progress=progress,
                stage=None,
                error_code=None,
                detail=None,
                device_ts=1.0,
            ),
            at=AT,
        )
    assert outcome.known
    return outcome.inserted, outcome.moved


async def _state(repo: Repository, campaign_id: int) -> str:
    async with repo.connection() as q:
        return (await q.execution_states(campaign_id))["T1"][0]


async def test_guarded_update_refuses_replays_reorders_and_illegal_moves(repo: Repository) -> None:
    campaign_id = await _one_execution(repo)
    first = new_message_id()
    assert await _report(repo, campaign_id, 1, ExecState.QUEUED, first) == (True, True)
    # The same message again: not stored twice, nothing moves.
    assert await _report(repo, campaign_id, 1, ExecState.QUEUED, first) == (False, False)
    assert await _report(repo, campaign_id, 3, ExecState.DOWNLOADING, progress=50) == (True, True)
    # An older event arriving late is stored but cannot move the execution back.
    assert await _report(repo, campaign_id, 2, ExecState.DOWNLOADING, progress=0) == (True, False)
    # Illegal: downloading -> succeeded skips the whole install.
    assert await _report(repo, campaign_id, 4, ExecState.SUCCEEDED) == (True, False)
    assert await _state(repo, campaign_id) == "downloading"
    for seq, state in enumerate(
        [
            ExecState.DOWNLOADED,
            ExecState.VERIFYING,
            ExecState.VERIFIED,
            ExecState.BACKING_UP,
            ExecState.INSTALLING,
            ExecState.REBOOTING,
            ExecState.SELF_TESTING,
            ExecState.SUCCEEDED,
        ],
        start=5,
    ):
        assert await _report(repo, campaign_id, seq, state) == (True, True)
    # Final states are sticky.
    assert await _report(repo, campaign_id, 20, ExecState.ROLLED_BACK) == (True, False)
    assert await _state(repo, campaign_id) == "succeeded"


async def test_sql_refuses_an_illegal_move_even_without_python(repo: Repository) -> None:
    campaign_id = await _one_execution(repo)
    async with repo.connection() as q:
        outcome = await q.record_event(
            EventRow(
                msg_id=new_message_id(),
                terminal_id="T1",
                campaign_id=campaign_id,
                seq=1,
                state="self_testing",
                progress=None,
                stage=None,
                error_code=None,
                detail=None,
                device_ts=1.0,
            ),
            at=AT,
        )
    assert outcome.inserted
    assert not outcome.moved
    assert await _state(repo, campaign_id) == "pending"


async def test_event_for_unknown_execution_is_not_stored(repo: Repository) -> None:
    campaign_id = await _one_execution(repo)
    async with repo.connection() as q:
        outcome = await q.record_event(
            EventRow(
                msg_id=new_message_id(),
                terminal_id="T1",
                campaign_id=campaign_id + 1,
                seq=1,
                state="queued",
                progress=None,
                stage=None,
                error_code=None,
                detail=None,
                device_ts=1.0,
            ),
            at=AT,
        )
    assert (outcome.known, outcome.inserted, outcome.moved) == (False, False, False)


async def test_seq_gaps_are_counted(repo: Repository) -> None:
    campaign_id = await _one_execution(repo)
    await _report(repo, campaign_id, 1, ExecState.QUEUED)
    await _report(repo, campaign_id, 4, ExecState.DOWNLOADING, progress=0)
    conn_row = None
    async with repo.connection() as q:
        conn_row = await q._conn.fetchrow("SELECT last_event_seq, seq_gaps FROM terminals")
    assert conn_row is not None
    assert (conn_row["last_event_seq"], conn_row["seq_gaps"]) == (4, 1)


async def test_heartbeat_partitions_are_created_ahead(repo: Repository) -> None:
    async with repo.connection() as q:
        again = await q.ensure_heartbeat_partitions(3)
    # The first call happened? No: migrations create none, so this call creates 5.
    assert again == 5
    async with repo.connection() as q:
        assert await q.ensure_heartbeat_partitions(3) == 0


async def test_dead_letters_are_bounded(repo: Repository) -> None:
    rows = [("fleet/v1/t/T1/events", "malformed", f"n{n}", b"x" * 2000) for n in range(150)]
    async with repo.connection() as q:
        await q.add_dead_letters(rows)
        await q.trim_dead_letters(100)
        assert await q.dead_letter_counts() == {"malformed": 100}
        kept = await q._conn.fetch("SELECT detail, length(payload) AS n FROM dead_letters")
    assert {r["detail"] for r in kept} == {f"n{n}" for n in range(50, 150)}
    assert {r["n"] for r in kept} == {1024}


async def test_upgrade_from_0001_keeps_running_campaigns_running(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A database with a campaign under way at schema 1 migrates and the runner carries on."""
    name = f"fleet_upgrade_{os.getpid()}"
    pg_server.create_database(name)
    dsn = pg_server.dsn(name)
    first = load_migrations()[0]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(first.sql)
        await conn.execute("INSERT INTO schema_version VALUES (1, $1)", first.name)
        await conn.execute(
            """
            INSERT INTO terminals (id, model, online) SELECT 'T' || n, 'P400', true
            FROM generate_series(1, 40) n;
            INSERT INTO groups VALUES ('g');
            INSERT INTO group_members (group_name, terminal_id) SELECT 'g', id FROM terminals;
            INSERT INTO packages (name, kind, version, size, sha256, compatible_models)
            VALUES ('os', 'firmware', '2.0.0', 10, repeat('a', 64), '{P400}');
            INSERT INTO campaigns (name, control, current_wave, success_threshold,
                                   failure_threshold, desired_revision, started_at)
            VALUES ('old', 'running', 1, 0.8, 0.2, 1, now());
            INSERT INTO campaign_groups VALUES (1, 'g');
            INSERT INTO campaign_packages VALUES (1, 1, 1);
            INSERT INTO campaign_waves (campaign_id, wave, bucket_hi, opened_at)
            VALUES (1, 1, 5000, now()), (1, 2, 10000, NULL);
            INSERT INTO executions (campaign_id, terminal_id, wave, bucket)
            SELECT 1, id, CASE WHEN fleet_bucket(id) < 5000 THEN 1 ELSE 2 END, fleet_bucket(id)
            FROM terminals;
            UPDATE executions SET state = 'downloading' WHERE terminal_id = 'T1';
            INSERT INTO campaign_log (campaign_id, actor, action) VALUES (1, 'operator', 'started');
            """
        )
    finally:
        await conn.close()
    assert await migrate(dsn) == list(range(2, SCHEMA_VERSION + 1))
    repo = await connect(dsn, pool_size=2)
    try:
        async with repo.connection() as q:
            campaign = await q.campaign(1)
            kept = await q._conn.fetchval("SELECT count(*) FROM campaign_log_0001")
            t1 = await q._conn.fetchrow(
                "SELECT attempt, admitted_at FROM executions WHERE terminal_id = 'T1'"
            )
        assert campaign is not None
        policy = CampaignPolicy.model_validate(campaign["policy"])
        assert [w.percent for w in policy.waves] == [50, 100]
        assert (policy.window, policy.health_gate.enabled) == (None, False)
        assert kept == 1
        assert t1 is not None
        assert t1["attempt"] == 1
        assert t1["admitted_at"] is not None
        sent: list[str] = []

        class Publisher:
            async def publish(self, topic: str, payload: bytes, **_: object) -> None:
                sent.append(topic)

        settings = FleetSettings(artifact_dir=tmp_path)
        await CampaignRunner(repo, Publisher(), settings, CLOCK).tick()
        wave1 = {
            r["terminal_id"]
            for r in await _executions(repo)
            if r["wave"] == 1 and r["terminal_id"] != "T1"
        }
        assert {t.split("/")[3] for t in sent if t.endswith("/cmd")} == wave1
        assert "fleet/v1/g/g/desired" in sent
    finally:
        await repo.close()


async def _executions(repo: Repository) -> list[asyncpg.Record]:
    async with repo.connection() as q:
        return await q.executions(1)


async def test_one_statement_stores_events_of_many_terminals(repo: Repository) -> None:
    """Each row is judged on its own: applied, unknown execution, or a duplicate."""
    campaign_id = await _one_execution(repo, ("T1", "T2", "T3"))

    def row(tid: str, seq: int, state: ExecState, msg_id: str, campaign: int) -> EventRow:
        return EventRow(
            msg_id=msg_id,
            terminal_id=tid,
            campaign_id=campaign,
            seq=seq,
            state=state.value,
            progress=None,
            stage=None,
            error_code=None,
            detail=None,
            device_ts=1.0,
        )

    async with repo.transaction() as q:
        first = await q.record_events(
            [
                row("T1", 1, ExecState.QUEUED, "a1", campaign_id),
                row("T2", 1, ExecState.SELF_TESTING, "b1", campaign_id),  # illegal from pending
                row("T3", 1, ExecState.QUEUED, "c1", campaign_id + 1),  # no such execution
            ],
            AT,
        )
        second = await q.record_events(
            [
                row("T1", 2, ExecState.DOWNLOADING, "a2", campaign_id),
                row("T2", 1, ExecState.SELF_TESTING, "b1", campaign_id),  # a redelivery
            ],
            AT,
        )
    outcomes = [(o.known, o.inserted, o.moved, o.new_state) for o in first + second]
    assert outcomes == [
        (True, True, True, "queued"),
        (True, True, False, None),
        (False, False, False, None),
        (True, True, True, "downloading"),
        (True, False, False, None),
    ]
    async with repo.connection() as q:
        states = {t: s for t, (s, _) in (await q.execution_states(campaign_id)).items()}
    assert states == {"T1": "downloading", "T2": "pending", "T3": "pending"}
