"""Prometheus metrics of the controller. Names reuse the log vocabulary (`action`).

Counters and most gauges are updated where things happen. The gauges that describe the
database (terminals, heartbeat ages, campaign executions, dead letters) are recomputed by
the ``metrics-refresh`` task every ``metrics_refresh_s`` with a few set-based queries, so a
scrape never touches PostgreSQL. Every label has a bounded set of values:
docs/operations.md ("Metrics") lists them.
"""

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.clock import Clock, as_datetime
from fleet.db.repository import CampaignCount, HeartbeatAges, Repository, TerminalCount
from fleet.errors import DatabaseUnavailableError
from fleet.policy import CampaignPolicy
from fleet.protocol import CommandKind, ErrorCode, RejectReason
from fleet.states import FAILURE, REPORTABLE, ExecState

logger = logging.getLogger(__name__)

INGEST_MESSAGES = Counter(
    "fleet_ingest_messages_total",
    "Terminal messages received by ingest, by kind.",
    ["kind"],
)
INGEST_REJECTED = Counter(
    "fleet_ingest_rejected_total",
    "Terminal messages refused and dead-lettered, by stable reason code.",
    ["reason"],
)
EVENT_DUPLICATES = Counter(
    "fleet_event_duplicates_total",
    "State events whose message id was already stored (redeliveries, replays).",
)
EVENT_NOT_APPLIED = Counter(
    "fleet_event_not_applied_total",
    "New state events stored but refused by the state machine (stale seq, illegal move, repeat).",
)
UPDATE_TRANSITIONS = Counter(
    "fleet_update_transitions_total",
    "Executions moved by a terminal's state event, by new state.",
    ["to"],
)
INGEST_QUEUE_DEPTH = Gauge(
    "fleet_ingest_queue_depth",
    "Messages received from the broker and not yet written.",
)
DB_BATCH_SECONDS = Histogram(
    "fleet_db_batch_seconds",
    "Time to write and commit one ingest batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DB_BATCH_RETRIES = Counter(
    "fleet_db_batch_retries_total",
    "Ingest batches retried because the database was unavailable.",
)
MQTT_CONNECTS = Counter(
    "fleet_mqtt_connects_total",
    "Successful MQTT connections of the controller (1 + reconnects).",
)
CAMPAIGN_DECISIONS = Counter(
    "fleet_campaign_decisions_total",
    "Automatic campaign decisions, by action (wave_advanced, threshold_tripped, ...).",
    ["action"],
)
CAMPAIGN_TICKS = Counter(
    "fleet_campaign_ticks_total",
    "Completed evaluations of every live campaign by the runner (its liveness).",
)
DESIRED_PUBLISHED = Counter(
    "fleet_desired_published_total",
    "Retained desired-state messages published to groups.",
)
COMMANDS_DROPPED = Counter(
    "fleet_commands_dropped_total",
    "Replies to terminals dropped because too many were pending (the terminal asks again).",
)
COMMANDS_PUBLISHED = Counter(
    "fleet_commands_published_total",
    "Per-terminal commands published, by kind.",
    ["kind"],
)

UPDATE_FAILURES = Counter(
    "fleet_update_failures_total",
    "Executions moved to a failure state (failed, rolled_back, rejected, timed_out, "
    "retry_wait), by error code: a known code, `none` or `other`.",
    ["code"],
)
MQTT_DISCONNECTS = Counter(
    "fleet_mqtt_disconnects_total",
    "MQTT connections of the controller that ended (each is followed by reconnecting).",
)
MQTT_CONNECT_FAILURES = Counter(
    "fleet_mqtt_connect_failures_total",
    "MQTT connection attempts of the controller that failed (refused or unreachable).",
)
MQTT_CONNECTED = Gauge(
    "fleet_mqtt_connected",
    "1 while the controller's MQTT session is connected, else 0.",
)

# -- gauges read from the database by the metrics-refresh task ------------------------

