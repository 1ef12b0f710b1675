"""What every benchmark needs: results, private servers, fleets written up front, the
controller and the simulator as processes of their own, and readings from /proc.

Everything runs on loopback against servers this module starts (`fleet.embedded`), never
against the machine's own services; every process started here is stopped by its PID.
"""

import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg

from fleet import campaigns, dynsec, inventory
from fleet.artifacts import ArtifactStore
from fleet.clock import SystemClock
from fleet.db import connect, migrate
from fleet.embedded import Mosquitto, Postgres, find_mosquitto, find_postgres_bindir, free_port
from fleet.policy import CampaignPolicy, Wave
from fleet.protocol import PackageKind
from fleet.settings import FleetSettings

ROOT: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable
CONTROLLER_USERNAME: Final = "controller"
TERMINAL_SECRET: Final = "bench-terminal-secret"
#: A broker identity allowed to publish and read every fleet topic, like the controller
#: but without the dynamic-security API: the load publisher and the bare subscriber.
BENCH_ROLE: Final = "bench"
BENCH_GROUP: Final = "bench"
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_STOP_TIMEOUT_S: Final = 60.0


# -- results ---------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure, the ceiling it is compared with (same run), and its target."""

    name: str
    value: float | None
    unit: str
    ceiling: float | None = None
    ceiling_name: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        """The figure as a share of its ceiling."""
        if self.value is None or not self.ceiling:
            return None
        return self.value / self.ceiling


@dataclass
class Result:
    """What one benchmark measured, how to reproduce it, and what limited it."""

    name: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    error: str | None = None

    def add(self, figure: Figure) -> Figure:
        """Record a figure and print it with its ceiling and ratio."""
        self.figures.append(figure)
        say(f"  {format_figure(figure)}")
        return figure

    def note(self, text: str) -> None:
        """Record and print a remark about the run (a limit hit, a fallback taken)."""
        self.notes.append(text)
        say(f"  note: {text}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, ratios included."""
        data = asdict(self)
        for figure, raw in zip(self.figures, data["figures"], strict=True):
            raw["ratio"] = figure.ratio
        return data


@dataclass
class Context:
    """One run of the suite: smoke or full size, and what benchmarks share (ceilings)."""

    smoke: bool = False
    selected: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)


def say(text: str) -> None:
    """Progress and figures go to stdout as they happen."""
    print(text, flush=True)


def number(value: float | None, unit: str = "") -> str:
    """A figure for people: thousands separated, a sensible number of digits."""
    if value is None:
        return "n/a"
    if value == 0 or abs(value) >= 100 or float(value).is_integer():
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:,.1f}"
    else:
        text = f"{value:,.3g}"
    return f"{text} {unit}".strip()


