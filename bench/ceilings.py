"""Ceilings of this machine, measured in the same run as the figures compared with them.

(a) the broker's QoS1 pass-through: the ingest workload from the load publisher (four
connections) to a bare ``mosquitto_sub -C N``, on the product's broker configuration;
for reference also ``mosquitto_pub -l`` in four parallel 50k-line chunks, the method of
../shared/research/perf-limits.md. (b) PostgreSQL: bare COPY (``copy_records_to_table``,
batches of 5,000, synchronous commit) into the heartbeats and update_events tables.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import loadpub, workload
from bench.harness import (
    Context,
    Figure,
    Result,
    Stack,
    cpu_seconds,
    median,
    say,
    stack,
    terminal_ids,
)
from fleet.embedded import Mosquitto

NAME = "ceilings"
BUDGET_S = 120.0
COMMAND = "make bench BENCH=ceilings"
PUBLISHERS = 4
COPY_BATCH = 5000
#: The ingest mix: 10,000 terminals heartbeating, 2,000 of them reporting 8 events each.
FULL_MIX = workload.Mix(
    terminals=10_000, heartbeats=64_000, event_terminals=2000, events_per_terminal=8
)
SMOKE_MIX = workload.Mix(terminals=50, heartbeats=240, event_terminals=20, events_per_terminal=3)
PROBE_TOPIC = "fleet/bench/probe"
_PUB_CHUNK = 50_000


def mix_of(ctx: Context) -> workload.Mix:
    """The ingest mix at this run's size."""
    return SMOKE_MIX if ctx.smoke else FULL_MIX


def reps_of(ctx: Context) -> int:
    """Repetitions per figure (the median is reported)."""
    return 1 if ctx.smoke else 3


def publisher_identities(password: str) -> list[tuple[str, str]]:
    """The load publisher's broker identities, one per connection."""
    return [(f"bench-pub-{n}", password) for n in range(PUBLISHERS)]


def broker_spec(ids: list[str] | None = None) -> dict[str, object]:
    """Dynsec content of a broker the load publisher and a bare subscriber can use."""
    names = [name for name, _ in publisher_identities("")] + ["bench-sub"]
    return {"terminals": ids or [], "bench_clients": names}


@dataclass
class Ceilings:
    """What the ingest figures are compared with."""

    broker_msgs_s: float | None
    copy_heartbeats_rows_s: float | None
    copy_events_rows_s: float | None
    mix: workload.Mix

    @property
    def copy_mix_rows_s(self) -> float | None:
        """COPY rate of the mix: each table at its own rate, in the mix's proportions."""
        if not self.copy_heartbeats_rows_s or not self.copy_events_rows_s:
            return None
        seconds = (
            self.mix.heartbeats / self.copy_heartbeats_rows_s
            + self.mix.events / self.copy_events_rows_s
        )
        return self.mix.total / seconds


