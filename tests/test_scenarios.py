"""Scenario files, fault profiles, A/B power loss and the report of the device simulator.

The power-loss tests run one terminal on the in-memory link (tests/test_device_sim.py)
against a local HTTP server, once per named point; the fleet test runs a scenario file
against the real broker, database and controller.
"""

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from device_sim import __main__ as cli
from device_sim import config as models
from device_sim.config import Faults, PowerLossPoint, SimConfig
from device_sim.device import TerminalProfile
from device_sim.download import DownloadFailedError, DownloadPlan, download
from device_sim.fleet import Simulator
from device_sim.report import render_summary
from device_sim.scenario import ScenarioError, load_scenario
from device_sim.storage import Boot, Flash, StorageError, checksum
from fleet.db import Repository
from fleet.embedded import Mosquitto
from fleet.protocol import MessageKind, PackageKind, PackageRef
from fleet.states import FINAL, ExecState
from tests.conftest import TERMINAL_SECRET
from tests.stack import Stack, eventually, make_settings, running, wait_status
from tests.test_device_sim import (
    INITIAL,
    WAIT,
    ArtifactServer,
    FakeLink,
    assert_wire_consistent,
    collapsed,
    desired,
    make_config,
    package,
)
from tests.test_device_sim import running as running_fake

S = ExecState
P = PowerLossPoint
ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "device_sim" / "scenarios").glob("*.toml"))


@pytest.fixture
async def artifacts() -> AsyncIterator[ArtifactServer]:
    server = ArtifactServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server
        listener.close()
        await listener.wait_closed()


# -- A/B storage: the bootloader's rules ---------------------------------------------


def test_flash_switch_is_atomic_and_an_unconfirmed_slot_falls_back() -> None:
    old, new = {"os": "1"}, {"os": "2"}
    data = {"pending_txns": [{"id": "a"}], "config": {}}
    flash = Flash(old, data)
    before = checksum(flash.data)
    with pytest.raises(StorageError):
        flash.switch()  # no backup yet
    flash.start_backup()
    flash.finish_backup()
    flash.start_write()
    assert flash.inactive is None
    with pytest.raises(StorageError):
        flash.switch()  # a half-written slot never becomes active
    assert flash.boot() is Boot.NORMAL
    assert flash.versions == old

    flash.start_write()
    flash.finish_write(new)
    flash.switch()
    assert (flash.versions, flash.confirmed) == (new, False)
    assert flash.boot() is Boot.FIRST  # the new slot's one try
    flash.start_migration()
    assert not flash.data_complete
    # The power goes mid-migration: the next boot finds the slot unconfirmed, no try left.
    assert flash.boot() is Boot.FELL_BACK
    assert (flash.versions, flash.confirmed, flash.data_complete) == (old, True, True)
    assert checksum(flash.data) == before
    assert flash.consistent()

    flash.switch()
    assert flash.boot() is Boot.FIRST
    flash.start_migration()
    flash.finish_migration()
    flash.confirm()
    assert flash.boot() is Boot.NORMAL
    assert (flash.versions, checksum(flash.data)) == (new, before)
    flash.discard_backup()
    with pytest.raises(StorageError):
        flash.restore_data()


# -- power loss at each named install point ------------------------------------------

#: The final report when the terminal comes back on its old release after a loss there.
ON_OLD = {
    P.AFTER_DOWNLOAD: ("failed", "install"),
    P.DURING_BACKUP: ("failed", "install"),
    P.DURING_WRITE_INACTIVE_SLOT: ("rolled_back", "install"),
    P.AFTER_WRITE_BEFORE_SWITCH: ("rolled_back", "install"),
    P.DURING_SLOT_SWITCH: ("rolled_back", "install"),
    P.DURING_FIRST_BOOT: ("rolled_back", "install"),
    P.DURING_SELF_TEST: ("rolled_back", "self_test"),
}
#: Points after which the terminal comes back on the new release and carries on.
ON_NEW = {P.AFTER_SWITCH_BEFORE_REBOOT, P.AFTER_CONFIRM}


