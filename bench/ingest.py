"""Ingest: QoS1 heartbeats and state events committed end to end by a running controller.

The load publisher sends the ingest mix (the same messages as ceiling (a)) to the broker;
``python -m fleet serve`` stores them and acknowledges each only after its commit. The
rate runs from the first message sent to the commit of the last row
(``pg_xact_commit_timestamp``); nothing counts until it is in the database, and the
counts sent (PUBACKed by the broker) and stored must be equal. The state events belong to
executions of a real (paused) campaign, so they are stored, not dead-lettered.
"""

import asyncio
import time
from datetime import UTC, datetime

import asyncpg

from bench import ceilings, loadpub, workload
from bench.harness import (
    Context,
    Figure,
    Result,
    Stack,
    box_cpu,
    controller_settings,
    cpu_seconds,
    median,
    prepare_campaign,
    register_terminals,
    say,
    stack,
    start_controller,
    terminal_ids,
)
from fleet import campaigns
from fleet.clock import SystemClock
from fleet.db import connect

NAME = "ingest"
BUDGET_S = 200.0
COMMAND = "make bench BENCH=ingest"
#: Controller CPU per stored message, at most (issue 4).
CPU_TARGET_US = 20.0
RATIO_TARGET = 0.6
_STALL_S = 20.0

_COUNTS = """
SELECT (SELECT count(*) FROM heartbeats), (SELECT count(*) FROM update_events),
       (SELECT count(*) FROM dead_letters)
"""
_LAST_COMMIT = """
SELECT greatest(
    (SELECT max(pg_xact_commit_timestamp(xmin)) FROM heartbeats WHERE device_ts >= $1),
    (SELECT max(pg_xact_commit_timestamp(xmin)) FROM update_events WHERE device_ts >= $1))
"""


async def _counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    row = await conn.fetchrow(_COUNTS)
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def _pause(dsn: str, campaign_id: int) -> None:
    repo = await connect(dsn, pool_size=2)
    try:
        await campaigns.pause_campaign(repo, SystemClock(), campaign_id)
    finally:
        await repo.close()


async def run(ctx: Context, result: Result) -> None:
    """Burst the mix at a running controller, `reps` times; figures are medians."""
    ceiling = await ceilings.ceilings(ctx, result)
    mix, reps = ceilings.mix_of(ctx), ceilings.reps_of(ctx)
    ids = terminal_ids(mix.terminals)
    say(f"ingest: {mix.total:,} messages per run to `python -m fleet serve`, {reps} run(s)")
    async with stack(NAME, brokers=[ceilings.broker_spec()]) as servers:
        settings = controller_settings(servers)
        await register_terminals(servers.dsn, ids)
        campaign_id = await prepare_campaign(settings, "bench-ingest", start=True)
        # Paused: the executions exist (events are stored), the runner leaves them alone.
        await _pause(servers.dsn, campaign_id)
        controller = await start_controller(settings, servers.root / "controller.log")
        conn = await asyncpg.connect(servers.dsn)
        rates: list[float] = []
        cpu_us: list[float] = []
        lost = 0
        try:
            for rep in range(reps):
                outcome = await _one_run(
                    conn, servers, controller.pid, ids, mix, campaign_id, rep, result
                )
                if outcome is not None:
                    rates.append(outcome[0])
                    cpu_us.append(outcome[1])
                    lost += outcome[2]
        finally:
            await conn.close()
            await controller.stop()
    rate = median(rates)
    result.details["runs_msgs_s"] = [round(r) for r in rates]
    result.details["runs_cpu_us_per_msg"] = [round(c, 2) for c in cpu_us]
    figure = Figure(
        "QoS1 heartbeats + state events committed end to end",
        rate,
        "msg/s",
        ceiling=ceiling.broker_msgs_s,
        ceiling_name="broker pass-through (a)",
        target=f"≥ {RATIO_TARGET} x broker ceiling",
    )
    figure.met = None if figure.ratio is None else figure.ratio >= RATIO_TARGET
    result.add(figure)
    result.add(
        Figure(
            "the same, against bare COPY",
            rate,
            "msg/s",
            ceiling=ceiling.copy_mix_rows_s,
            ceiling_name="bare COPY of the mix (b)",
        )
    )
    cpu = median(cpu_us)
    result.add(
        Figure(
            "controller CPU per stored message",
            cpu,
            "µs",
            target=f"≤ {CPU_TARGET_US:.0f} µs",
            met=None if cpu is None else cpu <= CPU_TARGET_US,
        )
    )
    result.add(
        Figure(
            "messages lost (PUBACKed by the broker but not stored), all runs",
            lost,
            "msgs",
            target="0",
            met=lost == 0 and len(rates) == reps,
        )
    )