async def _subscriber(broker: Mosquitto, password: str, count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-u",
        "bench-sub",
        "-P",
        password,
        "-V",
        "5",
        "-q",
        "1",
        "-t",
        "fleet/v1/t/+/+",
        "-t",
        PROBE_TOPIC,
        "-C",
        str(count + 1),
        "-F",
        "x",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _count_lines(stream: asyncio.StreamReader, first: asyncio.Event) -> int:
    lines = 0
    while chunk := await stream.read(1 << 16):
        lines += chunk.count(b"\n")
        if lines:
            first.set()
    return lines


async def _pass_through(
    broker: Mosquitto,
    password: str,
    total: int,
    publish: Callable[[], Awaitable[float | None]],
) -> tuple[float | None, int, float]:
    """One run: (delivered msg/s or None, delivered, broker CPU s per message).

    `publish` returns when its first message left (perf_counter), if it knows: the
    clock starts there, not before the publisher encoded its packets.
    """
    sub = await _subscriber(broker, password, total)
    assert sub.stdout is not None
    subscribed = asyncio.Event()
    counting = asyncio.create_task(_count_lines(sub.stdout, subscribed), name="sub-count")
    delivered = 0
    try:
        # The retained probe arrives once the subscription is in place.
        async with asyncio.timeout(10):
            await subscribed.wait()
        cpu0, t0 = cpu_seconds(broker.pid), time.perf_counter()
        first_send = await publish()
        t0 = first_send or t0
        try:
            async with asyncio.timeout(60):
                await sub.wait()
        except TimeoutError:
            sub.terminate()
            await sub.wait()
        t1, cpu1 = time.perf_counter(), cpu_seconds(broker.pid)
        delivered = await counting - 1
    finally:
        if sub.returncode is None:
            sub.terminate()
            await sub.wait()
        counting.cancel()
        # gather hands back the counter's own cancellation; ours still propagates.
        await asyncio.gather(counting, return_exceptions=True)
    rate = total / (t1 - t0) if delivered == total else None
    return rate, delivered, (cpu1 - cpu0) / max(1, delivered)


async def _burst(servers: Stack, batches: list[list[loadpub.Message]]) -> float | None:
    stats = await loadpub.burst(
        servers.broker.host,
        servers.broker.port,
        publisher_identities(servers.password),
        batches,
        timeout_s=60,
    )
    return stats.first_send


async def _mosquitto_pub(broker: Mosquitto, password: str, lines_file: str) -> None:
    inputs = [Path(f"{lines_file}.{n}").open("rb") for n in range(PUBLISHERS)]  # noqa: ASYNC230, SIM115 - small local files, handed to the children
    publishers = [
        await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-u",
            user,
            "-P",
            password,
            "-q",
            "1",
            "-M",
            "1000",
            "-t",
            "fleet/v1/t/T000000/heartbeat",
            "-l",
            stdin=inputs[n],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for n, (user, _) in enumerate(publisher_identities(password))
    ]
    for handle in inputs:
        handle.close()
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(p.wait() for p in publishers))
    finally:
        for p in publishers:
            if p.returncode is None:
                p.kill()
                await p.wait()


