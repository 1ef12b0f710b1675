"""The controller process: one supervising TaskGroup of named tasks.

Tasks: ``ingest`` (MQTT -> PostgreSQL, ack after commit), ``campaign-runner`` (desired
states, waves, automatic pause), ``http`` (artifacts with Range, /metrics, /healthz) and
``maintenance`` (heartbeat partitions, dead-letter trimming). If any of them fails the group
cancels the rest and the process exits loudly; a supervisor (systemd, compose) restarts
it, and because every decision lives in PostgreSQL and un-acked messages live in the
broker's session, the new process carries on where the old one stopped.
"""

import asyncio
import logging

from fleet.artifacts import ArtifactStore
from fleet.campaigns import CampaignRunner, send_groups
from fleet.db.repository import Repository, connect
from fleet.errors import DatabaseUnavailableError
from fleet.http import HttpServer
from fleet.ingest import Ingest
from fleet.mqtt import Incoming, MqttSession, PublishError
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

_MAINTENANCE_EVERY_S = 600.0


async def run(
    settings: FleetSettings, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """Run the controller until `stop` is set; set `ready` once it serves."""
    repo = await connect(settings.database_url, pool_size=settings.db_pool_size)
    try:
        async with repo.connection() as q:
            await q.ensure_heartbeat_partitions(settings.heartbeat_partition_days_ahead)
        inbox: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=settings.ingest_queue_max)
        session = MqttSession(settings, inbox)
        await session.start()
        try:
            await _supervise(settings, repo, session, inbox, stop, ready)
        finally:
            await session.stop()
    finally:
        await repo.close()
    logger.info("controller stopped", extra={"action": "controller_stopped"})


async def _supervise(
    settings: FleetSettings,
    repo: Repository,
    session: MqttSession,
    inbox: asyncio.Queue[Incoming],
    stop: asyncio.Event,
    ready: asyncio.Event | None,
) -> None:
    async def tell_groups(terminal_id: str, groups: list[str]) -> None:
        try:
            await send_groups(session, terminal_id, groups, settings.command_expiry_s)
        except PublishError as exc:
            # The terminal keeps its configured groups; its next hello asks again.
            logger.warning(
                "groups of %s not sent: %s", terminal_id, exc, extra={"action": "command_failed"}
            )

    ingest = Ingest(
        repo,
        session,
        batch_max=settings.ingest_batch_max,
        batch_wait_s=settings.ingest_batch_wait_ms / 1000,
        on_hello=tell_groups,
    )
    runner = CampaignRunner(
        repo,
        session,
        artifact_base_url=settings.artifact_base_url,
        tick_s=settings.campaign_tick_s,
    )
    http = HttpServer(
        settings.http_host,
        settings.http_port,
        ArtifactStore(settings.artifact_dir),
        health=session.connected.is_set,
        grace_s=settings.shutdown_grace_s,
    )
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(ingest.run(inbox, stop), name="ingest")
        tasks.create_task(runner.run(stop), name="campaign-runner")
        tasks.create_task(http.serve(stop), name="http")
        tasks.create_task(_maintenance(repo, settings, stop), name="maintenance")
        logger.info("controller serving", extra={"action": "controller_ready"})
        if ready is not None:
            ready.set()


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
