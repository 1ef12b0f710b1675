"""Versioned schema migrations: ``migrations/NNNN_name.sql``, applied in order, once each.

`migrate` is its own command; the controller refuses to start on a database whose version
is not `SCHEMA_VERSION` (mender's DbVersion / procrastinate's separate schema step).
"""

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same for every migrating process.
_MIGRATION_LOCK = 0x666C656574


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Read the migration files shipped in the package, ordered by version."""
    found = []
    for entry in resources.files("fleet.db").joinpath("migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        msg = f"migration versions must be 1..n without gaps, found {[m.version for m in found]}"
        raise RuntimeError(msg)
    return found


SCHEMA_VERSION = len(load_migrations())


async def applied_version(
    conn: "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]",
) -> int:
    """Return the schema version of a database (0 when it has none)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    version: int | None = await conn.fetchval("SELECT max(version) FROM schema_version")
    return version or 0


async def migrate(dsn: str) -> list[int]:
    """Apply every migration the database lacks, each in its own transaction.

    Returns:
        The versions applied by this call.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            current = await applied_version(conn)
            done = []
            for migration in load_migrations():
                if migration.version <= current:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                logger.info(
                    "applied migration %04d_%s",
                    migration.version,
                    migration.name,
                    extra={"action": "migration_applied"},
                )
                done.append(migration.version)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        await conn.close()