def _packages(server: ArtifactServer, kind: str) -> list[PackageRef]:
    firmware = package(server, "os", PackageKind.FIRMWARE, "2.0", size=20_000)
    app = package(server, "pay", PackageKind.APP, "3.1", size=20_000)
    params = package(server, "cfg", PackageKind.PARAMS, "2", size=2_000)
    return {"firmware": [firmware], "params": [params], "bundle": [firmware, app]}[kind]


@pytest.mark.parametrize("kind", ["firmware", "params", "bundle"])
@pytest.mark.parametrize("point", list(PowerLossPoint))
async def test_power_loss_leaves_old_or_new_release_and_the_data_intact(
    artifacts: ArtifactServer, point: PowerLossPoint, kind: str
) -> None:
    faults = Faults(power_loss_rate=1.0, power_loss_points=frozenset({point}))
    async with running_fake(make_config(faults=faults)) as h:
        terminal = h.terminal
        before, txns = terminal.data_checksum, terminal.pending_txns
        packages = _packages(artifacts, kind)
        h.update(packages)
        record = await h.final()

        # Exactly the one loss per package that got that far, each followed by a boot.
        assert set(record.power_losses) == {point.value}
        hellos = h.link.of_kind(MessageKind.HELLO)
        assert len({hello.boot_id for hello in hellos}) == len(hellos)
        assert hellos[-1].versions == terminal.versions

        # Old or new, package by package, never in between; the flash is settled.
        names = [p.name for p in packages]
        new = {p.name: p.version for p in packages}
        versions = terminal.versions
        assert all(versions[n] in {INITIAL[n], new[n]} for n in names)
        assert terminal.storage_settled() is True
        last, failing = record.events[-1], 0
        if record.final_state is S.SUCCEEDED:
            assert point in ON_NEW or point is P.DURING_SLOT_SWITCH
            assert {n: versions[n] for n in names} == new
        else:
            assert point in ON_OLD
            assert (record.final_state.value, last.stage) == ON_OLD[point]  # type: ignore[union-attr]
            assert last.error_code == "POWER_LOSS"
            assert last.detail is not None
            assert last.detail.startswith(f"power lost {point.value}")
            failing = names.index(last.package)  # type: ignore[arg-type]
            assert [versions[n] for n in names[failing:]] == [INITIAL[n] for n in names[failing:]]
            assert [versions[n] for n in names[:failing]] == [new[n] for n in names[:failing]]
        if point is not P.DURING_SLOT_SWITCH:
            assert (record.final_state is S.SUCCEEDED) == (point in ON_NEW)

        # The data survived, and the report says so.
        assert record.data_intact
        assert terminal.data_checksum == before
        assert terminal.pending_txns == txns
        assert terminal.data_intact() is True
        report = h.sim.report()
        assert report["integrity"]["ok"], report["integrity"]
        assert report["faults"][f"power_loss.{point.value}"] == len(record.power_losses)
        assert report["campaigns"]["1"]["power_losses"] == len(record.power_losses)
        recoveries = report["recoveries"]
        assert ("resumed" in recoveries) == (record.final_state is S.SUCCEEDED or failing > 0)
        fell_back = point in {P.DURING_FIRST_BOOT, P.DURING_SELF_TEST}
        assert ("fell_back" in recoveries) == fell_back

        # Every report is one the controller's state machine accepts, in order.
        assert_wire_consistent(h, record)
        states = collapsed(record.states)
        assert states[-1] in FINAL
        assert states.count(S.QUEUED) == 1


# -- fault profiles and refusals, in memory -------------------------------------------


