"""Prometheus metrics of the controller. Names reuse the log vocabulary (`action`)."""

from prometheus_client import Counter, Gauge, Histogram

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
