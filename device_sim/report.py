"""The end-of-run report: a JSON-able dict for machines, and a summary for people.

docs/simulator.md describes every key. The report judges the run too: `integrity.ok`
is false when any terminal's local data did not survive an update (or is not what it
was at start-up), and the CLI exits non-zero on it.
"""

import collections
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from device_sim.device import CampaignRecord

if TYPE_CHECKING:
    from device_sim.fleet import Simulator

#: Offenders listed by name; the counts cover all of them.
LISTED = 20


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99/max of `values` (empty dict when there are none)."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "p50": round(rank(50), 3),
        "p90": round(rank(90), 3),
        "p99": round(rank(99), 3),
        "max": round(ordered[-1], 3),
    }


def _sorted_counts(counter: Mapping[str, int]) -> dict[str, int]:
    return {key: counter[key] for key in sorted(counter) if counter[key]}


def _campaign(records: list[CampaignRecord], latest: list[CampaignRecord]) -> dict[str, Any]:
    finals = collections.Counter(r.final_state.value for r in records if r.final_state)
    outcome = collections.Counter(r.final_state.value for r in latest if r.final_state)
    durations = [r.duration_s for r in records if r.final_state and r.duration_s is not None]
    return {
        "attempts": len(records),
        "final": _sorted_counts(finals),
        # Each terminal once: the final state of its latest attempt.
        "outcome": _sorted_counts(outcome),
        "abandoned": sum(r.abandoned for r in records),
        "postponed": sum(r.postponed for r in records),
        "in_progress": sum(not r.settled for r in records),
        "power_losses": sum(len(r.power_losses) for r in records),
        "duration_s": percentiles(durations),
    }


def build_report(sim: "Simulator") -> dict[str, Any]:
    """Summarise a run: states, timings, faults, the fleet built, and the data check.

    Per campaign, `attempts` counts every attempt (a postponed or failed one and its
    successor count twice); `final` counts the final states reported, `outcome` each
    terminal's latest final state, and `postponed`, `abandoned` (canceled before
    installing) and `in_progress` the rest.
    """
    config, terminals = sim.config, list(sim.terminals.values())
    by_campaign: collections.defaultdict[int, list[CampaignRecord]] = collections.defaultdict(list)
    violations: list[str] = []
    checked = 0
    for record in sim.records():
        by_campaign[record.campaign_id].append(record)
        if record.data_intact is not None:
            checked += 1
            if not record.data_intact:
                violations.append(f"{record.tid}/c{record.campaign_id}#{record.attempt}")
    campaigns = {
        str(cid): _campaign(records, sim.campaign_records(cid))
        for cid, records in sorted(by_campaign.items())
    }
    outcome: collections.Counter[str] = collections.Counter()
    for campaign in campaigns.values():
        outcome.update(campaign["outcome"])

    # Nothing but an update touches the data store, so every terminal not updating must
    # still hold what it did at start-up; one updating (or bricked) cannot be judged now.
    intact, unchecked, unsettled = 0, 0, []
    for terminal in terminals:
        survived = terminal.data_intact()
        if survived is None:
            unchecked += 1
        elif survived:
            intact += 1
        else:
            violations.append(f"{terminal.tid}/now")
        if terminal.storage_settled() is False:
            unsettled.append(terminal.tid)
    not_intact = len(terminals) - intact - unchecked
    stats = sim.stats
    durations = [
        r.duration_s
        for records in by_campaign.values()
        for r in records
        if r.final_state and r.duration_s is not None
    ]
    versions: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for terminal in terminals:
        for name, version in terminal.versions.items():
            versions[name][version] += 1
    return {
        "scenario": {
            "name": config.name,
            "first": config.terminal_id(config.start) if config.count else None,
            "count": config.count,
            "seed": config.seed,
        },
        "terminals": len(terminals),
        "connected": sim.connected_count,
        "elapsed_s": sim.elapsed_s,
        "events_sent": sum(t.seq for t in terminals),
        "heartbeats_sent": sum(t.heartbeats_sent for t in terminals),
        "bricked": sum(t.bricked for t in terminals),
        "updating": sum(t.updating for t in terminals),
        "outcome": _sorted_counts(outcome),
        "campaigns": campaigns,
        "versions": {name: _sorted_counts(c) for name, c in sorted(versions.items())},
        "timing": {
            "update_s": percentiles(durations),
            "connect_s": percentiles(stats.connect_s),
            "connects": len(stats.connect_s),
            "all_connected_s": sim.all_connected_s,
        },
        "faults": _sorted_counts(stats.faults),
        "refusals": _sorted_counts(stats.refusals),
        "recoveries": _sorted_counts(stats.recoveries),
        "fleet": _fleet(terminals),
        "storage": {
            "settled": len(terminals) - unchecked - len(unsettled),
            "unsettled": len(unsettled),
            "offenders": unsettled[:LISTED],
        },
        "integrity": {
            "checked": checked,
            "ok": not violations and not unsettled,
            "terminals_intact": intact,
            "terminals_not_intact": not_intact,
            "terminals_unchecked": unchecked,
            "violations": violations[:LISTED],
            "violation_count": len(violations),
        },
    }


