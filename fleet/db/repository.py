"""The repository: one async function per named query in ``queries.sql``.

This is the one place that knows asyncpg. Driver exceptions are translated here into
`fleet.errors` types; nothing above this module imports asyncpg's exceptions.
"""

import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from fleet.db.migrate import SCHEMA_VERSION, applied_version
from fleet.errors import (
    DatabaseUnavailableError,
    DuplicateError,
    QueryRefusedError,
    SchemaVersionError,
    TransientConflictError,
)

_NAME_RE = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: sql}`` on ``-- name: x`` lines."""
    parts = _NAME_RE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            msg = f"query {name} is defined twice"
            raise ValueError(msg)
        queries[name] = body.strip()
    return queries


QUERIES = parse_queries(resources.files("fleet.db").joinpath("queries.sql").read_text())

HEARTBEAT_COLUMNS = (
    "terminal_id",
    "received_at",
    "device_ts",
    "versions",
    "battery_pct",
    "storage_free_mb",
    "busy",
    "health",
)


@dataclass(frozen=True)
class EventOutcome:
    """What storing one state event did."""

    known: bool
    inserted: bool
    moved: bool
    #: The state the execution moved to (it may differ from the reported one).
    new_state: str | None = None


class EventRow(NamedTuple):
    """One state event as `record_events` takes it (field order is the query's)."""

    msg_id: str
    terminal_id: str
    campaign_id: int
    seq: int
    state: str
    progress: int | None
    stage: str | None
    error_code: str | None
    detail: str | None
    device_ts: float
    attempt: int | None = None
    package: str | None = None


@dataclass(frozen=True)
class LiveCampaign:
    """A campaign past draft, as the runner sees it."""

    id: int
    name: str
    control: str
    current_wave: int
    wave_count: int
    desired_revision: int
    acknowledged_failures: dict[int, int]
    policy: dict[str, Any]
    target: dict[str, Any]
    wave_ready_at: datetime | None
    #: Every wave open and every execution final: nothing left to decide.
    settled: bool = False


@dataclass(frozen=True)
class DesiredSource:
    """What a desired-state message of a campaign is built from."""

    campaign_id: int
    control: str
    revision: int
    groups: list[str]
    packages: list[dict[str, Any]]


@dataclass(frozen=True)
class Admitted:
    """A terminal the runner starts (or re-sends a start to)."""

    terminal_id: str
    attempt: int
    postpones: int


@dataclass(frozen=True)
class WaveRow:
    """Count of one wave's executions in one state (state None: an empty wave)."""

    wave: int
    bucket_hi: int
    opened_at: datetime | None
    state: str | None
    n: int


class HeartbeatRow(NamedTuple):
    """One heartbeat, ready for COPY."""

    terminal_id: str
    received_at: datetime
    device_ts: datetime
    versions: str
    battery_pct: int
    storage_free_mb: int
    busy: bool
    health: str


Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


class Queries:
    """The named queries, bound to one connection (inside a transaction or not)."""

    def __init__(self, conn: Connection) -> None:
        """Bind to a connection."""
        self._conn = conn

    async def ensure_heartbeat_partitions(self, days_ahead: int) -> int:
        """Create missing daily heartbeat partitions; return how many were made."""
        created: int = await self._conn.fetchval(QUERIES["ensure_heartbeat_partitions"], days_ahead)
        return created

    async def upsert_terminals(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or update terminals (id, model, merchant_id, timezone, versions, attributes)."""
        await self._conn.execute(
            QUERIES["upsert_terminals"],
            [r["id"] for r in rows],
            [r.get("model", "unknown") for r in rows],
            [r.get("merchant_id", "") for r in rows],
            [r.get("timezone", "UTC") for r in rows],
            [json.dumps(r.get("versions", {})) for r in rows],
            [json.dumps(r.get("attributes", {})) for r in rows],
        )

    async def create_group(self, name: str) -> None:
        """Create a group if it does not exist."""
        await self._conn.execute(QUERIES["create_group"], name)

    async def assign_group(self, group: str, terminal_ids: Sequence[str]) -> None:
        """Add terminals to a group (idempotent)."""
        await self._conn.execute(QUERIES["assign_group"], group, list(terminal_ids))

    async def terminals_groups(self, terminal_ids: Sequence[str]) -> dict[str, list[str]]:
        """Return each terminal's groups (terminals in no group are left out)."""
        rows = await self._conn.fetch(QUERIES["terminals_groups"], list(terminal_ids))
        return {r["terminal_id"]: list(r["groups"]) for r in rows}

    async def add_package(
        self,
        name: str,
        kind: str,
        version: str,
        size: int,
        sha256: str,
        models: Sequence[str],
        *,
        from_versions: Sequence[str] = (),
        requires: dict[str, str] | None = None,
    ) -> int:
        """Register a package; return its id."""
        package_id: int = await self._conn.fetchval(
            QUERIES["add_package"],
            name,
            kind,
            version,
            size,
            sha256,
            list(models),
            list(from_versions),
            json.dumps(requires or {}),
        )
        return package_id

    async def package_by_name(self, name: str, version: str) -> asyncpg.Record | None:
        """Return a package row by name and version."""
        return await self._conn.fetchrow(QUERIES["package_by_name"], name, version)

    async def record_event(self, row: "EventRow", at: datetime) -> EventOutcome:
        """Store one state event; `record_events` with a single row."""
        [outcome] = await self.record_events([row], at)
        return outcome

    async def plan_each_run(self) -> None:
        """Plan this transaction's statements on every run (ingest's batches)."""
        await self._conn.execute(QUERIES["plan_each_run"])

    async def record_events(self, rows: Sequence["EventRow"], at: datetime) -> list[EventOutcome]:
        """Store state events idempotently and apply each that is new and legal.

        `rows` must name distinct terminals (see the query); `at` is the controller's
        clock, which every campaign deadline compares with. One outcome per row, in order.
        """
        if not rows:
            return []
        columns = [list(column) for column in zip(*rows, strict=True)]
        # $11 is the clock, between the event's own fields and the two added later.
        records = await self._conn.fetch(QUERIES["record_events"], *columns[:10], at, *columns[10:])
        return [
            EventOutcome(
                known=r["known"], inserted=r["inserted"], moved=r["moved"], new_state=r["new_state"]
            )
            for r in records
        ]

    async def touch_terminals(
        self,
        ids: Sequence[str],
        seen: Sequence[datetime],
        versions: Sequence[str],
        health: Sequence[str],
        at: datetime,
    ) -> set[str]:
        """Coalesce last-seen, versions and health; return the ids that exist."""
        rows = await self._conn.fetch(
            QUERIES["touch_terminals"], list(ids), list(seen), list(versions), list(health), at
        )
        return {r["id"] for r in rows}

    async def copy_heartbeats(self, rows: Sequence[HeartbeatRow]) -> None:
        """Write heartbeats with COPY."""
        # The row's fields are in HEARTBEAT_COLUMNS order: it goes to COPY as it is.
        await self._conn.copy_records_to_table(
            "heartbeats",
            records=rows,
            columns=HEARTBEAT_COLUMNS,
        )

    async def set_presence(
        self, ids: Sequence[str], online: Sequence[bool], fresh: Sequence[bool]
    ) -> set[str]:
        """Set online flags (and last-seen where `fresh`); return the ids that exist."""
        rows = await self._conn.fetch(QUERIES["set_presence"], list(ids), list(online), list(fresh))
        return {r["id"] for r in rows}

    async def record_hello(
        self,
        *,
        terminal_id: str,
        model: str,
        versions: dict[str, str],
        merchant_id: str,
        timezone: str,
        attributes: dict[str, str],
        boot_id: str,
    ) -> list[str] | None:
        """Store a terminal's inventory; return its groups, or None if it is unknown."""
        row = await self._conn.fetchrow(
            QUERIES["record_hello"],
            terminal_id,
            model,
            json.dumps(versions),
            merchant_id,
            timezone,
            json.dumps(attributes),
            boot_id,
        )
        return None if row is None else list(row["groups"])

    async def add_dead_letters(self, rows: Sequence[tuple[str, str, str, bytes]]) -> None:
        """Keep refused messages: (topic, reason, detail, first KiB of payload)."""
        await self._conn.execute(
            QUERIES["add_dead_letters"],
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3][:1024] for r in rows],
        )

    async def trim_dead_letters(self, keep: int) -> None:
        """Delete all but the newest `keep` dead letters."""
        await self._conn.execute(QUERIES["trim_dead_letters"], keep)

    async def dead_letter_counts(self) -> dict[str, int]:
        """Return dead letters kept, by reason."""
        rows = await self._conn.fetch(QUERIES["dead_letter_counts"])
        return {r["reason"]: r["n"] for r in rows}

    async def create_campaign(
        self,
        *,
        name: str,
        groups: Sequence[str],
        package_ids: Sequence[int],
        wave_bucket_his: Sequence[int],
        wave_soaks: Sequence[float],
        success_threshold: float,
        failure_threshold: float,
        policy: str,
        target: str,
        rollback_of: int | None,
    ) -> int:
        """Create a draft campaign with its groups, ordered packages and waves."""
        campaign_id: int = await self._conn.fetchval(
            QUERIES["create_campaign"],
            name,
            success_threshold,
            failure_threshold,
            policy,
            target,
            rollback_of,
        )
        await self._conn.execute(QUERIES["add_campaign_groups"], campaign_id, list(groups))
        await self._conn.execute(QUERIES["add_campaign_packages"], campaign_id, list(package_ids))
        await self._conn.execute(
            QUERIES["add_campaign_waves"], campaign_id, list(wave_bucket_his), list(wave_soaks)
        )
        return campaign_id

    async def set_wave_bounds(self, campaign_id: int, bucket_his: Sequence[int]) -> None:
        """Set every wave's upper bucket bound, wave 1 first."""
        await self._conn.execute(QUERIES["set_wave_bounds"], campaign_id, list(bucket_his))

    async def campaign_by_name(self, name: str) -> int | None:
        """Return a campaign's id by name."""
        campaign_id: int | None = await self._conn.fetchval(QUERIES["campaign_by_name"], name)
        return campaign_id

    async def campaign_packages(self, campaign_id: int) -> list[dict[str, Any]]:
        """Return the campaign's packages in install order."""
        rows = await self._conn.fetch(QUERIES["campaign_packages"], campaign_id)
        return [{**dict(r), "requires": json.loads(r["requires"])} for r in rows]

    async def campaign_waves(self, campaign_id: int) -> list[asyncpg.Record]:
        """Return the campaign's waves (wave, bucket_hi, soak_s, opened_at)."""
        return await self._conn.fetch(QUERIES["campaign_waves"], campaign_id)

    async def campaign_groups(self, campaign_id: int) -> list[str]:
        """Return the campaign's target groups."""
        rows = await self._conn.fetch(QUERIES["campaign_groups"], campaign_id)
        return [r["group_name"] for r in rows]

    async def mark_started(self, campaign_id: int, at: datetime) -> bool:
        """Move a draft campaign to running with wave 1 current; False if not a draft."""
        return await self._conn.fetchval(QUERIES["mark_started"], campaign_id, at) is not None

    async def candidates(
        self, campaign_id: int, source_campaign: int | None
    ) -> list[dict[str, Any]]:
        """Group members with neither an execution nor an exclusion in the campaign."""
        rows = await self._conn.fetch(QUERIES["candidates"], campaign_id, source_campaign)
        return [
            {
                **dict(r),
                "versions": json.loads(r["versions"]),
                "attributes": json.loads(r["attributes"]),
            }
            for r in rows
        ]

    async def add_executions(
        self, campaign_id: int, rows: Sequence[tuple[str, int, int]], at: datetime
    ) -> None:
        """Create pending executions: (terminal id, wave, bucket)."""
        await self._conn.execute(
            QUERIES["add_executions"],
            campaign_id,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            at,
        )

    async def add_exclusions(
        self, campaign_id: int, rows: Sequence[tuple[str, str, str]], at: datetime
    ) -> None:
        """Record excluded terminals: (terminal id, reason, detail)."""
        await self._conn.execute(
            QUERIES["add_exclusions"],
            campaign_id,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            at,
        )

    async def exclude_unstarted_of_model(
        self, campaign_id: int, model: str, at: datetime
    ) -> list[str]:
        """Move the model's not-yet-started executions to exclusions; return them."""
        rows = await self._conn.fetch(QUERIES["exclude_unstarted_of_model"], campaign_id, model, at)
        return [r["terminal_id"] for r in rows]

    async def set_target(self, campaign_id: int, target: str) -> None:
        """Replace the campaign's target filter (JSON)."""
        await self._conn.execute(QUERIES["set_target"], campaign_id, target)

    async def exclusion_counts(self, campaign_id: int) -> dict[str, int]:
        """Return exclusions by reason."""
        rows = await self._conn.fetch(QUERIES["exclusion_counts"], campaign_id)
        return {r["reason"]: r["n"] for r in rows}

    async def exclusions(self, campaign_id: int, limit: int) -> list[asyncpg.Record]:
        """Return up to `limit` exclusions (terminal_id, reason, detail)."""
        return await self._conn.fetch(QUERIES["exclusions"], campaign_id, limit)

    async def set_control(
        self,
        campaign_id: int,
        control: str,
        reason: str | None,
        from_controls: Sequence[str],
        at: datetime,
    ) -> int | None:
        """Change a campaign's control; return the new desired revision, None if refused."""
        revision: int | None = await self._conn.fetchval(
            QUERIES["set_control"], campaign_id, control, reason, list(from_controls), at
        )
        return revision

    async def cancel_unstarted(self, campaign_id: int, at: datetime) -> None:
        """End what the controller holds as canceled; admitted-but-silent as canceling."""
        await self._conn.execute(QUERIES["cancel_unstarted"], campaign_id, at)

    async def cancels_to_send(
        self, campaign_id: int, at: datetime, *, whole_campaign: bool
    ) -> list[str]:
        """Mark and return the terminals a cancel command must go to.

        Always those canceling (their start may be in flight); with `whole_campaign`
        (canceled, aborted) also every terminal still before its install.
        """
        rows = await self._conn.fetch(QUERIES["cancels_to_send"], campaign_id, at, whole_campaign)
        return [r["terminal_id"] for r in rows]

    async def finish_canceling(self, campaign_id: int, grace_s: float, at: datetime) -> list[str]:
        """End as canceled the canceling executions older than `grace_s`; return them."""
        rows = await self._conn.fetch(QUERIES["finish_canceling"], campaign_id, grace_s, at)
        return [r["terminal_id"] for r in rows]

    async def expire_deadlines(self, campaign_id: int, at: datetime) -> list[asyncpg.Record]:
        """End executions past their phase deadline; return (terminal_id, state, phase)."""
        return await self._conn.fetch(QUERIES["expire_deadlines"], campaign_id, at)

    async def mark_unreachable(
        self, campaign_id: int, at: datetime, current_wave: int
    ) -> list[str]:
        """Mark executions of offline terminals unreachable; return them."""
        rows = await self._conn.fetch(QUERIES["mark_unreachable"], campaign_id, at, current_wave)
        return [r["terminal_id"] for r in rows]

    async def back_online(self, campaign_id: int, at: datetime) -> list[str]:
        """Return never-admitted unreachable executions whose terminal is back to pending."""
        rows = await self._conn.fetch(QUERIES["back_online"], campaign_id, at)
        return [r["terminal_id"] for r in rows]

    async def judge_health(self, campaign_id: int, at: datetime) -> list[asyncpg.Record]:
        """Apply the health gate; return (terminal_id, state, rate) of those judged."""
        return await self._conn.fetch(QUERIES["judge_health"], campaign_id, at)

    async def resends_due(
        self, campaign_id: int, at: datetime, after_s: float, max_resends: int
    ) -> list[Admitted]:
        """Mark and return the starts the reconciler sends again."""
        rows = await self._conn.fetch(QUERIES["resends_due"], campaign_id, at, after_s, max_resends)
        return [Admitted(**dict(r)) for r in rows]

    async def admission_load(self, campaign_id: int, at: datetime) -> tuple[int, int]:
        """Return (starts in the last minute, executions downloading or about to)."""
        row = await self._conn.fetchrow(QUERIES["admission_load"], campaign_id, at)
        assert row is not None
        return row["recent"], row["downloading"]

    async def admissible_timezones(
        self, campaign_id: int, at: datetime, current_wave: int
    ) -> list[str]:
        """Time zones of terminals that could be admitted now."""
        rows = await self._conn.fetch(
            QUERIES["admissible_timezones"], campaign_id, at, current_wave
        )
        return [r["timezone"] for r in rows]

    async def admit(
        self,
        campaign_id: int,
        at: datetime,
        current_wave: int,
        timezones: Sequence[str] | None,
        limit: int,
    ) -> list[Admitted]:
        """Admit up to `limit` terminals in open waves and open windows."""
        rows = await self._conn.fetch(
            QUERIES["admit"],
            campaign_id,
            at,
            current_wave,
            None if timezones is None else list(timezones),
            limit,
        )
        return [Admitted(**dict(r)) for r in rows]

    async def overlapping_campaigns(self, campaign_id: int) -> list[str]:
        """Names of other unfinished campaigns sharing a group with this one."""
        rows = await self._conn.fetch(QUERIES["overlapping_campaigns"], campaign_id)
        return [r["name"] for r in rows]

    async def restart_start_phase(self, campaign_id: int, at: datetime) -> None:
        """Give executions held at their start a fresh start deadline."""
        await self._conn.execute(QUERIES["restart_start_phase"], campaign_id, at)

    async def acknowledge_failures(self, campaign_id: int, failures: dict[int, int]) -> None:
        """Record the failures per wave an operator accepted by resuming."""
        await self._conn.execute(
            QUERIES["acknowledge_failures"],
            campaign_id,
            json.dumps({str(wave): n for wave, n in failures.items()}),
        )

    async def mark_wave_ready(self, campaign_id: int, at: datetime) -> bool:
        """Note when the current wave met its success threshold; False if already noted."""
        status = await self._conn.execute(QUERIES["mark_wave_ready"], campaign_id, at)
        return status.endswith(" 1")

    async def open_wave(self, campaign_id: int, wave: int, at: datetime) -> int | None:
        """Open `wave` if `wave - 1` is current; return the new revision, None if refused."""
        revision: int | None = await self._conn.fetchval(
            QUERIES["open_wave"], campaign_id, wave, at
        )
        return revision

    async def live_campaigns(self) -> list[LiveCampaign]:
        """Return every campaign past draft."""
        rows = await self._conn.fetch(QUERIES["live_campaigns"])
        return [
            LiveCampaign(
                **{
                    **dict(r),
                    "acknowledged_failures": {
                        int(wave): n for wave, n in json.loads(r["acknowledged_failures"]).items()
                    },
                    "policy": json.loads(r["policy"]),
                    "target": json.loads(r["target"]),
                }
            )
            for r in rows
        ]

    async def campaign(self, campaign_id: int) -> dict[str, Any] | None:
        """Return a campaign row, its policy and target decoded."""
        row = await self._conn.fetchrow(QUERIES["campaign"], campaign_id)
        if row is None:
            return None
        return {
            **dict(row),
            "policy": json.loads(row["policy"]),
            "target": json.loads(row["target"]),
        }

    async def campaign_desired(self, campaign_id: int) -> DesiredSource | None:
        """Return what the campaign's desired-state message is made of."""
        row = await self._conn.fetchrow(QUERIES["campaign_desired"], campaign_id)
        if row is None:
            return None
        return DesiredSource(
            campaign_id=row["id"],
            control=row["control"],
            revision=row["desired_revision"],
            groups=list(row["groups"]),
            packages=json.loads(row["packages"]) if row["packages"] else [],
        )

    async def wave_counts(self, campaign_id: int) -> list[WaveRow]:
        """Return execution counts per wave and state."""
        rows = await self._conn.fetch(QUERIES["wave_counts"], campaign_id)
        return [WaveRow(**dict(r)) for r in rows]

    async def audit_head(self) -> tuple[int, str] | None:
        """Lock the audit chain for this transaction; return its tip (id, hash)."""
        await self._conn.execute(QUERIES["audit_lock"])
        row = await self._conn.fetchrow(QUERIES["audit_head"])
        return None if row is None else (row["id"], row["hash"])

    async def audit_insert(
        self,
        *,
        entry_id: int,
        at: datetime,
        actor: str,
        action: str,
        campaign_id: int | None,
        detail: str,
        prev_hash: str,
        entry_hash: str,
    ) -> None:
        """Append one audit entry (its hash already computed)."""
        await self._conn.execute(
            QUERIES["audit_insert"],
            entry_id,
            at,
            actor,
            action,
            campaign_id,
            detail,
            prev_hash,
            entry_hash,
        )

    async def audit_page(self, after_id: int, limit: int) -> list[asyncpg.Record]:
        """Return audit entries with id > `after_id`, in order."""
        return await self._conn.fetch(QUERIES["audit_page"], after_id, limit)

    async def campaign_audit(self, campaign_id: int) -> list[asyncpg.Record]:
        """Return a campaign's audit entries, oldest first."""
        return await self._conn.fetch(QUERIES["campaign_audit"], campaign_id)

    async def previous_versions(self, campaign_id: int) -> dict[str, dict[str, int]]:
        """Return package name -> {version it replaced: terminals}."""
        rows = await self._conn.fetch(QUERIES["previous_versions"], campaign_id)
        found: dict[str, dict[str, int]] = {}
        for r in rows:
            found.setdefault(r["name"], {})[r["version"]] = r["n"]
        return found

    async def execution_states(self, campaign_id: int) -> dict[str, tuple[str, str | None]]:
        """Return terminal id -> (state, error code) for a campaign."""
        rows = await self._conn.fetch(QUERIES["execution_states"], campaign_id)
        return {r["terminal_id"]: (r["state"], r["error_code"]) for r in rows}

    async def executions(self, campaign_id: int) -> list[asyncpg.Record]:
        """Return every execution of a campaign with its attempt and timing columns."""
        return await self._conn.fetch(QUERIES["executions"], campaign_id)

    async def plan_terminals(self, campaign_id: int) -> list[asyncpg.Record]:
        """Return (wave, timezone, n) of executions not yet final."""
        return await self._conn.fetch(QUERIES["plan_terminals"], campaign_id)

    # -- the REST API ------------------------------------------------------------------

    async def api_terminals(
        self,
        *,
        after: str,
        group: str | None,
        model: str | None,
        online: bool | None,
        package: tuple[str, str] | None,
        merchant: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Return one page of terminals after `after` (an id), filtered."""
        name, version = package if package is not None else (None, None)
        return _dicts(
            await self._conn.fetch(
                QUERIES["api_terminals"],
                after,
                group,
                model,
                online,
                name,
                version,
                merchant,
                limit,
            )
        )

    async def api_terminal(self, terminal_id: str) -> dict[str, Any] | None:
        """Return one terminal with its groups."""
        return _dict(await self._conn.fetchrow(QUERIES["api_terminal"], terminal_id))

    async def api_terminal_executions(self, terminal_id: str, limit: int) -> list[dict[str, Any]]:
        """Return a terminal's executions, newest first."""
        return _dicts(
            await self._conn.fetch(QUERIES["api_terminal_executions"], terminal_id, limit)
        )

    async def api_terminal_events(self, terminal_id: str, limit: int) -> list[dict[str, Any]]:
        """Return a terminal's newest state events."""
        return _dicts(await self._conn.fetch(QUERIES["api_terminal_events"], terminal_id, limit))

    async def api_groups(self) -> list[dict[str, Any]]:
        """Return every group with its member count."""
        return _dicts(await self._conn.fetch(QUERIES["api_groups"]))

    async def api_group(self, name: str) -> dict[str, Any] | None:
        """Return one group with its member count."""
        return _dict(await self._conn.fetchrow(QUERIES["api_group"], name))

    async def api_known_terminals(self, terminal_ids: Sequence[str]) -> set[str]:
        """Return which of `terminal_ids` exist."""
        rows = await self._conn.fetch(QUERIES["api_known_terminals"], list(terminal_ids))
        return {r["id"] for r in rows}

    async def api_packages(self, name: str | None) -> list[dict[str, Any]]:
        """Return packages, optionally of one name."""
        return _dicts(await self._conn.fetch(QUERIES["api_packages"], name))

    async def api_package(self, package_id: int) -> dict[str, Any] | None:
        """Return one package."""
        return _dict(await self._conn.fetchrow(QUERIES["api_package"], package_id))

    async def api_campaigns(
        self, *, before: int, control: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Return one page of campaigns with ids below `before`, newest first."""
        return _dicts(await self._conn.fetch(QUERIES["api_campaigns"], before, control, limit))

    async def api_audit(
        self, *, after: int, campaign_id: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Return audit entries after `after`, optionally of one campaign."""
        return _dicts(await self._conn.fetch(QUERIES["api_audit"], after, campaign_id, limit))

    async def api_dead_letters(
        self, *, after: int, reason: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Return dead letters after `after`, optionally of one reason."""
        return _dicts(await self._conn.fetch(QUERIES["api_dead_letters"], after, reason, limit))

    async def existing_groups(self, names: Sequence[str]) -> set[str]:
        """Return which of `names` are groups."""
        rows = await self._conn.fetch(QUERIES["existing_groups"], list(names))
        return {r["name"] for r in rows}

    async def packages_of_content(self, sha256: str) -> int:
        """Return how many packages are this content."""
        n: int = await self._conn.fetchval(QUERIES["packages_of_content"], sha256)
        return n

    async def lock_content(self, sha256: str) -> None:
        """Hold, until the transaction ends, the lock on one package content."""
        await self._conn.execute(QUERIES["lock_content"], sha256)

    async def lock_broker_admin(self) -> None:
        """Hold, until the transaction ends, the right to open a broker-admin session."""
        await self._conn.execute(QUERIES["lock_broker_admin"])

    async def token_add(
        self, *, name: str, role: str, token_hash: str, created_by: str, at: datetime
    ) -> dict[str, Any]:
        """Store a new token's hash; return its row."""
        row = await self._conn.fetchrow(
            QUERIES["token_add"], name, role, token_hash, created_by, at
        )
        assert row is not None
        return dict(row)

    async def token_by_hash(self, token_hash: str) -> asyncpg.Record | None:
        """Return the live token with this hash."""
        return await self._conn.fetchrow(QUERIES["token_by_hash"], token_hash)

    async def tokens(self) -> list[dict[str, Any]]:
        """Return every token, revoked ones too, without hashes."""
        return [dict(r) for r in await self._conn.fetch(QUERIES["tokens"])]

    async def token_revoke(self, token_id: int, at: datetime) -> asyncpg.Record | None:
        """Revoke a live token; return it, or None if there is no such live token."""
        return await self._conn.fetchrow(QUERIES["token_revoke"], token_id, at)

    async def mark_completed(self, campaign_id: int, at: datetime) -> bool:
        """Record a running campaign completed; False if it is not running or already was."""
        return await self._conn.fetchval(QUERIES["mark_completed"], campaign_id, at) is not None

    async def add_webhook_endpoint(
        self,
        *,
        url: str,
        secret: str,
        events: Sequence[str],
        actions: Sequence[str],
        at: datetime,
        start_after: int | None,
        actor: str,
    ) -> int:
        """Register a webhook endpoint; it gets audit entries after `start_after` (or now)."""
        row = await self._conn.fetchrow(
            QUERIES["add_webhook_endpoint"],
            url,
            secret,
            list(events),
            list(actions),
            at,
            start_after,
            actor,
        )
        assert row is not None  # INSERT ... RETURNING always returns the row
        endpoint_id: int = row["id"]
        return endpoint_id

    async def webhook_endpoints(
        self, *, include_removed: bool = False, endpoint_id: int | None = None
    ) -> list[asyncpg.Record]:
        """Return webhook endpoints (never their secrets) with their pending event counts."""
        return await self._conn.fetch(QUERIES["webhook_endpoints"], include_removed, endpoint_id)

    async def remove_webhook_endpoint(self, endpoint_id: int, at: datetime) -> str | None:
        """Remove a live webhook endpoint; return its URL, or None if there was none."""
        url: str | None = await self._conn.fetchval(
            QUERIES["remove_webhook_endpoint"], endpoint_id, at
        )
        return url

    async def skip_idle_webhooks(self) -> None:
        """Move idle endpoints' cursors to the audit head."""
        await self._conn.execute(QUERIES["skip_idle_webhooks"])

    async def claim_webhook_endpoints(
        self, limit: int, lease_s: float, lease: uuid.UUID
    ) -> list[asyncpg.Record]:
        """Lease up to `limit` due endpoints that have events to send."""
        return await self._conn.fetch(QUERIES["claim_webhook_endpoints"], limit, lease_s, lease)

    async def webhook_events(
        self, after_id: int, actions: Sequence[str], limit: int
    ) -> list[asyncpg.Record]:
        """Return the next audit entries of these actions after `after_id`, with campaign names."""
        return await self._conn.fetch(QUERIES["webhook_events"], after_id, list(actions), limit)

    async def hold_webhook_lease(self, endpoint_id: int, lease: uuid.UUID, lease_s: float) -> bool:
        """Renew this loop's lease on a live endpoint; False if it was lost or removed."""
        found = await self._conn.fetchval(
            QUERIES["hold_webhook_lease"], endpoint_id, lease, lease_s
        )
        return found is not None

    async def webhook_delivered(self, endpoint_id: int, lease: uuid.UUID, audit_id: int) -> bool:
        """Move the endpoint's cursor to `audit_id`; False if this loop lost the lease."""
        found = await self._conn.fetchval(
            QUERIES["webhook_delivered"], endpoint_id, lease, audit_id
        )
        return found is not None

    async def webhook_failed(
        self, endpoint_id: int, lease: uuid.UUID, error: str, retry_in_s: float
    ) -> int | None:
        """Count a failed attempt and release the lease; return the failures in a row."""
        attempts: int | None = await self._conn.fetchval(
            QUERIES["webhook_failed"], endpoint_id, lease, error, retry_in_s
        )
        return attempts

    async def release_webhook_endpoint(self, endpoint_id: int, lease: uuid.UUID) -> None:
        """Give the endpoint's lease back."""
        await self._conn.execute(QUERIES["release_webhook_endpoint"], endpoint_id, lease)

    async def log_webhook_attempt(
        self,
        *,
        endpoint_id: int,
        audit_id: int,
        event: str,
        attempt: int,
        status: int | None,
        error: str | None,
        duration_ms: float,
        keep: int,
    ) -> None:
        """Record one delivery attempt, keeping the newest `keep` of the endpoint."""
        await self._conn.execute(
            QUERIES["log_webhook_attempt"],
            endpoint_id,
            audit_id,
            event,
            attempt,
            status,
            error,
            duration_ms,
            keep,
        )

    async def webhook_deliveries(self, endpoint_id: int, limit: int) -> list[asyncpg.Record]:
        """Return an endpoint's newest delivery attempts, newest first."""
        return await self._conn.fetch(QUERIES["webhook_deliveries"], endpoint_id, limit)

    async def terminal_counts(self) -> list["TerminalCount"]:
        """Return terminals counted by model, firmware version and online flag."""
        rows = await self._conn.fetch(QUERIES["terminal_counts"])
        return [TerminalCount(**dict(r)) for r in rows]

    async def heartbeat_ages(self, at: datetime, bounds: Sequence[float]) -> "HeartbeatAges":
        """Return online terminals' heartbeat ages at `at`, counted under each bound."""
        row = await self._conn.fetchrow(QUERIES["heartbeat_ages"], at, list(bounds))
        assert row is not None
        return HeartbeatAges(
            under=list(row["under"]), n=row["n"], total_s=row["total_s"], oldest_s=row["oldest_s"]
        )

    async def campaign_execution_counts(self, since: datetime) -> list["CampaignCount"]:
        """Return execution counts by wave and state of live and recently changed campaigns.

        A campaign without executions yet has one row with wave, state and n None.
        """
        rows = await self._conn.fetch(QUERIES["campaign_execution_counts"], since)
        return [
            CampaignCount(
                **{
                    **dict(r),
                    "acknowledged_failures": {
                        int(wave): n for wave, n in json.loads(r["acknowledged_failures"]).items()
                    },
                    "policy": json.loads(r["policy"]),
                }
            )
            for r in rows
        ]


class TerminalCount(NamedTuple):
    """Terminals of one model, firmware version (None: none reported) and online flag."""

    model: str
    version: str | None
    online: bool
    n: int


class HeartbeatAges(NamedTuple):
    """Online terminals' seconds since their last heartbeat, as a cumulative histogram."""

    #: Terminals at or under each bound asked for, in the same order.
    under: list[int]
    n: int
    total_s: float
    #: The oldest age (None: no online terminal has sent a heartbeat).
    oldest_s: float | None


class CampaignCount(NamedTuple):
    """Executions of one campaign in one wave and state, with the campaign's rules."""

    id: int
    name: str
    current_wave: int
    acknowledged_failures: dict[int, int]
    policy: dict[str, Any]
    wave: int | None
    state: str | None
    n: int | None


def _dicts(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


def _dict(row: asyncpg.Record | None) -> dict[str, Any] | None:
    return None if row is None else dict(row)


class Repository:
    """A pool of connections handing out `Queries`, with errors translated."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 30.0) -> None:
        """Wrap a pool."""
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        """Run queries in one transaction; it commits when the block ends cleanly."""
        with _translated():
            async with (
                self._pool.acquire(timeout=self._acquire_timeout_s) as conn,
                conn.transaction(),
            ):
                yield Queries(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Queries]:
        """Run queries in autocommit mode."""
        with _translated():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                yield Queries(conn)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()


# Failures that mean "the database is not there right now", as opposed to a refused query:
# connection-class SQLSTATEs (08), operator intervention such as a shutdown (57), a dropped
# connection, and the socket errors below them.
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.ConnectionDoesNotExistError,
    ConnectionError,
    OSError,
    TimeoutError,
)


_LOCK_NOT_AVAILABLE = "55P03"


class _translated:  # noqa: N801 - used like a function, as a context manager
    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise DuplicateError(constraint=exc.constraint_name or "") from exc
        if isinstance(exc, asyncpg.PostgresError) and (
            (exc.sqlstate or "").startswith("40") or exc.sqlstate == _LOCK_NOT_AVAILABLE
        ):
            raise TransientConflictError(str(exc)) from exc
        if isinstance(exc, _UNAVAILABLE):
            raise DatabaseUnavailableError(str(exc) or type(exc).__name__) from exc
        if isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower():
            raise DatabaseUnavailableError(str(exc)) from exc
        if isinstance(exc, asyncpg.PostgresError):
            raise QueryRefusedError(exc.sqlstate or "", str(exc)) from exc


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Every write here is acknowledged to a terminal afterwards; never trade durability.
    await conn.execute("SET synchronous_commit = on")


async def connect(
    dsn: str, *, pool_size: int = 8, command_timeout_s: float = 30.0, check_schema: bool = True
) -> Repository:
    """Open a pool and, unless told not to, refuse a database at the wrong schema version.

    Raises:
        SchemaVersionError: the database is not at `SCHEMA_VERSION` (run ``fleet migrate``).
        DatabaseUnavailableError: the database cannot be reached.
    """
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=pool_size,
            init=_init_connection,
            command_timeout=command_timeout_s,
        )
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError) as exc:
        raise DatabaseUnavailableError(str(exc)) from exc
    if check_schema:
        async with pool.acquire() as conn:
            found = await applied_version(conn)
        if found != SCHEMA_VERSION:
            await pool.close()
            raise SchemaVersionError(expected=SCHEMA_VERSION, found=found)
    return Repository(pool, acquire_timeout_s=command_timeout_s)