async def test_truncated_download_resumes_with_range_or_fails_cleanly(
    artifacts: ArtifactServer,
) -> None:
    data = bytes(range(256)) * 200
    url, size, digest = artifacts.add("/cut", data)
    seen: list[str] = []

    async def ignore(_offset: int) -> None:
        return None

    plan = DownloadPlan(url=url, size=size, chunk_bytes=4096, truncate_at=20_000, retry_s=0)
    result = await download(plan, ignore, on_fault=seen.append)
    assert (result.length, result.sha256, result.resumed) == (size, digest, 1)
    assert seen == ["truncate"]
    assert artifacts.requests[-1] == ("/cut", "bytes=20000-")

    once = DownloadPlan(url=url, size=size, truncate_at=100, max_attempts=1, retry_s=0)
    with pytest.raises(DownloadFailedError) as failed:
        await download(once, ignore)
    assert failed.value.code == "DOWNLOAD_FAILED"
    assert "100 of" in failed.value.detail


async def test_busy_hours_and_low_battery_refuse_installs(artifacts: ArtifactServer) -> None:
    config = make_config(
        count=4,
        terminals_per_merchant=2,
        merchant_profiles=[{"name": "always_open", "busy_hours": ["00:00-24:00"]}],
        battery={"start_min_pct": 5, "start_max_pct": 5, "min_install_pct": 20},
    )
    busy = config.model_copy(
        update={"battery": config.battery.model_copy(update={"min_install_pct": 0})}
    )
    async with running_fake(busy) as h:
        pkg = package(artifacts)
        tids = list(h.sim.terminals)
        assert all(h.sim.terminals[t].busy for t in tids)
        h.publish_desired(desired([pkg]))
        h.start(1, 1, may_postpone=True, tid=tids[0])
        h.start(1, 1, may_postpone=False, tid=tids[1])
        postponed = await h.sim.wait_terminal_settled(tids[0], 1, timeout_s=WAIT)
        assert postponed.postponed
        assert postponed.events[-1].stage == "postponed"
        forced = await h.sim.wait_terminal_final(tids[1], 1, timeout_s=WAIT)
        # A forced start waits for the sale in progress, then installs.
        assert forced.final_state is S.SUCCEEDED
        assert collapsed(forced.states)[:2] == [S.QUEUED, S.DEFERRED]
        assert forced.events[1].stage == "busy"
        assert h.sim.report()["refusals"] == {"deferred.busy": 1, "postponed.busy_hours": 1}

    artifacts.requests.clear()
    async with running_fake(config.model_copy(update={"merchant_profiles": []})) as h:
        pkg = package(artifacts)
        tids = list(h.sim.terminals)
        assert h.terminal.heartbeat().battery_pct == 5
        h.publish_desired(desired([pkg]))
        h.start(1, 1, may_postpone=True, tid=tids[0])
        h.start(1, 1, may_postpone=False, tid=tids[1])
        postponed = await h.sim.wait_terminal_settled(tids[0], 1, timeout_s=WAIT)
        assert (postponed.events[-1].stage, postponed.events[-1].error_code) == (
            "postponed",
            "LOW_BATTERY",
        )
        refused = await h.sim.wait_terminal_final(tids[1], 1, timeout_s=WAIT)
        last = refused.events[-1]
        assert (refused.final_state, last.stage, last.error_code) == (
            S.FAILED,
            "install",
            "LOW_BATTERY",
        )
        assert S.DOWNLOADING not in refused.states  # nothing fetched for nothing
        assert artifacts.requests == []


async def test_clock_skew_disconnects_and_flapping(artifacts: ArtifactServer) -> None:
    faults = Faults(
        clock_skew_share=1.0,
        clock_skew_max_s=30,  # under the test commands' 60 s expiry, which it judges by its clock
        disconnect_per_h=3600 * 50,
        offline_s=0.02,
        flap_per_h=3600 * 20,
        flap_count=3,
        flap_window_s=0.06,
    )
    async with running_fake(make_config(faults=faults)) as h:
        skew = h.terminal.profile.clock_skew_s
        assert skew != 0
        await h.link.wait_for(lambda: len(h.link.of_kind(MessageKind.HELLO)) >= 6)
        hellos = h.link.of_kind(MessageKind.HELLO)
        # One boot, many connections: each reconnect announces itself again.
        assert len({hello.boot_id for hello in hellos}) == 1
        now = time.time()
        assert abs(hellos[-1].ts - (now + skew)) < 5
        h.update([package(artifacts)])
        record = await h.final()
        assert record.final_state is S.SUCCEEDED
        assert all(abs(e.ts - (now + skew)) < 30 for e in record.events)
        report = h.sim.report()
    assert report["faults"]["disconnect"] >= 1
    assert report["faults"]["flap"] >= 1
    assert report["fleet"]["clock_skewed"] == 1
    assert report["timing"]["connects"] >= 6
    assert report["integrity"]["ok"]


