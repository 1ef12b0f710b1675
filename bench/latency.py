"""Publish-to-commit latency with 10,000 terminals heartbeating once a second.

Latency is the commit time of each heartbeat's row (``pg_xact_commit_timestamp``) minus
the timestamp the terminal put in it when it published. Two sources, one after the other:

* the simulator (``python -m device_sim --heartbeat-only``, four processes of 2,500
  terminals): the product's own terminals, whose publish path is part of the figure;
* the load publisher, paced at 10,000 heartbeats a second from 10,000 terminal topics,
  each stamped as it leaves: the controller and the broker alone.
"""

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench import ceilings, loadpub, workload
from bench.harness import (
    BENCH_GROUP,
    Context,
    Figure,
    Process,
    Result,
    Stack,
    alive,
    box_cpu,
    controller_settings,
    cpu_seconds,
    note_deaths,
    register_terminals,
    say,
    stack,
    start_controller,
    start_simulators,
    stop_simulator,
    terminal_ids,
    wait_until,
)
from fleet import protocol
from fleet.protocol import MessageKind

NAME = "latency"
BUDGET_S = 200.0
COMMAND = "make bench BENCH=latency"
P99_TARGET_MS = 250.0
SIM_PROCESSES = 4

# A hello sets the boot id: a terminal the simulator connected, not one the paced
# publisher's heartbeats marked online.
_BOOTED = "SELECT count(*) FROM terminals WHERE online AND boot_id IS NOT NULL"
_LATENCY = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99,
       max(lag)::float8 AS worst
FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - device_ts) * 1000 AS lag
      FROM heartbeats WHERE device_ts >= $1 AND device_ts < $2) AS lags
