"""Every Grafana panel's query, run by a real Prometheus that scrapes a controller.

The dashboards under deploy/grafana/dashboards are loaded as they are provisioned. A small
campaign with one failing model runs on the real stack while Prometheus (Debian's package,
its own process on a free port) scrapes the controller every second; then each panel's
query, with the template variables filled in, must return exactly the series and values
the database and the scenario say. A panel whose query has no expectation here fails the
test: a dashboard cannot gain a query that nobody has run.
"""

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

from device_sim.config import Faults
from device_sim.fleet import Simulator
from fleet.db import Repository
from fleet.embedded import Mosquitto, free_port
from fleet.protocol import MessageKind, derive_terminal_password, terminal_topic
from fleet.states import FAILURE, SUCCESS, ExecState
from tests.conftest import CONTROLLER_PASSWORD, CONTROLLER_USERNAME, TERMINAL_SECRET
from tests.mqtt_probe import Probe
from tests.stack import (
    FAST,
    Stack,
    eventually,
    make_settings,
    running,
    sim_config,
    terminal_ids,
    wait_status,
)

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")

# What Grafana would put in place of its built-in variables. Both windows cover the
# whole test, so a rate is positive exactly for what moved while it ran.
RATE_INTERVAL = "5m"
RANGE = "5m"
# Prometheus has its own process; these bound each wait on it, never a fixed sleep.
READY_WITHIN_S = 30.0
QUERIES_WITHIN_S = 30.0

COUNT = 8
FAILING_MODEL = "A920"
CAMPAIGN = "dash-1"
WAVE_THRESHOLD = 0.8
CAMPAIGN_THRESHOLD = 0.9
PROBE_TERMINAL = "PROBE1"

Labels = frozenset[tuple[str, str]]
Series = dict[Labels, float]
#: What a query's series must be, given the facts; None when it is.
Check = Callable[["Facts", Series], str | None]


def labels(**values: str) -> Labels:
    """A series' labels, as the comparisons key them."""
    return frozenset(values.items())