# -- a scenario file against the real broker, database and controller ---------------

FLEET_SCENARIO = """
name = "test-fleet"
seed = 4
count = 30
groups = ["north", "south"]
terminals_per_merchant = 3
initial_versions = { os = "1.0.0", cfg = "1" }

[models]
P400 = 3
VX-690 = 1

[model_versions.VX-690]
os = "0.9.0"

[timezones]
"Europe/Berlin" = 2
"Asia/Tokyo" = 1

[[merchant_profiles]]
name = "shop"
weight = 3

[[merchant_profiles]]
name = "always_busy"
weight = 1
busy_hours = ["00:00-24:00"]

[link_classes.lte]
weight = 2
bytes_per_s = 4_000_000
jitter = 0.3

[link_classes.3g]
weight = 1
bytes_per_s = 800_000

[battery]
start_min_pct = 5
start_max_pct = 100
min_install_pct = 20

[timing]
heartbeat_s = 0.5
install_s = 0.05
reboot_s = 0.05
self_test_s = 0.02
busy_s = 0.2
download_retry_s = 0.01
reconnect_max_s = 0.5

[faults]
download_drop_rate = 0.2
truncate_rate = 0.3
corrupt_rate = 0.1
power_loss_rate = 0.4
disconnect_per_h = 720
offline_s = 0.1
flap_per_h = 60
flap_count = 3
flap_window_s = 0.6
clock_skew_share = 0.5
clock_skew_max_s = 120
"""


