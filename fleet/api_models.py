"""The REST API's request and response bodies: the JSON half of its OpenAPI contract."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.policy import CampaignPolicy, TargetFilter
from fleet.protocol import ID_PATTERN, MAX_PACKAGES
from fleet.webhooks import WebhookEndpoint

Name = Annotated[str, Field(pattern=ID_PATTERN, examples=["T000001"])]
Version = Annotated[str, Field(pattern=r"^[A-Za-z0-9._+-]{1,64}$", examples=["2.4.1"])]
RoleName = Literal["viewer", "operator", "admin"]
#: Most terminals one request may add to a group.
MAX_MEMBERS_PER_REQUEST = 10_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorDetail(_Body):
    """What went wrong: `code` is stable and meant for programs, `message` for people."""

    code: str = Field(examples=["not_running"])
    message: str
    #: Field-level problems of a refused request body or query (validation_failed).
    fields: list[dict[str, Any]] | None = None


class ErrorBody(_Body):
    """Every error response of the API."""

    error: ErrorDetail


# -- terminals -------------------------------------------------------------------------


class TerminalSummary(_Body):
    """A terminal as listed."""

    id: str
    model: str
    merchant_id: str
    timezone: str
    versions: dict[str, str]
    online: bool
    last_seen: datetime | None
    groups: list[str]


class TerminalPage(_Body):
    """One page of terminals; pass `next_cursor` as `after` for the next one."""

    items: list[TerminalSummary]
    next_cursor: str | None


class ExecutionRecord(_Body):
    """One campaign as one terminal went through it."""

    campaign_id: int
    campaign_name: str
    wave: int
    state: str
    progress: int | None
    stage: str | None
    error_code: str | None
    detail: str | None
    updated_at: datetime
    finished_at: datetime | None


class EventRecord(_Body):
    """One state event as the terminal reported it; `applied` says if it moved anything."""

    campaign_id: int
    seq: int
    state: str
    progress: int | None
    stage: str | None
    error_code: str | None
    detail: str | None
    device_ts: datetime
    received_at: datetime
    applied: bool


class TerminalDetail(TerminalSummary):
    """A terminal with its update history: executions newest first, and its newest events."""

    attributes: dict[str, Any]
    boot_id: str | None
    last_event_seq: int
    seq_gaps: int
    created_at: datetime
    executions: list[ExecutionRecord]
    events: list[EventRecord]


class NewTerminal(_Body):
    """A terminal to register; its broker password derives from the terminal secret."""

    id: Name
    model: Annotated[str, Field(min_length=1, max_length=64)] = "unknown"
    merchant_id: Annotated[str, Field(max_length=128)] = ""
    timezone: Annotated[str, Field(min_length=1, max_length=64, examples=["Europe/Berlin"])] = "UTC"
    attributes: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]],
        Field(max_length=32),
    ] = Field(default_factory=dict)


class TerminalsProvision(_Body):
    """Terminals to register or update (idempotent), at most 10,000 a request."""

    terminals: Annotated[list[NewTerminal], Field(min_length=1, max_length=10_000)]


class Provisioned(_Body):
    """How many terminals are now registered with the database and the broker."""

    provisioned: int


class DeadLetter(_Body):
    """A terminal message ingest refused, kept (bounded) for diagnosis."""

    id: int
    received_at: datetime
    topic: str
    reason: str
    detail: str
    #: The first 1 KiB of what arrived, decoded as UTF-8 with replacement characters.
    payload: str


class DeadLetterPage(_Body):
    """Dead letters oldest first; pass `next_cursor` as `after` for the next ones."""

    items: list[DeadLetter]
    next_cursor: int | None


# -- groups ----------------------------------------------------------------------------


class GroupOut(_Body):
    """A group and how many terminals are in it."""

    name: str
    members: int
    created_at: datetime


class GroupCreate(_Body):
    """A new group."""

    name: Name


class MembersAdd(_Body):
    """Terminals to add to a group; each must exist."""

    terminals: Annotated[list[Name], Field(min_length=1, max_length=MAX_MEMBERS_PER_REQUEST)]


# -- packages --------------------------------------------------------------------------


class PackageOut(_Body):
    """A registered package; size and sha256 are computed from the uploaded bytes."""

    id: int
    name: str
    kind: str
    version: str
    size: int
    sha256: str
    models: list[str]
    created_at: datetime


# -- campaigns -------------------------------------------------------------------------


class PackageRef(_Body):
    """A package by name and version."""

    name: Name
    version: Version


class CampaignCreate(_Body):
    """A new draft campaign; `policy` and `target` default as in docs/operations.md."""

    name: Name
    groups: Annotated[list[Name], Field(min_length=1, max_length=100)]
    packages: Annotated[list[PackageRef], Field(min_length=1, max_length=MAX_PACKAGES)]
    policy: CampaignPolicy = Field(default_factory=CampaignPolicy)
    target: TargetFilter = Field(default_factory=TargetFilter)


class CampaignSummary(_Body):
    """A campaign as listed."""

    id: int
    name: str
    status: str
    control: str
    current_wave: int
    wave_count: int
    executions: int
    final: int
    paused_reason: str | None
    rollback_of: int | None
    created_at: datetime
    started_at: datetime | None


class CampaignPage(_Body):
    """Campaigns newest first; pass `next_cursor` as `before` for older ones."""

    items: list[CampaignSummary]
    next_cursor: int | None


class WaveProgress(_Body):
    """One wave's executions by state."""

    wave: int
    opened: bool
    size: int
    counts: dict[str, int]


