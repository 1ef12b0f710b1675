"""Text rendering of a campaign's live progress: a bar per wave, counts per state."""

from fleet.campaigns import CampaignStatus
from fleet.states import FAILURE, FINAL, SUCCESS, ExecState

_BAR = 30
_ORDER = [state.value for state in ExecState]


def _bar(success: int, failure: int, other_final: int, size: int) -> str:
    if size == 0:
        return "." * _BAR
    cells = []
    for count, char in ((success, "#"), (failure, "x"), (other_final, "-")):
        cells.append(char * round(count * _BAR / size))
    filled = "".join(cells)[:_BAR]
    return filled + " " * (_BAR - len(filled))


def render_status(status: CampaignStatus) -> str:
    """Render a campaign as lines: a header, then one bar per wave, then totals.

    ``#`` succeeded, ``x`` failed (any failure state), ``-`` other final states; the
    counts after the bar list every non-empty state.
    """
    lines = [
        f"campaign {status.id} {status.name!r}: {status.status}"
        f" (wave {status.current_wave}/{len(status.waves)})"
        + (
            f" - {status.paused_reason}"
            if status.status in ("paused", "aborted") and status.paused_reason
            else ""
        )
    ]
    for wave in status.waves:
        success = wave.count(SUCCESS)
        failure = wave.count(FAILURE & FINAL)
        done = wave.count(FINAL)
        mark = ">" if wave.opened else " "
        counts = " ".join(
            f"{state}={wave.counts[state]}" for state in _ORDER if wave.counts.get(state)
        )
        bar = _bar(success, failure, done - success - failure, wave.size)
        lines.append(f"{mark} wave {wave.wave} [{bar}] {done:>6}/{wave.size:<6} {counts}")
    totals = status.totals
    lines.append(
        "  total " + " ".join(f"{state}={totals[state]}" for state in _ORDER if totals.get(state))
    )
    if status.excluded:
        lines.append(
            "  excluded " + " ".join(f"{r}={n}" for r, n in sorted(status.excluded.items()))
        )
    return "\n".join(lines)
