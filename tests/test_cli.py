"""The `fleet` command against a real database and broker, as an operator would use it."""

import json
import os
from pathlib import Path

import pytest

from fleet.__main__ import main
from fleet.embedded import Mosquitto
from tests.conftest import CONTROLLER_PASSWORD, TERMINAL_SECRET


@pytest.fixture
def cli_env(
    broker: Mosquitto, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv("FLEET_DATABASE_URL", database_url)
    monkeypatch.setenv("FLEET_MQTT_PORT", str(broker.port))
    monkeypatch.setenv("FLEET_MQTT_PASSWORD", CONTROLLER_PASSWORD)
    monkeypatch.setenv("FLEET_TERMINAL_SECRET", TERMINAL_SECRET)
    monkeypatch.setenv("FLEET_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    return tmp_path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_operator_workflow(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = cli_env / "os.bin"
    package.write_bytes(os.urandom(4096))
    assert "none (up to date)" in _run(capsys, "migrate")
    assert "provisioned 4 terminals T000000..T000003" in _run(
        capsys, "terminals", "provision", "--count", "4", "--model", "P400"
    )
    _run(capsys, "group", "create", "north")
    assert "2 terminals in group north" in _run(
        capsys, "group", "assign", "north", "T000000", "T000001"
    )
    _run(
        capsys,
        "package",
        "add",
        str(package),
        "--name",
        "os",
        "--kind",
        "firmware",
        "--version",
        "2.0.0",
        "--models",
        "P400",
    )
    assert "created as 1 (draft)" in _run(
        capsys,
        "campaign",
        "create",
        "spring",
        "--group",
        "north",
        "--package",
        "os=2.0.0",
        "--waves",
        "50,100",
        "--window",
        "23:00-05:00",
        "--rate",
        "60",
        "--forced",
        "--deadline",
        "download=900",
    )
    plan = json.loads(_run(capsys, "campaign", "plan", "spring", "--json"))
    assert sum(w["terminals"] for w in plan["waves"]) == 2
    assert plan["eta"] is not None
    assert "started with 2 executions" in _run(capsys, "campaign", "start", "spring")
    _run(capsys, "campaign", "pause", "spring")
    status = json.loads(_run(capsys, "campaign", "status", "spring", "--json"))
    assert status["status"] == "paused"
    assert status["totals"] == {"pending": 2}
    _run(capsys, "campaign", "resume", "1")
    text = _run(capsys, "campaign", "status", "1")
    assert "running" in text
    assert "wave 1 [" in text
    _run(capsys, "campaign", "cancel", "spring")
    status = json.loads(_run(capsys, "campaign", "status", "spring", "--json"))
    assert status["status"] == "canceled"
    # No controller ran, so no terminal was told to start: they end canceled at once.
    assert status["totals"] == {"canceled": 2}
    assert "audit chain intact" in _run(capsys, "audit", "verify")
    log = _run(capsys, "campaign", "audit", "spring")
    for action in ("campaign_created", "campaign_started", "campaign_paused", "campaign_canceled"):
        assert action in log


def test_refusals_are_clear_errors(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["campaign", "start", "nope"]) == 1
    assert "no campaign 'nope'" in capsys.readouterr().err
    assert main(["campaign", "create", "x", "--group", "g", "--package", "os=9"]) == 1
    assert "no group 'g'" in capsys.readouterr().err
    assert main(["group", "create", "g"]) == 0
    capsys.readouterr()
    assert main(["campaign", "create", "x", "--group", "g", "--package", "os=9"]) == 1
    assert "no package 'os=9'" in capsys.readouterr().err


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "FLEET_DATABASE_URL" in out
    assert "FLEET_TERMINAL_SECRET" in out
