"""The demo: a whole rollout on embedded defaults, ending in a summary checked against the DB.

It starts a private PostgreSQL and Mosquitto (from ``broker_config/``) on free ports, the
controller in this process, and the simulated terminals in a separate process (as real
terminals would be); it then provisions the fleet, registers a firmware package, runs a
three-wave campaign (started through the REST API) with live progress, and compares the
database's final states with the simulator's own report.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from fleet import campaigns, controller, inventory, tokens
from fleet.artifacts import ArtifactStore
from fleet.broker_admin import BrokerAdmin
from fleet.clock import SystemClock
from fleet.db import connect, migrate
from fleet.db.repository import Repository
from fleet.embedded import Mosquitto, Postgres, free_port
from fleet.policy import CampaignPolicy, HealthGate, Retries, Wave
from fleet.progress import render_status
from fleet.protocol import PackageKind
from fleet.settings import FleetSettings
from fleet.states import FINAL
from fleet.tokens import Role

logger = logging.getLogger(__name__)

GROUPS = ("north", "south")
MODELS = {"PAX-A920": 3.0, "VX-690": 1.0}
PACKAGE_SIZE = 256 * 1024
CAMPAIGN_TIMEOUT_S = 600.0
#: The demo runs whenever someone tries it, so it has no maintenance window; its retries
#: back off for seconds, not minutes, and its thresholds let the injected faults through.
DEMO_POLICY = CampaignPolicy(
    waves=[Wave(percent=10), Wave(percent=50), Wave(percent=100)],
    success_threshold=0.8,
    failure_threshold=0.25,
    cumulative_failure_threshold=0.25,
    window=None,
    retries=Retries(backoff_s=2.0),
    health_gate=HealthGate(tolerance=0.05),
)


async def run_demo(settings: FleetSettings, *, terminals: int, workdir: Path | None) -> int:
    """Run the demo; return 0 when the summary matches the database."""
    # The demo's own logging would scroll the progress display away.
    logging.getLogger().setLevel(logging.WARNING)
    root = workdir or Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    # As root, PostgreSQL runs as the `postgres` user, who must reach its directory.
    root.chmod(0o755)
    postgres = Postgres()
    mosquitto = Mosquitto(controller_username=settings.mqtt_username)
    try:
        print(f"demo: starting PostgreSQL and Mosquitto under {root}", flush=True)
        postgres.start(root / "postgres")
        postgres.create_database("fleet")
        password = secrets.token_hex(16)
        mosquitto.start(root / "mosquitto", password)
        http_port = free_port()
        demo_settings = settings.model_copy(
            update={
                "database_url": postgres.dsn("fleet"),
                "mqtt_host": mosquitto.host,
                "mqtt_port": mosquitto.port,
                "mqtt_password": password,
                "http_port": http_port,
                "api_port": free_port(),
                "artifact_base_url": f"http://127.0.0.1:{http_port}",
                "artifact_dir": root / "artifacts",
                "campaign_tick_s": 0.5,
                # The fleet connects after the campaign starts: pick terminals up promptly.
                "enroll_every_s": 1.0,
            }
        )
        await migrate(demo_settings.database_url)
        return await _run(demo_settings, terminals, root)
    finally:
        mosquitto.stop()
        postgres.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


async def _run(settings: FleetSettings, count: int, root: Path) -> int:
    repo = await connect(settings.database_url, pool_size=4)
    stop = asyncio.Event()
    ready = asyncio.Event()
    serving = asyncio.create_task(controller.run(settings, stop, ready), name="controller")
    simulator: asyncio.subprocess.Process | None = None
    try:
        campaign_id = await _prepare(repo, settings, count, root)
        async with asyncio.timeout(60):
            await ready.wait()
        simulator = await _start_simulator(settings, count, root)
        print(f"demo: {count} simulated terminals starting (pid {simulator.pid})", flush=True)
        _, token = await tokens.issue(
            repo, name="demo-operator", role=Role.OPERATOR, actor="demo", at=time.time()
        )
        api_url = f"http://{settings.api_host}:{settings.api_port}/api/v1"
        async with httpx.AsyncClient(
            base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api:
            print(f"demo: starting the campaign with POST {api_url}/campaigns/{campaign_id}/start")
            (await api.post(f"/campaigns/{campaign_id}/start")).raise_for_status()
            status = await _watch(repo, campaign_id, simulator)
            report = await _stop_simulator(simulator)
            simulator = None
            progress = (await api.get(f"/campaigns/{campaign_id}")).json()
        code = await _summarise(repo, campaign_id, count, status.status, report)
        final = await campaigns.campaign_status(repo, campaign_id)
        api_agrees = progress["totals"] == final.totals
        print(f"  REST API progress agrees with the database: {api_agrees}")
        return code if api_agrees else 1
    finally:
        if simulator is not None and simulator.returncode is None:
            simulator.kill()
            await simulator.wait()
        stop.set()
        await serving
        await repo.close()


async def _prepare(repo: Repository, settings: FleetSettings, count: int, root: Path) -> int:
    ids = [f"T{n:06d}" for n in range(count)]
    print(f"demo: provisioning {count} terminals in groups {', '.join(GROUPS)}", flush=True)
    async with BrokerAdmin.from_settings(settings) as admin:
        await inventory.provision_terminals(
            repo, admin, [{"id": tid} for tid in ids], settings.terminal_secret
        )
        for index, group in enumerate(GROUPS):
            await inventory.create_group(repo, admin, group)
            await inventory.assign_group(repo, admin, group, ids[index :: len(GROUPS)])
    firmware = root / "pos-os-2.0.0.bin"
    firmware.write_bytes(os.urandom(PACKAGE_SIZE))
    await inventory.add_package(
        repo,
        ArtifactStore(settings.artifact_dir),
        firmware,
        name="os",
        kind=PackageKind.FIRMWARE,
        version="2.0.0",
        models=list(MODELS),
    )
    return await campaigns.create_campaign(
        repo,
        SystemClock(),
        name="demo-os-2.0.0",
        groups=list(GROUPS),
        packages=[("os", "2.0.0")],
        policy=DEMO_POLICY,
    )


async def _start_simulator(
    settings: FleetSettings, count: int, root: Path
) -> asyncio.subprocess.Process:
    args = [
        "--count", str(count),
        "--broker", f"{settings.mqtt_host}:{settings.mqtt_port}",
        "--secret", settings.terminal_secret,
        "--groups", ",".join(GROUPS),
        "--models", ",".join(f"{m}:{w}" for m, w in MODELS.items()),
        "--versions", "os=1.0.0,pay=1.0.0",
        "--heartbeat-s", "10",
        "--download-bps", "1000000",
        "--install-s", "1.5",
        "--reboot-s", "1.0",
        "--self-test-s", "0.5",
        "--busy-probability", "0.05",
        "--busy-s", "2",
        "--drop-rate", "0.05",
        "--corrupt-rate", "0.02",
        "--install-fail-rate", "0.02",
        "--self-test-fail-rate", "0.03",
        "--seed", "7",
    ]  # fmt: skip
    log = (root / "simulator.log").open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device_sim", *args,
            stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    finally:
        log.close()


async def _watch(
    repo: Repository, campaign_id: int, simulator: asyncio.subprocess.Process
) -> campaigns.CampaignStatus:
    deadline = time.monotonic() + CAMPAIGN_TIMEOUT_S
    drawn = 0
    while True:
        status = await campaigns.campaign_status(repo, campaign_id)
        text = render_status(status)
        if drawn and sys.stdout.isatty():
            print(f"\x1b[{drawn}F\x1b[J", end="")
        print(text, flush=True)
        drawn = text.count("\n") + 1
        if status.status in ("completed", "paused", "canceled"):
            return status
        if simulator.returncode is not None:
            raise RuntimeError(f"the simulator exited early ({simulator.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError("the demo campaign did not finish in time")
        await asyncio.sleep(1.0 if sys.stdout.isatty() else 5.0)


async def _stop_simulator(simulator: asyncio.subprocess.Process) -> dict[str, Any]:
    simulator.terminate()
    async with asyncio.timeout(60):
        stdout, _ = await simulator.communicate()
    report: dict[str, Any] = json.loads(stdout)
    return report


async def _summarise(
    repo: Repository, campaign_id: int, count: int, status: str, report: dict[str, Any]
) -> int:
    async with repo.connection() as q:
        states = await q.execution_states(campaign_id)
    db_counts = Counter(state for state, _ in states.values())
    # Each terminal's latest attempt: a retried failure is not an outcome.
    sim_counts: dict[str, int] = report["campaigns"].get(str(campaign_id), {}).get("outcome", {})
    finals = {s.value for s in FINAL}
    db_final = sum(n for state, n in db_counts.items() if state in finals)
    print()
    print(f"demo summary: campaign {campaign_id} {status}")
    print(f"  {'state':<20}{'database':>10}{'simulator':>11}")
    for state in sorted(set(db_counts) | set(sim_counts)):
        print(f"  {state:<20}{db_counts.get(state, 0):>10}{sim_counts.get(state, 0):>11}")
    print(f"  {'total':<20}{sum(db_counts.values()):>10}{sum(sim_counts.values()):>11}")
    outcome = db_counts["succeeded"] + db_counts["failed"] + db_counts["rolled_back"]
    integrity = report.get("integrity", {})
    print(
        f"  succeeded + failed + rolled_back = {outcome} of {count} terminals; "
        f"local data intact: {integrity.get('ok')}"
    )
    matches = (
        dict(db_counts) == {k: v for k, v in sim_counts.items() if v}
        and db_final == count
        and outcome == count
        and bool(integrity.get("ok"))
    )
    print(
        "  database and simulator agree" if matches else "  MISMATCH between database and simulator"
    )
    with contextlib.suppress(Exception):
        async with repo.connection() as q:
            dead = await q.dead_letter_counts()
        print(f"  dead letters: {dead or 'none'}")
    return 0 if matches else 1
