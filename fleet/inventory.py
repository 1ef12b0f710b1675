"""Inventory requests: provision terminals, manage groups, register packages.

Each request changes PostgreSQL (the source of truth) and, where it concerns who may read
or write what, the broker's dynamic-security configuration, in that order: a terminal that
exists in the database but not yet in the broker cannot connect, which is the safe side.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fleet import audit
from fleet.artifacts import ArtifactStore, StoredArtifact
from fleet.broker_admin import BrokerAdmin
from fleet.campaigns import OPERATOR
from fleet.db.repository import Repository
from fleet.errors import CampaignError
from fleet.policy import valid_timezone
from fleet.protocol import MAX_MODELS, PackageKind, is_valid_id, now
from fleet.runner import send_groups

_VERSION_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}")


@contextlib.asynccontextmanager
async def admin_session(
    repo: Repository, open_admin: Callable[[], BrokerAdmin]
) -> AsyncIterator[BrokerAdmin]:
    """A broker-admin session held alone across every process sharing the database.

    All of them connect with the one admin client id, so a second session at once would
    take the first one's connection over (`use_username_as_clientid`).
    """
    async with repo.transaction() as q:
        await q.lock_broker_admin()
        async with open_admin() as admin:
            yield admin


async def provision_terminals(
    repo: Repository,
    admin: BrokerAdmin,
    terminals: Sequence[dict[str, Any]],
    secret: str,
    *,
    actor: str = OPERATOR,
) -> None:
    """Register terminals (dicts with id, model, merchant_id, timezone, versions, attributes).

    Their broker passwords derive from `secret` (`protocol.derive_terminal_password`).
    """
    bad = [t["id"] for t in terminals if not is_valid_id(t["id"])]
    if bad:
        raise CampaignError("bad_terminal_id", f"invalid terminal ids: {bad[:5]}")
    zones = {t.get("timezone", "UTC") for t in terminals}
    unknown = sorted(z for z in zones if not valid_timezone(z))
    if unknown:
        raise CampaignError("bad_timezone", f"unknown time zones: {unknown[:5]}")
    async with repo.transaction() as q:
        await q.upsert_terminals(terminals)
        await audit.append(
            q,
            at=now(),
            actor=actor,
            action="terminals_provisioned",
            detail={"count": len(terminals), "first": terminals[0]["id"] if terminals else None},
        )
    await admin.ensure_terminals([t["id"] for t in terminals], secret)


async def create_group(
    repo: Repository, admin: BrokerAdmin, name: str, *, actor: str = OPERATOR
) -> None:
    """Create a group in the database and its read permission in the broker."""
    if not is_valid_id(name):
        raise CampaignError("bad_group_name", f"invalid group name {name!r}")
    async with repo.transaction() as q:
        await q.create_group(name)
        await audit.append(q, at=now(), actor=actor, action="group_created", detail={"group": name})
    await admin.ensure_group(name)


async def assign_group(
    repo: Repository,
    admin: BrokerAdmin,
    group: str,
    terminal_ids: Sequence[str],
    *,
    command_expiry_s: int = 3600,
    actor: str = OPERATOR,
) -> None:
    """Add terminals to a group, let them read its desired state, and tell them so.

    Each terminal gets a `groups` command with its whole list; one that is offline finds
    it in its persistent session when it returns (until the command expires), and any
    terminal learns it again from the controller's reply to its next hello.
    """
    async with repo.transaction() as q:
        await q.assign_group(group, terminal_ids)
        await audit.append(
            q,
            at=now(),
            actor=actor,
            action="group_assigned",
            detail={
                "group": group,
                "terminals": list(terminal_ids[:50]),
                "count": len(terminal_ids),
            },
        )
    await admin.add_to_group(group, terminal_ids)
    async with repo.connection() as q:
        groups_of = await q.terminals_groups(terminal_ids)
    for terminal_id in terminal_ids:
        await send_groups(admin, terminal_id, groups_of.get(terminal_id, []), command_expiry_s)


async def add_package(
    repo: Repository,
    store: ArtifactStore,
    path: Path,
    *,
    name: str,
    kind: PackageKind,
    version: str,
    models: Sequence[str],
    from_versions: Sequence[str] = (),
    requires: dict[str, str] | None = None,
    actor: str = OPERATOR,
) -> int:
    """Store a package file content-addressed and register it; size and sha256 computed.

    `from_versions` limits which installed versions it upgrades; `requires` names packages
    that must be at least at a version (installed, or earlier in the same bundle).
    """
    if not 1 <= len(models) <= MAX_MODELS or any(not 0 < len(m) <= 64 for m in models):
        raise CampaignError(
            "bad_package", f"a package names 1 to {MAX_MODELS} models of at most 64 characters"
        )
    if not is_valid_id(name) or not _VERSION_RE.fullmatch(version):
        raise CampaignError("bad_package", f"invalid package name or version {name}={version}")
    bad_versions = [
        v for v in [*from_versions, *(requires or {}).values()] if not _VERSION_RE.fullmatch(v)
    ]
    if bad_versions or not all(is_valid_id(n) for n in requires or {}):
        raise CampaignError("bad_package", f"invalid from-version or requirement {bad_versions}")
    # Off the event loop: a package can be hundreds of megabytes, and the controller
    # serves terminals from the same loop.
    stored = await asyncio.to_thread(store.add_file, path)
    try:
        return await _register_package(
            repo,
            store,
            path,
            stored,
            name=name,
            kind=kind,
            version=version,
            models=models,
            from_versions=from_versions,
            requires=requires,
            actor=actor,
        )
    except Exception:
        # Refused (a duplicate, say): the file must not stay downloadable on its own.
        async with repo.transaction() as q:
            await q.lock_content(stored.sha256)
            if not await q.packages_of_content(stored.sha256):
                await asyncio.to_thread(store.remove, stored.sha256)
        raise


async def _register_package(
    repo: Repository,
    store: ArtifactStore,
    path: Path,
    stored: StoredArtifact,
    *,
    name: str,
    kind: PackageKind,
    version: str,
    models: Sequence[str],
    from_versions: Sequence[str],
    requires: dict[str, str] | None,
    actor: str,
) -> int:
    async with repo.transaction() as q:
        await q.lock_content(stored.sha256)
        if store.path_of(stored.sha256) is None:
            # A refused upload of the same content removed it before this took the lock.
            await asyncio.to_thread(store.add_file, path)
        package_id = await q.add_package(
            name,
            kind.value,
            version,
            stored.size,
            stored.sha256,
            models,
            from_versions=from_versions,
            requires=requires,
        )
        await audit.append(
            q,
            at=now(),
            actor=actor,
            action="package_added",
            detail={
                "package": f"{name}={version}",
                "kind": kind.value,
                "sha256": stored.sha256,
                "size": stored.size,
                "models": list(models),
                "from_versions": list(from_versions),
                "requires": requires or {},
            },
        )
    return package_id
