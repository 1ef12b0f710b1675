"""Operator tokens of the REST API: issue, authenticate, revoke.

A token is 256 random bits behind a recognisable prefix (``fleet_``), shown once when it
is issued. Only its SHA-256 is stored, so the table grants nothing to whoever reads it.
Each token has one role; a role includes every right of the roles below it.
"""

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any

from fleet import audit
from fleet.clock import as_datetime
from fleet.db.repository import Repository
from fleet.errors import CampaignError, NotFoundError

TOKEN_PREFIX = "fleet_"  # noqa: S105 - a label, not a secret
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}")


class Role(IntEnum):
    """What a token may do; each role may do everything the lower ones may."""

    VIEWER = 1  # read everything
    OPERATOR = 2  # also change terminals' groups, packages and campaigns
    ADMIN = 3  # also manage tokens and webhooks

    @property
    def label(self) -> str:
        """The role's name on the wire and in the database."""
        return self.name.lower()

    @classmethod
    def parse(cls, label: str) -> "Role":
        """The role named `label`."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise CampaignError("bad_role", f"unknown role {label!r}") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling: a live token's id, name and role."""

    token_id: int
    name: str
    role: Role


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: never its secret."""

    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


async def issue(
    repo: Repository, *, name: str, role: Role, actor: str, at: float
) -> tuple[TokenInfo, str]:
    """Create a token; return it as listed and its secret, which is not kept anywhere."""
    if not _NAME_RE.fullmatch(name):
        raise CampaignError("bad_token_name", f"invalid token name {name!r}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    async with repo.transaction() as q:
        row = await q.token_add(
            name=name,
            role=role.label,
            token_hash=token_hash(secret),
            created_by=actor,
            at=as_datetime(at),
        )
        await audit.append(
            q,
            at=at,
            actor=actor,
            action="token_issued",
            detail={"token_id": row["id"], "name": name, "role": role.label},
        )
    return _info(row), secret


async def authenticate(repo: Repository, token: str) -> Principal | None:
    """The live token `token` is, or None."""
    if not _TOKEN_RE.fullmatch(token):
        return None
    async with repo.connection() as q:
        row = await q.token_by_hash(token_hash(token))
    if row is None:
        return None
    return Principal(token_id=row["id"], name=row["name"], role=Role.parse(row["role"]))


async def list_tokens(repo: Repository) -> list[TokenInfo]:
    """Every token, revoked ones included."""
    async with repo.connection() as q:
        return [_info(row) for row in await q.tokens()]


async def revoke(repo: Repository, token_id: int, *, actor: str, at: float) -> None:
    """Revoke a live token at once: its next request is refused."""
    async with repo.transaction() as q:
        row = await q.token_revoke(token_id, as_datetime(at))
        if row is None:
            raise NotFoundError("live token", str(token_id))
        await audit.append(
            q,
            at=at,
            actor=actor,
            action="token_revoked",
            detail={"token_id": token_id, "name": row["name"], "role": row["role"]},
        )


def _info(row: Mapping[str, Any]) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        name=row["name"],
        role=Role.parse(row["role"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        revoked_at=row["revoked_at"],
    )