# -- the dashboards as files ------------------------------------------------------------


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def _targets() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, expr) of every panel target."""
    return [
        (name, panel["title"], target.get("refId", ""), target["expr"])
        for name, dashboard in _dashboards().items()
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _substitute(expr: str, campaign: str) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("$campaign", campaign)
    )


# -- what the test knows ---------------------------------------------------------------


@dataclass
class Facts:
    """The scenario's outcome as the database records it, and what the test did."""

    campaign: str
    current_wave: int = 0
    terminals: dict[tuple[str, str, str], int] = field(default_factory=dict)
    executions: dict[tuple[int, str], int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    transitions: set[str] = field(default_factory=set)
    not_applied: int = 0
    runner_actions: set[str] = field(default_factory=set)
    admissions: int = 0
    resends: int = 0
    hellos: int = 0
    reconnects: int = 0

    def presence(self, presence: str) -> int:
        """Terminals online or offline."""
        return sum(n for (_, _, p), n in self.terminals.items() if p == presence)

    def in_states(self, states: frozenset[ExecState], wave: int | None = None) -> int:
        """Executions in any of `states` (of one wave, or of all)."""
        return sum(
            n
            for (w, state), n in self.executions.items()
            if state in states and (wave is None or w == wave)
        )

    def failure_ratio(self, wave: int | None) -> float:
        """Failures over executions not canceled, as the runner's thresholds count them."""
        canceled = frozenset({ExecState.CANCELED, ExecState.CANCELING})
        size = sum(n for (w, _), n in self.executions.items() if wave is None or w == wave)
        counted = size - self.in_states(canceled, wave)
        return self.in_states(FAILURE, wave) / counted if counted else 0.0


def _scalar(expected: Callable[["Facts"], float]) -> Check:
    """One series without labels, equal to `expected` (no series when that is zero)."""

    def check(facts: Facts, found: Series) -> str | None:
        value = expected(facts)
        return _equal({labels(): value} if value else {}, found)

    return check


def _exact(expected: Callable[["Facts"], Series]) -> Check:
    """Exactly these series with these values."""
    return lambda facts, found: _equal(expected(facts), found)


def _about(expected: Callable[["Facts"], Series]) -> Check:
    """Exactly these series; values within what increase()'s extrapolation adds."""

    def check(facts: Facts, found: Series) -> str | None:
        wanted = expected(facts)
        if set(found) != set(wanted):
            return f"series {_show(found)}, expected {_show(wanted)}"
        for key, value in wanted.items():
            if problem := _near(found[key], value, value):
                return f"{dict(key)}: {problem}"
        return None

    return check


def _positive(expected: Callable[["Facts"], set[Labels]]) -> Check:
    """Exactly these series, each above zero (rates: what moved during the test)."""

    def check(facts: Facts, found: Series) -> str | None:
        wanted = expected(facts)
        if set(found) != wanted:
            return f"series {_show(found)}, expected {sorted(map(dict, wanted), key=str)}"
        zero = [dict(key) for key, value in found.items() if not value > 0]
        return f"not positive: {zero}" if zero else None

    return check


def _within(low: float, high: float) -> Check:
    """One series without labels, between `low` and `high`."""

    def check(_facts: Facts, found: Series) -> str | None:
        if set(found) != {labels()}:
            return f"series {_show(found)}, expected one without labels"
        value = found[labels()]
        return None if low <= value <= high else f"{value} not in [{low}, {high}]"

    return check


def _includes(required: set[Labels]) -> Check:
    """At least these series above zero; every other one at zero or more."""

    def check(_facts: Facts, found: Series) -> str | None:
        missing = [dict(key) for key in required if not found.get(key, 0) > 0]
        negative = [dict(key) for key, value in found.items() if value < 0]
        return f"missing or zero: {missing}, negative: {negative}" if missing or negative else None

    return check


def _near(value: float, low: float, high: float) -> str | None:
    """`value` in [low, high], give or take what increase()'s extrapolation adds."""
    if low - 0.01 <= value <= high * 1.15 + 0.01:
        return None
    return f"{value} not about [{low}, {high}]"


def _equal(wanted: Series, found: Series) -> str | None:
    if set(found) != set(wanted) or any(
        not math.isclose(found[key], value, abs_tol=1e-6) for key, value in wanted.items()
    ):
        return f"series {_show(found)}, expected {_show(wanted)}"
    return None


def _show(series: Series) -> str:
    return str(sorted((str(dict(sorted(key))), value) for key, value in series.items()))


_FAILED = "failed|rolled_back|rejected|timed_out|retry_wait"
_SUCCEEDED = "succeeded|already_installed"
_C = '{campaign="$campaign"'
_MAX_AGE_S = 5.0
_BATCHES = "sum by (le) (rate(fleet_db_batch_seconds_bucket[$__rate_interval]))"

#: Every query on every dashboard, and what it must return after the scenario.
EXPECTATIONS: dict[str, Check] = {
    # -- fleet overview
    'sum(fleet_terminals{presence="online"})': _scalar(lambda f: f.presence("online")),
    'sum(fleet_terminals{presence="offline"})': _scalar(lambda f: f.presence("offline")),
    "fleet_heartbeat_age_max_seconds": _within(0, _MAX_AGE_S),
    "fleet_mqtt_connected": _within(1, 1),
    "sum by (model, version, presence) (fleet_terminals)": _exact(
        lambda f: {
            labels(model=m, version=v, presence=p): n for (m, v, p), n in f.terminals.items()
        }
    ),
    'sum by (version) (fleet_terminals{presence="online"})': _exact(
        lambda f: _summed(
            "version", [(v, n) for (_, v, p), n in f.terminals.items() if p == "online"]
        )
    ),
    "histogram_quantile(0.5, sum by (le) (fleet_heartbeat_age_seconds_bucket))": _within(
        0, _MAX_AGE_S
    ),
    "histogram_quantile(0.95, sum by (le) (fleet_heartbeat_age_seconds_bucket))": _within(
        0, _MAX_AGE_S
    ),
    'sum(fleet_heartbeat_age_seconds_bucket{le="60.0"})'
    ' / sum(fleet_heartbeat_age_seconds_bucket{le="+Inf"})': _within(1, 1),
    "sum by (to) (rate(fleet_update_transitions_total[$__rate_interval])) > 0": _positive(
        lambda f: {labels(to=state) for state in f.transitions}
    ),
    "sum by (code) (increase(fleet_update_failures_total[$__range])) > 0": _about(
        lambda f: {labels(code=code): n for code, n in f.failures.items()}
    ),
    # -- campaign progress
    f"fleet_campaign_current_wave{_C}}}": _exact(
        lambda f: {labels(campaign=f.campaign): f.current_wave}
    ),
    f"sum(fleet_campaign_executions{_C}}})": _scalar(lambda f: sum(f.executions.values())),
    f'sum(fleet_campaign_executions{_C}, state=~"{_SUCCEEDED}"}})': _scalar(
        lambda f: f.in_states(SUCCESS)
    ),
    f'sum(fleet_campaign_executions{_C}, state=~"{_FAILED}"}})': _scalar(
        lambda f: f.in_states(FAILURE)
    ),
    f"sum by (state) (fleet_campaign_executions{_C}}})": _exact(
        lambda f: _summed("state", [(state, n) for (_, state), n in f.executions.items()])
    ),
    f"sum by (wave, state) (fleet_campaign_executions{_C}}})": _exact(
        lambda f: {labels(wave=str(w), state=s): n for (w, s), n in f.executions.items()}
    ),
    f'fleet_campaign_failure_ratio{_C}, scope="wave"}}': _exact(
        lambda f: {labels(campaign=f.campaign, scope="wave"): f.failure_ratio(f.current_wave)}
    ),
    f'fleet_campaign_failure_threshold_ratio{_C}, scope="wave"}}': _exact(
        lambda f: {labels(campaign=f.campaign, scope="wave"): WAVE_THRESHOLD}
    ),
    f'fleet_campaign_failure_ratio{_C}, scope="campaign"}}': _exact(
        lambda f: {labels(campaign=f.campaign, scope="campaign"): f.failure_ratio(None)}
    ),
    f'fleet_campaign_failure_threshold_ratio{_C}, scope="campaign"}}': _exact(
        lambda f: {labels(campaign=f.campaign, scope="campaign"): CAMPAIGN_THRESHOLD}
    ),
    "sum by (action) (increase(fleet_campaign_decisions_total[$__range])) > 0": (
        lambda f, found: (
            _positive(lambda f: {labels(action=a) for a in f.runner_actions})(f, found)
            or _near(found.get(labels(action="admitted"), 0), f.admissions, f.admissions)
        )
    ),
    # -- ingest health
    "fleet_ingest_queue_depth": _within(0, 100),
    "sum(fleet_dead_letters)": _scalar(lambda f: sum(f.dead_letters.values())),
    "time() - fleet_metrics_refresh_timestamp_seconds": _within(0, _MAX_AGE_S),
    "rate(fleet_campaign_ticks_total[$__rate_interval])": _positive(lambda _: {labels()}),
    "sum by (kind) (rate(fleet_ingest_messages_total[$__rate_interval]))": _positive(
        lambda _: {labels(kind=k) for k in ("events", "heartbeat", "presence", "hello")}
    ),
    "sum by (reason) (increase(fleet_ingest_rejected_total[$__range])) > 0": _about(
        lambda f: {labels(reason=r): n for r, n in f.dead_letters.items()}
    ),
    f"histogram_quantile(0.5, {_BATCHES})": _within(0, 5),
    f"histogram_quantile(0.99, {_BATCHES})": _within(0, 5),
    "sum(rate(fleet_db_batch_seconds_count[$__rate_interval]))": _positive(lambda _: {labels()}),
    "sum(rate(fleet_db_batch_retries_total[$__rate_interval]))": _within(0, 0),
    "sum(rate(fleet_event_duplicates_total[$__rate_interval]))": _within(0, math.inf),
    "sum(rate(fleet_event_not_applied_total[$__rate_interval]))": (
        lambda f, found: (_positive(lambda _: {labels()}) if f.not_applied else _within(0, 0))(
            f, found
        )
    ),
    "sum by (reason) (fleet_dead_letters)": _exact(
        lambda f: {labels(reason=r): n for r, n in f.dead_letters.items()}
    ),
    "sum(increase(fleet_mqtt_connects_total[$__range]))": _about(
        lambda f: {labels(): f.reconnects}
    ),
    "sum(increase(fleet_mqtt_disconnects_total[$__range]))": _about(
        lambda f: {labels(): f.reconnects}
    ),
    "sum(increase(fleet_mqtt_connect_failures_total[$__range]))": _within(0, 0),
    "sum by (kind) (increase(fleet_commands_published_total[$__range])) > 0": (
        lambda f, found: (
            _positive(lambda _: {labels(kind="groups"), labels(kind="start")})(f, found)
            # A hello at every boot, and a firmware install reboots: one to two each.
            or _near(found[labels(kind="groups")], f.hellos, 2 * f.hellos)
            # One start per admission, and maybe a re-sent one.
            or _near(found[labels(kind="start")], f.admissions, f.admissions + f.resends)
        )
    ),
    "sum(increase(fleet_commands_dropped_total[$__range]))": _within(0, 0),
    "sum by (path, code) (rate(fleet_http_requests_total[$__rate_interval]))": _includes(
        {labels(path="/metrics", code="200")}
    ),
}


def _summed(name: str, pairs: list[tuple[str, int]]) -> Series:
    """Counts summed per value of one label (as `sum by (label)` does)."""
    total: dict[str, int] = {}
    for value, n in pairs:
        total[value] = total.get(value, 0) + n
    return {labels(**{name: value}): n for value, n in total.items()}


# -- Prometheus, as its own process ----------------------------------------------------


@dataclass
class PrometheusServer:
    """A private Prometheus and its HTTP API."""

    url: str
    client: httpx.AsyncClient

    async def query(self, expr: str) -> dict[str, Any]:
        """Run an instant query; return Prometheus' whole answer."""
        reply = await self.client.get(f"{self.url}/api/v1/query", params={"query": expr})
        answer: dict[str, Any] = reply.json()
        return answer

    async def series(self, expr: str) -> Series:
        """Run an instant query that must succeed; return its series.

        `__name__`, `job` and `instance` are left out: the scrape adds them to any series
        that keeps its metric's labels.
        """
        answer = await self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        assert answer["data"]["resultType"] == "vector", f"{expr}: {answer}"
        return {
            frozenset(
                (k, v)
                for k, v in item["metric"].items()
                if k not in {"__name__", "job", "instance"}
            ): float(item["value"][1])
            for item in answer["data"]["result"]
        }


def _spawn_prometheus(workdir: Path, scrape: str | None) -> tuple["subprocess.Popen[bytes]", int]:
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed: run ./scripts/setup")
    workdir.mkdir(parents=True)
    config: dict[str, Any] = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}}
    if scrape is not None:
        config["scrape_configs"] = [
            {
                "job_name": "fleet",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [scrape]}],
            }
        ]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    return process, port


