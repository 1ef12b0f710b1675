"""The wire contract: bucket test vectors, topics, validation and refusal codes."""

import json

import pytest

from fleet import protocol as p
from fleet.states import ExecState

# Published in docs/protocol.md; terminals in other languages must reproduce them.
BUCKET_VECTORS = {
    "T000000": 5657,
    "T000001": 5439,
    "T000999": 7144,
    "POS-0001": 1805,
    "a": 2250,
    "Z9._-x": 4911,
}


@pytest.mark.parametrize(("terminal_id", "bucket"), BUCKET_VECTORS.items())
def test_bucket_vectors(terminal_id: str, bucket: int) -> None:
    assert p.bucket_of(terminal_id) == bucket


def test_buckets_spread_evenly() -> None:
    counts = [0] * 10
    for n in range(20_000):
        counts[p.bucket_of(f"T{n:06d}") // 1000] += 1
    assert min(counts) > 1800
    assert max(counts) < 2200


def test_topics_round_trip() -> None:
    topic = p.terminal_topic("T1", p.MessageKind.EVENTS)
    assert topic == "fleet/v1/t/T1/events"
    assert p.parse_terminal_topic(topic) == ("T1", p.MessageKind.EVENTS)
    assert p.desired_topic("north") == "fleet/v1/g/north/desired"
    for bad in ("fleet/v1/t/T1", "fleet/v2/t/T1/events", "fleet/v1/t/../events", "x/y/t/T1/cmd"):
        with pytest.raises(p.TopicError):
            p.parse_terminal_topic(bad)


def _event(**changes: object) -> dict[str, object]:
    event: dict[str, object] = {
        "v": 1,
        "msg_id": p.new_message_id(),
        "tid": "T1",
        "seq": 1,
        "campaign_id": 1,
        "state": "queued",
        "ts": 1_764_000_000.5,
    }
    event.update(changes)
    return event


def test_decode_accepts_a_valid_event() -> None:
    message = p.decode("fleet/v1/t/T1/events", json.dumps(_event()).encode())
    assert isinstance(message, p.StateEvent)
    assert message.state is ExecState.QUEUED


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("fleet/v1/t/T1/events", b"{not json", p.RejectReason.MALFORMED),
        ("fleet/v1/t/T1/events", b"[1, 2]", p.RejectReason.MALFORMED),
        ("fleet/v1/t/T1/events", b"\xff\xfe", p.RejectReason.MALFORMED),
        (
            "fleet/v1/t/T1/events",
            json.dumps(_event(v=2)).encode(),
            p.RejectReason.UNSUPPORTED_VERSION,
        ),
        (
            "fleet/v1/t/T1/events",
            json.dumps({k: v for k, v in _event().items() if k != "v"}).encode(),
            p.RejectReason.UNSUPPORTED_VERSION,
        ),
        (
            "fleet/v1/t/T1/events",
            json.dumps(_event(state="pending")).encode(),
            p.RejectReason.INVALID,
        ),
        ("fleet/v1/t/T1/events", json.dumps(_event(seq="1")).encode(), p.RejectReason.INVALID),
        ("fleet/v1/t/T1/events", json.dumps(_event(extra=1)).encode(), p.RejectReason.INVALID),
        (
            "fleet/v1/t/T1/events",
            json.dumps(_event(tid="T2")).encode(),
            p.RejectReason.TID_MISMATCH,
        ),
        ("fleet/v1/t/T1/events", b" " * (p.MAX_PAYLOAD_BYTES + 1), p.RejectReason.TOO_LARGE),
        ("fleet/v1/t/T1/nonsense", b"{}", p.RejectReason.BAD_TOPIC),
        ("fleet/v1/t/T1/cmd", b"{}", p.RejectReason.BAD_TOPIC),
    ],
)
def test_decode_refuses_with_a_stable_reason(
    topic: str, payload: bytes, reason: p.RejectReason
) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode(topic, payload)
    assert caught.value.reason is reason


def test_every_message_carries_the_protocol_version() -> None:
    desired = p.DesiredState(
        group="g",
        campaign_id=1,
        revision=1,
        status="active",
        packages=[
            p.PackageRef(
                name="fw",
                kind=p.PackageKind.FIRMWARE,
                version="2.0",
                url="http://h/artifacts/" + "0" * 64,
                size=1,
                sha256="0" * 64,
                models=["P400"],
            )
        ],
        issued_at=1_764_000_000.0,
    )
    assert json.loads(desired.to_bytes())["v"] == 1
    assert p.decode_desired(desired.to_bytes()) == desired
    start = p.Command(
        msg_id=p.new_message_id(),
        tid="T1",
        kind=p.CommandKind.START,
        issued_at=1_764_000_000.0,
        expires_at=1_764_003_600.0,
        campaign_id=7,
        attempt=2,
        may_postpone=False,
    )
    assert p.decode_command(start.to_bytes()) == start


def test_terminal_password_is_derived_per_terminal() -> None:
    assert p.derive_terminal_password("s", "T1") != p.derive_terminal_password("s", "T2")
    assert p.derive_terminal_password("s", "T1") == p.derive_terminal_password("s", "T1")