class CampaignProgress(_Body):
    """A campaign's status, derived from its executions, per wave and state."""

    id: int
    name: str
    status: str
    control: str
    current_wave: int
    paused_reason: str | None
    waves: list[WaveProgress]
    totals: dict[str, int]
    excluded: dict[str, int]


class StopRequest(_Body):
    """Why an operator pauses or cancels; kept in the audit log."""

    reason: Annotated[str, Field(max_length=500)] | None = None


class ModelExclusion(_Body):
    """A terminal model to take out of a campaign."""

    model: Annotated[str, Field(min_length=1, max_length=64)]


class Excluded(_Body):
    """What taking a model out did."""

    progress: "CampaignProgress"
    executions_removed: int


class RollbackCreate(_Body):
    """A draft campaign taking a campaign's terminals back to what they ran before."""

    name: Name
    #: Package name -> version, where terminals ran several versions before.
    versions: dict[Name, Version] = Field(default_factory=dict)


class StartResult(_Body):
    """What starting a campaign enrolled."""

    progress: CampaignProgress
    enrolled: int
    excluded: dict[str, int]
    awaiting_inventory: int


# -- audit and tokens ------------------------------------------------------------------


class AuditEntry(_Body):
    """One entry of the hash-chained audit log."""

    id: int
    at: datetime
    actor: str
    action: str
    campaign_id: int | None
    detail: dict[str, Any]
    hash: str


class AuditPage(_Body):
    """Audit entries oldest first; pass `next_cursor` as `after` for the next ones."""

    items: list[AuditEntry]
    next_cursor: int | None


class AuditVerdictOut(_Body):
    """The result of recomputing the whole chain."""

    intact: bool
    entries: int
    head_hash: str | None
    broken_at: int | None
    problem: str | None


class Whoami(_Body):
    """The calling token."""

    name: str
    role: RoleName


class TokenCreate(_Body):
    """A new token's name (the audit log's actor for what it does) and role."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")]
    role: RoleName


class TokenOut(_Body):
    """A token as listed; its secret is shown only once, when issued."""

    id: int
    name: str
    role: RoleName
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


class TokenIssued(TokenOut):
    """A new token and its secret: store it now, it cannot be shown again."""

    token: str


class WebhookCreate(_Body):
    """A new endpoint: campaign events are POSTed to `url`, signed with `secret`."""

    url: Annotated[str, Field(min_length=1, max_length=2048, examples=["https://ops.example/hook"])]
    events: Annotated[list[str], Field(min_length=1, max_length=32)]
    #: The HMAC key; the server generates one when it is left out.
    secret: Annotated[str, Field(min_length=16, max_length=256)] | None = None
    #: Replay from after this audit id; by default the endpoint starts at the newest entry.
    start_after: Annotated[int, Field(ge=0, le=2**62)] | None = None


class WebhookCreated(_Body):
    """A new endpoint and its secret: store it now, it cannot be shown again."""

    endpoint: WebhookEndpoint
    secret: str