async def _one_run(
    conn: asyncpg.Connection,
    servers: Stack,
    pid: int,
    ids: list[str],
    mix: workload.Mix,
    campaign_id: int,
    rep: int,
    result: Result,
) -> tuple[float, float, int] | None:
    """One burst: (committed msg/s, controller µs per message, lost) or None if unfinished."""
    ts = time.time()
    batches = workload.batches(
        ids,
        mix,
        campaign_id=campaign_id,
        seq_base=rep * mix.events_per_terminal,
        ts=ts,
        connections=ceilings.PUBLISHERS,
    )
    hb0, ev0, dead0 = await _counts(conn)
    broker0, (busy0, total0) = cpu_seconds(servers.broker.pid), box_cpu()
    cpu0, wall0, perf0 = cpu_seconds(pid), time.time(), time.perf_counter()
    stats = await loadpub.burst(
        servers.broker.host,
        servers.broker.port,
        ceilings.publisher_identities(servers.password),
        batches,
        timeout_s=120,
    )
    first_send = wall0 + ((stats.first_send or perf0) - perf0)
    stored, dead = 0, 0
    last_change, last_stored = time.monotonic(), -1
    cpu1 = cpu0
    while True:
        hb, ev, dead_now = await _counts(conn)
        cpu1 = cpu_seconds(pid)
        stored, dead = hb - hb0 + ev - ev0, dead_now - dead0
        if stored + dead >= stats.acked:
            break
        if stored != last_stored:
            last_stored, last_change = stored, time.monotonic()
        elif time.monotonic() - last_change > _STALL_S:
            break
        await asyncio.sleep(0.5)
    broker1, (busy1, total1) = cpu_seconds(servers.broker.pid), box_cpu()
    last_commit = await conn.fetchval(_LAST_COMMIT, datetime.fromtimestamp(ts - 0.001, UTC))
    lost = stats.acked - stored
    say(
        f"  run {rep + 1}: sent {stats.sent:,}, broker acked {stats.acked:,} "
        f"(refused {stats.refused}), stored {stored:,}, dead letters {dead}"
    )
    if stats.refused or dead:
        result.note(
            f"run {rep + 1}: {stats.refused} publishes refused by the broker "
            f"{stats.refusal_codes}, {dead} dead letters"
        )
    if stored < mix.total or last_commit is None:
        result.note(f"run {rep + 1}: only {stored:,} of {mix.total:,} stored")
        return None
    elapsed = last_commit.timestamp() - first_send
    rate = stored / elapsed
    cpu_per = (cpu1 - cpu0) / stored * 1e6
    busy = (busy1 - busy0) / max(1e-9, total1 - total0) * 100
    say(
        f"  run {rep + 1}: {rate:,.0f} msg/s committed, {cpu_per:.1f} µs controller CPU each; "
        f"broker {(broker1 - broker0) / stored * 1e6:.1f} µs each; machine {busy:.0f}% busy"
    )
    result.details.setdefault("runs", []).append(
        {
            "msgs_s": round(rate),
            "controller_cpu_us_per_msg": round(cpu_per, 2),
            "broker_cpu_us_per_msg": round((broker1 - broker0) / stored * 1e6, 2),
            "machine_busy_percent_of_all_cores": round(busy, 1),
        }
    )
    return rate, cpu_per, lost
