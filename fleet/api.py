"""The operators' REST API: terminals, groups, packages, campaigns, audit, tokens.

Served by the controller (the ``api`` task) on its own port, apart from the artifact port
that terminals reach. Every route needs a bearer token; a token's role decides what it may
do (`fleet.tokens.Role`), and everything it changes is audited under the token's name.
Errors are JSON ``{"error": {"code", "message"}}`` with a stable code, translated from the
typed errors of the layers below in one place (`_ERROR_STATUS` and the handlers).
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet import audit, campaigns, inventory, tokens, webhooks
from fleet.api_models import (
    AuditEntry,
    AuditPage,
    AuditVerdictOut,
    CampaignCreate,
    CampaignPage,
    CampaignProgress,
    CampaignSummary,
    DeadLetter,
    DeadLetterPage,
    ErrorBody,
    EventRecord,
    Excluded,
    ExecutionRecord,
    GroupCreate,
    GroupOut,
    MembersAdd,
    ModelExclusion,
    Name,
    PackageOut,
    Provisioned,
    RollbackCreate,
    StartResult,
    StopRequest,
    TerminalDetail,
    TerminalPage,
    TerminalsProvision,
    TerminalSummary,
    TokenCreate,
    TokenIssued,
    TokenOut,
    Version,
    WaveProgress,
    WebhookCreate,
    WebhookCreated,
    Whoami,
)
from fleet.artifacts import ArtifactStore
from fleet.broker_admin import BrokerAdmin
from fleet.clock import Clock
from fleet.db import connect
from fleet.db.repository import Repository
from fleet.errors import (
    BrokerAdminError,
    CampaignError,
    DatabaseUnavailableError,
    DuplicateError,
    NotFoundError,
    QueryRefusedError,
    WebhookError,
)
from fleet.planning import plan_campaign
from fleet.protocol import PackageKind
from fleet.settings import FleetSettings
from fleet.tokens import Principal, Role

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
_MAX_PAGE = 1000
_HISTORY = 50
#: Largest request body of most routes.
_MAX_BODY = 1024 * 1024
#: Largest body of the routes that take up to 10,000 terminals, with room to spare.
_MAX_LARGE_BODY = 16 * 1024 * 1024
_LARGE_BODY_ROUTES = re.compile(rf"{API_PREFIX}/(terminals|groups/[^/]+/members)")
_UPLOAD_PATH = f"{API_PREFIX}/packages"
#: Where uploads stream to, below the artifact store, before they are stored by sha256.
_UPLOADS = ".uploads"
#: An upload untouched this long belongs to no live request (another replica's included).
_STALE_UPLOAD_S = 3600.0
#: Served to anyone: the contract itself, and its browsable page.
_PUBLIC_PATHS = frozenset(
    {f"{API_PREFIX}/openapi.json", f"{API_PREFIX}/docs", f"{API_PREFIX}/docs/oauth2-redirect"}
)
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Methods counted under their own name; anything else is `other`, so no client can grow
#: the label set.
_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})

#: HTTP status of each stable error code the layers below raise; anything else that is a
#: `CampaignError` is a request the current state refuses (409), or a bad value (422).
_ERROR_STATUS = {
    "not_found": 404,
    "unauthenticated": 401,
    "forbidden": 403,
    "already_exists": 409,
    "payload_too_large": 413,
    "database_unavailable": 503,
    "broker_unavailable": 503,
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 422, 500, 503)
}


API_REQUESTS = Counter(
    "fleet_api_requests",
    "REST API requests answered, by route template, method and status code.",
    ["route", "method", "code"],
)
API_SECONDS = Histogram(
    "fleet_api_request_seconds",
    "Time to answer one REST API request, body included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class ApiError(Exception):
    """A refused request: its stable code and a message for people."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        """Keep the code, the message and the HTTP status (from the code by default)."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _ERROR_STATUS.get(code, 422 if code.startswith("bad_") else 409)