@contextlib.asynccontextmanager
async def prometheus(workdir: Path, scrape: str | None) -> AsyncIterator[PrometheusServer]:
    """Run Prometheus scraping `scrape` (host:port) every second, or nothing."""
    process, port = _spawn_prometheus(workdir, scrape)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            async def ready() -> bool:
                if process.poll() is not None:
                    raise AssertionError((workdir / "prometheus.log").read_text()[-2000:])
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(f"{url}/-/ready")).status_code == 200
                return False

            await eventually(ready, within_s=READY_WITHIN_S, what="Prometheus to be ready")
            yield PrometheusServer(url, client)
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


# -- the dashboards are well formed -----------------------------------------------------


def test_dashboards_are_provisionable_and_every_panel_has_a_query() -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {source["uid"] for source in provisioned}
    dashboards = _dashboards()
    assert set(dashboards) == {
        "fleet-overview.json",
        "campaign-progress.json",
        "ingest-health.json",
    }
    for name, dashboard in dashboards.items():
        assert dashboard["uid"], name
        assert dashboard["title"], name
        assert 36 <= dashboard["schemaVersion"] <= 41, name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in dashboard["panels"]:
            where = f"{name}: {panel['title']!r}"
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            assert panel["datasource"]["uid"] in uids, where
            assert panel["targets"], f"{where} has no query"
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), where
            assert all(refs), where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] in uids, where
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"]["uid"] in uids, name
    variables = dashboards["campaign-progress.json"]["templating"]["list"]
    assert [v["name"] for v in variables] == ["campaign"]


