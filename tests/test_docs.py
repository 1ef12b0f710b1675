"""The docs stay true to the code: every setting documented, bucket vectors published."""

from pathlib import Path

from fleet.protocol import RejectReason
from fleet.settings import FleetSettings
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
