"""The audit log: every operator action and automatic decision, hash-chained.

Each entry's hash is SHA-256 over the previous entry's hash and the entry's canonical
text (id, time, actor, action, campaign as JSON, then the detail's JSON). Ids are
consecutive, so editing, inserting or deleting a row anywhere but the tip breaks the
chain; publish `AuditVerdict.head_hash` somewhere else (a ticket, a log shipper) to pin
the tip as well. Appends take a transaction-scoped lock, so the chain has one order even
with several writers.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet.clock import as_datetime
from fleet.db.repository import Queries, Repository

GENESIS = "0" * 64
_PAGE = 5000


def canonical(
    entry_id: int,
    at: datetime,
    actor: str,
    action: str,
    campaign_id: int | None,
    detail: str,
) -> str:
    """The exact text an entry's hash covers: its fields as JSON, a newline, the detail.

    `detail` is stored as the very text hashed, so no database normalisation (of floats,
    of key order) can make an untouched entry fail to verify.
    """
    fields = json.dumps(
        [entry_id, at.isoformat(), actor, action, campaign_id],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"{fields}\n{detail}"


def chain_hash(prev_hash: str, body: str) -> str:
    """Hash of an entry: SHA-256 over the previous hash, a newline and the body."""
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


async def append(
    q: Queries,
    *,
    at: float,
    actor: str,
    action: str,
    campaign_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> str:
    """Append one entry inside the caller's transaction; return its hash.

    The entry commits or rolls back with the change it records.
    """
    head = await q.audit_head()
    entry_id, prev = (1, GENESIS) if head is None else (head[0] + 1, head[1])
    when = as_datetime(at)
    text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = chain_hash(prev, canonical(entry_id, when, actor, action, campaign_id, text))
    await q.audit_insert(
        entry_id=entry_id,
        at=when,
        actor=actor,
        action=action,
        campaign_id=campaign_id,
        detail=text,
        prev_hash=prev,
        entry_hash=digest,
    )
    return digest


@dataclass(frozen=True)
class AuditVerdict:
    """The outcome of checking the whole chain."""

    entries: int
    head_hash: str
    #: The first entry that does not verify, and why; None when the chain is intact.
    broken_at: int | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        """Tell whether every entry verified."""
        return self.broken_at is None


async def verify(repo: Repository) -> AuditVerdict:
    """Recompute the chain from the first entry and report the first break."""
    prev, expected_id, entries = GENESIS, 1, 0
    async with repo.connection() as q:
        while True:
            rows = await q.audit_page(expected_id - 1, _PAGE)
            if not rows:
                return AuditVerdict(entries=entries, head_hash=prev)
            for row in rows:
                problem = None
                if row["id"] != expected_id:
                    problem = f"expected entry {expected_id}, found {row['id']}"
                elif row["prev_hash"] != prev:
                    problem = "prev_hash does not match the previous entry"
                else:
                    body = canonical(
                        row["id"],
                        row["at"],
                        row["actor"],
                        row["action"],
                        row["campaign_id"],
                        row["detail"],
                    )
                    if chain_hash(prev, body) != row["hash"]:
                        problem = "content does not match its hash"
                if problem is not None:
                    return AuditVerdict(
                        entries=entries, head_hash=prev, broken_at=expected_id, problem=problem
                    )
                prev, expected_id, entries = row["hash"], expected_id + 1, entries + 1
