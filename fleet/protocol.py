"""Wire protocol v1: topics, payload models and the rollout bucket function.

This module is the whole contract between the controller and the terminals; the device
simulator imports it and nothing else from `fleet`. docs/protocol.md describes the same
contract for people; a change here is a change there.

Topics (``{root}`` is ``fleet/v1``):

=========================================  =========  ====  ======  ==================
topic                                       direction  QoS   retain  payload
=========================================  =========  ====  ======  ==================
``{root}/g/{group}/desired``                c -> t     1     yes     `DesiredState`
``{root}/t/{tid}/cmd``                      c -> t     1     no      `Command` (expiry)
``{root}/t/{tid}/events``                   t -> c     1     no      `StateEvent`
``{root}/t/{tid}/heartbeat``                t -> c     1     no      `Heartbeat`
``{root}/t/{tid}/presence``                 t -> c     1     yes     `Presence` (will)
``{root}/t/{tid}/hello``                    t -> c     1     no      `Hello`
=========================================  =========  ====  ======  ==================
"""

import enum
import hashlib
import hmac
import json
import re
import time
import uuid
from typing import Annotated, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.states import REPORTABLE, ExecState

PROTOCOL_VERSION: Literal[1] = 1
TOPIC_ROOT = "fleet/v1"

#: Hard cap on any payload, checked before JSON parsing. The broker's `max_packet_size`
#: is larger so that an oversized payload reaches ingest and is counted, not just dropped.
MAX_PAYLOAD_BYTES = 8192

#: Terminal ids and group names: a safe charset that fills exactly one topic level.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
_NUL_ESCAPE = re.compile(rb"\\u0000", re.IGNORECASE)

BUCKETS = 10_000
#: Packages in one desired state, and models one package may name.
MAX_PACKAGES = 8
MAX_MODELS = 64

TerminalId = Annotated[str, Field(pattern=ID_PATTERN)]
GroupName = Annotated[str, Field(pattern=ID_PATTERN)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$")]
ShortText = Annotated[str, Field(max_length=200)]
#: Unix seconds between 2001 and 2100: finite, and storable as a PostgreSQL timestamptz.
Timestamp = Annotated[float, Field(ge=1e9, le=4.1e9, allow_inf_nan=False)]
#: Integers that fit the database's bigint and integer columns.
BigInt = Annotated[int, Field(ge=1, le=2**63 - 1)]
SmallCount = Annotated[int, Field(ge=0, le=2**31 - 1)]
MessageId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class MessageKind(enum.StrEnum):
    """The last topic level of a terminal's own topics."""

    EVENTS = "events"
    HEARTBEAT = "heartbeat"
    PRESENCE = "presence"
    HELLO = "hello"
    CMD = "cmd"


class PackageKind(enum.StrEnum):
    """What a package changes on the terminal; bundles install in this order."""

    FIRMWARE = "firmware"
    APP = "app"
    PARAMS = "params"


KIND_ORDER = {PackageKind.FIRMWARE: 0, PackageKind.APP: 1, PackageKind.PARAMS: 2}


def bucket_of(terminal_id: str) -> int:
    """Return the terminal's rollout bucket in 0..9999.

    The first 8 bytes of SHA-256 over the UTF-8 id, big-endian, modulo 10,000. Both ends
    compute it, so the controller knows exactly who belongs to each wave.
    """
    digest = hashlib.sha256(terminal_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def is_valid_id(value: str) -> bool:
    """Tell whether a terminal id or group name is within the safe charset."""
    return _ID_RE.fullmatch(value) is not None


def derive_terminal_password(secret: str, terminal_id: str) -> str:
    """Return a provisioned terminal's broker password: HMAC-SHA256(secret, id), hex.

    Lets the simulator and the provisioning command agree without a password file; real
    terminals get per-device certificates or a password injected at manufacture.
    """
    return hmac.new(secret.encode(), terminal_id.encode(), hashlib.sha256).hexdigest()


def new_message_id() -> str:
    """Return a fresh message id (32 lowercase hex digits)."""
    return uuid.uuid4().hex


# -- topics ---------------------------------------------------------------------------


def desired_topic(group: str) -> str:
    """Topic of a group's retained desired state."""
    return f"{TOPIC_ROOT}/g/{group}/desired"


def terminal_topic(terminal_id: str, kind: MessageKind) -> str:
    """Topic of one of a terminal's own channels."""
    return f"{TOPIC_ROOT}/t/{terminal_id}/{kind.value}"


def terminal_subscription(kind: MessageKind) -> str:
    """Wildcard the controller subscribes to for one kind of terminal message."""
    return f"{TOPIC_ROOT}/t/+/{kind.value}"


class TopicError(ValueError):
    """The topic is not one of ours."""


_KIND_BY_NAME = {kind.value: kind for kind in MessageKind}


def parse_terminal_topic(topic: str) -> tuple[str, MessageKind]:
    """Split ``fleet/v1/t/{tid}/{kind}`` into its terminal id and kind.

    Raises:
        TopicError: the topic is not a terminal topic of this protocol version.
    """
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[2] != "t":
        raise TopicError(topic)
    tid, kind = parts[3], parts[4]
    if not is_valid_id(tid):
        raise TopicError(topic)
    found = _KIND_BY_NAME.get(kind)
    if found is None:
        raise TopicError(topic)
    return tid, found


# -- payloads -------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1] = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        """Encode as compact JSON."""
        return self.model_dump_json(exclude_none=True).encode()


class PackageRef(_Message):
    """A package a desired state points to; trust comes from its sha256 and size."""

    name: GroupName
    kind: PackageKind
    version: Version
    url: Annotated[str, Field(max_length=512)]
    size: Annotated[int, Field(ge=0)]
    sha256: Sha256Hex
    models: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_MODELS)]


