"""The ``fleet`` command: migrate, serve, inventory, campaigns, and the demo.

Settings come from ``FLEET_*`` environment variables (``fleet --help`` lists them); this
is the only module that reads the environment.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleet import audit, campaigns, controller, inventory, tokens, webhooks
from fleet.artifacts import ArtifactStore
from fleet.broker_admin import BrokerAdmin
from fleet.clock import SystemClock
from fleet.db import connect, migrate
from fleet.db.repository import Repository
from fleet.errors import FleetError
from fleet.planning import plan_campaign
from fleet.policy import CampaignPolicy, TargetFilter
from fleet.progress import render_status
from fleet.protocol import PackageKind
from fleet.settings import FleetSettings
from fleet.tokens import Role

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
    add.add_argument(
        "--from-version",
        action="append",
        default=[],
        help="a version this package upgrades from (repeatable; default: any)",
    )
    add.add_argument(
        "--requires",
        action="append",
        default=[],
        help="name=version: that package at least at that version (repeatable)",
    )

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
    create = campaign.add_parser(
        "create", help="create a draft campaign (see docs/operations.md for every rule)"
    )
    create.add_argument("name")
    create.add_argument("--group", action="append", required=True, help="repeatable")
    create.add_argument(
        "--package", action="append", required=True, help="name=version, repeatable"
    )
    _policy_arguments(create)
    _filter_arguments(create)
    for action in ("start", "pause", "resume", "cancel", "plan", "audit"):
        sub_action = campaign.add_parser(action)
        sub_action.add_argument("campaign", help="id or name")
        if action == "plan":
            sub_action.add_argument("--json", action="store_true")
    exclude = campaign.add_parser("exclude-model", help="take a terminal model out")
    exclude.add_argument("campaign", help="id or name")
    exclude.add_argument("model")
    rollback = campaign.add_parser(
        "rollback", help="create a draft campaign taking a campaign's terminals back"
    )
    rollback.add_argument("campaign", help="id or name of the campaign to undo")
    rollback.add_argument("--name", required=True)
    rollback.add_argument(
        "--to", action="append", default=[], help="name=version where terminals ran several"
    )
    status = campaign.add_parser("status")
    status.add_argument("campaign", help="id or name")
    status.add_argument("--watch", action="store_true", help="redraw until it ends")
    status.add_argument("--json", action="store_true")

    audit_cmd = sub.add_parser("audit", help="the hash-chained audit log").add_subparsers(
        dest="action", required=True
    )
    audit_cmd.add_parser("verify", help="recompute the whole chain; exit 1 if it is broken")

    token = sub.add_parser("token", help="operator tokens of the REST API").add_subparsers(
        dest="action", required=True
    )
    issue = token.add_parser("create", help="issue a token and print it (shown only once)")
    issue.add_argument("--name", required=True, help="who uses it; the audit log's actor")
    issue.add_argument("--role", required=True, choices=[r.label for r in Role])
    token.add_parser("list", help="every token, revoked ones too")
    token.add_parser("revoke", help="refuse a token from now on").add_argument("id", type=int)

    webhook = sub.add_parser("webhook", help="campaign events to HTTP endpoints").add_subparsers(
        dest="action", required=True
    )
    hook_add = webhook.add_parser("add", help="register an endpoint; prints its secret once")
    hook_add.add_argument("url")
    hook_add.add_argument(
        "--event", action="append", required=True, choices=webhooks.EVENTS, help="repeatable"
    )
    hook_add.add_argument("--secret", help="the HMAC key (default: a generated one)")
    hook_add.add_argument(
        "--start-after", type=int, help="replay from after this audit id (default: now)"
    )
    webhook.add_parser("list", help="endpoints and their delivery lag").add_argument(
        "--json", action="store_true"
    )
    webhook.add_parser("remove", help="stop sending to an endpoint").add_argument("id", type=int)
    deliveries = webhook.add_parser("deliveries", help="an endpoint's latest attempts")
    deliveries.add_argument("id", type=int)
    deliveries.add_argument("--limit", type=int, default=20)
    return parser


def _policy_arguments(create: argparse.ArgumentParser) -> None:
    policy = create.add_argument_group("rollout rules (override --policy)")
    policy.add_argument("--policy", type=Path, help="a JSON file of fleet.policy.CampaignPolicy")
    policy.add_argument("--waves", help="cumulative percentages, e.g. 10,50,100")
    policy.add_argument("--wave-counts", help="cumulative terminal counts, e.g. 50,500,5000")
    policy.add_argument("--soak", type=float, help="seconds each wave soaks before the next")
    policy.add_argument("--success-threshold", type=float)
    policy.add_argument("--failure-threshold", type=float, help="share of one wave")
    policy.add_argument("--cumulative-threshold", type=float, help="share of the campaign")
    policy.add_argument("--on-threshold", choices=["pause", "abort"])
    policy.add_argument("--window", help="local maintenance window, e.g. 22:00-06:00")
    policy.add_argument("--any-time", action="store_true", help="no maintenance window")
    policy.add_argument("--forced", action="store_true", help="merchants may not postpone")
    policy.add_argument("--max-postpones", type=int)
    policy.add_argument("--rate", type=int, help="terminals started per minute")
    policy.add_argument("--max-downloads", type=int, help="concurrent downloads")
    policy.add_argument("--no-health-gate", action="store_true")
    policy.add_argument("--deadline", action="append", default=[], help="phase=seconds")
    policy.add_argument("--retries", action="append", default=[], help="class=count")
    policy.add_argument("--expected-duration", type=float, help="seconds, for the ETA")


def _filter_arguments(create: argparse.ArgumentParser) -> None:
    target = create.add_argument_group("target filter (all given must match)")
    target.add_argument("--model", action="append", help="repeatable")
    target.add_argument("--merchant", action="append", help="repeatable")
    target.add_argument("--region", action="append", help="repeatable")
    target.add_argument("--current", action="append", default=[], help="name=version")
    target.add_argument("--attribute", action="append", default=[], help="key=value")


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise FleetError(f"{what} {value!r} is not key=value")
        pairs.append((key, rest))
    return pairs


def policy_from_args(args: argparse.Namespace) -> CampaignPolicy:
    """The campaign policy: the --policy file (or defaults), then each flag given."""
    raw: dict[str, Any] = json.loads(args.policy.read_text()) if args.policy else {}
    if args.waves:
        soak = args.soak or 0.0
        raw["waves"] = [{"percent": float(p), "soak_s": soak} for p in args.waves.split(",")]
    elif args.wave_counts:
        soak = args.soak or 0.0
        raw["waves"] = [{"count": int(c), "soak_s": soak} for c in args.wave_counts.split(",")]
    simple = {
        "success_threshold": args.success_threshold,
        "failure_threshold": args.failure_threshold,
        "cumulative_failure_threshold": args.cumulative_threshold,
        "threshold_action": args.on_threshold,
        "max_postpones": 0 if args.forced else args.max_postpones,
        "rate_per_min": args.rate,
        "max_concurrent_downloads": args.max_downloads,
        "expected_duration_s": args.expected_duration,
    }
    raw |= {k: v for k, v in simple.items() if v is not None}
    if args.any_time:
        raw["window"] = None
    elif args.window:
        start, _, end = args.window.partition("-")
        raw["window"] = {"start": start, "end": end}
    if args.no_health_gate:
        raw["health_gate"] = {"enabled": False}
    for phase, seconds in _pairs(args.deadline, "deadline"):
        raw.setdefault("deadlines", {})[f"{phase}_s"] = float(seconds)
    for failure_class, count in _pairs(args.retries, "retries"):
        raw.setdefault("retries", {})[failure_class] = int(count)
    try:
        return CampaignPolicy.model_validate(raw)
    except ValidationError as exc:
        raise FleetError(f"bad campaign rules: {exc}") from None


def target_from_args(args: argparse.Namespace) -> TargetFilter:
    """The target filter from the command line."""
    versions: dict[str, list[str]] = {}
    for name, version in _pairs(args.current, "current"):
        versions.setdefault(name, []).append(version)
    attributes: dict[str, list[str]] = {}
    for key, value in _pairs(args.attribute, "attribute"):
        attributes.setdefault(key, []).append(value)
    try:
        return TargetFilter(
            models=args.model,
            merchants=args.merchant,
            regions=args.region,
            versions=versions or None,
            attributes=attributes or None,
        )
    except ValidationError as exc:
        raise FleetError(f"bad target filter: {exc}") from None


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
        case "audit":
            return await _with_repo(settings, _verify_audit)
        case "token":
            return await _with_repo(settings, lambda repo: _token(repo, args))
        case "webhook":
            return await _with_repo(settings, lambda repo: _webhook(repo, settings, args))
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
    async with inventory.admin_session(repo, lambda: BrokerAdmin.from_settings(settings)) as admin:
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
        from_versions=args.from_version,
        requires=dict(_pairs(args.requires, "requires")),
    )
    print(f"package {args.name}={args.version} registered as {package_id}")
    return 0


async def _group(repo: Repository, settings: FleetSettings, args: argparse.Namespace) -> int:
    async with inventory.admin_session(repo, lambda: BrokerAdmin.from_settings(settings)) as admin:
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
    clock = SystemClock()
    if args.action == "create":
        campaign_id = await campaigns.create_campaign(
            repo,
            clock,
            name=args.name,
            groups=args.group,
            packages=_pairs(args.package, "package"),
            policy=policy_from_args(args),
            target=target_from_args(args),
        )
        print(f"campaign {args.name} created as {campaign_id} (draft)")
        return 0
    campaign_id = await _campaign_id(repo, args.campaign)
    match args.action:
        case "start":
            enrolled = await campaigns.start_campaign(repo, clock, campaign_id)
            print(
                f"campaign {campaign_id} started with {enrolled.added} executions; "
                f"excluded: {enrolled.excluded or 'none'}; "
                f"awaiting inventory: {enrolled.awaiting_inventory}"
            )
        case "pause":
            await campaigns.pause_campaign(repo, clock, campaign_id)
            print(f"campaign {campaign_id} paused")
        case "resume":
            await campaigns.resume_campaign(repo, clock, campaign_id)
            print(f"campaign {campaign_id} resumed")
        case "cancel":
            await campaigns.cancel_campaign(repo, clock, campaign_id)
            print(f"campaign {campaign_id} canceled")
        case "exclude-model":
            removed = await campaigns.exclude_model(repo, clock, campaign_id, args.model)
            print(f"model {args.model} excluded; {removed} executions left the campaign")
        case "rollback":
            rollback_id = await campaigns.create_rollback(
                repo, clock, campaign_id, name=args.name, versions=dict(_pairs(args.to, "to"))
            )
            print(f"rollback campaign {args.name} created as {rollback_id} (draft)")
        case "plan":
            plan = await plan_campaign(repo, clock, campaign_id)
            print(json.dumps(plan.as_dict(), indent=None if args.json else 2))
        case "audit":
            async with repo.connection() as q:
                for row in await q.campaign_audit(campaign_id):
                    print(
                        f"{row['at'].isoformat()} {row['action']:<20} {row['detail']}",
                        flush=True,
                    )
        case "status":
            await _status(repo, campaign_id, watch=args.watch, as_json=args.json)
    return 0


async def _token(repo: Repository, args: argparse.Namespace) -> int:
    now = SystemClock().now()
    match args.action:
        case "create":
            info, secret = await tokens.issue(
                repo, name=args.name, role=Role.parse(args.role), actor="cli", at=now
            )
            print(f"token {info.id} ({info.name}, {info.role.label}); shown only now:")
            print(secret)
        case "list":
            for info in await tokens.list_tokens(repo):
                revoked = f" revoked {info.revoked_at.isoformat()}" if info.revoked_at else ""
                print(f"{info.id:>4} {info.name:<24} {info.role.label:<8}{revoked}")
        case "revoke":
            await tokens.revoke(repo, args.id, actor="cli", at=now)
            print(f"token {args.id} revoked")
    return 0


async def _webhook(repo: Repository, settings: FleetSettings, args: argparse.Namespace) -> int:
    now = SystemClock().now()
    match args.action:
        case "add":
            endpoint, secret = await webhooks.add_endpoint(
                repo,
                url=args.url,
                events=args.event,
                secret=args.secret,
                actor=campaigns.OPERATOR,
                at=now,
                start_after=args.start_after,
                allowed_hosts=webhooks.allowed_hosts(settings.webhook_allowed_hosts),
            )
            print(f"webhook {endpoint.id} -> {endpoint.url}: {', '.join(endpoint.events)}")
            if args.secret is None:
                print(f"secret (shown once, keep it to verify signatures): {secret}")
        case "list":
            endpoints = await webhooks.list_endpoints(repo)
            if args.json:
                print(json.dumps([dataclasses.asdict(e) for e in endpoints]))
            for e in [] if args.json else endpoints:
                state = "ok" if e.attempts == 0 else f"FAILING since {e.failing_since}"
                print(f"{e.id:>4} {e.url} [{', '.join(e.events)}] pending={e.pending} {state}")
                if e.attempts:
                    print(f"     {e.attempts} attempts, last: {e.last_error}")
        case "remove":
            await webhooks.remove_endpoint(repo, args.id, actor=campaigns.OPERATOR, at=now)
            print(f"webhook {args.id} removed")
        case "deliveries":
            for d in await webhooks.recent_deliveries(repo, args.id, args.limit):
                outcome = "ok" if d.ok else (d.error or f"HTTP {d.status}")
                print(f"{d.at} #{d.audit_id} {d.event} attempt {d.attempt}: {outcome}")
    return 0


async def _verify_audit(repo: Repository) -> int:
    verdict = await audit.verify(repo)
    if verdict.intact:
        print(f"audit chain intact: {verdict.entries} entries, head {verdict.head_hash}")
        return 0
    print(
        f"audit chain BROKEN at entry {verdict.broken_at}: {verdict.problem} "
        f"({verdict.entries} entries verified before it)",
        file=sys.stderr,
    )
    return 1


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
                        "excluded": status.excluded,
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
        if not watch or status.status in ("completed", "canceled", "aborted", "paused"):
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
