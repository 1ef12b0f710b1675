"""The whole stack for integration tests: real broker, real database, real controller.

`Stack` provisions a fleet through the same inventory functions the CLI uses, runs the
controller in this event loop (or as a separate process, for crash tests), and runs the
simulator in this event loop so tests can read each terminal's own record.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.config import Faults, SimConfig, Timing
from device_sim.fleet import Simulator
from fleet import campaigns, controller, inventory
from fleet.artifacts import ArtifactStore
from fleet.broker_admin import BrokerAdmin
from fleet.clock import Clock, SystemClock
from fleet.db import Repository
from fleet.embedded import Mosquitto, free_port
from fleet.policy import CampaignPolicy, TargetFilter, Wave
from fleet.protocol import PackageKind
from fleet.settings import FleetSettings
from tests.conftest import CONTROLLER_PASSWORD, TERMINAL_SECRET

FAST = Timing(
    heartbeat_s=5.0,
    download_bps=50_000_000,
    chunk_bytes=16_384,
    install_s=0.05,
    reboot_s=0.05,
    self_test_s=0.02,
    download_retry_s=0.01,
    reconnect_max_s=1.0,
)


def make_settings(broker: Mosquitto, database_url: str, workdir: Path) -> FleetSettings:
    """Settings of a controller wired to the test's broker and database."""
    http_port = free_port()
    return FleetSettings(
        database_url=database_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_password=CONTROLLER_PASSWORD,
        mqtt_session_expiry_s=600,
        http_port=http_port,
        api_port=free_port(),
        artifact_base_url=f"http://127.0.0.1:{http_port}",
        artifact_dir=workdir / "artifacts",
        campaign_tick_s=0.1,
        enroll_every_s=0.2,
        cancel_grace_s=0.5,
        terminal_secret=TERMINAL_SECRET,
        shutdown_grace_s=2.0,
        leader_lease_s=0.5,
    )


@dataclass
class Stack:
    """One test's broker, database, controller settings and simulated fleet."""

    settings: FleetSettings
    repo: Repository
    workdir: Path
    clock: Clock = field(default_factory=SystemClock)
    _controller: asyncio.Task[None] | None = None
    _controller_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _process: "subprocess.Popen[bytes] | None" = None

    async def provision(
        self,
        terminal_ids: Sequence[str],
        groups: dict[str, Sequence[str]],
        *,
        attributes: Callable[[str], dict[str, str]] | None = None,
        model: str = "P400",
    ) -> None:
        """Register terminals (model, provisioned attributes) and groups.

        `model` "unknown" leaves the inventory to the terminals' hellos.
        """
        rows = [
            {"id": t, "model": model, "attributes": attributes(t) if attributes else {}}
            for t in terminal_ids
        ]
        async with BrokerAdmin.from_settings(self.settings) as admin:
            await inventory.provision_terminals(self.repo, admin, rows, TERMINAL_SECRET)
            for group, members in groups.items():
                await inventory.create_group(self.repo, admin, group)
                await inventory.assign_group(self.repo, admin, group, members)

    async def add_package(
        self,
        name: str,
        version: str,
        models: Sequence[str],
        size: int = 64 * 1024,
        *,
        kind: PackageKind = PackageKind.FIRMWARE,
        from_versions: Sequence[str] = (),
        requires: dict[str, str] | None = None,
    ) -> None:
        """Register a package of random bytes."""
        path = self.workdir / f"{name}-{version}.bin"
        path.write_bytes(os.urandom(size))
        await inventory.add_package(
            self.repo,
            ArtifactStore(self.settings.artifact_dir),
            path,
            name=name,
            kind=kind,
            version=version,
            models=models,
            from_versions=from_versions,
            requires=requires,
        )

    async def campaign(
        self,
        groups: Sequence[str],
        package: tuple[str, str] | Sequence[tuple[str, str]],
        *,
        waves: Sequence[float] = (10, 50, 100),
        name: str = "c1",
        target: TargetFilter | None = None,
        start: bool = True,
        **rules: object,
    ) -> int:
        """Create (and start) a campaign; return its id.

        `rules` are `CampaignPolicy` fields; tests default to no maintenance window, a
        permissive cumulative threshold and quick retries, so each test states the rule
        it is about.
        """
        packages = [package] if isinstance(package[0], str) else package
        policy = CampaignPolicy.model_validate(
            {
                "waves": [Wave(percent=w) for w in waves],
                "success_threshold": 0.8,
                "failure_threshold": 0.2,
                "cumulative_failure_threshold": 1.0,
                "window": None,
                "retries": {"backoff_s": 0.2, "download": 0, "verify": 0, "timeout": 0},
                "resend_after_s": 5.0,
            }
            | rules
        )
        campaign_id = await campaigns.create_campaign(
            self.repo,
            self.clock,
            name=name,
            groups=groups,
            packages=packages,  # type: ignore[arg-type]
            policy=policy,
            target=target,
        )
        if start:
            await campaigns.start_campaign(self.repo, self.clock, campaign_id)
        return campaign_id

    # -- the controller, in this loop ----------------------------------------------------

    async def start_controller(self) -> None:
        """Run the controller in this event loop; return once it serves."""
        ready = asyncio.Event()
        self._controller_stop = asyncio.Event()
        self._controller = asyncio.create_task(
            controller.run(self.settings, self._controller_stop, ready, self.clock),
            name="controller",
        )
        ready_wait = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {ready_wait, self._controller}, timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        ready_wait.cancel()
        if self._controller in done:
            self._controller.result()
        if not ready.is_set():
            await self.stop_controller()
            raise AssertionError("controller did not get ready")

    async def stop_controller(self) -> None:
        """Stop the in-loop controller and re-raise anything it failed with."""
        if self._controller is not None:
            self._controller_stop.set()
            task, self._controller = self._controller, None
            async with asyncio.timeout(60):
                await task

    # -- the controller, as a separate process -----------------------------------------

    def spawn_controller(self) -> "subprocess.Popen[bytes]":
        """Start ``python -m fleet serve`` with these settings in its environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        for name, value in self.settings.model_dump().items():
            env[f"FLEET_{name.upper()}"] = str(value)
        log = (self.workdir / "controller.log").open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "fleet", "serve"], env=env, stdout=log, stderr=log
        )
        log.close()
        return self._process

    def kill_controller_process(self) -> None:
        """SIGKILL the controller process: no shutdown code runs."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=30)
            self._process = None

    def terminate_controller_process(self) -> int:
        """SIGTERM the controller process and return its exit status."""
        assert self._process is not None
        self._process.terminate()
        code = self._process.wait(timeout=60)
        self._process = None
        return code