def format_figure(figure: Figure) -> str:
    """``name: value unit (ceiling: X unit name; ratio 0.55; target ...)``."""
    parts = [f"{figure.name}: {number(figure.value, figure.unit)}"]
    extra = []
    if figure.ceiling is not None:
        extra.append(f"ceiling {number(figure.ceiling, figure.unit)} ({figure.ceiling_name})")
        ratio = figure.ratio
        extra.append(f"ratio {ratio:.2f}" if ratio is not None else "ratio n/a")
    if figure.target:
        verdict = {True: "met", False: "MISSED", None: "not judged"}[figure.met]
        extra.append(f"target {figure.target}: {verdict}")
    if extra:
        parts.append(f"[{'; '.join(extra)}]")
    return " ".join(parts)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (`p` in 0..100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    """The median (upper of the two middle values); None when there are none."""
    return percentile(values, 50)


# -- the machine -----------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _meminfo_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def machine() -> dict[str, Any]:
    """The machine, its limits and the server versions, for the results file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _meminfo_gib(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _first_line([find_mosquitto(), "-h"]),
        "postgres": _first_line([str(find_postgres_bindir() / "postgres"), "--version"]),
        "open_files_limit": {"soft": soft, "hard": hard},
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the work tree had uncommitted changes."""
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    changed = [line for line in status.stdout.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed_files": len(changed)}


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


# -- /proc -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: field 3 (state) is index 0, utime (14) 11, stime (15) 12.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def box_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def established(port: int) -> int:
    """TCP connections a server on this loopback port has accepted and holds (IPv4).

    Read from /proc/net/tcp: the server's side of each connection has the port as its
    local one, in state ESTABLISHED (01).
    """
    local = f":{port:04X}"
    count = 0
    with Path("/proc/net/tcp").open() as table:
        next(table)
        for line in table:
            fields = line.split(None, 4)
            if fields[1].endswith(local) and fields[3] == "01":
                count += 1
    return count


def alive(pid: int) -> bool:
    """Whether a process still runs (and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- servers ---------------------------------------------------------------------------


def workdir(prefix: str) -> Path:
    """A scratch directory the ``postgres`` OS user can reach (the server runs as it)."""
    path = Path(tempfile.mkdtemp(prefix=f"fleet-bench-{prefix}-"))
    path.chmod(0o755)
    return path


def dynsec_document(
    password: str,
    *,
    terminals: Sequence[str] = (),
    groups: dict[str, Sequence[str]] | None = None,
    bench_clients: Sequence[str] = (),
) -> dict[str, Any]:
    """The broker's identities written before it starts, as the product's bootstrap does.

    Terminals and group memberships at run time go through `fleet.broker_admin`, whose
    cost grows with the square of the fleet (the plugin rewrites its file per command);
    a benchmark's fleet is known up front, so it is written into the file instead, with
    the roles and ACLs `fleet.dynsec` defines. `bench_clients` get the `BENCH_ROLE`.
    """
    document = dynsec.bootstrap_document(
        CONTROLLER_USERNAME, password, terminals=terminals, terminal_secret=TERMINAL_SECRET
    )
    fleet_topics = "fleet/#"
    document["roles"].append(
        {
            "rolename": BENCH_ROLE,
            "acls": [
                {"acltype": acltype, "topic": fleet_topics, "priority": 0, "allow": True}
                for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern")
            ],
        }
    )
    document["clients"] += [
        {"username": name, "roles": [{"rolename": BENCH_ROLE}], **dynsec.hash_password(password)}
        for name in bench_clients
    ]
    for group, members in (groups or {}).items():
        role = dynsec.group_role(group)
        document["roles"].append({"rolename": role, "acls": dynsec.group_acls(group)})
        document["groups"].append(
            {
                "groupname": group,
                "roles": [{"rolename": role}],
                "clients": [{"username": tid} for tid in members],
            }
        )
    return document


async def start_broker(root: Path, password: str, document: dict[str, Any]) -> Mosquitto:
    """Start a private Mosquitto (broker_config/mosquitto.conf) with these identities."""
    broker = Mosquitto(controller_username=CONTROLLER_USERNAME)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "dynamic-security.json").write_text(json.dumps(document))
    await asyncio.to_thread(broker.start, root, password)
    return broker


async def start_postgres(root: Path) -> Postgres:
    """Start a private PostgreSQL with a migrated ``fleet`` database.

    Commit timestamps are recorded (``track_commit_timestamp``), so latencies can be
    measured to the commit of each row rather than to a poll of the table.
    """
    server = Postgres()
    await asyncio.to_thread(server.start, root)
    await asyncio.to_thread(server.create_database, "fleet")
    conn = await asyncpg.connect(server.dsn("postgres"))
    try:
        await conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    finally:
        await conn.close()
    await asyncio.to_thread(server.restart)
    await migrate(server.dsn("fleet"))
    return server


@dataclass
class Stack:
    """Private PostgreSQL and Mosquitto servers of one benchmark."""

    root: Path
    password: str
    postgres: Postgres | None = None
    brokers: list[Mosquitto] = field(default_factory=list)

    @property
    def broker(self) -> Mosquitto:
        """The (first) broker."""
        return self.brokers[0]

    @property
    def dsn(self) -> str:
        """The fleet database."""
        assert self.postgres is not None
        return self.postgres.dsn("fleet")

    def stop(self) -> None:
        """Stop every server (each by its own PID) and remove the scratch files."""
        for broker in self.brokers:
            broker.stop()
        if self.postgres is not None:
            self.postgres.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.asynccontextmanager
async def stack(
    name: str,
    *,
    database: bool = True,
    brokers: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[Stack]:
    """Servers for one benchmark; `brokers` holds each broker's dynsec keyword arguments."""
    servers = Stack(root=workdir(name), password=secrets.token_hex(16))
    try:
        if database:
            servers.postgres = await start_postgres(servers.root / "postgres")
        for index, spec in enumerate(brokers):
            document = dynsec_document(servers.password, **spec)
            servers.brokers.append(
                await start_broker(servers.root / f"mosquitto-{index}", servers.password, document)
            )
        yield servers
    finally:
        await asyncio.to_thread(servers.stop)


def terminal_ids(count: int, start: int = 0) -> list[str]:
    """Ids as the simulator gives them (prefix T, six digits)."""
    return [f"T{n:06d}" for n in range(start, start + count)]


async def register_terminals(
    dsn: str,
    ids: Sequence[str],
    *,
    group: str | None = BENCH_GROUP,
    versions: dict[str, str] | None = None,
    model: str = "P400",
) -> None:
    """Write terminals (and one group's memberships) by COPY, within the schema's rules.

    `fleet terminals provision` does the same through an unnest upsert plus the broker;
    at 100,000 terminals the broker half is the slow part, and `dynsec_document` writes it.
    """
    versions_json = json.dumps(versions or {"os": "1.0.0"})
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "terminals",
                records=[(tid, model, "M0001", "UTC", versions_json, "{}") for tid in ids],
                columns=["id", "model", "merchant_id", "timezone", "versions", "attributes"],
            )
            if group is not None:
                await conn.execute(
                    "INSERT INTO groups (name) VALUES ($1) ON CONFLICT DO NOTHING", group
                )
                await conn.copy_records_to_table(
                    "group_members",
                    records=[(group, tid) for tid in ids],
                    columns=["group_name", "terminal_id"],
                )
    finally:
        await conn.close()


# -- the controller and the simulator as processes -------------------------------------


def controller_settings(servers: Stack, **overrides: Any) -> FleetSettings:  # noqa: ANN401
    """Product defaults, wired to this benchmark's servers."""
    http_port = free_port()
    values: dict[str, Any] = {
        "database_url": servers.dsn,
        "mqtt_host": servers.broker.host,
        "mqtt_port": servers.broker.port,
        "mqtt_password": servers.password,
        "http_port": http_port,
        "api_port": free_port(),
        "artifact_base_url": f"http://127.0.0.1:{http_port}",
        "artifact_dir": servers.root / "artifacts",
        "terminal_secret": TERMINAL_SECRET,
    }
    return FleetSettings(**(values | overrides))


async def http_get(host: str, port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on a fresh connection; the status code and the body."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


@dataclass
class Process:
    """A child process this suite started: stopped by its PID, never by name."""

    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether it has not exited yet."""
        return self.process.returncode is None

    def log_tail(self, lines: int = 15) -> str:
        """The end of its log, for a report of why it died."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(
        self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = _STOP_TIMEOUT_S
    ) -> bytes:
        """Signal it, wait (SIGKILL after `timeout_s`) and return what it wrote to stdout."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        try:
            async with asyncio.timeout(timeout_s):
                stdout, _ = await self.process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            stdout, _ = await self.process.communicate()
        return stdout or b""


def _env_of(settings: FleetSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    for name, value in settings.model_dump().items():
        env[f"FLEET_{name.upper()}"] = str(value)
    return env


async def run_cli(settings: FleetSettings, *args: str, timeout_s: float = 60.0) -> bytes:
    """Run one ``python -m fleet`` command with these settings; its stdout."""
    process = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "fleet",
        *args,
        env=_env_of(settings),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"fleet {' '.join(args)} failed: {stderr.decode()[-500:]}")
    return stdout


async def start_controller(settings: FleetSettings, log: Path, ready_s: float = 60.0) -> Process:
    """Run ``python -m fleet serve`` and return once /healthz answers 200."""
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "fleet",
            "serve",
            env=_env_of(settings),
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
    controller = Process("controller", process, log)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if not controller.running:
            raise RuntimeError(f"the controller exited:\n{controller.log_tail()}")
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, _ = await http_get(settings.http_host, settings.http_port, "/healthz", 2.0)
            if status == 200:
                return controller
        await asyncio.sleep(0.1)
    await controller.stop()
    raise RuntimeError(f"the controller was not ready in {ready_s:.0f} s:\n{controller.log_tail()}")


async def start_simulators(
    broker: Mosquitto,
    root: Path,
    into: list[Process],
    *,
    count: int,
    processes: int,
    args: Sequence[str] = (),
) -> None:
    """Start `processes` simulators sharing terminals T0..T{count} by id range.

    Each is appended to `into` as soon as it runs, so the caller's clean-up stops those
    started even when a later one fails to start.
    """
    per = count // processes
    for n in range(processes):
        into.append(  # noqa: PERF401 - one by one, see above
            await start_simulator(
                broker, root / f"simulator-{n}.log", count=per, start=n * per, args=args
            )
        )


async def start_simulator(
    broker: Mosquitto,
    log: Path,
    *,
    count: int,
    start: int = 0,
    args: Sequence[str] = (),
) -> Process:
    """Run ``python -m device_sim`` for terminals T{start}..; it prints a report on SIGTERM."""
    with log.open("ab") as err:
        process = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "device_sim",
            "--count",
            str(count),
            "--start",
            str(start),
            "--broker",
            f"{broker.host}:{broker.port}",
            "--secret",
            TERMINAL_SECRET,
            "--groups",
            BENCH_GROUP,
            # The model the fleet is registered with, which the packages are built for.
            "--models",
            "P400:1",
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    return Process(f"simulator {start}..{start + count - 1}", process, log)


def note_deaths(result: Result, processes: Sequence[Process]) -> bool:
    """Note each process that exited on its own, with its log's tail; whether any did."""
    died = False
    for process in processes:
        if not process.running:
            died = True
            tail = process.log_tail(6).replace("\n", " | ")
            result.note(
                f"{process.name} exited early (status {process.process.returncode}): {tail}"
            )
    return died


async def stop_simulator(
    simulator: Process, timeout_s: float = _STOP_TIMEOUT_S
) -> dict[str, Any] | None:
    """Stop a simulator and return its JSON report (None if it died or was killed)."""
    stdout = await simulator.stop(timeout_s=timeout_s)
    try:
        report: dict[str, Any] = json.loads(stdout)
    except ValueError:
        return None
    return report


async def wait_until(
    check: Callable[[], Any],
    *,
    timeout_s: float,
    every_s: float = 0.25,
) -> bool:
    """Poll an (async) check until it is true or the time is up; whether it came true."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every_s)


# -- campaigns through the product's own requests ----------------------------------------


async def prepare_campaign(
    settings: FleetSettings,
    name: str,
    *,
    start: bool,
    package_bytes: int = 4096,
    group: str = BENCH_GROUP,
) -> int:
    """Register a package and create a one-wave campaign over `group`, as the CLI would.

    The campaign has no maintenance window and otherwise the product's default rules;
    with `start`, its executions are enrolled too. Returns its id.
    """
    repo = await connect(settings.database_url, pool_size=2)
    try:
        path = settings.artifact_dir.parent / f"{name}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(package_bytes))
        await inventory.add_package(
            repo,
            ArtifactStore(settings.artifact_dir),
            path,
            name="os",
            kind=PackageKind.FIRMWARE,
            version=f"2.0.0-{name}",
            models=["P400"],
        )
        campaign_id = await campaigns.create_campaign(
            repo,
            SystemClock(),
            name=name,
            groups=[group],
            packages=[("os", f"2.0.0-{name}")],
            policy=CampaignPolicy(waves=[Wave(percent=100)], window=None),
        )
        if start:
            await campaigns.start_campaign(repo, SystemClock(), campaign_id)
    finally:
        await repo.close()
    return campaign_id
