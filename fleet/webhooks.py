"""Webhooks: campaign events, signed, retried, and delivered in order per endpoint.

Design note. The audit log is the outbox. Every campaign decision is appended to it in
the transaction that makes the decision, and its ids are dense and commit in order
(appends are serialised), so an endpoint needs only a cursor: the last audit id it has had.
The controller's ``webhooks`` task leases due endpoints (``FOR UPDATE SKIP LOCKED`` plus a
lease, so with several controllers each endpoint has one sender at a time), POSTs each
endpoint's next subscribed entry, and moves the cursor only after a 2xx. A failure is
retried with capped exponential backoff and jitter, and the endpoint's later events wait
behind it. Delivery is therefore at-least-once and in audit order per endpoint; receivers
dedupe on ``X-Fleet-Delivery`` (the audit id). An endpoint that stays down is retried at
the capped pace for as long as it takes: nothing is dropped, and ``pending``,
``failing_since`` and ``last_error`` show its lag.

The signature is Stripe's scheme: ``X-Fleet-Signature: t=<unix seconds>,v1=<hex>``, the
HMAC-SHA256 of ``"<t>." + body`` under the endpoint's secret; `verify` is the receiver's
side.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import idna

from fleet import audit
from fleet.clock import as_datetime
from fleet.db.repository import Repository
from fleet.errors import DatabaseUnavailableError, NotFoundError, QueryRefusedError, WebhookError
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

# DO NOT CHANGE a published name: receivers switch on them. Event -> the audit action.
_ACTION_OF = {
    "campaign.started": "campaign_started",
    "campaign.wave_advanced": "wave_advanced",
    "campaign.threshold_tripped": "threshold_tripped",
    "campaign.paused": "campaign_paused",
    "campaign.resumed": "campaign_resumed",
    "campaign.completed": "campaign_completed",
    "campaign.canceled": "campaign_canceled",
    "campaign.aborted": "campaign_aborted",
}
_EVENT_OF = {action: event for event, action in _ACTION_OF.items()}
#: Every event an endpoint may subscribe to.
EVENTS: tuple[str, ...] = tuple(_ACTION_OF)

#: Delivery attempts kept per endpoint (older ones are trimmed).
DELIVERY_LOG_KEEP = 100
#: How far from the receiver's clock a signature may be, by default (Stripe's default).
TOLERANCE_S = 300.0
SIGNATURE_HEADER = "X-Fleet-Signature"
_MAX_URL = 2048
_MIN_SECRET, _MAX_SECRET = 16, 256
# Endpoints one pass of one controller serves at once, and events per endpoint per lease.
_ENDPOINTS_PER_PASS = 16
_EVENTS_PER_LEASE = 100
# A lease outlives the longest POST by this much, so it never lapses under a live sender.
_LEASE_MARGIN_S = 30.0
_MAX_ERROR = 500


@dataclass(frozen=True)
class WebhookEndpoint:
    """A receiver of campaign events, as listed: never its secret. Times are ISO-8601."""

    id: int
    url: str
    events: list[str]
    created_at: str
    created_by: str
    #: The last audit id delivered (or passed over: not subscribed).
    delivered_through: int
    #: Subscribed events waiting, the oldest of them failing when `attempts` > 0.
    pending: int
    #: Failed attempts in a row at the oldest pending event.
    attempts: int
    last_error: str | None
    failing_since: str | None
    next_attempt_at: str | None
    last_delivered_at: str | None
    removed_at: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver one event to one endpoint. Times are ISO-8601."""

    id: int
    endpoint_id: int
    #: The audit id: the delivery id receivers see in ``X-Fleet-Delivery``.
    audit_id: int
    event: str
    attempt: int
    at: str
    #: The HTTP status, or None when no response came (refused, timed out, reset).
    status: int | None
    error: str | None
    duration_ms: float
    ok: bool


# -- operators' requests ---------------------------------------------------------------


