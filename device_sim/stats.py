"""What a simulator run counts: one object shared by every terminal of the process.

Terminals report into it as things happen, so the report needs no per-terminal lists:
the only growing part is one 8-byte float per connection made.
"""

import array
import collections
import dataclasses


@dataclasses.dataclass(slots=True)
class Stats:
    """Counters of injected faults, refusals and recoveries, and connection times."""

    #: Faults as they took effect, by kind (`corrupt`, `power_loss.during_backup`, ...).
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: Updates a terminal refused or put off, by reason (`postponed.low_battery`, ...).
    refusals: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: What terminals did about a fault (`fell_back`, `resumed`, `reported_power_loss`).
    recoveries: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: Seconds from starting to connect (gate and retries included) to connected.
    connect_s: "array.array[float]" = dataclasses.field(default_factory=lambda: array.array("d"))

    def fault(self, kind: str) -> None:
        """Count one injected fault."""
        self.faults[kind] += 1

    def refusal(self, kind: str) -> None:
        """Count one refused or postponed update."""
        self.refusals[kind] += 1

    def recovery(self, kind: str) -> None:
        """Count one recovery from a fault."""
        self.recoveries[kind] += 1

    def connected(self, seconds: float) -> None:
        """Note how long one connection took to establish."""
        self.connect_s.append(seconds)
