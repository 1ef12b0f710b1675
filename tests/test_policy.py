"""Pure rules: windows, version order, targeting verdicts and the plan's ETA simulation."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from fleet.planning import simulate
from fleet.policy import CampaignPolicy, TargetFilter, Wave, Window, valid_timezone, version_key
from fleet.targeting import Exclusion, Package, Terminal, exclusion

BERLIN = ZoneInfo("Europe/Berlin")


def test_window_spanning_midnight() -> None:
    window = Window(start="22:00", end="06:00")
    assert window.contains(datetime(2026, 11, 26, 23, 30, tzinfo=BERLIN))
    assert window.contains(datetime(2026, 11, 27, 5, 59, tzinfo=BERLIN))
    assert not window.contains(datetime(2026, 11, 27, 6, 0, tzinfo=BERLIN))
    assert not window.contains(datetime(2026, 11, 27, 12, 0, tzinfo=BERLIN))
    day = Window(start="09:00", end="17:00")
    assert day.contains(datetime(2026, 11, 27, 12, 0, tzinfo=BERLIN))
    assert not day.contains(datetime(2026, 11, 27, 17, 0, tzinfo=BERLIN))
    with pytest.raises(ValueError, match="empty"):
        Window(start="06:00", end="06:00")


def test_versions_order_numerically_and_time_zones_are_checked() -> None:
    assert version_key("1.2.10") > version_key("1.2.9") > version_key("1.2")
    assert version_key("2.0.0") > version_key("1.99.99")
    assert valid_timezone("Asia/Tokyo")
    assert not valid_timezone("Mars/Olympus")
    assert not valid_timezone("../etc/passwd")


def _terminal(**kw: object) -> Terminal:
    base: dict[str, object] = {
        "id": "T1",
        "model": "P400",
        "merchant_id": "M1",
        "versions": {"os": "1.0.0", "pay": "1.0.0"},
        "attributes": {"region": "eu"},
    }
    return Terminal(**(base | kw))  # type: ignore[arg-type]


def test_exclusion_reasons() -> None:
    os2 = Package("os", "2.0.0", ("P400",), from_versions=("1.0.0",))
    pay3 = Package("pay", "3.0.0", ("P400",), requires={"os": "2.0.0"})
    open_filter = TargetFilter()

    def verdict(terminal: Terminal, bundle: list[Package], **kw: object) -> Exclusion | None:
        found = exclusion(terminal, kw.pop("target", open_filter), bundle, allow_downgrade=False)  # type: ignore[arg-type]
        return None if found is None else found[0]

    assert verdict(_terminal(), [os2, pay3]) is None  # the bundle brings os 2.0.0 first
    assert verdict(_terminal(), [pay3]) is Exclusion.UNMET_DEPENDENCY
    assert verdict(_terminal(model="VX-690"), [os2]) is Exclusion.INCOMPATIBLE_MODEL
    assert verdict(_terminal(versions={"os": "0.9"}), [os2]) is Exclusion.INCOMPATIBLE_VERSION
    assert verdict(_terminal(versions={"os": "3.0"}), [Package("os", "2.0.0", ())]) is (
        Exclusion.DOWNGRADE
    )
    assert verdict(_terminal(), [os2], target=TargetFilter(regions=["us"])) is Exclusion.FILTER
    assert verdict(_terminal(), [os2], target=TargetFilter(versions={"pay": ["1.0.0"]})) is None
    assert verdict(_terminal(), [os2], target=TargetFilter(exclude_models=["P400"])) is (
        Exclusion.OPERATOR
    )


def test_eta_waits_for_windows_and_follows_the_rate_limit() -> None:
    start = datetime(2026, 11, 26, 21, 0, tzinfo=UTC).timestamp()  # 22:00 in Berlin
    policy = CampaignPolicy(rate_per_min=5, expected_duration_s=60)
    # Berlin is open now: 10 terminals at 5 a minute; UTC opens in an hour.
    schedule = simulate(policy, [{"Europe/Berlin": 10, "UTC": 5}], start=start)
    assert schedule.eta == start + 3600 + 60
    fast = simulate(policy, [{"Europe/Berlin": 10}], start=start)
    assert fast.eta == start + 60 + 60  # second batch a minute later, one minute each


def test_eta_opens_waves_after_soak() -> None:
    start = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
    policy = CampaignPolicy(
        waves=[Wave(percent=10, soak_s=1800), Wave(percent=100)],
        window=None,
        expected_duration_s=600,
    )
    schedule = simulate(policy, [{"UTC": 10}, {"UTC": 90}], start=start)
    assert schedule.opens_at[2] == start + 600 + 1800
    assert schedule.eta == start + 600 + 1800 + 600
