"""The simulator's configuration: frozen models, every time small-able for tests."""

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Seconds = Annotated[float, Field(ge=0)]
Rate = Annotated[float, Field(ge=0, le=1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Timing(_Frozen):
    """How long simulated work takes."""

    heartbeat_s: Annotated[float, Field(gt=0)] = 30.0
    download_bps: Annotated[int, Field(gt=0)] = 1_000_000
    chunk_bytes: Annotated[int, Field(ge=512, le=1_048_576)] = 16_384
    install_s: Seconds = 2.0
    reboot_s: Seconds = 3.0
    self_test_s: Seconds = 1.0
    busy_probability: Rate = 0.0
    busy_s: Seconds = 5.0
    #: Chance that the merchant postpones an attempt the controller lets them postpone.
    postpone_probability: Rate = 0.0
    http_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    download_retry_s: Seconds = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 10.0


class Faults(_Frozen):
    """Injected faults: rates per package step, and releases that misbehave.

    The `*_versions` fields map a package name to one version of it.
    A terminal that reboots into a bricked version never comes back; while a degraded
    version is installed, its heartbeats report `degraded_error_rate` of failed card
    transactions instead of the baseline `txn_error_rate`.
    """

    download_drop_rate: Rate = 0.0
    corrupt_rate: Rate = 0.0
    install_fail_rate: Rate = 0.0
    self_test_fail_rate: Rate = 0.0
    #: Models whose self-test fails at the first package of an update.
    self_test_fail_models: frozenset[str] = frozenset()
    max_download_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    #: Releases (package name -> version) whose self-test always fails.
    self_test_fail_versions: dict[str, str] = Field(default_factory=dict)
    bricked_versions: dict[str, str] = Field(default_factory=dict)
    degraded_versions: dict[str, str] = Field(default_factory=dict)
    txn_error_rate: Rate = 0.01
    degraded_error_rate: Rate = 0.3


class SimConfig(_Frozen):
    """Everything one simulator process needs to run its slice of a fleet."""

    count: Annotated[int, Field(ge=0, le=1_000_000)] = 10
    start: Annotated[int, Field(ge=0)] = 0
    id_prefix: str = "T"
    id_digits: Annotated[int, Field(ge=1, le=12)] = 6

    models: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {"PAX-A920": 3.0, "VX-690": 1.0}
    )
    initial_versions: dict[str, str] = Field(
        default_factory=lambda: {"os": "1.0.0", "pay": "1.0.0", "cfg": "1"}
    )
    groups: list[str] = Field(default_factory=lambda: ["all"])
    group_rule: Literal["round_robin", "all"] = "round_robin"
    group_map: dict[str, list[str]] = Field(default_factory=dict)
    merchants: list[str] = Field(default_factory=list)
    timezones: list[str] = Field(default_factory=lambda: ["Europe/Berlin", "UTC"])
    pending_txns_max: Annotated[int, Field(ge=0, le=1000)] = 5

    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    secret: str = "dev-secret"  # noqa: S105 - development default; real runs pass one
    keepalive_s: Annotated[int, Field(ge=5)] = 60
    session_expiry_s: Annotated[int, Field(ge=0)] = 3600
    connect_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 100
    incoming_queue_max: Annotated[int, Field(ge=10)] = 1000

    heartbeat_only: bool = False
    seed: int = 0
    timing: Timing = Field(default_factory=Timing)
    faults: Faults = Field(default_factory=Faults)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.models:
            msg = "at least one model is needed"
            raise ValueError(msg)
        if not self.groups and not self.group_map:
            msg = "at least one group is needed"
            raise ValueError(msg)
        return self

    def terminal_id(self, index: int) -> str:
        """Return the id of the terminal with absolute number `index`."""
        return f"{self.id_prefix}{index:0{self.id_digits}d}"

    def terminal_ids(self) -> list[str]:
        """Return the ids this process simulates, in order."""
        return [self.terminal_id(i) for i in range(self.start, self.start + self.count)]