def test_the_compose_prometheus_scrapes_the_controller() -> None:
    path = DEPLOY / "prometheus" / "prometheus.yml"
    [job] = yaml.safe_load(path.read_text())["scrape_configs"]
    assert job["job_name"] == "fleet"
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "5s"
    # Every controller compose can start is scraped, cluster replicas included.
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    controllers = {name for name, svc in services.items() if svc.get("command") == ["serve"]}
    assert len(controllers) >= 3
    [targets] = job["static_configs"]
    assert sorted(targets["targets"]) == sorted(f"{name}:8080" for name in controllers)
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian's prometheus) is missing: run ./scripts/setup"
    checked = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_query_has_an_expectation_and_every_expectation_a_query() -> None:
    exprs = {expr for *_, expr in _targets()}
    unexpected = [
        f"{name}: {title!r} {ref}: {expr}"
        for name, title, ref, expr in _targets()
        if expr not in EXPECTATIONS
    ]
    assert not unexpected, "panel queries this test does not check:\n" + "\n".join(unexpected)
    assert not set(EXPECTATIONS) - exprs, "expectations of queries no panel has"


async def test_every_query_parses(tmp_path: Path) -> None:
    async with prometheus(tmp_path / "prometheus", None) as server:
        for name, title, _, expr in _targets():
            answer = await server.query(_substitute(expr, "any"))
            assert answer["status"] == "success", f"{name}: {title!r}: {answer}"


