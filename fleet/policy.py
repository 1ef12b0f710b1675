"""A campaign's rules as validated values, stored as JSON on the campaign.

Waves, thresholds, health gate, deadlines, retries, maintenance windows, postponement,
rate limits, and the target filter.

Stored as JSON on the campaign (`campaigns.policy`, `campaigns.target`) and read back
into these models, so the rules an operator asked for are exactly the rules that run.
"""

import itertools
import re
from datetime import datetime, time
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet.protocol import ID_PATTERN

Seconds = Annotated[float, Field(ge=0, le=90 * 86_400)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=ID_PATTERN)]
_CLOCK_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")

#: Retry classes: the stage a failed attempt stopped in, or `timeout` for a missed deadline.
FAILURE_CLASSES = ("download", "verify", "install", "self_test", "health", "timeout")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Wave(_Frozen):
    """One wave: a cumulative share of the fleet (percent) or a number of terminals."""

    percent: Annotated[float, Field(gt=0, le=100)] | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    #: After the wave meets the success threshold, wait this long before the next one.
    soak_s: Seconds = 0.0

    @model_validator(mode="after")
    def _one_size(self) -> Self:
        if (self.percent is None) == (self.count is None):
            msg = "a wave has either percent or count"
            raise ValueError(msg)
        return self


class HealthGate(_Frozen):
    """A terminal succeeds only when it heartbeats on the new versions in time, no sicker."""

    enabled: bool = True
    #: How much worse than before the update the transaction error rate may be (absolute).
    tolerance: Annotated[float, Field(ge=0, le=1)] = 0.02


class Deadlines(_Frozen):
    """Per-phase deadlines; a phase that takes longer ends in timed_out."""

    start_s: Seconds = 3600.0
    download_s: Seconds = 1800.0
    install_s: Seconds = 900.0
    reboot_s: Seconds = 600.0
    health_s: Seconds = 600.0
    #: An offline terminal stays unreachable (not failed) this long, then times out.
    unreachable_s: Seconds = 3 * 86_400.0

    def of(self, phase: str) -> float:
        """The deadline of a phase."""
        value: float = getattr(self, f"{phase}_s")
        return value


class Retries(_Frozen):
    """How many retries each failure class gets, and the exponential backoff between them."""

    download: Annotated[int, Field(ge=0, le=20)] = 3
    verify: Annotated[int, Field(ge=0, le=20)] = 1
    install: Annotated[int, Field(ge=0, le=20)] = 0
    self_test: Annotated[int, Field(ge=0, le=20)] = 0
    health: Annotated[int, Field(ge=0, le=20)] = 0
    timeout: Annotated[int, Field(ge=0, le=20)] = 1
    backoff_s: Seconds = 300.0
    backoff_factor: Annotated[float, Field(ge=1, le=10)] = 2.0
    backoff_max_s: Seconds = 6 * 3600.0


class Window(_Frozen):
    """A daily maintenance window in the terminal's local time; it may span midnight."""

    start: str = "22:00"
    end: str = "06:00"

    @model_validator(mode="after")
    def _clock_times(self) -> Self:
        for value in (self.start, self.end):
            if not _CLOCK_RE.fullmatch(value):
                msg = f"{value!r} is not HH:MM"
                raise ValueError(msg)
        if self.start == self.end:
            msg = "an empty window; use no window to allow any time"
            raise ValueError(msg)
        return self

    @property
    def start_time(self) -> time:
        """Start as a time of day."""
        return time.fromisoformat(self.start)

    @property
    def end_time(self) -> time:
        """End as a time of day."""
        return time.fromisoformat(self.end)

    def contains(self, local: datetime) -> bool:
        """Tell whether a local wall-clock time is inside the window (end excluded)."""
        t, start, end = local.time().replace(tzinfo=None), self.start_time, self.end_time
        return start <= t < end if start < end else (t >= start or t < end)