class DesiredState(_Message):
    """A group's desired state: the campaign's target packages and whether it is live.

    It tells terminals what the campaign installs; a terminal starts only when a `start`
    command admits it, so waves, windows and rate limits stay the controller's decisions.
    """

    group: GroupName
    campaign_id: BigInt
    revision: BigInt
    status: Literal["active", "paused", "canceled"]
    packages: Annotated[list[PackageRef], Field(min_length=1, max_length=MAX_PACKAGES)]
    issued_at: Timestamp


class CommandKind(enum.StrEnum):
    """What a targeted command asks of one terminal."""

    GROUPS = "groups"
    START = "start"
    CANCEL = "cancel"
    REBOOT = "reboot"


class Command(_Message):
    """A command to one terminal; it also carries its MQTT message expiry as `expires_at`."""

    msg_id: MessageId
    tid: TerminalId
    kind: CommandKind
    issued_at: Timestamp
    expires_at: Timestamp
    campaign_id: BigInt | None = None
    #: `start`: the attempt number (a retry is a start with a higher one).
    attempt: BigInt | None = None
    #: `start`: whether the merchant may postpone this attempt (false: a forced update).
    may_postpone: bool | None = None
    groups: Annotated[list[GroupName], Field(max_length=64)] | None = None


class StateEvent(_Message):
    """A terminal's report that its execution in a campaign moved to `state`."""

    msg_id: MessageId
    tid: TerminalId
    seq: BigInt
    campaign_id: BigInt
    state: ExecState
    ts: Timestamp
    attempt: BigInt | None = None
    #: The package of the bundle this step concerns.
    package: GroupName | None = None
    progress: Annotated[int, Field(ge=0, le=100)] | None = None
    stage: Annotated[str, Field(max_length=32)] | None = None
    error_code: Annotated[str, Field(max_length=64, pattern=r"^[A-Z0-9_]+$")] | None = None
    detail: ShortText | None = None

    @model_validator(mode="after")
    def _reportable(self) -> Self:
        if self.state not in REPORTABLE:
            msg = f"terminals may not report {self.state.value}"
            raise ValueError(msg)
        return self


#: Heartbeat health key: the fraction (0..1) of card transactions that failed since the
#: previous heartbeat. The campaign health gate compares it before and after an update.
HEALTH_TXN_ERROR_RATE = "txn_error_rate"

HealthValue = (
    bool
    | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(allow_inf_nan=False)]
    | Annotated[str, Field(max_length=64)]
)


class Heartbeat(_Message):
    """Periodic health report."""

    tid: TerminalId
    ts: Timestamp
    versions: Annotated[dict[Annotated[str, Field(max_length=64)], Version], Field(max_length=16)]
    battery_pct: Annotated[int, Field(ge=0, le=100)]
    storage_free_mb: SmallCount
    busy: bool
    health: Annotated[dict[Annotated[str, Field(max_length=32)], HealthValue], Field(max_length=16)]


class Presence(_Message):
    """Retained online flag; the last will sets it to offline."""

    tid: TerminalId
    online: bool
    ts: Timestamp


class Hello(_Message):
    """Inventory a terminal sends each time it boots."""

    tid: TerminalId
    boot_id: MessageId
    model: Annotated[str, Field(min_length=1, max_length=64)]
    versions: Annotated[dict[Annotated[str, Field(max_length=64)], Version], Field(max_length=16)]
    merchant_id: Annotated[str, Field(max_length=64)]
    timezone: Annotated[str, Field(max_length=64)]
    attributes: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]],
        Field(max_length=32),
    ]
    ts: Timestamp