# -- every panel, on a real campaign ----------------------------------------------------


def _registry(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_every_panel_query_returns_what_the_campaign_did(
    broker: Mosquitto, database_url: str, tmp_path: Path, repo: Repository
) -> None:
    settings = make_settings(broker, database_url, tmp_path).model_copy(
        update={"metrics_refresh_s": 0.2}
    )
    stack = Stack(settings, repo, tmp_path)
    ids = terminal_ids(COUNT)
    await stack.provision([*ids, PROBE_TERMINAL], {"g1": ids})
    await stack.add_package("os", "2.0.0", ["P400", FAILING_MODEL])
    facts = Facts(campaign=CAMPAIGN)
    async with prometheus(tmp_path / "prometheus", f"127.0.0.1:{settings.http_port}") as server:
        await stack.start_controller()
        try:

            async def scraped() -> bool:
                return bool(await server.series("fleet_mqtt_connects_total"))

            # Every counter has a sample from before anything happens, so that each
            # increase() below sees all of its increments.
            await eventually(scraped, what="a first scrape of the controller")
            await _take_the_controller_session_away(broker)
            facts.reconnects = 1
            await _publish_garbage(broker)

            timing = FAST.model_copy(update={"heartbeat_s": 0.3})
            faults = Faults(self_test_fail_models=frozenset({FAILING_MODEL}))
            config = sim_config(
                broker,
                COUNT,
                ["g1"],
                faults=faults,
                models={"P400": 0.6, FAILING_MODEL: 0.4},
                seed=3,
                timing=timing,
            )
            simulator = Simulator(config)
            async with running(simulator):
                await simulator.wait_connected(timeout_s=30)
                campaign_id = await stack.campaign(
                    ["g1"],
                    ("os", "2.0.0"),
                    name=CAMPAIGN,
                    waves=[50, 100],
                    success_threshold=0.2,
                    failure_threshold=WAVE_THRESHOLD,
                    cumulative_failure_threshold=CAMPAIGN_THRESHOLD,
                )
                await _wait_settled(repo, campaign_id)
                await _learn(facts, repo, campaign_id)
                assert facts.failures, "the scenario must fail somewhere for the failure panels"
                assert facts.in_states(SUCCESS), "and succeed somewhere"
                await _check_every_query(server, facts)
                await _check_the_campaign_variable(server, facts)
        finally:
            await stack.stop_controller()


async def _wait_settled(repo: Repository, campaign_id: int) -> None:
    """Wait until nothing changes any more: completed, or paused by its threshold.

    Which one depends on the waves the failing terminals fall in; either way every
    execution that started has ended, and the panels must say so.
    """
    await wait_status(repo, campaign_id, {"completed", "paused"})

    async def settled() -> bool:
        async with repo.connection() as q:
            moving = await q._conn.fetchval(
                "SELECT count(*) FROM executions e JOIN execution_states s USING (state)"
                " WHERE e.campaign_id = $1 AND NOT s.final"
                " AND NOT (e.state = 'pending' AND e.admitted_at IS NULL)",
                campaign_id,
            )
            # The inventory follows with each terminal's next heartbeat: on the new
            # release where the update succeeded, back on the old one elsewhere.
            behind = await q._conn.fetchval(
                "SELECT count(*) FROM executions e JOIN terminals t ON t.id = e.terminal_id"
                " WHERE e.campaign_id = $1"
                " AND (e.state IN ('succeeded', 'already_installed'))"
                " <> (t.versions ->> 'os' = '2.0.0')",
                campaign_id,
            )
            # The runner records a completion on the tick after the last execution ends.
            recorded = await q._conn.fetchval(
                "SELECT control <> 'running' OR completed_at IS NOT NULL FROM campaigns"
                " WHERE id = $1",
                campaign_id,
            )
        return moving == 0 and behind == 0 and recorded

    await eventually(settled, what="every started execution to end, and the inventory to agree")


async def _take_the_controller_session_away(broker: Mosquitto) -> None:
    """Connect with the controller's client id: the broker drops the controller's link.

    Done before any terminal is connected, so no message of theirs goes to the probe.
    """
    connects = _registry("fleet_mqtt_connects_total")
    probe = Probe(
        broker.host,
        broker.port,
        CONTROLLER_USERNAME,
        CONTROLLER_PASSWORD,
        client_id=CONTROLLER_USERNAME,
    )
    try:
        await asyncio.to_thread(probe.connect)

        async def reconnected() -> bool:
            return _registry("fleet_mqtt_connects_total") == connects + 1

        await eventually(reconnected, what="the controller to reconnect")
    finally:
        await asyncio.to_thread(probe.close)


async def _publish_garbage(broker: Mosquitto) -> None:
    """Send ingest one malformed message, which becomes a dead letter."""
    password = derive_terminal_password(TERMINAL_SECRET, PROBE_TERMINAL)
    probe = Probe(broker.host, broker.port, PROBE_TERMINAL, password)
    try:
        await asyncio.to_thread(probe.connect)
        topic = terminal_topic(PROBE_TERMINAL, MessageKind.HEARTBEAT)
        await asyncio.to_thread(probe.publish, topic, b"{not json")
    finally:
        await asyncio.to_thread(probe.close)


async def _learn(facts: Facts, repo: Repository, campaign_id: int) -> None:
    """Read the outcome from the database, once everything the test waits for is stored."""

    async def garbage_stored() -> bool:
        async with repo.connection() as q:
            return bool(await q.dead_letter_counts())

    await eventually(garbage_stored, what="the malformed message to be dead-lettered")
    failure_states = [s.value for s in FAILURE]
    async with repo.connection() as q:
        conn = q._conn
        facts.dead_letters = await q.dead_letter_counts()
        facts.current_wave = await conn.fetchval(
            "SELECT current_wave FROM campaigns WHERE id = $1", campaign_id
        )
        for r in await conn.fetch(
            "SELECT model, coalesce(versions ->> 'os', 'none') AS version, online, count(*) AS n"
            " FROM terminals GROUP BY 1, 2, 3"
        ):
            key = (r["model"], r["version"], "online" if r["online"] else "offline")
            facts.terminals[key] = r["n"]
        for r in await conn.fetch(
            "SELECT wave, state, count(*) AS n FROM executions WHERE campaign_id = $1"
            " GROUP BY 1, 2",
            campaign_id,
        ):
            facts.executions[r["wave"], r["state"]] = r["n"]
        for r in await conn.fetch(
            "SELECT coalesce(error_code, 'none') AS code, count(*) AS n FROM executions"
            " WHERE campaign_id = $1 AND state = ANY($2::text[]) GROUP BY 1",
            campaign_id,
            failure_states,
        ):
            facts.failures[r["code"]] = r["n"]
        facts.transitions = {
            r["state"]
            for r in await conn.fetch("SELECT DISTINCT state FROM update_events WHERE applied")
        }
        facts.not_applied = await conn.fetchval(
            "SELECT count(*) FROM update_events WHERE NOT applied"
        )
        facts.runner_actions = {
            r["action"]
            for r in await conn.fetch(
                "SELECT DISTINCT action FROM audit_log WHERE actor = 'runner'"
                " AND action <> 'start_resent'"
            )
        }
        facts.admissions = await conn.fetchval(
            "SELECT sum(attempt) FROM executions WHERE campaign_id = $1", campaign_id
        )
        facts.resends = await conn.fetchval(
            "SELECT coalesce(sum((detail::jsonb ->> 'count')::int), 0) FROM audit_log"
            " WHERE action = 'start_resent'"
        )
        facts.hellos = await conn.fetchval(
            "SELECT count(*) FROM terminals WHERE boot_id IS NOT NULL"
        )


async def _check_the_campaign_variable(server: PrometheusServer, facts: Facts) -> None:
    """The campaign dashboard's variable offers the campaign (Grafana's label_values)."""
    [variable] = _dashboards()["campaign-progress.json"]["templating"]["list"]
    match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
    assert match is not None, variable["query"]
    metric, label = match.groups()
    reply = await server.client.get(
        f"{server.url}/api/v1/label/{label}/values", params={"match[]": metric}
    )
    assert reply.json() == {"status": "success", "data": [facts.campaign]}


async def _check_every_query(server: PrometheusServer, facts: Facts) -> None:
    """Poll Prometheus until every panel's query returns what the facts say (bounded)."""
    targets = _targets()
    problems: dict[str, str] = {}

    async def all_as_expected() -> bool:
        found_now: dict[str, str] = {}
        for name, title, ref, expr in targets:
            found = await server.series(_substitute(expr, facts.campaign))
            problem = EXPECTATIONS[expr](facts, found)
            if problem is not None:
                found_now[f"{name}: {title!r} {ref}: {expr}"] = problem
        # Replaced only by a whole pass: the timeout may cut one short.
        problems.clear()
        problems.update(found_now)
        return not problems

    try:
        await eventually(all_as_expected, within_s=QUERIES_WITHIN_S, what="every panel")
    except AssertionError:
        pytest.fail(
            "panel queries not as expected:\n"
            + "\n".join(f"{where}\n    {problem}" for where, problem in problems.items())
        )
