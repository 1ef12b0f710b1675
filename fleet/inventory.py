"""Inventory requests: provision terminals, manage groups, register packages.

Each request changes PostgreSQL (the source of truth) and, where it concerns who may read
or write what, the broker's dynamic-security configuration, in that order: a terminal that
exists in the database but not yet in the broker cannot connect, which is the safe side.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet.artifacts import ArtifactStore
from fleet.broker_admin import BrokerAdmin
from fleet.db.repository import Repository
from fleet.errors import CampaignError
from fleet.protocol import PackageKind, is_valid_id


async def provision_terminals(
    repo: Repository, admin: BrokerAdmin, terminals: Sequence[dict[str, Any]], secret: str
) -> None:
    """Register terminals (dicts with id, model, merchant_id, timezone, versions, attributes).

    Their broker passwords derive from `secret` (`protocol.derive_terminal_password`).
    """
    bad = [t["id"] for t in terminals if not is_valid_id(t["id"])]
    if bad:
        raise CampaignError("bad_terminal_id", f"invalid terminal ids: {bad[:5]}")
    async with repo.transaction() as q:
        await q.upsert_terminals(terminals)
    await admin.ensure_terminals([t["id"] for t in terminals], secret)


async def create_group(repo: Repository, admin: BrokerAdmin, name: str) -> None:
    """Create a group in the database and its read permission in the broker."""
    if not is_valid_id(name):
        raise CampaignError("bad_group_name", f"invalid group name {name!r}")
    async with repo.transaction() as q:
        await q.create_group(name)
    await admin.ensure_group(name)


async def assign_group(
    repo: Repository, admin: BrokerAdmin, group: str, terminal_ids: Sequence[str]
) -> None:
    """Add terminals to a group; they may read its desired state from now on."""
    async with repo.transaction() as q:
        await q.assign_group(group, terminal_ids)
    await admin.add_to_group(group, terminal_ids)


async def add_package(
    repo: Repository,
    store: ArtifactStore,
    path: Path,
    *,
    name: str,
    kind: PackageKind,
    version: str,
    models: Sequence[str],
) -> int:
    """Store a package file content-addressed and register it; size and sha256 computed."""
    if not models:
        raise CampaignError("bad_package", "a package needs at least one compatible model")
    stored = store.add_file(path)
    async with repo.transaction() as q:
        return await q.add_package(name, kind.value, version, stored.size, stored.sha256, models)
