"""The terminal update state machine, as data.

One execution is one terminal's part in one campaign. Terminals report the states in
`REPORTABLE`; the controller alone sets `pending`, `canceling`, `timed_out`,
`unreachable`, `retry_wait` and `health_check`. `ALLOWED` is also loaded into the
database (table `state_transitions`, checked against this module by a test), and every
state change goes through a guarded UPDATE that consults that table, so a replayed or
reordered event cannot move an execution backwards even if Python were bypassed.

DO NOT CHANGE the string values: they are on the wire and in the database.
"""

from enum import StrEnum


class ExecState(StrEnum):
    """Every state an execution can be in."""

    PENDING = "pending"
    QUEUED = "queued"
    DEFERRED = "deferred"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    BACKING_UP = "backing_up"
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    SELF_TESTING = "self_testing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"
    ALREADY_INSTALLED = "already_installed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    CANCELING = "canceling"
    UNREACHABLE = "unreachable"
    RETRY_WAIT = "retry_wait"
    HEALTH_CHECK = "health_check"


S = ExecState

FINAL: frozenset[ExecState] = frozenset(
    {
        S.SUCCEEDED,
        S.FAILED,
        S.ROLLED_BACK,
        S.REJECTED,
        S.ALREADY_INSTALLED,
        S.TIMED_OUT,
        S.CANCELED,
    }
)

#: Final states that count as the update having reached its goal.
SUCCESS: frozenset[ExecState] = frozenset({S.SUCCEEDED, S.ALREADY_INSTALLED})

#: States that count toward a campaign's failure thresholds: final failures, and failed
#: attempts waiting for their retry (a bad release must trip the threshold before its
#: retries run out, and a retry that succeeds takes its failure back).
FAILURE: frozenset[ExecState] = frozenset(
    {S.FAILED, S.ROLLED_BACK, S.REJECTED, S.TIMED_OUT, S.RETRY_WAIT}
)

#: States only the controller may set; a terminal reporting one is refused.
CONTROLLER_ONLY: frozenset[ExecState] = frozenset(
    {S.PENDING, S.TIMED_OUT, S.CANCELING, S.UNREACHABLE, S.RETRY_WAIT, S.HEALTH_CHECK}
)

#: The states a terminal reports when it begins (or declines) an update.
_FIRST_REPORTS = frozenset({S.QUEUED, S.DEFERRED, S.DOWNLOADING, S.REJECTED, S.ALREADY_INSTALLED})

REPORTABLE: frozenset[ExecState] = frozenset(ExecState) - CONTROLLER_ONLY

_ABORTS = frozenset({S.FAILED, S.TIMED_OUT, S.UNREACHABLE, S.RETRY_WAIT})
_CANCELABLE = frozenset({S.CANCELED})

