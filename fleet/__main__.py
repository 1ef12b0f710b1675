"""The ``fleet`` command: migrate, serve, inventory, campaigns, and the demo.

Settings come from ``FLEET_*`` environment variables (``fleet --help`` lists them); this
is the only module that reads the environment.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from fleet import campaigns, controller, inventory
from fleet.artifacts import ArtifactStore
from fleet.broker_admin import BrokerAdmin
from fleet.db import connect, migrate
from fleet.db.repository import Repository
from fleet.errors import FleetError
from fleet.progress import render_status
from fleet.protocol import PackageKind
from fleet.settings import FleetSettings

logger = logging.getLogger("fleet")


def _settings_help() -> str:
    lines = ["settings (environment variables):"]
    for name, field in FleetSettings.model_fields.items():
        lines.append(f"  FLEET_{name.upper():<34} {field.description} (default: {field.default})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="Signed software updates for fleets of payment terminals over MQTT.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="bring the database schema up to date")
    sub.add_parser("serve", help="run the controller until SIGINT/SIGTERM")

    demo = sub.add_parser("demo", help="run a whole rollout on embedded defaults")
    demo.add_argument("--terminals", type=int, default=1000)
    demo.add_argument("--workdir", type=Path, default=None, help="keep the demo's files here")

    terminals = sub.add_parser("terminals", help="terminal inventory").add_subparsers(
        dest="action", required=True
    )
    provision = terminals.add_parser("provision", help="register terminals and broker identities")
    provision.add_argument("--prefix", default="T")
    provision.add_argument("--start", type=int, default=0)
    provision.add_argument("--count", type=int, required=True)
    provision.add_argument("--model", default="P400")
    provision.add_argument("--merchant", default="M0001")
    provision.add_argument("--timezone", default="UTC")

    package = sub.add_parser("package", help="packages").add_subparsers(
        dest="action", required=True
    )
    add = package.add_parser("add", help="store a package file and register it")
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--kind", choices=[k.value for k in PackageKind], required=True)
    add.add_argument("--version", required=True)
    add.add_argument("--models", required=True, help="comma-separated compatible models")

    group = sub.add_parser("group", help="terminal groups").add_subparsers(
        dest="action", required=True
    )
    group.add_parser("create").add_argument("name")
    assign = group.add_parser("assign", help="add terminals to a group")
    assign.add_argument("name")
    assign.add_argument("terminals", nargs="+", help="terminal ids")

    campaign = sub.add_parser("campaign", help="campaigns").add_subparsers(
        dest="action", required=True
    )
    create = campaign.add_parser("create")
    create.add_argument("name")
    create.add_argument("--group", action="append", required=True, help="repeatable")
    create.add_argument(
        "--package", action="append", required=True, help="name=version, repeatable"
    )
    create.add_argument("--waves", default="10,50,100", help="cumulative percentages")
    create.add_argument("--success-threshold", type=float, default=0.9)
    create.add_argument("--failure-threshold", type=float, default=0.1)
    for action in ("start", "pause", "resume", "cancel"):
        campaign.add_parser(action).add_argument("campaign", help="id or name")
    status = campaign.add_parser("status")
    status.add_argument("campaign", help="id or name")
    status.add_argument("--watch", action="store_true", help="redraw until it ends")
    status.add_argument("--json", action="store_true")
    return parser


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _with_repo(settings: FleetSettings, work: Callable[[Repository], Awaitable[int]]) -> int:
    repo = await connect(settings.database_url, pool_size=2)
    try:
        return await work(repo)
    finally:
        await repo.close()


async def _campaign_id(repo: Repository, key: str) -> int:
    if key.isdigit():
        return int(key)
    async with repo.connection() as q:
        found = await q.campaign_by_name(key)
    if found is None:
        raise FleetError(f"no campaign {key!r}")
    return found


async def _run(args: argparse.Namespace, settings: FleetSettings) -> int:  # noqa: PLR0911
    match args.command:
        case "migrate":
            applied = await migrate(settings.database_url)
            print(f"applied migrations: {applied or 'none (up to date)'}")
            return 0
        case "serve":
            stop = asyncio.Event()
            with _stop_on_signals(stop):
                await controller.run(settings, stop)
            return 0
        case "demo":
            from fleet.demo import run_demo  # noqa: PLC0415 - only the demo needs it

            return await run_demo(settings, terminals=args.terminals, workdir=args.workdir)
        case "terminals":
            return await _with_repo(settings, lambda repo: _provision(repo, settings, args))
        case "package":
            return await _with_repo(settings, lambda repo: _add_package(repo, settings, args))
        case "group":
            return await _with_repo(settings, lambda repo: _group(repo, settings, args))
        case "campaign":
            return await _with_repo(settings, lambda repo: _campaign(repo, args))
    return 2


async def _provision(repo: Repository, settings: FleetSettings, args: argparse.Namespace) -> int:
    rows = [
        {
            "id": f"{args.prefix}{n:06d}",
            "model": args.model,
            "merchant_id": args.merchant,
            "timezone": args.timezone,
        }
        for n in range(args.start, args.start + args.count)
    ]
    async with BrokerAdmin.from_settings(settings) as admin:
        await inventory.provision_terminals(repo, admin, rows, settings.terminal_secret)
    print(f"provisioned {len(rows)} terminals {rows[0]['id']}..{rows[-1]['id']}")
    return 0


async def _add_package(repo: Repository, settings: FleetSettings, args: argparse.Namespace) -> int:
    package_id = await inventory.add_package(
        repo,
        ArtifactStore(settings.artifact_dir),
        args.file,
        name=args.name,
        kind=PackageKind(args.kind),
        version=args.version,
        models=[m for m in args.models.split(",") if m],
    )
    print(f"package {args.name}={args.version} registered as {package_id}")
    return 0


async def _group(repo: Repository, settings: FleetSettings, args: argparse.Namespace) -> int:
    async with BrokerAdmin.from_settings(settings) as admin:
        if args.action == "create":
            await inventory.create_group(repo, admin, args.name)
            print(f"group {args.name} ready")
        else:
            await inventory.assign_group(
                repo, admin, args.name, args.terminals, command_expiry_s=settings.command_expiry_s
            )
            print(f"{len(args.terminals)} terminals in group {args.name}")
    return 0


async def _campaign(repo: Repository, args: argparse.Namespace) -> int:
    if args.action == "create":
        packages = []
        for spec in args.package:
            name, _, version = spec.partition("=")
            packages.append((name, version))
        campaign_id = await campaigns.create_campaign(
            repo,
            name=args.name,
            groups=args.group,
            packages=packages,
            waves=[float(w) for w in args.waves.split(",")],
            success_threshold=args.success_threshold,
            failure_threshold=args.failure_threshold,
        )
        print(f"campaign {args.name} created as {campaign_id} (draft)")
        return 0
    campaign_id = await _campaign_id(repo, args.campaign)
    match args.action:
        case "start":
            count = await campaigns.start_campaign(repo, campaign_id)
            print(f"campaign {campaign_id} started with {count} executions")
        case "pause":
            await campaigns.pause_campaign(repo, campaign_id)
            print(f"campaign {campaign_id} paused")
        case "resume":
            await campaigns.resume_campaign(repo, campaign_id)
            print(f"campaign {campaign_id} resumed")
        case "cancel":
            await campaigns.cancel_campaign(repo, campaign_id)
            print(f"campaign {campaign_id} canceled")
        case "status":
            await _status(repo, campaign_id, watch=args.watch, as_json=args.json)
    return 0


async def _status(repo: Repository, campaign_id: int, *, watch: bool, as_json: bool) -> None:
    while True:
        status = await campaigns.campaign_status(repo, campaign_id)
        if as_json:
            print(
                json.dumps(
                    {
                        "id": status.id,
                        "name": status.name,
                        "status": status.status,
                        "current_wave": status.current_wave,
                        "paused_reason": status.paused_reason,
                        "waves": [
                            {"wave": w.wave, "opened": w.opened, "counts": w.counts}
                            for w in status.waves
                        ],
                        "totals": status.totals,
                    }
                )
            )
        else:
            text = render_status(status)
            if watch and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(text, flush=True)
        if not watch or status.status in ("completed", "canceled", "paused"):
            return
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fleet`` and ``python -m fleet``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = FleetSettings()
    try:
        return asyncio.run(_run(args, settings))
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
