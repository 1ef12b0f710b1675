"""The docs stay true to the code: settings, states, reasons and vectors all documented."""

from pathlib import Path

from fleet.policy import FAILURE_CLASSES
from fleet.protocol import CommandKind, RejectReason
from fleet.settings import FleetSettings
from fleet.states import PHASE, ExecState
from fleet.targeting import Exclusion
from tests.test_protocol import BUCKET_VECTORS

DOCS = Path(__file__).parent.parent / "docs"


def test_operations_lists_every_setting() -> None:
    text = (DOCS / "operations.md").read_text()
    for name in FleetSettings.model_fields:
        assert f"`FLEET_{name.upper()}`" in text, name


def test_protocol_publishes_the_bucket_vectors() -> None:
    text = (DOCS / "protocol.md").read_text()
    for terminal_id, bucket in BUCKET_VECTORS.items():
        assert f"| `{terminal_id}` | {bucket} |" in text


def test_every_reject_reason_is_documented() -> None:
    text = (DOCS / "protocol.md").read_text()
    for reason in RejectReason:
        assert f"`{reason.value}`" in text


def test_operations_maps_every_state_and_names_every_exclusion_and_retry_class() -> None:
    text = (DOCS / "operations.md").read_text()
    for state in ExecState:
        assert f"| `{state.value}` |" in text, state
    for reason in Exclusion:
        assert f"`{reason.value}`" in text, reason
    for failure_class in FAILURE_CLASSES:
        assert f"`{failure_class}`" in text, failure_class
    for phase in {p for p in PHASE.values() if p is not None}:
        assert f"`{phase}`" in text, phase


def test_protocol_names_every_command() -> None:
    text = (DOCS / "protocol.md").read_text()
    for kind in CommandKind:
        assert f"`{kind.value}`" in text, kind