def sim_config(
    broker: Mosquitto,
    count: int,
    groups: Sequence[str],
    *,
    faults: Faults | None = None,
    models: dict[str, float] | None = None,
    seed: int = 1,
    timing: Timing = FAST,
) -> SimConfig:
    """A simulator slice of `count` terminals T000000.. wired to the test's broker."""
    return SimConfig(
        count=count,
        broker_host=broker.host,
        broker_port=broker.port,
        secret=TERMINAL_SECRET,
        groups=list(groups),
        models=models or {"P400": 1.0},
        initial_versions={"os": "1.0.0"},
        seed=seed,
        timing=timing,
        faults=faults or Faults(),
        connect_concurrency=50,
    )


@contextlib.asynccontextmanager
async def running(simulator: Simulator) -> AsyncIterator[Simulator]:
    """Run a simulator for the duration of a block."""
    stop = asyncio.Event()
    task = asyncio.create_task(simulator.run(stop), name="simulator")
    try:
        yield simulator
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


def terminal_ids(count: int) -> list[str]:
    """The ids `sim_config` gives its terminals."""
    return [f"T{n:06d}" for n in range(count)]


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within_s: float = 30.0, what: str = "condition"
) -> None:
    """Poll `check` until it holds, for state only the database shows (it has no events).

    Bounded by `within_s`; the poll interval is short, so this waits on the state itself,
    not on a guessed duration.
    """
    try:
        async with asyncio.timeout(within_s):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def wait_status(
    repo: Repository, campaign_id: int, wanted: set[str], *, within_s: float = 60.0
) -> str:
    """Wait until the campaign's derived status is one of `wanted`; return it."""
    found = ""

    async def reached() -> bool:
        nonlocal found
        found = (await campaigns.campaign_status(repo, campaign_id)).status
        return found in wanted

    await eventually(reached, within_s=within_s, what=f"campaign status in {wanted}")
    return found
