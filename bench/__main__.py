"""``python -m bench [NAME ...] [--smoke]``: run benchmarks, write results, render the docs.

Each benchmark has a time budget of its own and the whole run one of its own
(`TOTAL_BUDGET_S`), so ``make bench`` ends by itself in under 15 minutes on this machine.
Running only some benchmarks merges their results into the results file.
"""

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import campaign, ceilings, ingest, latency, memory, simulator, status
from bench.harness import ROOT, Context, Result, format_figure, git_state, machine, now_iso, say
from bench.report import update_docs, write_results

#: The whole suite stops starting benchmarks, and cuts the running one short, after this.
TOTAL_BUDGET_S = 14 * 60.0
#: A smoke run's budget per benchmark (tests/test_bench.py).
SMOKE_BUDGET_S = 60.0
RESULTS = ROOT / "bench" / "results" / "latest.json"
DOCS = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's entry point and its time budget at full size."""

    run: Callable[[Context, Result], Awaitable[None]]
    budget_s: float
    command: str


BENCHMARKS: dict[str, Benchmark] = {
    "ceilings": Benchmark(ceilings.run, ceilings.BUDGET_S, ceilings.COMMAND),
    "ingest": Benchmark(ingest.run, ingest.BUDGET_S, ingest.COMMAND),
    "latency": Benchmark(latency.run, latency.BUDGET_S, latency.COMMAND),
    "fanout": Benchmark(campaign.run_fanout, campaign.BUDGET_S, campaign.FANOUT_COMMAND),
    "campaign": Benchmark(campaign.run_campaign, campaign.BUDGET_S, campaign.COMMAND),
    "simulator": Benchmark(simulator.run, simulator.BUDGET_S, simulator.COMMAND),
    "memory": Benchmark(memory.run, memory.BUDGET_S, memory.COMMAND),
    "status": Benchmark(status.run, status.BUDGET_S, status.COMMAND),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS})")
    parser.add_argument("--docs", type=Path, default=None, help=f"page to render (default {DOCS})")
    parser.add_argument("--no-docs", action="store_true", help="do not touch the docs page")
    return parser


async def _run_one(name: str, ctx: Context, budget_s: float) -> Result:
    bench = BENCHMARKS[name]
    say(f"\n== {name} (budget {budget_s:.0f} s) ==")
    started = time.monotonic()
    # Filled as the benchmark goes: what it measured before a timeout or a failure stays.
    result = Result(name, bench.command)
    try:
        async with asyncio.timeout(budget_s):
            await bench.run(ctx, result)
    except TimeoutError:
        result.error = f"exceeded its time budget of {budget_s:.0f} s"
    except Exception as exc:
        logging.getLogger("bench").exception("%s failed", name)
        result.error = f"{type(exc).__name__}: {exc}"
    result.elapsed_s = round(time.monotonic() - started, 1)
    say(f"-- {name}: {result.elapsed_s:.0f} s{'; ERROR ' + result.error if result.error else ''}")
    for figure in result.figures:
        say(f"   {format_figure(figure)}")
    return result


async def run_suite(names: list[str], ctx: Context) -> tuple[dict[str, Result], float]:
    """Run the benchmarks in order within the suite's budget; their results and total time.

    SIGTERM cancels the run like SIGINT does, so every server and process it started is
    stopped by the benchmarks' own clean-up before it exits.
    """
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = time.monotonic()
    results: dict[str, Result] = {}
    for name in names:
        left = TOTAL_BUDGET_S - (time.monotonic() - started)
        budget = SMOKE_BUDGET_S if ctx.smoke else BENCHMARKS[name].budget_s
        if left < 10:
            results[name] = Result(
                name, BENCHMARKS[name].command, error="not run: the suite's time budget was spent"
            )
            continue
        results[name] = await _run_one(name, ctx, min(budget, left))
    return results, time.monotonic() - started


def merge(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """Keep the results of benchmarks not run this time (each carries its own date)."""
    try:
        old: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    benchmarks = dict(old.get("benchmarks", {}))
    benchmarks.update(fresh["benchmarks"])
    ordered = {name: benchmarks[name] for name in BENCHMARKS if name in benchmarks}
    return fresh | {"benchmarks": ordered}


def main(argv: list[str] | None = None) -> int:
    """Run, write the results file and render the docs table; 1 if a benchmark failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = args.names or list(BENCHMARKS)
    ctx = Context(smoke=args.smoke, selected=names)
    invoked = "python -m bench" + "".join(f" {n}" for n in args.names)
    command = (
        f"{invoked}{' --smoke' if args.smoke else ''}" if args.names or args.smoke else "make bench"
    )
    info, git, date = machine(), git_state(), now_iso()
    try:
        results, total = asyncio.run(run_suite(names, ctx))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted: servers and processes stopped; no results written")
        return 130
    fresh: dict[str, Any] = {
        "date": date,
        "command": command,
        "total_s": round(total, 1),
        "smoke": args.smoke,
        "machine": info,
        "git": git,
        "benchmarks": {
            name: result.as_dict() | {"date": date, "commit": git["commit"]}
            for name, result in results.items()
        },
    }
    out = args.out or RESULTS
    merged = merge(out, fresh) if args.names else fresh
    write_results(merged, out)
    say(f"\nresults: {out} (total {total:.0f} s)")
    if not args.no_docs and not (args.smoke and args.docs is None):
        page = args.docs or DOCS
        update_docs(merged, page)
        say(f"docs: {page}")
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
