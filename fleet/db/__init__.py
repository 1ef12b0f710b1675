"""Database layer: named SQL, versioned migrations and the repository over asyncpg."""

from fleet.db.migrate import SCHEMA_VERSION, applied_version, migrate
from fleet.db.repository import Repository, connect

__all__ = ["SCHEMA_VERSION", "Repository", "applied_version", "connect", "migrate"]