async def test_a_scenario_fleet_with_faults_completes_and_the_report_matches_the_database(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    scenario = tmp_path / "fleet.toml"
    scenario.write_text(FLEET_SCENARIO)
    config = load_scenario(
        scenario,
        {"broker_host": broker.host, "broker_port": broker.port, "secret": TERMINAL_SECRET},
    )
    simulator = Simulator(config)
    terminals = simulator.terminals
    ids = list(terminals)
    assert len(ids) == 30
    groups: dict[str, Sequence[str]] = {
        g: [t for t in ids if terminals[t].profile.groups == (g,)] for g in config.groups
    }
    assert all(groups.values())
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    await stack.provision(ids, groups, model="unknown")
    await stack.add_package("os", "2.0.0", ["P400", "VX-690"], size=64 * 1024)
    await stack.add_package("cfg", "2", ["P400", "VX-690"], size=4096, kind=PackageKind.PARAMS)
    await stack.start_controller()
    try:
        async with running(simulator):
            await simulator.wait_connected(timeout_s=30)

            async def all_said_hello() -> bool:
                # The start judges members by their hello (model, versions): wait for all.
                async with repo.connection() as q:
                    known = await q._conn.fetchval(
                        "SELECT count(*) FROM terminals WHERE boot_id IS NOT NULL"
                    )
                return bool(known == len(ids))

            await eventually(all_said_hello, what="every terminal's hello")
            campaign_id = await stack.campaign(
                list(groups),
                [("os", "2.0.0"), ("cfg", "2")],
                waves=[100],
                failure_threshold=1.0,
                max_postpones=1,
                postpone_delay_s=0.3,
                retries={"backoff_s": 0.2, "download": 2, "verify": 2, "install": 1},
            )
            # Every terminal's latest attempt final, then the campaign (its health gate).
            await simulator.wait_final(campaign_id, len(ids), timeout_s=120)
            assert await wait_status(repo, campaign_id, {"completed"}) == "completed"
        report = simulator.report()
        async with repo.connection() as q:
            db = {t: state for t, (state, _) in (await q.execution_states(campaign_id)).items()}
            codes = collections.Counter(
                r["error_code"]
                for r in await q._conn.fetch("SELECT error_code FROM update_events")
                if r["error_code"]
            )
    finally:
        await stack.stop_controller()

    # Counts per final state: the report's are the database's.
    latest = {r.tid: r for r in simulator.campaign_records(campaign_id)}
    assert db == {tid: r.final_state.value for tid, r in latest.items()}  # type: ignore[union-attr]
    assert report["campaigns"][str(campaign_id)]["outcome"] == dict(
        sorted(collections.Counter(db.values()).items())
    )
    assert report["outcome"] == report["campaigns"][str(campaign_id)]["outcome"]
    assert report["connected"] == report["terminals"] == 30

    # Faults were injected and counted, and each left its trace on the wire.
    faults = report["faults"]
    for kind in ("download_drop", "truncate", "disconnect"):
        assert faults.get(kind, 0) > 0, (kind, faults)
    records = simulator.records()
    losses = sum(len(r.power_losses) for r in records)
    assert losses > 0
    assert sum(n for k, n in faults.items() if k.startswith("power_loss.")) == losses
    sent = collections.Counter(
        e.error_code for r in records for e in (*r.events, *r.resent) if e.error_code
    )
    for code in ("POWER_LOSS", "LOW_BATTERY", "HASH_MISMATCH"):
        assert codes[code] == sent[code], code
    assert sent["POWER_LOSS"] > 0
    assert report["refusals"].get("postponed.low_battery", 0) > 0
    assert report["refusals"].get("postponed.busy_hours", 0) > 0
    assert report["fleet"]["clock_skewed"] > 0
    assert set(report["fleet"]["link_classes"]) == {"lte", "3g"}

    # Old or new, never between; the local data of every terminal survived.
    for tid, terminal in terminals.items():
        before = latest[tid].versions_before
        assert terminal.versions["os"] in {before["os"], "2.0.0"}
        assert terminal.versions["cfg"] in {"1", "2"}
        if db[tid] == "succeeded":
            assert (terminal.versions["os"], terminal.versions["cfg"]) == ("2.0.0", "2")
    assert all(r.data_intact for r in records if r.final_state is not None)
    integrity = report["integrity"]
    assert integrity["ok"], integrity
    assert (integrity["terminals_intact"], integrity["terminals_not_intact"]) == (30, 0)
    assert report["storage"] == {"settled": 30, "unsettled": 0, "offenders": []}
    assert report["timing"]["connect_s"]["p50"] >= 0
    assert report["timing"]["update_s"]["max"] > 0
    assert "local data OK" in render_summary(report)


# -- the scenario format, the CLI and the docs -----------------------------------------


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenarios_load_and_build_their_fleet(path: Path) -> None:
    config = load_scenario(path, {"count": 40, "start": 1000})
    assert config.name == path.stem
    simulator = Simulator(config, link_factory=lambda _p: FakeLink({}))
    profiles = [t.profile for t in simulator.terminals.values()]
    assert profiles[0].tid == config.terminal_id(1000)
    assert {p.model for p in profiles} <= set(config.models)
    assert {p.timezone for p in profiles} <= set(config.timezones)


def test_processes_sharing_a_fleet_by_id_range_build_the_same_terminals() -> None:
    path = ROOT / "device_sim" / "scenarios" / "pos-retail-50k.toml"
    whole = load_scenario(path, {"count": 60, "start": 100})
    halves = [load_scenario(path, {"count": 30, "start": s}) for s in (100, 130)]
    one = [TerminalProfile.from_config(whole, i) for i in range(100, 160)]
    two = [TerminalProfile.from_config(c, i) for c in halves for i in range(c.start, c.start + 30)]
    assert one == two
    # The draws are spread as the weights say, and merchants keep their kind.
    assert len({p.link_class for p in one}) > 1
    kinds = collections.defaultdict(set)
    for profile in one:
        kinds[profile.merchant_id].add(profile.merchant_kind)
    assert all(len(k) == 1 for k in kinds.values())
    versions = {p.versions["os"] for p in one if p.model == "VX-690"}
    assert versions <= {"1.0.0", "0.9.0"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "count = 3\n[faults]\ncorupt_rate = 0.1\n",
            "faults.corupt_rate: unknown key (did you mean corrupt_rate?)",
        ),
        (
            "[faults]\ncorrupt_rate = 1.5\n",
            "faults.corrupt_rate: Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            "[battery]\nstart_min_pct = 90\nstart_max_pct = 10\n",
            "battery: start_min_pct is above start_max_pct",
        ),
        (
            'timezones = ["Europe/Berlin", "Mars/Olympus"]\n',
            "timezones.Mars/Olympus: unknown time zone 'Mars/Olympus'",
        ),
        (
            '[[merchant_profiles]]\nname = "bar"\nbusy_hours = ["18:00-25:00"]\n',
            "merchant_profiles.0.busy_hours.0: '18:00-25:00' is not a non-empty range",
        ),
        ("[link_classes.lte]\nweight = 2\n", "link_classes.lte.bytes_per_s: required"),
        (
            '[faults]\npower_loss_points = ["during_lunch"]\n',
            "faults.power_loss_points.0: Input should be 'after_download'",
        ),
        ("[models]\nA = 0\n", "models.A: Input should be greater than 0"),
        ('group_rule = "by_model"\n', "group_by: group_rule by_model needs a map"),
        ('[model_versions.NOPE]\nos = "2"\n', "model_versions: 'NOPE' is not one of the models"),
        ("count = \n", "not valid TOML: Invalid value (at line 1, column 9)"),
    ],
)
def test_scenario_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith(f"{path}: ")