async def measure_broker(
    servers: Stack, mix: workload.Mix, reps: int, result: Result
) -> float | None:
    """Ceiling (a): the median pass-through of the ingest workload to a bare subscriber."""
    broker = servers.broker
    await loadpub.publish_retained(
        broker.host, broker.port, publisher_identities(servers.password)[0], PROBE_TOPIC, b"p"
    )
    ids = terminal_ids(mix.terminals)
    rates: list[float] = []
    cpu_per_msg: list[float] = []
    for rep in range(reps):
        batches = workload.batches(
            ids, mix, campaign_id=1, seq_base=rep * 100, ts=time.time(), connections=PUBLISHERS
        )
        rate, delivered, cpu = await _pass_through(
            broker,
            servers.password,
            mix.total,
            lambda b=batches: _burst(servers, b),  # type: ignore[misc]
        )
        say(
            f"  broker pass-through run {rep + 1}: {delivered}/{mix.total} delivered, "
            f"{rate or 0:,.0f} msg/s"
        )
        if rate is None:
            result.note(f"run {rep + 1}: the bare subscriber got {delivered} of {mix.total}")
            continue
        rates.append(rate)
        cpu_per_msg.append(cpu)
    ceiling = median(rates)
    result.details["broker_pass_through_runs_msgs_s"] = [round(r) for r in rates]
    result.details["broker_cpu_us_per_msg"] = [round(c * 1e6, 2) for c in cpu_per_msg]
    result.add(
        Figure(
            "broker QoS1 pass-through, load publisher x4 -> mosquitto_sub",
            ceiling,
            "msg/s",
        )
    )
    result.note(
        "perf-limits measured 70,986 msg/s with 154-byte payloads, anonymous access and no "
        "persistence; this is the product's broker configuration (dynsec ACLs, persistence) "
        "and the real payloads"
    )
    # The method perf-limits used, as a cross-check of the load publisher.
    lines = "\n".join(
        m.payload.decode()
        for batch in workload.batches(
            ids, mix, campaign_id=1, seq_base=0, ts=time.time(), connections=1
        )
        for m in batch
    ).splitlines()
    lines_file = str(servers.root / "lines")
    per = min(_PUB_CHUNK, -(-len(lines) // PUBLISHERS))
    for n in range(PUBLISHERS):
        chunk = lines[n * per : (n + 1) * per]
        text = "\n".join(chunk) + ("\n" if chunk else "")
        await asyncio.to_thread(Path(f"{lines_file}.{n}").write_text, text)
    sent = min(len(lines), per * PUBLISHERS)
    pub_rates: list[float] = []
    for _ in range(reps):
        rate, delivered, _cpu = await _pass_through(
            broker,
            servers.password,
            sent,
            lambda: _mosquitto_pub(broker, servers.password, lines_file),
        )
        if rate is not None:
            pub_rates.append(rate)
        else:
            result.note(f"mosquitto_pub x4: the bare subscriber got {delivered} of {sent}")
    result.add(
        Figure(
            "broker QoS1 pass-through, mosquitto_pub -l x4 (perf-limits method)",
            median(pub_rates),
            "msg/s",
            ceiling=ceiling,
            ceiling_name="load publisher x4",
        )
    )
    return ceiling


async def _copy_rate(
    conn: asyncpg.Connection, table: str, columns: list[str], rows: list[tuple[object, ...]]
) -> float:
    await conn.execute(f"TRUNCATE {table}")
    started = time.perf_counter()
    for offset in range(0, len(rows), COPY_BATCH):
        await conn.copy_records_to_table(
            table, records=rows[offset : offset + COPY_BATCH], columns=columns
        )
    elapsed = time.perf_counter() - started
    await conn.execute(f"TRUNCATE {table}")
    return len(rows) / elapsed


async def measure_copy(
    dsn: str, mix: workload.Mix, reps: int, result: Result
) -> tuple[float | None, float | None]:
    """Ceiling (b): bare COPY into heartbeats and update_events, median rows/s."""
    ids = terminal_ids(mix.terminals)
    rows = max(mix.total, 1000)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT fleet_ensure_heartbeat_partitions(1)")
        hb, ev = [], []
        for _ in range(reps):
            now = time.time()
            hb.append(
                await _copy_rate(
                    conn,
                    "heartbeats",
                    workload.HEARTBEAT_COLUMNS,
                    workload.heartbeat_rows(rows, ids, now),
                )
            )
            ev.append(
                await _copy_rate(
                    conn,
                    "update_events",
                    workload.EVENT_COLUMNS,
                    workload.event_rows(rows, ids, 1, now),
                )
            )
    finally:
        await conn.close()
    result.details["copy_heartbeats_runs_rows_s"] = [round(r) for r in hb]
    result.details["copy_events_runs_rows_s"] = [round(r) for r in ev]
    hb_rate, ev_rate = median(hb), median(ev)
    result.add(Figure(f"bare COPY into heartbeats ({COPY_BATCH}/batch)", hb_rate, "rows/s"))
    result.add(Figure(f"bare COPY into update_events ({COPY_BATCH}/batch)", ev_rate, "rows/s"))
    return hb_rate, ev_rate


async def ceilings(ctx: Context, result: Result) -> Ceilings:
    """Measure (or reuse, within one run of the suite) the ceilings of the ingest mix."""
    found = ctx.shared.get(NAME)
    if isinstance(found, Ceilings):
        return found
    mix, reps = mix_of(ctx), reps_of(ctx)
    say(
        f"ceilings: {mix.total:,} messages ({mix.heartbeats:,} heartbeats, "
        f"{mix.events:,} events), {reps} run(s) each"
    )
    async with stack("ceilings", brokers=[broker_spec()]) as servers:
        broker = await measure_broker(servers, mix, reps, result)
        hb, ev = await measure_copy(servers.dsn, mix, reps, result)
    found = Ceilings(broker, hb, ev, mix)
    result.add(Figure("bare COPY, the ingest mix's proportions", found.copy_mix_rows_s, "rows/s"))
    ctx.shared[NAME] = found
    return found


async def run(ctx: Context, result: Result) -> None:
    """The ceilings benchmark on its own."""
    await ceilings(ctx, result)