#: from-state -> the states it may move to. A state listed as its own successor accepts
#: repeated reports (progress updates); any other repeat is a no-op refused by the guard.
ALLOWED: dict[ExecState, frozenset[ExecState]] = {
    # A pending execution the controller has not admitted yet ends canceled at once; one
    # whose start command may be in flight goes through canceling.
    S.PENDING: _FIRST_REPORTS | _ABORTS | {S.CANCELING, S.CANCELED, S.HEALTH_CHECK},
    # Cancel asked while the terminal had not reported: its first report may still be in
    # flight (it saw the campaign before the cancel) and wins; otherwise the runner ends
    # the execution as canceled after a grace period.
    S.CANCELING: _FIRST_REPORTS | _ABORTS | _CANCELABLE | {S.HEALTH_CHECK},
    # -> health_check: already_installed on a retry, whose earlier attempt may have installed.
    S.QUEUED: frozenset(
        {S.DEFERRED, S.DOWNLOADING, S.REJECTED, S.ALREADY_INSTALLED, S.HEALTH_CHECK}
    )
    | _ABORTS
    | _CANCELABLE,
    # deferred -> pending: a merchant postponed, and the controller admits it again later.
    S.DEFERRED: frozenset({S.DEFERRED, S.QUEUED, S.DOWNLOADING, S.PENDING}) | _ABORTS | _CANCELABLE,
    # downloading -> downloading carries progress; downloaded/verified -> downloading is
    # the next package of an ordered bundle.
    S.DOWNLOADING: frozenset({S.DOWNLOADING, S.DOWNLOADED}) | _ABORTS | _CANCELABLE,
    S.DOWNLOADED: frozenset({S.VERIFYING, S.DOWNLOADING}) | _ABORTS | _CANCELABLE,
    S.VERIFYING: frozenset({S.VERIFIED, S.REJECTED}) | _ABORTS,
    S.VERIFIED: frozenset({S.DOWNLOADING, S.BACKING_UP}) | _ABORTS | _CANCELABLE,
    S.BACKING_UP: frozenset({S.INSTALLING}) | _ABORTS,
    # A package that needs no reboot (parameters) goes straight to its self-test.
    S.INSTALLING: frozenset({S.REBOOTING, S.SELF_TESTING, S.ROLLED_BACK}) | _ABORTS,
    S.REBOOTING: frozenset({S.SELF_TESTING, S.ROLLED_BACK}) | _ABORTS,
    # self_testing -> backing_up is the next package of an ordered bundle; a terminal's
    # `succeeded` becomes health_check when the campaign has a health gate.
    S.SELF_TESTING: frozenset({S.SUCCEEDED, S.ROLLED_BACK, S.BACKING_UP, S.HEALTH_CHECK}) | _ABORTS,
    # A terminal that comes back reports where it is and resumes from there; one that was
    # offline before it was ever admitted is admitted when it returns (pending).
    S.UNREACHABLE: REPORTABLE | frozenset({S.TIMED_OUT, S.HEALTH_CHECK, S.RETRY_WAIT, S.PENDING}),
    # Waiting for the next attempt: the controller re-admits it (pending); a late report
    # of the previous attempt still wins, as after unreachable.
    S.RETRY_WAIT: REPORTABLE | frozenset({S.PENDING, S.HEALTH_CHECK, S.UNREACHABLE}),
    # The terminal said succeeded; the controller waits for a healthy heartbeat.
    S.HEALTH_CHECK: frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.RETRY_WAIT}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    S.REJECTED: frozenset(),
    S.ALREADY_INSTALLED: frozenset(),
    S.TIMED_OUT: frozenset(),
    S.CANCELED: frozenset(),
}


#: The deadline phase each state belongs to (see the campaign's per-phase deadlines);
#: states without one are final, or wait on purpose (unreachable, retry_wait).
PHASE: dict[ExecState, str | None] = {
    S.PENDING: "start",
    S.CANCELING: None,
    S.QUEUED: "start",
    S.DEFERRED: "start",
    S.DOWNLOADING: "download",
    S.DOWNLOADED: "download",
    S.VERIFYING: "download",
    S.VERIFIED: "download",
    S.BACKING_UP: "install",
    S.INSTALLING: "install",
    S.REBOOTING: "reboot",
    S.SELF_TESTING: "reboot",
    S.HEALTH_CHECK: "health",
    S.UNREACHABLE: None,
    S.RETRY_WAIT: None,
} | dict.fromkeys(FINAL, None)

#: Phases during which a silent terminal is expected (it reboots): losing it there counts
#: against the deadline, not as unreachable, so a release that never boots times out.
OFFLINE_EXPECTED: frozenset[str] = frozenset({"reboot", "health"})


def can_move(current: ExecState, new: ExecState) -> bool:
    """Tell whether an execution in `current` may move to `new`."""
    return new in ALLOWED[current]


def transition_pairs() -> list[tuple[str, str]]:
    """Every allowed (from, to) pair, sorted: the content of table `state_transitions`."""
    return sorted((src.value, dst.value) for src, dsts in ALLOWED.items() for dst in dsts)