TERMINALS = Gauge(
    "fleet_terminals",
    "Terminals by model, firmware version and presence (online, offline).",
    ["model", "version", "presence"],
)
CAMPAIGN_EXECUTIONS = Gauge(
    "fleet_campaign_executions",
    "Executions of live and recently changed campaigns, by campaign name, wave and state.",
    ["campaign", "wave", "state"],
)
CAMPAIGN_CURRENT_WAVE = Gauge(
    "fleet_campaign_current_wave",
    "The newest open wave of live and recently changed campaigns.",
    ["campaign"],
)
CAMPAIGN_FAILURE_RATIO = Gauge(
    "fleet_campaign_failure_ratio",
    "Failures over counted executions as the thresholds see them, by scope: the current "
    "wave (`wave`) or the whole campaign (`campaign`).",
    ["campaign", "scope"],
)
CAMPAIGN_FAILURE_THRESHOLD = Gauge(
    "fleet_campaign_failure_threshold_ratio",
    "The campaign policy's failure threshold, by scope (`wave`, `campaign`).",
    ["campaign", "scope"],
)
DEAD_LETTERS = Gauge(
    "fleet_dead_letters",
    "Dead letters kept in the database, by reason.",
    ["reason"],
)
METRICS_REFRESHED = Gauge(
    "fleet_metrics_refresh_timestamp_seconds",
    "When the gauges read from the database were last refreshed (Unix time).",
)

#: Bounds of the heartbeat-age gauge histogram, in seconds.
HEARTBEAT_AGE_BOUNDS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
#: Distinct label values kept; the terminals of the rest are counted as `other`.
MAX_MODELS = 50
MAX_VERSIONS = 20
#: A campaign that is neither running nor paused leaves the gauges after this long
#: without a change.
RECENT_CAMPAIGN_S = 86_400.0

_KNOWN_CODES = frozenset(ErrorCode)
# As the runner counts: a canceled execution counts neither as a failure nor at all.
_NOT_COUNTED = frozenset({ExecState.CANCELED, ExecState.CANCELING})

# Every bounded label value is present from the start, at zero: a series that appears
# with its first increment would hide that increment from rate() and increase().
for _code in (*ErrorCode, "none", "other"):
    UPDATE_FAILURES.labels(_code)
for _reason in RejectReason:
    INGEST_REJECTED.labels(_reason.value)
for _state in sorted(REPORTABLE):
    UPDATE_TRANSITIONS.labels(_state.value)
for _kind in ("events", "heartbeat", "presence", "hello"):
    INGEST_MESSAGES.labels(_kind)
for _command in CommandKind:
    COMMANDS_PUBLISHED.labels(_command.value)
for _action in (
    "admitted",
    "terminals_joined",
    "wave_succeeded",
    "wave_advanced",
    "threshold_tripped",
    "timed_out",
    "retry_scheduled",
    "unreachable",
    "health_gate_failed",
    "canceled_unanswered",
    "campaign_completed",
):
    CAMPAIGN_DECISIONS.labels(_action)


def failure_code(code: str | None) -> str:
    """Return the `code` label of a failure: a known error code, `none` or `other`."""
    if code is None:
        return "none"
    return code if code in _KNOWN_CODES else "other"


class _HeartbeatAge(Collector):
    """Online terminals by seconds since their last heartbeat: a gauge histogram.

    A histogram of the fleet as it is now, not of events, so it goes up and down
    (OpenMetrics `gaugehistogram`, exposed to Prometheus as `_bucket` series).
    """

    def __init__(self) -> None:
        self.ages: HeartbeatAges | None = None

    def collect(self) -> Iterable[Metric]:
        ages = self.ages
        if ages is None:
            return
        buckets = [
            (str(bound), float(n))
            for bound, n in zip(HEARTBEAT_AGE_BOUNDS, ages.under, strict=True)
        ]
        buckets.append(("+Inf", float(ages.n)))
        yield GaugeHistogramMetricFamily(
            "fleet_heartbeat_age_seconds",
            "Online terminals by seconds since their last heartbeat (those without one yet "
            "are left out).",
            buckets=buckets,
            gsum_value=ages.total_s,
        )
        if ages.oldest_s is not None:
            yield GaugeMetricFamily(
                "fleet_heartbeat_age_max_seconds",
                "Seconds since the last heartbeat of the online terminal heard from longest ago.",
                value=ages.oldest_s,
            )


HEARTBEAT_AGE = _HeartbeatAge()
REGISTRY.register(HEARTBEAT_AGE)


async def refresh_forever(
    repo: Repository, every_s: float, clock: Clock, stop: asyncio.Event
) -> None:
    """Refresh the database gauges every `every_s` until `stop` is set.

    While the database is unavailable the gauges keep their last values;
    `fleet_metrics_refresh_timestamp_seconds` shows how old they are. Only the leading
    replica refreshes (the gauges describe the whole fleet, so replicas would repeat each
    other); when it stops, or stops leading, its series go, so no replica exports stale ones.
    """
    try:
        while not stop.is_set():
            try:
                await refresh(repo, clock)
            except DatabaseUnavailableError as exc:
                logger.warning(
                    "metrics not refreshed: %s", exc, extra={"action": "metrics_refresh_skipped"}
                )
            try:
                async with asyncio.timeout(every_s):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        _forget_refreshed()