@dataclass
class ApiContext:
    """What the routes work with; one per controller process."""

    repo: Repository
    settings: FleetSettings
    clock: Clock
    store: ArtifactStore
    #: Opens the controller's dynamic-security connection; its client id is fixed, so
    #: calls are serialised by `admin_lock` (two at once would take over each other).
    broker_admin: Callable[[], BrokerAdmin]
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[BrokerAdmin]:
        """One broker-admin connection, held alone here and across processes."""
        async with (
            self.admin_lock,
            inventory.admin_session(self.repo, self.broker_admin) as admin,
        ):
            yield admin


def create_app(context: ApiContext) -> FastAPI:
    """Build the application around `context`."""
    app = FastAPI(
        title="fleet",
        version="1",
        summary="Signed software rollouts to payment terminals over MQTT",
        description="Every route needs `Authorization: Bearer <token>`. Roles: viewer "
        "(read), operator (also change groups, packages and campaigns), admin (also tokens "
        'and webhooks). Errors are `{"error": {"code", "message"}}` with a stable code.',
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    app.state.context = context
    # The last added runs first: measure, then authenticate, then read a bounded body.
    app.add_middleware(_BoundedBody)
    app.add_middleware(_Authenticated, repo=context.repo)
    app.add_middleware(_Measured)
    app.include_router(_router(), prefix=API_PREFIX, responses=_ERROR_RESPONSES)
    _install_error_handlers(app)
    return app


class _Measured:
    """Count every answer by route template (a bounded set) and time it."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            route = scope.get("route")
            # Routes of the included router know their path below the API prefix.
            path = getattr(route, "path", None)
            template = "other" if path is None else _under_prefix(path)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            API_REQUESTS.labels(template, method, str(status)).inc()
            API_SECONDS.observe(time.perf_counter() - started)


def _under_prefix(path: str) -> str:
    return path if path.startswith(API_PREFIX) else API_PREFIX + path


def _large_body_allowed(method: str, path: str) -> bool:
    """Routes that take up to `_MAX_LARGE_BODY`: lists of up to 10,000 terminals."""
    return method == "POST" and bool(_LARGE_BODY_ROUTES.fullmatch(path))


class _Authenticated:
    """Check the bearer token before anything reads the request body.

    FastAPI parses a JSON body before a route's dependencies run, so checking the token
    there would let anyone without one make the controller buffer and parse a body. Here
    an unknown token is refused at once, and so is a viewer's token on anything that is
    not a read; the routes then check the exact role they need (`_require`).
    """

    def __init__(self, app: ASGIApp, *, repo: Repository) -> None:
        self._app = app
        self._repo = repo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _PUBLIC_PATHS:
            await self._app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        principal = None
        if scheme.lower() == "bearer" and token.strip():
            principal = await tokens.authenticate(self._repo, token.strip())
        if principal is None:
            message = "a bearer token is required" if not header else "unknown or revoked token"
            await _error(401, "unauthenticated", message)(scope, receive, send)
            return
        if scope["method"] not in _READS and principal.role < Role.OPERATOR:
            await _error(403, "forbidden", _forbidden(Role.OPERATOR, principal))(
                scope, receive, send
            )
            return
        scope.setdefault("state", {})["principal"] = principal
        await self._app(scope, receive, send)


class _BoundedBody:
    """Read a request body whole, up to its route's limit, before the route sees it.

    Over the limit is 413 at once, whether the size was declared or the body was chunked.
    The package upload is exempt: it streams to disk under its own limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == _UPLOAD_PATH:
            await self._app(scope, receive, send)
            return
        limit = (
            _MAX_LARGE_BODY if _large_body_allowed(scope["method"], scope["path"]) else _MAX_BODY
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = _error(
            413, "payload_too_large", f"a request body here is at most {limit} bytes"
        )
        if declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the route sees what there was
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)


# -- authentication --------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An operator token (`fleet token create`).")


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


Context = Annotated[ApiContext, Depends(_context)]


def _require(role: Role) -> Callable[..., Awaitable[Principal]]:
    async def authorised(
        request: Request,
        # Unused here (`_Authenticated` checked the token); it puts the scheme in the spec.
        _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            raise ApiError("unauthenticated", "a bearer token is required")
        if principal.role < role:
            raise ApiError("forbidden", _forbidden(role, principal))
        return principal

    return authorised


def _forbidden(role: Role, principal: Principal) -> str:
    return f"this needs the {role.label} role; the token is {principal.role.label}"


Viewer = Annotated[Principal, Depends(_require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(_require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(_require(Role.ADMIN))]
#: Path ids: positive, within PostgreSQL's bigint.
DbId = Annotated[int, PathParam(ge=1, le=2**62)]


# -- routes ----------------------------------------------------------------------------


def _router() -> APIRouter:
    api = APIRouter()

    @api.get("/whoami", tags=["tokens"])
    async def whoami(caller: Viewer) -> Whoami:
        """The calling token's name and role."""
        return Whoami(name=caller.name, role=caller.role.label)

    # -- terminals ---------------------------------------------------------------------

    @api.get("/terminals", tags=["terminals"])
    async def list_terminals(
        _: Viewer,
        context: Context,
        group: Annotated[Name | None, Query(description="Members of this group")] = None,
        model: Annotated[str | None, Query(max_length=64)] = None,
        merchant: Annotated[str | None, Query(max_length=128)] = None,
        online: bool | None = None,
        package: Annotated[Name | None, Query(description="With `version`")] = None,
        version: Annotated[Version | None, Query(description="Installed `package` version")] = None,
        after: Annotated[str, Query(max_length=64, description="Cursor: a terminal id")] = "",
        limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    ) -> TerminalPage:
        """Terminals in id order, filtered, one page at a time."""
        if (package is None) != (version is None):
            raise ApiError("bad_filter", "package and version go together")
        async with context.repo.connection() as q:
            rows = await q.api_terminals(
                after=after,
                group=group,
                model=model,
                online=online,
                package=(package, version) if package and version else None,
                merchant=merchant,
                limit=limit + 1,
            )
        items = [_terminal(row) for row in rows[:limit]]
        more = len(rows) > limit
        return TerminalPage(items=items, next_cursor=items[-1].id if more else None)

    @api.post("/terminals", tags=["terminals"])
    async def provision(
        caller: Operator, context: Context, body: TerminalsProvision
    ) -> Provisioned:
        """Register terminals or update their inventory (idempotent), and their broker logins.

        Each terminal's broker password is derived from the controller's terminal secret,
        so manufacturing can program it without this API ever returning it.
        """
        rows = [t.model_dump() for t in body.terminals]
        async with context.admin() as admin:
            await inventory.provision_terminals(
                context.repo, admin, rows, context.settings.terminal_secret, actor=caller.name
            )
        return Provisioned(provisioned=len(rows))

    @api.get("/terminals/{terminal_id}", tags=["terminals"])
    async def get_terminal(_: Viewer, context: Context, terminal_id: Name) -> TerminalDetail:
        """One terminal, its campaigns newest first and its newest state events."""
        async with context.repo.connection() as q:
            row = await q.api_terminal(terminal_id)
            if row is None:
                raise NotFoundError("terminal", terminal_id)
            executions = await q.api_terminal_executions(terminal_id, _HISTORY)
            events = await q.api_terminal_events(terminal_id, _HISTORY)
        summary = _terminal(row)
        return TerminalDetail(
            **summary.model_dump(),
            attributes=_json(row["attributes"]),
            boot_id=row["boot_id"],
            last_event_seq=row["last_event_seq"],
            seq_gaps=row["seq_gaps"],
            created_at=row["created_at"],
            executions=[ExecutionRecord(**dict(r)) for r in executions],
            events=[EventRecord(**dict(r)) for r in events],
        )

    # -- groups ------------------------------------------------------------------------

    @api.get("/groups", tags=["groups"])
    async def list_groups(_: Viewer, context: Context) -> list[GroupOut]:
        """Every group and its size."""
        async with context.repo.connection() as q:
            return [GroupOut(**dict(r)) for r in await q.api_groups()]

    @api.post("/groups", status_code=201, tags=["groups"])
    async def create_group(caller: Operator, context: Context, body: GroupCreate) -> GroupOut:
        """Create a group (idempotent): in the database, then its topic in the broker."""
        async with context.admin() as admin:
            await inventory.create_group(context.repo, admin, body.name, actor=caller.name)
        return await _group(context, body.name)

    @api.get("/groups/{name}", tags=["groups"])
    async def get_group(_: Viewer, context: Context, name: Name) -> GroupOut:
        """One group and its size."""
        return await _group(context, name)

    @api.post("/groups/{name}/members", tags=["groups"])
    async def add_members(
        caller: Operator, context: Context, name: Name, body: MembersAdd
    ) -> GroupOut:
        """Add existing terminals to a group (idempotent) and tell them their groups."""
        await _group(context, name)
        wanted = list(dict.fromkeys(body.terminals))
        async with context.repo.connection() as q:
            known = await q.api_known_terminals(wanted)
        unknown = [t for t in wanted if t not in known]
        if unknown:
            raise NotFoundError("terminal", ", ".join(unknown[:10]))
        async with context.admin() as admin:
            await inventory.assign_group(
                context.repo,
                admin,
                name,
                wanted,
                command_expiry_s=context.settings.command_expiry_s,
                actor=caller.name,
            )
        return await _group(context, name)

    # -- packages ----------------------------------------------------------------------

    @api.get("/packages", tags=["packages"])
    async def list_packages(
        _: Viewer, context: Context, name: Annotated[Name | None, Query()] = None
    ) -> list[PackageOut]:
        """Registered packages, by name."""
        async with context.repo.connection() as q:
            return [_package(r) for r in await q.api_packages(name)]

    @api.get("/packages/{package_id}", tags=["packages"])
    async def get_package(_: Viewer, context: Context, package_id: DbId) -> PackageOut:
        """One package."""
        async with context.repo.connection() as q:
            row = await q.api_package(package_id)
        if row is None:
            raise NotFoundError("package", str(package_id))
        return _package(row)

    @api.post(
        "/packages",
        status_code=201,
        tags=["packages"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def upload_package(
        caller: Operator,
        context: Context,
        request: Request,
        name: Annotated[Name, Query()],
        version: Annotated[Version, Query()],
        kind: Annotated[PackageKind, Query()],
        models: Annotated[list[str], Query(min_length=1, max_length=32)],
        from_version: Annotated[list[Version] | None, Query(max_length=32)] = None,
        requires: Annotated[
            list[str] | None, Query(max_length=16, description="name=version, repeatable")
        ] = None,
    ) -> PackageOut:
        """Upload a package file as the body; its size and sha256 are computed here."""
        needs: dict[str, str] = {}
        for pair in requires or []:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ApiError("bad_package", f"requires takes name=version, not {pair!r}")
            needs[key] = value
        path = await _receive(request, context)
        try:
            package_id = await inventory.add_package(
                context.repo,
                context.store,
                path,
                name=name,
                kind=kind,
                version=version,
                models=models,
                from_versions=from_version or [],
                requires=needs,
                actor=caller.name,
            )
        finally:
            path.unlink(missing_ok=True)
        async with context.repo.connection() as q:
            row = await q.api_package(package_id)
        assert row is not None
        return _package(row)

    # -- campaigns ---------------------------------------------------------------------

    @api.get("/campaigns", tags=["campaigns"])
    async def list_campaigns(
        _: Viewer,
        context: Context,
        control: Annotated[
            str | None, Query(pattern="^(draft|running|paused|canceled|aborted)$")
        ] = None,
        before: Annotated[int | None, Query(ge=1, le=2**62, description="Cursor")] = None,
        limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    ) -> CampaignPage:
        """Campaigns newest first."""
        async with context.repo.connection() as q:
            rows = await q.api_campaigns(before=before or 2**62, control=control, limit=limit + 1)
        items = [_campaign_summary(r) for r in rows[:limit]]
        more = len(rows) > limit
        return CampaignPage(items=items, next_cursor=items[-1].id if more else None)

    @api.post("/campaigns", status_code=201, tags=["campaigns"])
    async def create_campaign(
        caller: Operator, context: Context, body: CampaignCreate
    ) -> CampaignProgress:
        """Create a draft campaign; nothing is sent until it is started."""
        campaign_id = await campaigns.create_campaign(
            context.repo,
            context.clock,
            name=body.name,
            groups=body.groups,
            packages=[(p.name, p.version) for p in body.packages],
            policy=body.policy,
            target=body.target,
            actor=caller.name,
        )
        return await _progress(context, campaign_id)

    @api.get("/campaigns/{campaign_id}", tags=["campaigns"])
    async def get_campaign(_: Viewer, context: Context, campaign_id: DbId) -> CampaignProgress:
        """A campaign's progress per wave and state."""
        return await _progress(context, campaign_id)

    @api.get("/campaigns/{campaign_id}/plan", tags=["campaigns"])
    async def get_plan(_: Viewer, context: Context, campaign_id: DbId) -> dict[str, Any]:
        """When each wave should open and finish, from the policy and the fleet's time zones."""
        plan = await plan_campaign(context.repo, context.clock, campaign_id)
        return plan.as_dict()

    @api.post("/campaigns/{campaign_id}/start", tags=["campaigns"])
    async def start(caller: Operator, context: Context, campaign_id: DbId) -> StartResult:
        """Start a draft: enroll the targeted terminals and open the first wave."""
        enrolled = await campaigns.start_campaign(
            context.repo, context.clock, campaign_id, actor=caller.name
        )
        return StartResult(
            progress=await _progress(context, campaign_id),
            enrolled=enrolled.added,
            excluded=enrolled.excluded,
            awaiting_inventory=enrolled.awaiting_inventory,
        )

    @api.post("/campaigns/{campaign_id}/pause", tags=["campaigns"])
    async def pause(
        caller: Operator,
        context: Context,
        campaign_id: DbId,
        body: StopRequest | None = None,
    ) -> CampaignProgress:
        """Pause a running campaign: nothing new starts; updates under way finish."""
        await campaigns.pause_campaign(
            context.repo,
            context.clock,
            campaign_id,
            reason=body.reason if body and body.reason else "operator",
            actor=caller.name,
        )
        return await _progress(context, campaign_id)

    @api.post("/campaigns/{campaign_id}/resume", tags=["campaigns"])
    async def resume(caller: Operator, context: Context, campaign_id: DbId) -> CampaignProgress:
        """Resume a paused campaign; failures that caused an automatic pause are accepted."""
        await campaigns.resume_campaign(context.repo, context.clock, campaign_id, actor=caller.name)
        return await _progress(context, campaign_id)

    @api.post("/campaigns/{campaign_id}/cancel", tags=["campaigns"])
    async def cancel(
        caller: Operator,
        context: Context,
        campaign_id: DbId,
        body: StopRequest | None = None,
    ) -> CampaignProgress:
        """Cancel: unstarted executions end canceled; installs under way run to their end."""
        await campaigns.cancel_campaign(
            context.repo,
            context.clock,
            campaign_id,
            reason=body.reason if body else None,
            actor=caller.name,
        )
        return await _progress(context, campaign_id)

    @api.post("/campaigns/{campaign_id}/exclude-model", tags=["campaigns"])
    async def exclude_model(
        caller: Operator, context: Context, campaign_id: DbId, body: ModelExclusion
    ) -> Excluded:
        """Take a terminal model out: its unstarted executions leave, later joiners too."""
        removed = await campaigns.exclude_model(
            context.repo, context.clock, campaign_id, body.model, actor=caller.name
        )
        return Excluded(progress=await _progress(context, campaign_id), executions_removed=removed)

    @api.post("/campaigns/{campaign_id}/rollback", status_code=201, tags=["campaigns"])
    async def rollback(
        caller: Operator, context: Context, campaign_id: DbId, body: RollbackCreate
    ) -> CampaignProgress:
        """Create a draft that takes this campaign's terminals back to their old versions."""
        rollback_id = await campaigns.create_rollback(
            context.repo,
            context.clock,
            campaign_id,
            name=body.name,
            versions=body.versions,
            actor=caller.name,
        )
        return await _progress(context, rollback_id)

    @api.get("/campaigns/{campaign_id}/audit", tags=["audit"])
    async def campaign_audit(
        _: Viewer,
        context: Context,
        campaign_id: DbId,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    ) -> AuditPage:
        """A campaign's audit entries, oldest first."""
        await _progress(context, campaign_id)
        return await _audit_page(context, after, campaign_id, limit)

    # -- audit -------------------------------------------------------------------------

    @api.get("/audit", tags=["audit"])
    async def audit_log(
        _: Viewer,
        context: Context,
        after: Annotated[int, Query(ge=0, le=2**62, description="Cursor: an entry id")] = 0,
        limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    ) -> AuditPage:
        """Every operator action and automatic decision, oldest first."""
        return await _audit_page(context, after, None, limit)

    @api.get("/audit/verify", tags=["audit"])
    async def verify_audit(_: Viewer, context: Context) -> AuditVerdictOut:
        """Recompute the whole hash chain; keep `head_hash` elsewhere to detect a cut tail."""
        verdict = await audit.verify(context.repo)
        return AuditVerdictOut(
            intact=verdict.intact,
            entries=verdict.entries,
            head_hash=verdict.head_hash or None,
            broken_at=verdict.broken_at,
            problem=verdict.problem,
        )

    @api.get("/dead-letters", tags=["audit"])
    async def dead_letters(
        _: Viewer,
        context: Context,
        reason: Annotated[str | None, Query(max_length=64)] = None,
        after: Annotated[int, Query(ge=0, le=2**62, description="Cursor")] = 0,
        limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    ) -> DeadLetterPage:
        """Terminal messages ingest refused (the newest FLEET_DEAD_LETTER_MAX_ROWS are kept)."""
        async with context.repo.connection() as q:
            rows = await q.api_dead_letters(after=after, reason=reason, limit=limit + 1)
        items = [
            DeadLetter(
                id=r["id"],
                received_at=r["received_at"],
                topic=r["topic"],
                reason=r["reason"],
                detail=r["detail"],
                payload=bytes(r["payload"]).decode(errors="replace"),
            )
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        return DeadLetterPage(items=items, next_cursor=items[-1].id if more else None)

    # -- tokens ------------------------------------------------------------------------

    @api.get("/tokens", tags=["tokens"])
    async def list_tokens(_: Admin, context: Context) -> list[TokenOut]:
        """Every token, revoked ones too; never their secrets."""
        return [_token(t) for t in await tokens.list_tokens(context.repo)]

    @api.post("/tokens", status_code=201, tags=["tokens"])
    async def issue_token(caller: Admin, context: Context, body: TokenCreate) -> TokenIssued:
        """Issue a token; its secret is in this response only."""
        info, secret = await tokens.issue(
            context.repo,
            name=body.name,
            role=Role.parse(body.role),
            actor=caller.name,
            at=context.clock.now(),
        )
        return TokenIssued(**_token(info).model_dump(), token=secret)

    @api.delete("/tokens/{token_id}", status_code=204, tags=["tokens"])
    async def revoke_token(caller: Admin, context: Context, token_id: DbId) -> None:
        """Revoke a token; its next request is refused."""
        await tokens.revoke(context.repo, token_id, actor=caller.name, at=context.clock.now())

    # -- webhooks ----------------------------------------------------------------------

    @api.get("/webhooks", tags=["webhooks"])
    async def list_webhooks(_: Admin, context: Context) -> list[webhooks.WebhookEndpoint]:
        """Endpoints and their delivery lag: pending events, failing attempts, last error."""
        return await webhooks.list_endpoints(context.repo)

    @api.post("/webhooks", status_code=201, tags=["webhooks"])
    async def add_webhook(caller: Admin, context: Context, body: WebhookCreate) -> WebhookCreated:
        """Register an endpoint for campaign events; its secret is in this response only."""
        endpoint, secret = await webhooks.add_endpoint(
            context.repo,
            url=body.url,
            events=body.events,
            secret=body.secret,
            actor=caller.name,
            at=context.clock.now(),
            start_after=body.start_after,
            allowed_hosts=webhooks.allowed_hosts(context.settings.webhook_allowed_hosts),
        )
        return WebhookCreated(endpoint=endpoint, secret=secret)

    @api.delete("/webhooks/{webhook_id}", status_code=204, tags=["webhooks"])
    async def remove_webhook(caller: Admin, context: Context, webhook_id: DbId) -> None:
        """Stop sending to an endpoint."""
        await webhooks.remove_endpoint(
            context.repo, webhook_id, actor=caller.name, at=context.clock.now()
        )

    @api.get("/webhooks/{webhook_id}/deliveries", tags=["webhooks"])
    async def webhook_deliveries(
        _: Admin,
        context: Context,
        webhook_id: DbId,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> list[webhooks.Delivery]:
        """An endpoint's newest delivery attempts, newest first."""
        return await webhooks.recent_deliveries(context.repo, webhook_id, limit)

    return api


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the controller owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run(
    settings: FleetSettings,
    clock: Clock,
    store: ArtifactStore,
    stop: asyncio.Event,
    listening: asyncio.Event | None = None,
) -> None:
    """The controller's ``api`` task: serve the API on a database pool of its own.

    `listening` is set once the port accepts connections.

    Its own pool, so however many operators call at once, ingest and the runner keep
    their connections.
    """
    repo = await connect(
        settings.database_url,
        pool_size=settings.api_db_pool_size,
        command_timeout_s=settings.db_command_timeout_s,
    )
    try:
        await asyncio.to_thread(_sweep_uploads, store.root / _UPLOADS)
        context = ApiContext(
            repo=repo,
            settings=settings,
            clock=clock,
            store=store,
            broker_admin=lambda: BrokerAdmin.from_settings(settings),
        )
        await serve(
            create_app(context),
            settings.api_host,
            settings.api_port,
            stop,
            settings.shutdown_grace_s,
            listening,
        )
    finally:
        await repo.close()


def _sweep_uploads(uploads: Path) -> None:
    """Delete uploads a stopped process left behind (old enough not to be in progress)."""
    if not uploads.is_dir():
        return
    cutoff = time.time() - _STALE_UPLOAD_S
    for leftover in uploads.iterdir():
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
                logger.info("removed an abandoned upload %s", leftover.name)


async def serve(
    app: FastAPI,
    host: str,
    port: int,
    stop: asyncio.Event,
    grace_s: float,
    listening: asyncio.Event | None = None,
) -> None:
    """Serve `app` until `stop` is set, then let requests under way finish for `grace_s`.

    The socket is bound here, so a taken port raises `OSError` into the supervisor
    instead of uvicorn's exit.
    """
    sock = socket.create_server((host, port), reuse_port=False)
    # Inherited by accepted connections. Without it a response's head and body wait on
    # the client's delayed ACK: 44 ms for any request instead of 1 ms (measured here).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own flag
    if listening is not None:
        listening.set()  # connections queue in the backlog until uvicorn accepts them
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(grace_s)),
        limit_concurrency=256,
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="api-server")
    stopping = asyncio.create_task(stop.wait(), name="api-stop")
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        server.should_exit = True
        try:
            await serving
        finally:
            sock.close()


# -- helpers ---------------------------------------------------------------------------


def _json(value: str | dict[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    loaded: dict[str, Any] = json.loads(value)
    return loaded


def _terminal(row: Mapping[str, Any]) -> TerminalSummary:
    return TerminalSummary(
        id=row["id"],
        model=row["model"],
        merchant_id=row["merchant_id"],
        timezone=row["timezone"],
        versions={k: str(v) for k, v in _json(row["versions"]).items()},
        online=row["online"],
        last_seen=row["last_seen"],
        groups=list(row["groups"]),
    )


def _package(row: Mapping[str, Any]) -> PackageOut:
    return PackageOut(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        version=row["version"],
        size=row["size"],
        sha256=row["sha256"],
        models=list(row["compatible_models"]),
        created_at=row["created_at"],
    )


def _campaign_summary(row: Mapping[str, Any]) -> CampaignSummary:
    status = campaigns.derived_status(
        row["control"],
        every_wave_open=row["current_wave"] >= row["wave_count"],
        everything_final=row["final"] == row["executions"],
    )
    return CampaignSummary(status=status, **dict(row))


def _token(info: tokens.TokenInfo) -> TokenOut:
    return TokenOut(
        id=info.id,
        name=info.name,
        role=info.role.label,
        created_at=info.created_at,
        created_by=info.created_by,
        revoked_at=info.revoked_at,
    )


async def _group(context: ApiContext, name: str) -> GroupOut:
    async with context.repo.connection() as q:
        row = await q.api_group(name)
    if row is None:
        raise NotFoundError("group", name)
    return GroupOut(**dict(row))


async def _progress(context: ApiContext, campaign_id: int) -> CampaignProgress:
    status = await campaigns.campaign_status(context.repo, campaign_id)
    return CampaignProgress(
        id=status.id,
        name=status.name,
        status=status.status,
        control=status.control,
        current_wave=status.current_wave,
        paused_reason=status.paused_reason,
        waves=[
            WaveProgress(wave=w.wave, opened=w.opened, size=w.size, counts=w.counts)
            for w in status.waves
        ],
        totals=status.totals,
        excluded=status.excluded,
    )


async def _audit_page(
    context: ApiContext, after: int, campaign_id: int | None, limit: int
) -> AuditPage:
    async with context.repo.connection() as q:
        rows = await q.api_audit(after=after, campaign_id=campaign_id, limit=limit + 1)
    items = [
        AuditEntry(
            id=r["id"],
            at=r["at"],
            actor=r["actor"],
            action=r["action"],
            campaign_id=r["campaign_id"],
            detail=_json(r["detail"]),
            hash=r["hash"],
        )
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return AuditPage(items=items, next_cursor=items[-1].id if more else None)


async def _receive(request: Request, context: ApiContext) -> Path:
    """Stream the request body into a private file beside the store, bounded in size."""
    limit = context.settings.api_max_upload_mb * 1024 * 1024
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    uploads = context.store.root / _UPLOADS
    await asyncio.to_thread(uploads.mkdir, parents=True, exist_ok=True)
    handle, name = await asyncio.to_thread(tempfile.mkstemp, dir=uploads)
    path = Path(name)
    try:
        received = await _write_body(request, handle, limit)
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    if received == 0:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise ApiError("bad_package", "the request body (the package file) is empty")
    return path


async def _write_body(request: Request, handle: int, limit: int) -> int:
    received = 0
    with os.fdopen(handle, "wb") as out:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            await asyncio.to_thread(out.write, chunk)
    return received


def _too_large(limit: int) -> ApiError:
    return ApiError("payload_too_large", f"a package may be at most {limit} bytes")


# -- errors ----------------------------------------------------------------------------


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:  # noqa: ANN401
    body: dict[str, Any] = {"code": code, "message": message}
    body.update(extra)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Translate every typed error of the layers below into the API's error body."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(CampaignError)
    async def refused(_: Request, exc: CampaignError) -> JSONResponse:
        translated = ApiError(exc.code, str(exc))
        return _error(translated.status, translated.code, translated.message)

    @app.exception_handler(WebhookError)
    async def bad_webhook(_: Request, exc: WebhookError) -> JSONResponse:
        return _error(422, exc.code, str(exc))

    @app.exception_handler(DuplicateError)
    async def duplicate(_: Request, exc: DuplicateError) -> JSONResponse:
        return _error(409, "already_exists", f"already exists ({exc.constraint})")

    @app.exception_handler(QueryRefusedError)
    async def query_refused(_: Request, exc: QueryRefusedError) -> JSONResponse:
        # PostgreSQL's own text can quote other rows' values: it goes to the log only.
        logger.warning("api: refused by the database: %s", exc, extra={"action": "api_refused"})
        return _error(
            422,
            "refused_by_database",
            f"a value was refused by the database (SQLSTATE {exc.sqlstate})",
        )

    @app.exception_handler(DatabaseUnavailableError)
    async def database_away(_: Request, exc: DatabaseUnavailableError) -> JSONResponse:
        logger.warning("api: database unavailable: %s", exc, extra={"action": "api_db_away"})
        return _error(503, "database_unavailable", "the database is unavailable; retry later")

    @app.exception_handler(BrokerAdminError)
    async def broker_away(_: Request, exc: BrokerAdminError) -> JSONResponse:
        logger.warning("api: broker admin failed: %s", exc, extra={"action": "api_broker_away"})
        return _error(503, "broker_unavailable", f"the broker did not do it: {exc}")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _error(422, "validation_failed", "the request is not valid", fields=fields)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        logger.error("api: unhandled error", exc_info=exc, extra={"action": "api_error"})
        return _error(500, "internal_error", "internal error; see the controller's log")