_M = TypeVar("_M", bound=_Message)

TerminalMessage = StateEvent | Heartbeat | Presence | Hello

_MODELS: dict[MessageKind, type[TerminalMessage]] = {
    MessageKind.EVENTS: StateEvent,
    MessageKind.HEARTBEAT: Heartbeat,
    MessageKind.PRESENCE: Presence,
    MessageKind.HELLO: Hello,
}


class RejectReason(enum.StrEnum):
    """Stable codes for why an incoming message was refused. DO NOT CHANGE: on dashboards."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID = "invalid"
    BAD_TOPIC = "bad_topic"
    TID_MISMATCH = "tid_mismatch"
    UNKNOWN_TERMINAL = "unknown_terminal"
    UNKNOWN_EXECUTION = "unknown_execution"
    RETAINED = "retained"
    UNSTORABLE = "unstorable"


class ErrorCode(enum.StrEnum):
    """The `error_code`s of failed updates that the controller knows by name.

    Terminals may send others (`^[A-Z0-9_]+$`); they are stored as sent, and counted on
    dashboards as ``other``. The last two are the controller's own. DO NOT CHANGE: on
    dashboards.
    """

    INCOMPATIBLE_MODEL = "INCOMPATIBLE_MODEL"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    SIZE_EXCEEDED = "SIZE_EXCEEDED"
    HASH_MISMATCH = "HASH_MISMATCH"
    INSTALL_FAILED = "INSTALL_FAILED"
    SELF_TEST_FAILED = "SELF_TEST_FAILED"
    POWER_LOSS = "POWER_LOSS"
    LOW_BATTERY = "LOW_BATTERY"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    HEALTH_DEGRADED = "HEALTH_DEGRADED"


class ProtocolError(ValueError):
    """An incoming message broke the contract; `reason` is a stable code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        """Keep the reason code and a short, bounded detail."""
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail[:500]


def decode(topic: str, payload: bytes) -> TerminalMessage:
    """Validate one message a terminal published.

    Checks, in order: the topic, the size cap, JSON, the protocol version, the schema,
    and that the payload's terminal id is the topic's (the broker binds the topic to the
    MQTT identity; this re-check keeps a misconfigured broker from letting ids mix).

    Raises:
        ProtocolError: the message is refused; `reason` says why.
    """
    try:
        tid, kind = parse_terminal_topic(topic)
    except TopicError:
        raise ProtocolError(RejectReason.BAD_TOPIC, topic) from None
    model = _MODELS.get(kind)
    if model is None:
        raise ProtocolError(RejectReason.BAD_TOPIC, topic)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(RejectReason.TOO_LARGE, f"{len(payload)} bytes")
    if _NUL_ESCAPE.search(payload):
        # PostgreSQL text and jsonb cannot hold U+0000; refuse it here, not in a batch.
        raise ProtocolError(RejectReason.INVALID, "U+0000 in a string")
    # Validated in one pass, the hot path; only a refusal is parsed again to say why.
    try:
        message = model.model_validate_json(payload)
    except ValidationError as exc:
        raise _refusal(payload, exc) from None
    if "v" not in message.model_fields_set:
        raise ProtocolError(RejectReason.UNSUPPORTED_VERSION, "None")
    if message.tid != tid:
        raise ProtocolError(RejectReason.TID_MISMATCH, f"topic {tid} payload {message.tid}")
    return message


def _refusal(payload: bytes, exc: ValidationError) -> ProtocolError:
    """Why a payload failed validation: not JSON, another protocol version, or the schema."""
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return ProtocolError(RejectReason.MALFORMED, str(error))
    if not isinstance(raw, dict):
        return ProtocolError(RejectReason.MALFORMED, "payload is not a JSON object")
    if raw.get("v") != PROTOCOL_VERSION:
        return ProtocolError(RejectReason.UNSUPPORTED_VERSION, repr(raw.get("v"))[:50])
    return ProtocolError(RejectReason.INVALID, _summarise(exc))


def decode_desired(payload: bytes) -> DesiredState:
    """Validate a group's desired state (terminal side)."""
    return _decode_model(DesiredState, payload)


def decode_command(payload: bytes) -> Command:
    """Validate a targeted command (terminal side)."""
    return _decode_model(Command, payload)


def _decode_model(model: type[_M], payload: bytes) -> _M:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(RejectReason.TOO_LARGE, f"{len(payload)} bytes")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(RejectReason.INVALID, _summarise(exc)) from None


def _summarise(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    return f"{exc.error_count()} error(s); {loc}: {first['msg']}"


def now() -> float:
    """Wall-clock seconds, the timestamp unit of every message."""
    return time.time()
