"""The controller process: one supervising TaskGroup of named tasks.

Tasks: ``ingest`` (MQTT -> PostgreSQL, ack after commit), ``campaign-runner`` (desired
states, waves, automatic pause), ``http`` (artifacts with Range, /metrics, /healthz),
``api`` (the operators' REST API, `fleet.api`), ``webhooks`` (campaign events to
operators' endpoints, from the audit log), ``maintenance`` (heartbeat partitions,
dead-letter trimming) and ``metrics-refresh`` (the gauges read from the database). The
runner, maintenance and the metrics refresh run only while this replica leads
(``leadership``, ``lead``; see `fleet.leader`). If any of them fails the group cancels the
rest and the process exits loudly; a supervisor (systemd, compose) restarts it, and
because every decision lives in PostgreSQL and un-acked messages live in the broker's
session, the new process carries on where the old one stopped.
"""

import asyncio
import logging

from fleet import api, metrics
from fleet.artifacts import ArtifactStore
from fleet.clock import Clock, SystemClock
from fleet.db.repository import Repository, connect
from fleet.errors import DatabaseUnavailableError
from fleet.http import HttpServer
from fleet.ingest import Ingest
from fleet.leader import Leadership
from fleet.mqtt import Incoming, MqttSession, PublishError
from fleet.runner import CampaignRunner, send_groups
from fleet.settings import FleetSettings
from fleet.webhooks import WebhookSender

logger = logging.getLogger(__name__)

_MAINTENANCE_EVERY_S = 600.0
_MAX_PENDING_REPLIES = 10_000
_DRAIN_POLL_S = 0.01


async def run(
    settings: FleetSettings,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    clock: Clock | None = None,
) -> None:
    """Run the controller until `stop` is set; set `ready` once it serves.

    `clock` drives every campaign decision; tests pass a `ManualClock`.
    """
    _warn_about_demo_secrets(settings)
    repo = await connect(
        settings.database_url,
        pool_size=settings.db_pool_size,
        command_timeout_s=settings.db_command_timeout_s,
    )
    try:
        async with repo.connection() as q:
            await q.ensure_heartbeat_partitions(settings.heartbeat_partition_days_ahead)
        inbox: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=settings.ingest_queue_max)
        session = MqttSession(settings, inbox)
        try:
            await session.start()
            await _supervise(settings, repo, session, inbox, stop, ready, clock or SystemClock())
        finally:
            await session.stop()
    finally:
        await repo.close()
    logger.info("controller stopped", extra={"action": "controller_stopped"})


def _warn_about_demo_secrets(settings: FleetSettings) -> None:
    defaults = FleetSettings.model_fields
    for name in ("mqtt_password", "terminal_secret"):
        if getattr(settings, name) == defaults[name].default:
            logger.warning(
                "FLEET_%s is the public default: fine for a demo, never for real terminals",
                name.upper(),
                extra={"action": "demo_secret"},
            )


async def _supervise(
    settings: FleetSettings,
    repo: Repository,
    session: MqttSession,
    inbox: asyncio.Queue[Incoming],
    stop: asyncio.Event,
    ready: asyncio.Event | None,
    clock: Clock,
) -> None:
    replies: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue(maxsize=_MAX_PENDING_REPLIES)

    def after_hello(terminal_id: str, groups: list[str]) -> None:
        try:
            replies.put_nowait((terminal_id, groups))
        except asyncio.QueueFull:
            # The terminal keeps its configured groups and asks again at its next boot.
            metrics.COMMANDS_DROPPED.inc()
            logger.warning(
                "groups reply to %s dropped: %d replies pending",
                terminal_id,
                replies.qsize(),
                extra={"action": "command_dropped"},
            )

    ingest = Ingest(
        repo,
        session,
        batch_max=settings.ingest_batch_max,
        batch_wait_s=settings.ingest_batch_wait_ms / 1000,
        on_hello=after_hello,
        clock=clock,
    )
    store = ArtifactStore(settings.artifact_dir)
    leadership = Leadership(
        settings.database_url,
        lease_s=settings.leader_lease_s,
        name=settings.mqtt_client_id or settings.mqtt_username,
    )
    resign = asyncio.Event()
    http = HttpServer(
        settings.http_host,
        settings.http_port,
        store,
        health=session.healthy,
        grace_s=settings.shutdown_grace_s,
    )
    # In cluster mode ingest outlives the stop signal a little: see `_hand_over_ingest`.
    ingest_stop = asyncio.Event() if settings.mqtt_shared_group else stop
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(ingest.run(inbox, ingest_stop), name="ingest")
        if ingest_stop is not stop:
            tasks.create_task(
                _hand_over_ingest(session, inbox, stop, ingest_stop, settings.shutdown_grace_s),
                name="ingest-handover",
            )
        # Until ingest stops: hellos written during a hand-over still get their answer.
        tasks.create_task(_send_replies(session, replies, settings, ingest_stop), name="replies")
        tasks.create_task(leadership.run(resign), name="leadership")
        tasks.create_task(
            _lead(leadership, repo, session, settings, clock, stop, resign), name="lead"
        )
        tasks.create_task(http.serve(stop), name="http")
        api_listening = asyncio.Event()
        tasks.create_task(api.run(settings, clock, store, stop, api_listening), name="api")
        tasks.create_task(WebhookSender(repo, settings).run(stop), name="webhooks")
        await api_listening.wait()
        logger.info("controller serving", extra={"action": "controller_ready"})
        if ready is not None:
            ready.set()