def _forget_refreshed() -> None:
    _set_terminals([])
    HEARTBEAT_AGE.ages = None
    _set_campaigns([])
    DEAD_LETTERS.clear()


async def refresh(repo: Repository, clock: Clock) -> None:
    """Read the database gauges once and replace their series."""
    now = clock.now()
    async with repo.connection() as q:
        terminals = await q.terminal_counts()
        ages = await q.heartbeat_ages(as_datetime(now), HEARTBEAT_AGE_BOUNDS)
        campaigns = await q.campaign_execution_counts(as_datetime(now - RECENT_CAMPAIGN_S))
        dead_letters = await q.dead_letter_counts()
    # No await from here on: a scrape (in this event loop) sees the old series or the new
    # ones, never a mix; series that disappeared (a campaign long over) are dropped.
    _set_terminals(terminals)
    HEARTBEAT_AGE.ages = ages
    _set_campaigns(campaigns)
    DEAD_LETTERS.clear()
    for reason, n in dead_letters.items():
        DEAD_LETTERS.labels(reason).set(n)
    METRICS_REFRESHED.set(time.time())


def _top(counts: dict[str, int], keep: int) -> set[str]:
    return set(sorted(counts, key=lambda value: (-counts[value], value))[:keep])


def _set_terminals(rows: Sequence[TerminalCount]) -> None:
    by_model: dict[str, int] = defaultdict(int)
    by_version: dict[str, int] = defaultdict(int)
    for row in rows:
        by_model[row.model] += row.n
        by_version[row.version or "none"] += row.n
    models, versions = _top(by_model, MAX_MODELS), _top(by_version, MAX_VERSIONS)
    series: dict[tuple[str, str, str], int] = defaultdict(int)
    for row in rows:
        model = row.model if row.model in models else "other"
        version = row.version or "none"
        version = version if version in versions else "other"
        series[model, version, "online" if row.online else "offline"] += row.n
    TERMINALS.clear()
    for labels, n in series.items():
        TERMINALS.labels(*labels).set(n)


def _set_campaigns(rows: Sequence[CampaignCount]) -> None:
    for gauge in (
        CAMPAIGN_EXECUTIONS,
        CAMPAIGN_CURRENT_WAVE,
        CAMPAIGN_FAILURE_RATIO,
        CAMPAIGN_FAILURE_THRESHOLD,
    ):
        gauge.clear()
    by_campaign: dict[int, list[CampaignCount]] = defaultdict(list)
    for row in rows:
        by_campaign[row.id].append(row)
    for campaign_rows in by_campaign.values():
        first = campaign_rows[0]
        waves: dict[int, dict[str, int]] = defaultdict(dict)
        for row in campaign_rows:
            if row.wave is not None and row.state is not None and row.n is not None:
                waves[row.wave][row.state] = row.n
                CAMPAIGN_EXECUTIONS.labels(first.name, str(row.wave), row.state).set(row.n)
        CAMPAIGN_CURRENT_WAVE.labels(first.name).set(first.current_wave)
        try:
            policy = CampaignPolicy.model_validate(first.policy)
        except ValueError as exc:
            # The runner reports such a campaign on every tick; its counts still show.
            logger.warning(
                "no failure ratios for campaign %s: %s",
                first.name,
                exc,
                extra={"action": "metrics_policy_unreadable"},
            )
            continue
        acknowledged = first.acknowledged_failures
        current = waves.get(first.current_wave, {})
        everything: dict[str, int] = defaultdict(int)
        for counts in waves.values():
            for state, n in counts.items():
                everything[state] += n
        for scope, counts, accepted, threshold in (
            (
                "wave",
                current,
                acknowledged.get(first.current_wave, 0),
                policy.failure_threshold,
            ),
            (
                "campaign",
                everything,
                sum(acknowledged.values()),
                policy.cumulative_failure_threshold,
            ),
        ):
            CAMPAIGN_FAILURE_RATIO.labels(first.name, scope).set(_failure_ratio(counts, accepted))
            CAMPAIGN_FAILURE_THRESHOLD.labels(first.name, scope).set(threshold)


def _failure_ratio(counts: dict[str, int], accepted: int) -> float:
    """Failures beyond those an operator accepted, over executions not canceled."""
    counted = sum(n for s, n in counts.items() if s not in _NOT_COUNTED) - accepted
    failed = max(0, sum(n for s, n in counts.items() if s in FAILURE) - accepted)
    return failed / counted if counted > 0 else 0.0
