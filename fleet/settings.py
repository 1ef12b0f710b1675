"""The controller's settings: one frozen object, read once at start-up, passed down.

Every field has a default and a description; `python -m fleet --help` lists each with its
environment variable (``FLEET_`` + the upper-cased field name). Nothing below
`fleet.__main__` reads the environment.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class FleetSettings(BaseSettings):
    """Everything the controller, the CLI and the demo can be told."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", frozen=True, extra="forbid")

    database_url: str = Field(
        "postgresql://fleet@127.0.0.1:5432/fleet",
        description="PostgreSQL DSN of the fleet database.",
    )
    db_pool_size: int = Field(8, ge=2, description="Connections in the database pool.")
    db_command_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long one statement, or waiting for a pooled connection, may take "
        "before the database counts as unavailable (and ingest retries).",
    )

    mqtt_host: str = Field("127.0.0.1", description="MQTT broker host.")
    mqtt_port: int = Field(1883, description="MQTT broker port.")
    mqtt_username: str = Field(
        "controller",
        description="The controller's broker identity; also its client id, so a restarted "
        "controller resumes the same persistent session and its queue.",
    )
    broker_acl: Literal["dynsec", "database"] = Field(
        "dynsec",
        description="Where the broker learns who may connect and what they may read: "
        "`dynsec`, Mosquitto's dynamic-security plugin, which the controller keeps up to "
        "date; `database`, the fleet database itself (EMQX's PostgreSQL authentication and "
        "authorization, deploy/emqx/), so provisioning only writes the database.",
    )
    mqtt_password: str = Field("controller", description="The controller's broker password.")
    mqtt_session_expiry_s: int = Field(
        86_400,
        ge=0,
        description="How long the broker keeps the ingest session (and its queue) while the "
        "controller is away.",
    )
    mqtt_receive_max: int = Field(
        10_000,
        ge=1,
        le=65_535,
        description="Un-acknowledged QoS1 messages the broker may have in flight to ingest: "
        "the backpressure window.",
    )
    mqtt_publish_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long a publish may wait for the broker's PUBACK before it counts "
        "as failed (and is retried by whoever sent it).",
    )
    mqtt_keepalive_s: int = Field(
        30, ge=5, le=65_535, description="MQTT keep-alive of the controller."
    )
    mqtt_client_id: str = Field(
        "",
        description="MQTT client id of this controller; empty means the username. Each "
        "replica of a cluster needs its own, stable across its restarts (its persistent "
        "session and queue are keyed by it). Mosquitto with use_username_as_clientid "
        "ignores it: there, replicas need their own usernames.",
    )
    mqtt_shared_group: str = Field(
        "",
        pattern=r"^[^/+#]*$",
        description="Cluster mode: subscribe to terminal messages as "
        "$share/<group>/<filter>, so replicas with the same group split them; empty means "
        "plain subscriptions (one controller receives everything).",
    )
    leader_lease_s: float = Field(
        4.0,
        gt=0,
        description="Leadership (campaign runner, maintenance): a leader that cannot confirm "
        "its PostgreSQL advisory lock for this long stops deciding, and a new leader waits "
        "this long after taking the lock before it starts.",
    )

    http_host: str = Field("127.0.0.1", description="Bind address of artifacts and metrics.")
    http_port: int = Field(8080, description="Port of artifacts (/artifacts) and /metrics.")
    api_host: str = Field(
        "127.0.0.1",
        description="Bind address of the operators' REST API (keep it off the terminals' network).",
    )
    api_port: int = Field(8081, description="Port of the REST API (/api/v1, its OpenAPI spec).")
    api_db_pool_size: int = Field(
        4,
        ge=1,
        description="Database connections of the REST API, a pool apart from ingest's and "
        "the runner's.",
    )
    api_max_upload_mb: int = Field(
        512, ge=1, description="Largest package file the API accepts, in MiB."
    )
    artifact_dir: Path = Field(
        Path("var/artifacts"), description="Where package files are stored by sha256."
    )
    artifact_base_url: str = Field(
        "http://127.0.0.1:8080",
        description="Base URL terminals download from; desired states carry "
        "{base}/artifacts/{sha256}.",
    )

    ingest_batch_max: int = Field(
        5000, ge=1, description="Messages per database transaction at most."
    )
    ingest_batch_wait_ms: int = Field(
        20, ge=0, description="How long a partial batch waits for more messages."
    )
    ingest_queue_max: int = Field(
        20_000,
        ge=1,
        description="Messages received but not yet written; when full, reading from the "
        "broker pauses and its flow control holds the rest.",
    )
    dead_letter_max_rows: int = Field(
        10_000, ge=100, description="Dead letters kept; older ones are trimmed."
    )
    heartbeat_partition_days_ahead: int = Field(
        3, ge=1, description="Daily heartbeat partitions created ahead of time."
    )

    campaign_tick_s: float = Field(
        1.0, gt=0, description="How often the campaign runner re-evaluates running campaigns."
    )
    enroll_every_s: float = Field(
        5.0,
        gt=0,
        description="How often the runner looks for terminals that joined a running "
        "campaign's groups or said their first hello (a full pass over the groups' members).",
    )
    cancel_grace_s: float = Field(
        300.0,
        ge=0,
        description="After a cancel, how long an execution whose terminal has not reported "
        "stays canceling (its first report may be in flight) before it ends canceled.",
    )
    command_expiry_s: int = Field(
        3600, ge=1, description="MQTT message expiry of per-terminal commands."
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="How long in-flight work may finish after a stop signal."
    )
    terminal_secret: str = Field(
        "demo-provisioning-secret",
        description="Key from which provisioned terminals' broker passwords are derived "
        "(HMAC-SHA256 of the terminal id). Change it in production.",
    )

    webhook_allowed_hosts: str = Field(
        "",
        description="Comma-separated hosts webhook endpoints may be registered at "
        "(`*.example.com` matches its subdomains); empty allows any host.",
    )
    webhook_poll_s: float = Field(
        1.0,
        gt=0,
        description="How often the webhook delivery loop looks for new campaign events "
        "(the longest an event waits before it is sent).",
    )
    webhook_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long one webhook POST may take, connect to last byte, before the "
        "attempt counts as failed.",
    )
    webhook_backoff_s: float = Field(
        1.0,
        gt=0,
        description="Wait before the first retry of a failed webhook delivery; it doubles "
        "with each failure (with jitter) up to FLEET_WEBHOOK_MAX_BACKOFF_S.",
    )
    webhook_max_backoff_s: float = Field(
        600.0,
        gt=0,
        description="Longest wait between retries of a failing webhook endpoint; it is "
        "retried at this pace for as long as it fails, and its later events wait.",
    )
    metrics_refresh_s: float = Field(
        15.0,
        gt=0,
        description="How often the gauges read from the database (terminals, heartbeat ages, "
        "campaign executions, dead letters) are recomputed; a scrape never queries it.",
    )