def test_cli_scenario_with_overrides_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ROOT / "device_sim" / "scenarios" / "smoke.toml"
    argv = ["--scenario", str(path), "--start", "7", "--count", "3", "--check"]
    argv += ["--corrupt-rate", "0.5", "--set", "faults.truncate_rate=0.25"]
    assert cli.main([*argv, "--broker", "broker.example:1884"]) == 0
    config = SimConfig.model_validate_json(capsys.readouterr().out)
    assert (config.name, config.start, config.count) == ("smoke", 7, 3)
    assert (config.broker_host, config.broker_port) == ("broker.example", 1884)
    assert (config.faults.corrupt_rate, config.faults.truncate_rate) == (0.5, 0.25)
    # What the options leave alone keeps the scenario's value, not the option's default.
    assert config.faults.download_drop_rate == 0.1
    assert config.timing.heartbeat_s == 5

    bad = tmp_path / "bad.toml"
    bad.write_text("[timing]\nheartbeat_s = 0\n")
    assert cli.main(["--scenario", str(bad), "--check"]) == 2
    assert "timing.heartbeat_s: Input should be greater than 0" in capsys.readouterr().err
    assert cli.main(["--check", "--set", "faults.nope=1"]) == 2
    assert "faults.nope: unknown key" in capsys.readouterr().err


def test_report_summary_and_exit_status_of_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    # No broker needed: a run of zero terminals still reports, and says the data is fine.
    assert cli.main(["--count", "0", "--duration", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["integrity"]["ok"]
    assert render_summary(report).splitlines()[0].startswith("device_sim (no scenario name)")


def test_docs_describe_every_scenario_key_and_power_loss_point() -> None:
    text = (ROOT / "docs" / "simulator.md").read_text()
    for model in (
        models.SimConfig,
        models.Timing,
        models.Faults,
        models.Battery,
        models.LinkClass,
        models.MerchantProfile,
    ):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name}"
    for point in PowerLossPoint:
        assert f"| `{point.value}` |" in text, point
    for path in SCENARIOS:
        assert f"device_sim/scenarios/{path.name}" in text, path
