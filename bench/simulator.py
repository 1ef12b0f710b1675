"""Simulator capacity: terminals one process holds, and resident memory per terminal.

``python -m device_sim --heartbeat-only --heartbeat-s 30`` with 15,000 terminals in one
process, then 50,000 over four processes. A connection counts once the broker's
side of it is established (/proc/net/tcp); the simulator's own report
says how many terminals connected at least once. RSS and CPU come from /proc.

This sandbox caps every process at 20,000 open files (hard limit; root cannot raise it),
so one Mosquitto holds at most about 19,900 connections: the 50,000-terminal run gives
each simulator process a broker of its own (four brokers, each 12,500 terminals).
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import (
    Context,
    Figure,
    Process,
    Result,
    alive,
    cpu_seconds,
    established,
    note_deaths,
    rss_bytes,
    say,
    stack,
    start_simulator,
    stop_simulator,
    terminal_ids,
)
from fleet.embedded import Mosquitto

NAME = "simulator"
BUDGET_S = 300.0
COMMAND = "make bench BENCH=simulator"
RSS_TARGET_KB = 30.0
#: Connecting stops counting once no new connection arrived for this long.
_PLATEAU_S = 8.0
_ARGS = ["--heartbeat-only", "--heartbeat-s", "30", "--connect-concurrency", "200"]


@dataclass
class Held:
    """What a set of simulator processes held after connecting and a steady period."""

    wanted: int
    connected: int
    peak: int
    connect_s: float
    rss_bytes: int
    cpu_percent: float
    reports: list[dict[str, Any] | None]


async def _hold(
    result: Result,
    brokers: list[Mosquitto],
    counts: list[int],
    root: Any,  # noqa: ANN401 - a Path
    *,
    connect_s: float,
    steady_s: float,
) -> Held:
    """One simulator process per broker; connect (bounded), then hold for `steady_s`."""
    simulators: list[Process] = []
    start = 0
    reports: list[dict[str, Any] | None] = []
    try:
        for n, (broker, count) in enumerate(zip(brokers, counts, strict=True)):
            simulators.append(
                await start_simulator(
                    broker, root / f"simulator-{n}.log", count=count, start=start, args=_ARGS
                )
            )
            start += count

        def connected() -> int:
            return sum(established(b.port) for b in brokers)

        t0 = time.monotonic()
        deadline = t0 + connect_s
        reached, grew_at = 0, t0
        while time.monotonic() < deadline:
            now = connected()
            if now > reached:
                reached, grew_at = now, time.monotonic()
            if reached >= sum(counts) or not all(s.running for s in simulators):
                break
            if reached and time.monotonic() - grew_at > _PLATEAU_S:
                break
            await asyncio.sleep(1.0)
        took = time.monotonic() - t0
        say(
            f"  {sum(counts):,} terminals: at most {reached:,} established connections, "
            f"reached in {took:.0f} s"
        )
        pids = [s.pid for s in simulators if s.running]
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        await asyncio.sleep(steady_s)
        live = [pid for pid in pids if alive(pid)]
        rss = sum(rss_bytes(pid) for pid in live)
        cpu = sum(cpu_seconds(pid) - cpu0[pid] for pid in live) / steady_s * 100
        held = connected()
        note_deaths(result, simulators)
    finally:
        reports = [await stop_simulator(s, timeout_s=20) for s in simulators]
    return Held(sum(counts), held, reached, took, rss, cpu, reports)


def _figures(result: Result, label: str, held: Held, target: str) -> None:
    result.add(
        Figure(
            f"{label}: terminals connected",
            held.connected,
            "terminals",
            ceiling=held.wanted,
            ceiling_name="asked for",
            target=target,
            met=held.connected >= held.wanted,
        )
    )
    per_kb = held.rss_bytes / held.connected / 1024 if held.connected else None
    result.add(
        Figure(
            f"{label}: resident memory per connected terminal",
            per_kb,
            "KB",
            target=f"< {RSS_TARGET_KB:.0f} KB",
            met=None
            if per_kb is None
            else per_kb < RSS_TARGET_KB and held.connected >= held.wanted,
        )
    )
    result.add(
        Figure(f"{label}: simulator CPU, steady (30 s heartbeats)", held.cpu_percent, "% of a core")
    )
    result.details[label] = {
        "wanted": held.wanted,
        "connected": held.connected,
        "peak_established": held.peak,
        "connect_s": round(held.connect_s, 1),
        "rss_mib": round(held.rss_bytes / 2**20, 1),
        "cpu_percent": round(held.cpu_percent, 1),
        "reports": [
            {k: r.get(k) for k in ("terminals", "connected", "heartbeats_sent")} if r else None
            for r in held.reports
        ],
    }


async def run(ctx: Context, result: Result) -> None:
    """One process with 15,000 terminals; four processes (four brokers) with 50,000."""
    one = 50 if ctx.smoke else 15_000
    processes = 2 if ctx.smoke else 4
    many = 50 if ctx.smoke else 50_000
    connect_s = 20.0 if ctx.smoke else 45.0
    # One whole heartbeat interval: every terminal has sent (and allocated) at least once.
    steady_s = 1.0 if ctx.smoke else 30.0

    say(f"simulator: one process with {one:,} terminals")
    async with stack(NAME, database=False, brokers=[{"terminals": terminal_ids(one)}]) as servers:
        held = await _hold(
            result, servers.brokers, [one], servers.root, connect_s=connect_s, steady_s=steady_s
        )
    _figures(result, "one process", held, f"{one:,} terminals")

    per = many // processes
    say(f"simulator: {processes} processes with {many:,} terminals, one broker each")
    specs = [{"terminals": terminal_ids(per, n * per)} for n in range(processes)]
    async with stack(f"{NAME}-many", database=False, brokers=specs) as servers:
        held = await _hold(
            result,
            servers.brokers,
            [per] * processes,
            servers.root,
            connect_s=connect_s + 30,
            steady_s=steady_s,
        )
    _figures(result, f"{processes} processes", held, f"{many:,} terminals")
    result.note(
        f"the {processes}-process run uses one broker per process: this sandbox allows 20,000 "
        "open files per process, so one Mosquitto holds at most ~19,900 connections"
    )