async def add_endpoint(
    repo: Repository,
    *,
    url: str,
    events: Sequence[str],
    secret: str | None,
    actor: str,
    at: float,
    start_after: int | None = None,
    allowed_hosts: Sequence[str] = (),
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint; return it and its secret (shown this once).

    It receives the subscribed events appended after it was created, or after audit
    entry `start_after` when given (to replay history). The audit entry
    ``webhook_added`` records it, without the secret.

    Raises:
        WebhookError: ``bad_url`` (not http(s) with a host, or with credentials, or a
            host outside `allowed_hosts` when that is not empty),
            ``bad_events`` (none, or an unknown name), ``bad_secret`` (too short or long).
    """
    url = _check_url(url, allowed_hosts)
    chosen = _check_events(events)
    if secret is None:
        secret = secrets.token_urlsafe(32)
    elif not (_MIN_SECRET <= len(secret) <= _MAX_SECRET) or not secret.isprintable():
        raise WebhookError(
            "bad_secret", f"a secret has {_MIN_SECRET} to {_MAX_SECRET} printable characters"
        )
    if start_after is not None and start_after < 0:
        raise WebhookError("bad_events", "start_after is an audit id, 0 or more")
    async with repo.transaction() as q:
        endpoint_id = await q.add_webhook_endpoint(
            url=url,
            secret=secret,
            events=chosen,
            actions=[_ACTION_OF[e] for e in chosen],
            at=as_datetime(at),
            start_after=start_after,
            actor=actor,
        )
        [row] = await q.webhook_endpoints(endpoint_id=endpoint_id)
        await audit.append(
            q,
            at=at,
            actor=actor,
            action="webhook_added",
            detail={
                "endpoint": endpoint_id,
                "url": redacted(url),
                "events": chosen,
                "delivered_through": row["delivered_through"],
            },
        )
    return _endpoint(row), secret


async def list_endpoints(repo: Repository) -> list[WebhookEndpoint]:
    """Every endpoint not removed, with its delivery state; never secrets."""
    async with repo.connection() as q:
        return [_endpoint(r) for r in await q.webhook_endpoints()]


async def remove_endpoint(repo: Repository, endpoint_id: int, *, actor: str, at: float) -> None:
    """Remove an endpoint: nothing more is sent to it, and its secret is forgotten.

    A POST already under way when it is removed may still arrive.

    Raises:
        NotFoundError: no live endpoint has this id (code ``not_found``).
    """
    async with repo.transaction() as q:
        url = await q.remove_webhook_endpoint(endpoint_id, as_datetime(at))
        if url is None:
            raise NotFoundError("webhook endpoint", str(endpoint_id))
        await audit.append(
            q,
            at=at,
            actor=actor,
            action="webhook_removed",
            detail={"endpoint": endpoint_id, "url": redacted(url)},
        )


async def recent_deliveries(repo: Repository, endpoint_id: int, limit: int) -> list[Delivery]:
    """An endpoint's newest delivery attempts, newest first (at most `DELIVERY_LOG_KEEP`).

    Raises:
        NotFoundError: no endpoint, live or removed, has this id (code ``not_found``).
    """
    async with repo.connection() as q:
        if not await q.webhook_endpoints(include_removed=True, endpoint_id=endpoint_id):
            raise NotFoundError("webhook endpoint", str(endpoint_id))
        rows = await q.webhook_deliveries(endpoint_id, max(1, min(limit, DELIVERY_LOG_KEEP)))
    return [
        Delivery(
            id=r["id"],
            endpoint_id=r["endpoint_id"],
            audit_id=r["audit_id"],
            event=r["event"],
            attempt=r["attempt"],
            at=r["at"].isoformat(),
            status=r["status"],
            error=r["error"],
            duration_ms=r["duration_ms"],
            ok=r["status"] is not None and 200 <= r["status"] < 300,
        )
        for r in rows
    ]


def allowed_hosts(setting: str) -> list[str]:
    """The host patterns of `FleetSettings.webhook_allowed_hosts` (comma-separated)."""
    return [h.strip().lower() for h in setting.split(",") if h.strip()]


def _host_allowed(host: str, patterns: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


def redacted(url: str) -> str:
    """`url` without its path and query, which often carry a receiver's own secret.

    What the audit log (readable by viewers) and the controller's log show of an endpoint.
    """
    parts = urlsplit(url)
    return (
        f"{parts.scheme}://{parts.netloc}/…" if parts.path not in ("", "/") or parts.query else url
    )


def _encodable_host(host: str) -> bool:
    """Whether the HTTP client can connect to `host` (an IP address or an IDNA name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    if host.isascii() and "xn--" not in host.lower():
        return True  # sent as it is, as the HTTP client does
    try:
        idna.encode(host, uts46=True)
    except idna.IDNAError:
        return False
    return True


def _check_url(url: str, allowed: Sequence[str] = ()) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise WebhookError("bad_url", f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError("bad_url", "a webhook URL is http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        # They would be listed to every operator; the signature authenticates us instead.
        raise WebhookError("bad_url", "a webhook URL carries no credentials")
    if len(url) > _MAX_URL or parts.fragment:
        raise WebhookError("bad_url", f"a webhook URL is under {_MAX_URL} characters, no #")
    if not _encodable_host(parts.hostname):
        raise WebhookError("bad_url", f"not a valid host name: {parts.hostname!r}")
    if allowed and not _host_allowed(parts.hostname, allowed):
        # The controller sits inside the operator's network: without a list, an admin
        # token could make it POST to any internal address.
        raise WebhookError(
            "bad_url", f"webhooks may go to {', '.join(allowed)} only (FLEET_WEBHOOK_ALLOWED_HOSTS)"
        )
    return url


def _check_events(events: Sequence[str]) -> list[str]:
    if isinstance(events, str) or not events:
        raise WebhookError("bad_events", f"subscribe to one or more of {', '.join(EVENTS)}")
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise WebhookError(
            "bad_events", f"unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}"
        )
    return [e for e in EVENTS if e in events]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _endpoint(row: Any) -> WebhookEndpoint:  # noqa: ANN401 - an asyncpg record
    return WebhookEndpoint(
        id=row["id"],
        url=row["url"],
        events=list(row["events"]),
        created_at=row["created_at"].isoformat(),
        created_by=row["created_by"],
        delivered_through=row["delivered_through"],
        pending=row["pending"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        failing_since=_iso(row["failing_since"]),
        next_attempt_at=_iso(row["next_attempt_at"]),
        last_delivered_at=_iso(row["last_delivered_at"]),
        removed_at=_iso(row["removed_at"]),
    )


# -- the wire --------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Fleet-Signature`` value: ``t=<timestamp>,v1=<hex HMAC-SHA256>``.

    The HMAC covers ``f"{timestamp}."`` followed by the raw body, under the secret.
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, now: float, tolerance_s: float = TOLERANCE_S
) -> bool:
    """Tell whether a signature header is valid for this body and fresh at `now`.

    Any ``v1`` in the header may match (several appear while a secret is rotated); a
    timestamp further than `tolerance_s` from `now` fails, which bounds replays.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures or abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2].encode()
    return any(hmac.compare_digest(expected, s.encode()) for s in signatures)


def event_payload(entry: Any) -> dict[str, Any]:  # noqa: ANN401 - an asyncpg record
    """The JSON body of the event an audit entry is."""
    campaign = None
    if entry["campaign_id"] is not None:
        campaign = {"id": entry["campaign_id"], "name": entry["campaign_name"]}
    return {
        "id": entry["id"],
        "event": _EVENT_OF[entry["action"]],
        "at": entry["at"].isoformat(),
        "campaign": campaign,
        "actor": entry["actor"],
        "detail": json.loads(entry["detail"]),
    }


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    """Wait after `failures` failed attempts in a row: doubling, capped, jittered.

    The jitter (between half and all of the step) keeps many endpoints, or a recovered
    receiver's many senders, from retrying in lockstep.
    """
    step = min(max_s, base_s * 2 ** min(failures - 1, 40))
    return random.uniform(step / 2, step)


# -- the delivery loop -----------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    status: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """The controller's ``webhooks`` task: sends each endpoint's events, in order."""

    def __init__(
        self,
        repo: Repository,
        settings: FleetSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Wire the sender to the repository; `transport` is for tests of our HTTP side."""
        self._repo = repo
        self._poll_s = settings.webhook_poll_s
        self._timeout_s = settings.webhook_timeout_s
        self._backoff_s = settings.webhook_backoff_s
        self._max_backoff_s = settings.webhook_max_backoff_s
        self._lease_s = settings.webhook_timeout_s + _LEASE_MARGIN_S
        self._transport = transport
        self._allowed = allowed_hosts(settings.webhook_allowed_hosts)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; a POST under way then finishes (or times out).

        Up to `_ENDPOINTS_PER_PASS` endpoints drain at once, each in its own task; a free
        slot is filled as soon as one finishes, so a slow endpoint holds one slot, not the
        others' events.
        """
        draining: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(
            timeout=self._timeout_s,
            follow_redirects=False,
            headers={"User-Agent": "fleet-webhooks/1"},
            transport=self._transport,
        ) as client:
            try:
                while not stop.is_set():
                    try:
                        draining |= await self._claim(
                            client, _ENDPOINTS_PER_PASS - len(draining), stop
                        )
                    except DatabaseUnavailableError as exc:
                        logger.warning(
                            "webhook pass skipped: %s",
                            exc,
                            extra={"action": "webhook_pass_skipped"},
                        )
                    waiting = asyncio.ensure_future(stop.wait())
                    try:
                        await asyncio.wait(
                            {waiting, *draining},
                            timeout=self._poll_s,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        waiting.cancel()
                    for task in [t for t in draining if t.done()]:
                        draining.discard(task)
                        task.result()  # a bug in delivery stops the controller loudly
            finally:
                if draining:
                    await asyncio.wait(draining)

    async def _claim(
        self, client: httpx.AsyncClient, slots: int, stop: asyncio.Event
    ) -> set[asyncio.Task[None]]:
        """Lease up to `slots` due endpoints and start draining each in its own task."""
        if slots <= 0:
            return set()
        lease = uuid.uuid4()
        async with self._repo.connection() as q:
            await q.skip_idle_webhooks()
            claimed = await q.claim_webhook_endpoints(slots, self._lease_s, lease)
        return {
            asyncio.create_task(
                self._drain(client, endpoint, lease, stop), name=f"webhook-{endpoint['id']}"
            )
            for endpoint in claimed
        }

    async def _drain(
        self,
        client: httpx.AsyncClient,
        endpoint: Any,  # noqa: ANN401 - an asyncpg record
        lease: uuid.UUID,
        stop: asyncio.Event,
    ) -> None:
        endpoint_id: int = endpoint["id"]
        failures: int = endpoint["attempts"]
        try:
            async with self._repo.connection() as q:
                entries = await q.webhook_events(
                    endpoint["delivered_through"], endpoint["actions"], _EVENTS_PER_LEASE
                )
            for entry in entries:
                if stop.is_set():
                    break
                async with self._repo.connection() as q:
                    if not await q.hold_webhook_lease(endpoint_id, lease, self._lease_s):
                        return  # removed, or (after a stall) another sender has it
                event, delay = _EVENT_OF[entry["action"]], 0.0
                outcome = await self._post(client, endpoint["url"], endpoint["secret"], entry)
                async with self._repo.transaction() as q:
                    await q.log_webhook_attempt(
                        endpoint_id=endpoint_id,
                        audit_id=entry["id"],
                        event=event,
                        attempt=failures + 1,
                        status=outcome.status,
                        error=outcome.error,
                        duration_ms=outcome.duration_ms,
                        keep=DELIVERY_LOG_KEEP,
                    )
                    if outcome.ok:
                        if not await q.webhook_delivered(endpoint_id, lease, entry["id"]):
                            return
                    else:
                        failures += 1
                        delay = backoff_s(failures, self._backoff_s, self._max_backoff_s)
                        await q.webhook_failed(endpoint_id, lease, outcome.error or "", delay)
                if not outcome.ok:
                    logger.warning(
                        "webhook %s to endpoint %d (%s) failed, attempt %d: %s; retry in %.3gs",
                        event,
                        endpoint_id,
                        redacted(endpoint["url"]),
                        failures,
                        outcome.error,
                        delay,
                        extra={"action": "webhook_failed"},
                    )
                    return
                failures = 0
            async with self._repo.connection() as q:
                await q.release_webhook_endpoint(endpoint_id, lease)
        except (DatabaseUnavailableError, QueryRefusedError) as exc:
            # The lease lapses on its own; the event is sent again (at least once).
            logger.warning(
                "webhook endpoint %d left: %s",
                endpoint_id,
                exc,
                extra={"action": "webhook_pass_skipped"},
            )

    async def _post(
        self,
        client: httpx.AsyncClient,
        url: str,
        secret: str,
        entry: Any,  # noqa: ANN401 - an asyncpg record
    ) -> _Outcome:
        body = json.dumps(event_payload(entry), separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Fleet-Event": _EVENT_OF[entry["action"]],
            "X-Fleet-Delivery": str(entry["id"]),
            # Signed at each attempt, so a retry is as fresh as the first try.
            SIGNATURE_HEADER: sign(secret, int(time.time()), body),
        }
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        host = urlsplit(url).hostname or ""
        if self._allowed and not _host_allowed(host, self._allowed):
            # Registered before the list was narrowed: held back, not dropped.
            return _Outcome(None, f"{host} is not in FLEET_WEBHOOK_ALLOWED_HOSTS", 0.0)
        try:
            async with asyncio.timeout(self._timeout_s):
                # Streamed and closed unread: a receiver's answer body is not ours to hold.
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code
        except TimeoutError:
            error = f"no response within {self._timeout_s:g}s"
        except Exception as exc:
            # httpx raises more than HTTPError for some URLs (an invalid IDNA host raises
            # idna.IDNAError); none of it may stop delivery to the other endpoints.
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}"
        duration_ms = (time.monotonic() - started) * 1000
        return _Outcome(status, None if error is None else error[:_MAX_ERROR], duration_ms)