class TargetFilter(_Frozen):
    """Which members of the campaign's groups take part; every clause given must match."""

    models: list[Annotated[str, Field(max_length=64)]] | None = None
    #: Current version of a package, e.g. {"pay": ["1.0.0", "1.0.1"]}.
    versions: dict[Name, list[str]] | None = None
    merchants: list[str] | None = None
    #: The terminal attribute `region`.
    regions: list[str] | None = None
    #: Any other inventory attribute, e.g. {"rate_plan": ["gold"]}.
    attributes: dict[str, list[str]] | None = None
    #: Models an operator took out of the campaign (also applied to later joiners).
    exclude_models: list[str] = Field(default_factory=list)
    #: Only terminals that have an execution in this campaign (rollback campaigns).
    from_campaign: int | None = None


class CampaignPolicy(_Frozen):
    """Everything about how a campaign rolls out."""

    #: By default a canary of 1%, then 10%, 50% and the rest: a bad release meets few.
    waves: Annotated[list[Wave], Field(min_length=1, max_length=100)] = Field(
        default_factory=lambda: [Wave(percent=p) for p in (1, 10, 50, 100)]
    )
    #: Share of a wave that must succeed before the next opens.
    success_threshold: Fraction = 0.9
    #: Share of one wave whose failure trips the threshold action.
    failure_threshold: Fraction = 0.1
    #: Share of the whole campaign (every wave's executions) whose failure trips it.
    cumulative_failure_threshold: Fraction = 0.05
    threshold_action: Literal["pause", "abort"] = "pause"
    health_gate: HealthGate = Field(default_factory=HealthGate)
    deadlines: Deadlines = Field(default_factory=Deadlines)
    retries: Retries = Field(default_factory=Retries)
    #: None: any time of day.
    window: Window | None = Field(default_factory=Window)
    #: How often a merchant may postpone; 0 makes the update forced.
    max_postpones: Annotated[int, Field(ge=0, le=100)] = 3
    postpone_delay_s: Seconds = 3600.0
    #: Terminals started per minute (None: no limit).
    rate_per_min: Annotated[int, Field(ge=1)] | None = None
    #: Terminals downloading (or about to) at once (None: no cap).
    max_concurrent_downloads: Annotated[int, Field(ge=1)] | None = None
    #: Reconciler: re-send a start to a silent online terminal after this long, this often.
    resend_after_s: Annotated[float, Field(gt=0)] = 120.0
    max_resends: Annotated[int, Field(ge=0, le=100)] = 3
    #: A downgrade (rollback campaigns) is refused unless allowed.
    allow_downgrade: bool = False
    #: The operator's estimate of one terminal's update time, for the plan's ETA.
    expected_duration_s: Seconds = 600.0

    @model_validator(mode="after")
    def _waves_grow(self) -> Self:
        percents = [w.percent for w in self.waves if w.percent is not None]
        counts = [w.count for w in self.waves if w.count is not None]
        if percents and counts:
            msg = "waves are all by percent or all by count"
            raise ValueError(msg)
        sizes: list[float] = [float(p) for p in percents] or [float(c) for c in counts]
        if any(b <= a for a, b in itertools.pairwise(sizes)):
            msg = "wave sizes are cumulative and must grow"
            raise ValueError(msg)
        if percents and percents[-1] != 100:
            msg = "the last wave must reach 100%"
            raise ValueError(msg)
        return self


def valid_timezone(name: str) -> bool:
    """Tell whether an IANA time zone name is known here."""
    if not name or name.startswith(("/", ".")) or ".." in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def zone(name: str) -> ZoneInfo:
    """The zone of a terminal; unknown names fall back to UTC (ingest stores only valid ones)."""
    return ZoneInfo(name) if valid_timezone(name) else ZoneInfo("UTC")


_PART_RE = re.compile(r"\d+|[A-Za-z]+")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions like 1.2.10 > 1.2.9 > 1.2.0-rc1; numbers sort before words."""
    return tuple(
        (1, int(part)) if part.isdigit() else (0, part.lower())
        for part in _PART_RE.findall(version)
    )