async def _send_replies(
    session: MqttSession,
    replies: asyncio.Queue[tuple[str, list[str]]],
    settings: FleetSettings,
    stop: asyncio.Event,
) -> None:
    """Answer each hello with the terminal's groups, off the ingest path."""
    while True:
        stopping = asyncio.ensure_future(stop.wait())
        getting = asyncio.ensure_future(replies.get())
        try:
            await asyncio.wait({stopping, getting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not getting.done():
                getting.cancel()
        if not getting.done() or getting.cancelled():
            return
        terminal_id, groups = getting.result()
        try:
            await send_groups(session, terminal_id, groups, settings.command_expiry_s)
        except (PublishError, ValueError) as exc:
            logger.warning(
                "groups of %s not sent: %s", terminal_id, exc, extra={"action": "command_failed"}
            )


async def _lead(
    leadership: Leadership,
    repo: Repository,
    session: MqttSession,
    settings: FleetSettings,
    clock: Clock,
    stop: asyncio.Event,
    resign: asyncio.Event,
) -> None:
    """Run the runner, maintenance and metrics refresh while, and only while, this leads.

    On a stop, the current tick ends first and the lock is handed over afterwards
    (`resign`); on a lost lock, both are cancelled at once: that is the fence.
    """
    try:
        while await _first(stop, leadership.leading) is not stop:
            # A new runner each term: nothing cached from before another replica led.
            runner = CampaignRunner(repo, session, settings, clock)
            step_down = asyncio.Event()
            async with asyncio.TaskGroup() as tasks:
                work = [
                    tasks.create_task(runner.run(step_down), name="campaign-runner"),
                    tasks.create_task(_maintenance(repo, settings, step_down), name="maintenance"),
                    tasks.create_task(
                        metrics.refresh_forever(repo, settings.metrics_refresh_s, clock, step_down),
                        name="metrics-refresh",
                    ),
                ]
                if await _first(leadership.following, stop) is not leadership.following:
                    # Stopping: the current tick may end, but only while still leading.
                    step_down.set()
                    await _until_done_or(work, leadership.following)
                if leadership.following.is_set():
                    for task in work:
                        task.cancel()
    finally:
        resign.set()


async def _hand_over_ingest(
    session: MqttSession,
    inbox: asyncio.Queue[Incoming],
    stop: asyncio.Event,
    ingest_stop: asyncio.Event,
    grace_s: float,
) -> None:
    """On a stop in cluster mode: leave the shared group, then write what already came.

    What this replica leaves un-acked stays in its own broker session, which no other
    replica reads; so it first stops new deliveries (`MqttSession.leave_shared_group`
    returns once everything routed to it before has arrived), then lets ingest empty the
    inbox, within the grace.
    """
    await stop.wait()
    try:
        async with asyncio.timeout(grace_s):
            await session.leave_shared_group()
            # No event says "queue empty" (asyncio.Queue.join needs task_done calls).
            while not (inbox.empty() and session.drained()):  # noqa: ASYNC110
                await asyncio.sleep(_DRAIN_POLL_S)
    except TimeoutError:
        logger.warning(
            "stopping with %d messages not written", inbox.qsize(), extra={"action": "ingest_cut"}
        )
    finally:
        ingest_stop.set()


async def _until_done_or(work: list[asyncio.Task[None]], event: asyncio.Event) -> None:
    """Wait until every task in `work` is done, or `event` is set."""
    waiting = asyncio.ensure_future(event.wait())
    finishing = asyncio.ensure_future(asyncio.wait(work))
    try:
        await asyncio.wait({waiting, finishing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        finishing.cancel()


async def _first(*events: asyncio.Event) -> asyncio.Event:
    """Wait until one of `events` is set; return the first one found set."""
    waits = {asyncio.ensure_future(event.wait()): event for event in events}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return next(event for event in events if event.is_set())


async def _maintenance(repo: Repository, settings: FleetSettings, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with repo.connection() as q:
                await q.ensure_heartbeat_partitions(settings.heartbeat_partition_days_ahead)
                await q.trim_dead_letters(settings.dead_letter_max_rows)
        except DatabaseUnavailableError as exc:
            logger.warning("maintenance skipped: %s", exc, extra={"action": "maintenance_skipped"})
        try:
            async with asyncio.timeout(_MAINTENANCE_EVERY_S):
                await stop.wait()
        except TimeoutError:
            pass