"""


async def _latency(
    conn: asyncpg.Connection, start: float, end: float, expected: int
) -> dict[str, Any]:
    """Latency of heartbeats stamped in [start, end), once their count stops growing."""
    window = (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
    count = "SELECT count(*) FROM heartbeats WHERE device_ts >= $1 AND device_ts < $2"
    seen = -1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        n = int(await conn.fetchval(count, *window))
        if n >= expected or n == seen:
            break
        seen = n
        await asyncio.sleep(1.0)
    row = await conn.fetchrow(_LATENCY, *window)
    assert row is not None
    return dict(row)


def _latency_figures(result: Result, label: str, found: dict[str, Any], seconds: float) -> None:
    rate = found["n"] / seconds if seconds else None
    result.add(Figure(f"{label}: heartbeats stored per second", rate, "msg/s"))
    result.add(Figure(f"{label}: publish-to-commit p50", found["p50"], "ms"))
    p99 = found["p99"]
    result.add(
        Figure(
            f"{label}: publish-to-commit p99",
            p99,
            "ms",
            target=f"< {P99_TARGET_MS:.0f} ms",
            met=None if p99 is None else p99 < P99_TARGET_MS,
        )
    )


async def run(ctx: Context, result: Result) -> None:
    """Paced publisher first, then the simulator, against one running controller."""
    terminals = 50 if ctx.smoke else 10_000
    window_s = 1.5 if ctx.smoke else 15.0
    ids = terminal_ids(terminals)
    spec = ceilings.broker_spec(ids) | {"groups": {BENCH_GROUP: ids}}
    say(f"latency: {terminals:,} terminals at 1 heartbeat/s, {window_s:.0f} s windows")
    async with stack(NAME, brokers=[spec]) as servers:
        settings = controller_settings(servers)
        await register_terminals(servers.dsn, ids)
        controller = await start_controller(settings, servers.root / "controller.log")
        conn = await asyncpg.connect(servers.dsn)
        try:
            await _paced(result, servers, conn, ids, window_s)
            await _simulated(ctx, result, servers, conn, controller.pid, ids, window_s)
        finally:
            await conn.close()
            await controller.stop()


async def _paced(
    result: Result,
    servers: Stack,
    conn: asyncpg.Connection,
    ids: list[str],
    window_s: float,
) -> None:
    def make(n: int) -> loadpub.Message:
        tid = ids[n % len(ids)]
        return loadpub.Message(
            protocol.terminal_topic(tid, MessageKind.HEARTBEAT),
            workload.heartbeat(tid, time.time()),
        )

    start = time.time()
    stats = await loadpub.paced(
        servers.broker.host,
        servers.broker.port,
        ceilings.publisher_identities(servers.password),
        make,
        rate_per_s=len(ids),
        duration_s=window_s,
    )
    end = time.time()
    found = await _latency(conn, start, end, stats.acked)
    say(f"  paced: sent {stats.sent:,}, acked {stats.acked:,}, stored {found['n']:,}")
    _latency_figures(result, "load publisher, paced", found, window_s)
    result.details["paced"] = found | {"sent": stats.sent, "acked": stats.acked}


async def _simulated(
    ctx: Context,
    result: Result,
    servers: Stack,
    conn: asyncpg.Connection,
    controller_pid: int,
    ids: list[str],
    window_s: float,
) -> None:
    processes = 1 if ctx.smoke else SIM_PROCESSES
    simulators: list[Process] = []
    reports: list[dict[str, Any] | None] = []
    try:
        await start_simulators(
            servers.broker,
            servers.root,
            simulators,
            count=len(ids),
            processes=processes,
            args=["--heartbeat-only", "--heartbeat-s", "1", "--connect-concurrency", "200"],
        )

        async def online() -> bool:
            n = int(await conn.fetchval(_BOOTED))
            return n >= len(ids) or not all(s.running for s in simulators)

        t0 = time.monotonic()
        connected = await wait_until(online, timeout_s=30 if ctx.smoke else 60, every_s=1.0)
        online_n = int(await conn.fetchval(_BOOTED))
        say(f"  simulator: {online_n:,} terminals said hello in {time.monotonic() - t0:.0f} s")
        note_deaths(result, simulators)
        if not connected:
            result.note(f"simulator: only {online_n:,} of {len(ids):,} terminals came online")
        await asyncio.sleep(0.5 if ctx.smoke else 2.0)
        cpu = {s.pid: cpu_seconds(s.pid) for s in simulators if s.running}
        cpu_controller = cpu_seconds(controller_pid)
        cpu_broker = cpu_seconds(servers.broker.pid)
        busy0, total0 = box_cpu()
        start = time.time()
        await asyncio.sleep(window_s)
        end = time.time()
        sim_cpu = sum(cpu_seconds(pid) - c for pid, c in cpu.items() if alive(pid))
        controller_cpu = cpu_seconds(controller_pid) - cpu_controller
        broker_cpu = cpu_seconds(servers.broker.pid) - cpu_broker
        busy1, total1 = box_cpu()
        machine_busy = (busy1 - busy0) / max(1e-9, total1 - total0) * 100
    finally:
        reports = [await stop_simulator(s, timeout_s=30) for s in simulators]
    found = await _latency(conn, start, end, int(len(ids) * window_s))
    _latency_figures(result, f"simulator, {processes} processes", found, window_s)
    result.details["simulator"] = found | {
        "online": online_n,
        "simulator_cpu_percent": round(sim_cpu / window_s * 100, 1),
        "controller_cpu_percent": round(controller_cpu / window_s * 100, 1),
        "broker_cpu_percent": round(broker_cpu / window_s * 100, 1),
        "machine_busy_percent_of_all_cores": round(machine_busy, 1),
        "reports": [
            {k: r.get(k) for k in ("terminals", "connected", "heartbeats_sent")} if r else None
            for r in reports
        ],
    }
    say(
        f"  simulator CPU {sim_cpu / window_s * 100:.0f}% of a core (all processes), "
        f"controller {controller_cpu / window_s * 100:.0f}%, "
        f"broker {broker_cpu / window_s * 100:.0f}%; machine {machine_busy:.0f}% busy"
    )
    if found["n"] < 0.95 * len(ids) * window_s:
        result.note(
            f"the simulator delivered {found['n'] / window_s:,.0f} of {len(ids):,} heartbeats/s "
            f"(simulator CPU {sim_cpu / window_s * 100:.0f}% of a core over "
            f"{processes} processes, broker {broker_cpu / window_s * 100:.0f}%, "
            f"machine {machine_busy:.0f}% busy)"
        )
