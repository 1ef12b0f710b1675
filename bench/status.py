"""Campaign status latency with 100,000 executions: the CLI, the HTTP API, the library.

The fleet is written by COPY; the campaign is created and started through
`fleet.campaigns` (what ``fleet campaign create`` and ``fleet campaign start`` call), so
its 100,000 executions are enrolled by the product. With the controller serving it:

* ``python -m fleet campaign status ID --json``, a process per request, as an operator's
  script would run it (interpreter start-up included);
* `fleet.campaigns.campaign_status`, the call behind that command, in one process;
* the HTTP API, if the controller serves a campaign status route (see `API_PATHS`).
"""

import json
import time

from bench.harness import (
    Context,
    Figure,
    Result,
    controller_settings,
    http_get,
    percentile,
    prepare_campaign,
    register_terminals,
    run_cli,
    say,
    stack,
    start_controller,
    terminal_ids,
)
from fleet import campaigns
from fleet.db import connect

NAME = "status"
BUDGET_S = 150.0
COMMAND = "make bench BENCH=status"
P95_TARGET_MS = 50.0
#: Routes a campaign status API may have; none exists yet (issue 5 adds the REST API).
API_PATHS = ("/api/v1/campaigns/{id}", "/api/campaigns/{id}", "/campaigns/{id}")


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

            api = None
            for path in API_PATHS:
                code, _ = await http_get(
                    settings.http_host, settings.http_port, path.format(id=campaign_id)
                )
                if code == 200:
                    api = path.format(id=campaign_id)
                    break
            if api is None:
                result.note(
                    "the controller serves no campaign status over HTTP yet (tried "
                    f"{', '.join(API_PATHS)}); issue 5 adds the REST API"
                )
            else:
                samples = []
                for _ in range(api_n):
                    started = time.perf_counter()
                    await http_get(settings.http_host, settings.http_port, api)
                    samples.append((time.perf_counter() - started) * 1000)
                _figures(result, f"HTTP GET {api}", samples)

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
