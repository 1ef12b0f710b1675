"""Campaign status latency with 100,000 executions: the CLI, the HTTP API, the library.

The fleet is written by COPY; the campaign is created and started through
`fleet.campaigns` (what ``fleet campaign create`` and ``fleet campaign start`` call), so
its 100,000 executions are enrolled by the product. With the controller serving it:

* ``python -m fleet campaign status ID --json``, a process per request, as an operator's
  script would run it (interpreter start-up included);
* `fleet.campaigns.campaign_status`, the call behind that command, in one process;
* the REST API (``GET /api/v1/campaigns/{id}``) with a viewer token, on one connection.
"""

import json
import time

import httpx

from bench.harness import (
    Context,
    Figure,
    Result,
    controller_settings,
    percentile,
    prepare_campaign,
    register_terminals,
    run_cli,
    say,
    stack,
    start_controller,
    terminal_ids,
)
from fleet import campaigns, tokens
from fleet.db import connect
from fleet.tokens import Role

NAME = "status"
BUDGET_S = 150.0
COMMAND = "make bench BENCH=status"
P95_TARGET_MS = 50.0


def _figures(result: Result, label: str, samples_ms: list[float]) -> None:
    p95 = percentile(samples_ms, 95)
    result.add(Figure(f"{label}: p50", percentile(samples_ms, 50), "ms"))
    result.add(
        Figure(
            f"{label}: p95 ({len(samples_ms)} requests)",
            p95,
            "ms",
            target=f"< {P95_TARGET_MS:.0f} ms",
            met=None if p95 is None else p95 < P95_TARGET_MS,
        )
    )
    result.add(Figure(f"{label}: p99", percentile(samples_ms, 99), "ms"))


async def run(ctx: Context, result: Result) -> None:
    """Set up 100,000 executions, then time status requests three ways."""
    terminals = 500 if ctx.smoke else 100_000
    library_n, api_n, cli_n = (20, 20, 3) if ctx.smoke else (200, 200, 30)
    async with stack(NAME, brokers=[{}]) as servers:
        settings = controller_settings(servers)
        await register_terminals(servers.dsn, terminal_ids(terminals))
        t0 = time.perf_counter()
        campaign_id = await prepare_campaign(settings, "bench-status", start=True)
        enrolled_s = time.perf_counter() - t0
        say(f"status: campaign of {terminals:,} created and started in {enrolled_s:.1f} s")
        result.details["create_and_start_s"] = round(enrolled_s, 2)
        controller = await start_controller(settings, servers.root / "controller.log")
        try:
            repo = await connect(settings.database_url, pool_size=2)
            try:
                _, token = await tokens.issue(
                    repo, name="bench", role=Role.VIEWER, actor="bench", at=time.time()
                )
                status = await campaigns.campaign_status(repo, campaign_id)
                result.details["executions"] = sum(status.totals.values())
                samples: list[float] = []
                for _ in range(library_n):
                    started = time.perf_counter()
                    await campaigns.campaign_status(repo, campaign_id)
                    samples.append((time.perf_counter() - started) * 1000)
            finally:
                await repo.close()
            _figures(result, "fleet.campaigns.campaign_status (library)", samples)

            url = f"http://{settings.api_host}:{settings.api_port}/api/v1/campaigns/{campaign_id}"
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(headers=headers, timeout=30) as http:
                (await http.get(url)).raise_for_status()
                samples = []
                for _ in range(api_n):
                    started = time.perf_counter()
                    (await http.get(url)).raise_for_status()
                    samples.append((time.perf_counter() - started) * 1000)
            _figures(result, "REST API GET /api/v1/campaigns/{id} (one connection)", samples)

            samples = []
            for _ in range(cli_n):
                started = time.perf_counter()
                out = await run_cli(settings, "campaign", "status", str(campaign_id), "--json")
                samples.append((time.perf_counter() - started) * 1000)
            json.loads(out)
            _figures(result, "CLI `fleet campaign status --json` (new process each)", samples)
        finally:
            await controller.stop()
    result.note(
        "measured while the controller runs the campaign (its runner ticks over the same "
        "executions); the CLI figure includes starting a Python interpreter"
    )
