"""Controller resident memory with 10,000 and then 100,000 terminals registered.

The terminals are written into the database (by COPY, as `bench.harness.register_terminals`
explains), ``python -m fleet serve`` starts, settles, and its RSS is read from /proc; then
it stops, the fleet grows to 100,000 and it starts again.
"""

import asyncio

from bench.harness import (
    Context,
    Figure,
    Result,
    controller_settings,
    register_terminals,
    rss_bytes,
    say,
    stack,
    start_controller,
    terminal_ids,
)

NAME = "memory"
BUDGET_S = 90.0
COMMAND = "make bench BENCH=memory"


async def _settled_rss(pid: int, seconds: float) -> int:
    """The largest RSS seen over `seconds` after start (sampled every half second)."""
    peak = 0
    for _ in range(max(1, int(seconds * 2))):
        peak = max(peak, rss_bytes(pid))
        await asyncio.sleep(0.5)
    return peak


async def run(ctx: Context, result: Result) -> None:
    """Register, start, settle, read; grow the fleet; again."""
    sizes = [50, 500] if ctx.smoke else [10_000, 100_000]
    settle_s = 0.5 if ctx.smoke else 8.0
    readings: dict[int, int] = {}
    async with stack(NAME, brokers=[{}]) as servers:
        settings = controller_settings(servers)
        registered = 0
        for size in sizes:
            await register_terminals(
                servers.dsn, terminal_ids(size - registered, registered), group=None
            )
            registered = size
            controller = await start_controller(settings, servers.root / f"controller-{size}.log")
            try:
                readings[size] = await _settled_rss(controller.pid, settle_s)
            finally:
                await controller.stop()
            say(f"  {size:,} terminals registered: controller RSS {readings[size] / 2**20:.1f} MiB")
    for size, rss in readings.items():
        result.add(Figure(f"controller RSS, {size:,} terminals registered", rss / 2**20, "MiB"))
    small, large = sizes
    growth = (readings[large] - readings[small]) / (large - small)
    result.add(Figure("controller RSS growth per registered terminal", growth, "bytes"))
    result.note(
        "idle controller (no campaign running, no terminal online); the terminals live in "
        "PostgreSQL, so the controller's memory does not grow with them"
        if growth < 100
        else "the controller's memory grows with the registered fleet"
    )
