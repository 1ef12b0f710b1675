"""The simulator's configuration: frozen models, every time small-able for tests.

A scenario file (device_sim/scenario.py, docs/simulator.md) is these models written as
TOML: its top-level keys are `SimConfig`'s fields, its tables the nested models. Every
per-terminal choice drawn from them (model, versions, time zone, groups, merchant, link
speed, battery, clock skew) depends only on the seed and the terminal's absolute number,
so processes that split one fleet by id range build exactly the terminals one process
would have built.
"""

import enum
import re
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from fleet.protocol import GroupName, Version, is_valid_id

Seconds = Annotated[float, Field(ge=0)]
Rate = Annotated[float, Field(ge=0, le=1)]
Weight = Annotated[float, Field(gt=0)]
Percent = Annotated[int, Field(ge=0, le=100)]
PerHour = Annotated[float, Field(ge=0, le=3_600_000)]
ModelName = Annotated[str, Field(min_length=1, max_length=64)]
_CLOCK_RE = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")


def _equal_weights(value: object) -> object:
    if isinstance(value, list | tuple):
        return dict.fromkeys(value, 1.0)
    return value


def _zone_name(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        msg = f"unknown time zone {value!r}"
        raise ValueError(msg) from None
    return value


def _minutes_range(value: object) -> object:
    """`"HH:MM-HH:MM"` to minutes since midnight; `24:00` may end a range."""
    if not isinstance(value, str):
        return value
    found = _CLOCK_RE.fullmatch(value.strip())
    if found is None:
        msg = f"{value!r} is not HH:MM-HH:MM"
        raise ValueError(msg)
    h1, m1, h2, m2 = (int(g) for g in found.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 24 * 60 or start == end:
        msg = f"{value!r} is not a non-empty range of clock times"
        raise ValueError(msg)
    return (start, end)


Weights = Annotated[dict[str, Weight], BeforeValidator(_equal_weights)]
ZoneName = Annotated[str, Field(max_length=64), BeforeValidator(_zone_name)]
ZoneWeights = Annotated[dict[ZoneName, Weight], BeforeValidator(_equal_weights)]
GroupWeights = Annotated[dict[GroupName, Weight], BeforeValidator(_equal_weights)]
#: A version, or versions with weights (`{"1.0.0" = 9, "0.9.0" = 1}`).
VersionSpec = Version | dict[Version, Weight]
#: A local-time range as minutes since midnight, written `"HH:MM-HH:MM"` (may span midnight).
BusyRange = Annotated[tuple[int, int], BeforeValidator(_minutes_range)]


def _factory_versions() -> dict[str, VersionSpec]:
    return {"os": "1.0.0", "pay": "1.0.0", "cfg": "1"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PowerLossPoint(enum.StrEnum):
    """Named moments of a package install at which the power can go (docs/simulator.md).

    In install order. Flash holds two software slots (A/B), the boot control block, the
    local data and its backup; see device_sim/storage.py for the rules a boot follows.
    """

    #: The package is downloaded and verified; nothing of its install has begun.
    AFTER_DOWNLOAD = "after_download"
    #: The local data is being copied to the backup area: the backup is torn.
    DURING_BACKUP = "during_backup"
    #: The image is half written to the inactive slot.
    DURING_WRITE_INACTIVE_SLOT = "during_write_inactive_slot"
    #: The inactive slot is complete; the boot control block still points at the old one.
    AFTER_WRITE_BEFORE_SWITCH = "after_write_before_switch"
    #: The boot control block is being written: atomic, so the switch either landed or not.
    DURING_SLOT_SWITCH = "during_slot_switch"
    #: The new slot is active but unconfirmed; the terminal has not restarted into it yet.
    AFTER_SWITCH_BEFORE_REBOOT = "after_switch_before_reboot"
    #: The new slot's first start, while it migrates the local data into its own store.
    DURING_FIRST_BOOT = "during_first_boot"
    #: The new slot runs its self-test; it is not confirmed yet.
    DURING_SELF_TEST = "during_self_test"
    #: The self-test passed and the new slot is confirmed; nothing reported yet.
    AFTER_CONFIRM = "after_confirm"


class Timing(_Frozen):
    """How long simulated work takes."""

    heartbeat_s: Annotated[float, Field(gt=0)] = 30.0
    #: Download speed of terminals whose link class does not say (no `link_classes`).
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
    """Injected faults: rates per package step, releases that misbehave, unreliable links.

    The `*_versions` fields map a package name to one version of it.
    A terminal that reboots into a bricked version never comes back (the release marks
    its slot good and then never reaches the broker, so the A/B fallback cannot save it);
    while a degraded version is installed, its heartbeats report `degraded_error_rate` of
    failed card transactions instead of the baseline `txn_error_rate`.
    """

    download_drop_rate: Rate = 0.0
    corrupt_rate: Rate = 0.0
    #: Chance per package download that the server ends the body early (fewer bytes).
    truncate_rate: Rate = 0.0
    install_fail_rate: Rate = 0.0
    self_test_fail_rate: Rate = 0.0
    #: Models whose self-test fails at the first package of an update.
    self_test_fail_models: frozenset[str] = frozenset()
    max_download_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    #: Releases (package name -> version) whose self-test always fails.
    self_test_fail_versions: dict[str, str] = Field(default_factory=dict)
    #: Releases that never come back after the reboot into them.
    bricked_versions: dict[str, str] = Field(default_factory=dict)
    degraded_versions: dict[str, str] = Field(default_factory=dict)
    txn_error_rate: Rate = 0.01
    degraded_error_rate: Rate = 0.3
    #: Chance per package install that the power goes at one of `power_loss_points`.
    power_loss_rate: Rate = 0.0
    power_loss_points: frozenset[PowerLossPoint] = frozenset(PowerLossPoint)
    #: Unexpected MQTT disconnects per terminal and hour; each lasts about `offline_s`.
    disconnect_per_h: PerHour = 0.0
    offline_s: Seconds = 5.0
    #: Flapping episodes per terminal and hour: `flap_count` drops within `flap_window_s`.
    flap_per_h: PerHour = 0.0
    flap_count: Annotated[int, Field(ge=1, le=1000)] = 5
    flap_window_s: Annotated[float, Field(gt=0)] = 60.0
    #: Share of terminals whose clock is off, by up to `clock_skew_max_s` either way.
    clock_skew_share: Rate = 0.0
    clock_skew_max_s: Annotated[float, Field(ge=0, le=30 * 86_400)] = 0.0


class LinkClass(_Frozen):
    """A kind of network link and how fast it downloads."""

    weight: Weight = 1.0
    bytes_per_s: Annotated[int, Field(gt=0)]
    #: Each terminal's speed is `bytes_per_s` times a factor drawn from 1 +/- `jitter`.
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.0


class MerchantProfile(_Frozen):
    """A kind of merchant, and when (local time) their terminals are busy with sales."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    weight: Weight = 1.0
    busy_hours: tuple[BusyRange, ...] = ()


class Battery(_Frozen):
    """Battery levels: where they start, how they drain, and the low-battery rule."""

    start_min_pct: Percent = 40
    start_max_pct: Percent = 100
    drain_pct_per_h: Annotated[float, Field(ge=0, le=1000)] = 0.0
    #: Share of terminals on a charger: their level rises and the rule does not apply.
    charging_share: Rate = 0.0
    charge_pct_per_h: Annotated[float, Field(ge=0, le=1000)] = 20.0
    #: Battery used by installing one package.
    install_cost_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    #: Below this level a terminal refuses to install (0: never refuses).
    min_install_pct: Percent = 0

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.start_min_pct > self.start_max_pct:
            msg = "start_min_pct is above start_max_pct"
            raise ValueError(msg)
        return self


class SimConfig(_Frozen):
    """Everything one simulator process needs to run its slice of a fleet."""

    #: A scenario's name and description, shown in the report.
    name: Annotated[str, Field(max_length=100)] = ""
    description: Annotated[str, Field(max_length=2000)] = ""
    count: Annotated[int, Field(ge=0, le=1_000_000)] = 10
    start: Annotated[int, Field(ge=0)] = 0
    id_prefix: str = "T"
    id_digits: Annotated[int, Field(ge=1, le=12)] = 6

    models: dict[ModelName, Weight] = Field(
        default_factory=lambda: {"PAX-A920": 3.0, "VX-690": 1.0}
    )
    initial_versions: dict[GroupName, VersionSpec] = Field(default_factory=_factory_versions)
    #: Per model, versions that replace `initial_versions` (others are inherited).
    model_versions: dict[ModelName, dict[GroupName, VersionSpec]] = Field(default_factory=dict)
    groups: GroupWeights = Field(default_factory=lambda: {"all": 1.0})
    group_rule: Literal["round_robin", "all", "random", "by_model", "by_timezone"] = "round_robin"
    #: `by_model`/`by_timezone`: a model's (time zone's) groups; others fall back to
    #: `round_robin` over `groups`.
    group_by: dict[str, list[GroupName]] = Field(default_factory=dict)
    group_map: dict[str, list[GroupName]] = Field(default_factory=dict)
    merchants: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list
    )
    terminals_per_merchant: Annotated[int, Field(ge=1, le=1_000_000)] = 4
    merchant_profiles: list[MerchantProfile] = Field(default_factory=list)
    timezones: ZoneWeights = Field(default_factory=lambda: {"Europe/Berlin": 1.0, "UTC": 1.0})
    pending_txns_max: Annotated[int, Field(ge=0, le=1000)] = 5
    link_classes: dict[Annotated[str, Field(max_length=32)], LinkClass] = Field(
        default_factory=dict
    )
    battery: Battery = Field(default_factory=Battery)

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
        problems: list[str] = []
        if not self.models:
            problems.append("models: at least one model is needed")
        if not self.groups and not self.group_map:
            problems.append("groups: at least one group is needed")
        if not is_valid_id(self.terminal_id(self.start)):
            problems.append(f"id_prefix: {self.terminal_id(self.start)!r} is not a valid id")
        problems.extend(
            f"model_versions: {m!r} is not one of the models"
            for m in self.model_versions
            if m not in self.models
        )
        if self.group_rule in {"by_model", "by_timezone"}:
            known = self.models if self.group_rule == "by_model" else self.timezones
            what = "models" if self.group_rule == "by_model" else "timezones"
            if not self.group_by:
                problems.append(f"group_by: group_rule {self.group_rule} needs a map")
            problems.extend(
                f"group_by: {key!r} is not one of the {what}"
                for key in self.group_by
                if key not in known
            )
        elif self.group_by:
            problems.append("group_by: only used with group_rule by_model or by_timezone")
        if self.group_rule == "random" and not self.groups:
            problems.append("groups: group_rule random needs groups")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def terminal_id(self, index: int) -> str:
        """Return the id of the terminal with absolute number `index`."""
        return f"{self.id_prefix}{index:0{self.id_digits}d}"

    def terminal_ids(self) -> list[str]:
        """Return the ids this process simulates, in order."""
        return [self.terminal_id(i) for i in range(self.start, self.start + self.count)]