def _fleet(terminals: list[Any]) -> dict[str, Any]:
    """How the scenario's draws came out for this process's terminals."""
    models: collections.Counter[str] = collections.Counter()
    zones: collections.Counter[str] = collections.Counter()
    links: collections.Counter[str] = collections.Counter()
    merchants: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    skewed = charging = 0
    for terminal in terminals:
        profile = terminal.profile
        models[profile.model] += 1
        zones[profile.timezone] += 1
        links[profile.link_class or "default"] += 1
        merchants[profile.merchant_kind or "default"] += 1
        groups.update(profile.groups)
        skewed += profile.clock_skew_s != 0
        charging += profile.charging
    return {
        "models": _sorted_counts(models),
        "timezones": _sorted_counts(zones),
        "groups": _sorted_counts(groups),
        "link_classes": _sorted_counts(links),
        "merchant_kinds": _sorted_counts(merchants),
        "clock_skewed": skewed,
        "charging": charging,
    }


def _line(values: Mapping[str, float]) -> str:
    return " ".join(f"{key} {value:g}" for key, value in values.items()) or "-"


def render_summary(report: Mapping[str, Any]) -> str:
    """A few lines for people: what ran, how it ended, and whether the data survived."""
    scenario, timing, integrity = report["scenario"], report["timing"], report["integrity"]
    name = scenario["name"] or "(no scenario name)"
    lines = [
        (
            f"device_sim {name}: {report['terminals']} terminals from {scenario['first']},"
            f" ran {report['elapsed_s']:g} s"
        ),
        (
            f"  connected {report['connected']}/{report['terminals']}"
            f" (all after {timing['all_connected_s']} s); {timing['connects']} connections,"
            f" seconds {_line(timing['connect_s'])}"
        ),
    ]
    for cid, campaign in report["campaigns"].items():
        lines.append(
            f"  campaign {cid}: {campaign['attempts']} attempts; outcome"
            f" {_line(campaign['outcome'])}; postponed {campaign['postponed']},"
            f" in progress {campaign['in_progress']}, power losses {campaign['power_losses']}"
        )
        lines.append(f"    update seconds {_line(campaign['duration_s'])}")
    lines.extend(f"  {key}: {_line(report[key])}" for key in ("faults", "refusals", "recoveries"))
    verdict = "OK" if integrity["ok"] else "NOT OK"
    lines.append(
        f"  local data {verdict}: {integrity['terminals_intact']} intact,"
        f" {integrity['terminals_not_intact']} not intact,"
        f" {integrity['terminals_unchecked']} not judged (updating or bricked);"
        f" {integrity['checked']} attempts checked"
    )
    if integrity["violations"]:
        lines.append(
            f"  offenders ({integrity['violation_count']}): {', '.join(integrity['violations'])}"
        )
    storage = report["storage"]
    if storage["unsettled"]:
        lines.append(
            f"  flash unsettled ({storage['unsettled']}): {', '.join(storage['offenders'])}"
        )
    return "\n".join(lines)
