"""Unit tests of the device simulator: an in-memory Link and a real local HTTP server."""

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pydantic
import pytest

from device_sim import device as device_module
from device_sim import wire_link
from device_sim.config import Faults, SimConfig, Timing
from device_sim.device import CampaignRecord, SentEvent, Terminal, TerminalProfile
from device_sim.download import DownloadFailedError, DownloadPlan, download
from device_sim.fleet import Simulator, wire_link_factory
from device_sim.link import Incoming, LinkLostError
from device_sim.wire_link import WireLink
from fleet import dynsec, mqtt_wire, protocol
from fleet.broker_admin import BrokerAdmin
from fleet.protocol import (
    Command,
    CommandKind,
    DesiredState,
    MessageKind,
    PackageKind,
    PackageRef,
    StateEvent,
)
from fleet.states import FINAL, ExecState, can_move
from tests.conftest import CONTROLLER_PASSWORD, CONTROLLER_USERNAME, TERMINAL_SECRET

S = ExecState
WAIT = 10.0
MODEL = "M1"
GROUP = "g1"


# -- an in-memory broker connection --------------------------------------------------


class FakeLink:
    """Records what the terminal publishes and lets the test deliver messages.

    Follows the `Link` contract: `drop()` loses the connection as a failed publish on a
    real link does, `refuse` makes connecting fail, and calls that must not wait raise
    `LinkLostError` while the link is down.
    """

    def __init__(self, retained: dict[str, bytes]) -> None:
        self.retained = retained
        self.published: list[tuple[str, bytes, bool]] = []
        self.subscriptions: set[str] = set()
        self.connects = 0
        self.connect_attempts = 0
        self.disconnects = 0
        self.refuse = False
        self.connect_delay = 0.0
        self.on_connect: Callable[[FakeLink], None] | None = None
        self.on_publish: Callable[[str, bytes], None] | None = None
        self.connecting = 0
        self.max_connecting = 0
        self.lost = False
        self._up = False
        self._inbox: collections.deque[Incoming] = collections.deque()
        self._kick = asyncio.Event()

    def _changed(self) -> None:
        self._kick.set()
        self._kick = asyncio.Event()

    async def connect(self) -> None:
        self.connect_attempts += 1
        self.connecting += 1
        self.max_connecting = max(self.max_connecting, self.connecting)
        try:
            if self.on_connect is not None:
                self.on_connect(self)
            await asyncio.sleep(self.connect_delay)
            if self.refuse:
                raise ConnectionError("refused")
            if not self._up:
                self.connects += 1
                self._up, self.lost = True, False
        finally:
            self.connecting -= 1
            self._changed()

    async def disconnect(self) -> None:
        self.disconnects += 1
        self._up, self.lost = False, False
        self._changed()

    def power_off(self) -> None:
        self._up, self.lost = False, False
        self._changed()

    def drop(self) -> None:
        """The connection ends unexpectedly."""
        self._up, self.lost = False, True
        self._changed()

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        while not self._up:
            if not wait:
                raise LinkLostError("fake")
            await self._kick.wait()
        self.published.append((topic, payload, retain))
        if self.on_publish is not None:
            self.on_publish(topic, payload)
        self._changed()

    async def subscribe(self, topics: Sequence[str]) -> None:
        if topics and not self._up:
            raise LinkLostError("fake")
        for topic in topics:
            self.subscriptions.add(topic)
            if topic in self.retained:
                self._inbox.append(Incoming(topic, self.retained[topic], retain=True))
        self._changed()

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        if topics and not self._up:
            raise LinkLostError("fake")
        self.subscriptions.difference_update(topics)
        self._changed()

    async def messages(self) -> AsyncGenerator[Incoming, None]:
        while True:
            if self.lost:
                raise LinkLostError("fake")
            if self._up and self._inbox:
                message = self._inbox.popleft()
                if message.topic in self.subscriptions:
                    yield message
                continue
            await self._kick.wait()

    def deliver(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if retain:
            self.retained[topic] = payload
        self._inbox.append(Incoming(topic, payload, retain=retain))
        self._changed()

    def of_kind(self, kind: MessageKind) -> list[Any]:
        return [
            protocol.decode(topic, payload)
            for topic, payload, _ in self.published
            if topic.endswith(f"/{kind.value}")
        ]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await self._kick.wait()


# -- a tiny HTTP/1.1 server with Range -----------------------------------------------


@dataclass
class ArtifactServer:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    status: int = 200
    extra: bytes = b""
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes) -> tuple[str, int, str]:
        self.files[path] = data
        return self.url(path), len(data), hashlib.sha256(data).hexdigest()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in head[1:] if line)
            }
            rng = headers.get("range")
            self.requests.append((path, rng))
            data = self.files.get(path)
            if data is None or self.status != 200:
                code = 404 if data is None else self.status
                writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
                return
            body = data + self.extra
            start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
            if rng:
                status = "206 Partial Content"
                extra = f"Content-Range: bytes {start}-{len(body) - 1}/{len(body)}\r\n"
            else:
                status, extra = "200 OK", ""
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body) - start}\r\n{extra}"
                "Connection: close\r\n\r\n".encode()
            )
            for offset in range(start, len(body), 8192):
                writer.write(body[offset : offset + 8192])
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def http() -> AsyncIterator[ArtifactServer]:
    server = ArtifactServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server
        listener.close()
        await listener.wait_closed()


# -- helpers ------------------------------------------------------------------------

INITIAL = {"os": "1.0", "pay": "1.0", "cfg": "1"}


def make_config(**overrides: Any) -> SimConfig:
    timing = Timing(
        heartbeat_s=0.02,
        download_bps=50_000_000,
        install_s=0.01,
        reboot_s=0.01,
        self_test_s=0.01,
        busy_s=0.05,
        download_retry_s=0.0,
        http_timeout_s=5.0,
    )
    base: dict[str, Any] = {
        "count": 1,
        "models": {MODEL: 1.0},
        "initial_versions": INITIAL,
        "groups": [GROUP],
        "pending_txns_max": 5,
        "timing": timing,
        "seed": 7,
    }
    base.update(overrides)
    return SimConfig(**base)


def timing(**changes: Any) -> Timing:
    return make_config().timing.model_copy(update=changes)


def package(
    server: ArtifactServer,
    name: str = "os",
    kind: PackageKind = PackageKind.FIRMWARE,
    version: str = "2.0",
    size: int = 100_000,
    models: list[str] | None = None,
) -> PackageRef:
    data = bytes((i * 7 + len(name)) % 251 for i in range(size))
    url, length, digest = server.add(f"/artifacts/{name}-{version}", data)
    return PackageRef(
        name=name,
        kind=kind,
        version=version,
        url=url,
        size=length,
        sha256=digest,
        models=[MODEL] if models is None else models,
    )


def bundle(server: ArtifactServer) -> tuple[PackageRef, PackageRef, PackageRef]:
    """Firmware, app and parameters, each one version up."""
    return (
        package(server, "os", PackageKind.FIRMWARE, "2.0"),
        package(server, "pay", PackageKind.APP, "3.1"),
        package(server, "cfg", PackageKind.PARAMS, "2", size=2_000),
    )


def desired(
    packages: Sequence[PackageRef],
    campaign_id: int = 1,
    revision: int = 1,
    status: str = "active",
) -> bytes:
    return DesiredState(
        group=GROUP,
        campaign_id=campaign_id,
        revision=revision,
        status=status,  # type: ignore[arg-type]
        packages=list(packages),
        issued_at=protocol.now(),
    ).to_bytes()


class Harness:
    def __init__(self, config: SimConfig) -> None:
        self.retained: dict[str, bytes] = {}
        self.links: dict[str, FakeLink] = {}
        self.sim = Simulator(config, link_factory=self._link)
        self.stop = asyncio.Event()

    def _link(self, profile: Any) -> FakeLink:
        link = FakeLink(self.retained)
        self.links[profile.tid] = link
        return link

    @property
    def tid(self) -> str:
        return next(iter(self.sim.terminals))

    @property
    def terminal(self) -> Terminal:
        return self.sim.terminals[self.tid]

    @property
    def link(self) -> FakeLink:
        return self.links[self.tid]

    def publish_desired(self, payload: bytes) -> None:
        for link in self.links.values():
            link.deliver(protocol.desired_topic(GROUP), payload, retain=True)

    def command(self, kind: CommandKind, *, tid: str | None = None, **fields: Any) -> None:
        tid = tid or self.tid
        ts = protocol.now()
        cmd = Command(
            msg_id=protocol.new_message_id(),
            tid=tid,
            kind=kind,
            issued_at=ts,
            expires_at=fields.pop("expires_at", ts + 60),
            **fields,
        )
        self.links[tid].deliver(protocol.terminal_topic(tid, MessageKind.CMD), cmd.to_bytes())

    def start(
        self,
        campaign_id: int = 1,
        attempt: int = 1,
        *,
        may_postpone: bool = False,
        tid: str | None = None,
    ) -> None:
        self.command(
            CommandKind.START,
            tid=tid,
            campaign_id=campaign_id,
            attempt=attempt,
            may_postpone=may_postpone,
        )

    def update(self, packages: Sequence[PackageRef], campaign_id: int = 1) -> None:
        """Publish an active desired state and admit every terminal (attempt 1)."""
        self.publish_desired(desired(packages, campaign_id))
        for tid in self.sim.terminals:
            self.start(campaign_id, tid=tid)

    def events(self, campaign_id: int | None = None) -> list[StateEvent]:
        found = self.link.of_kind(MessageKind.EVENTS)
        return [e for e in found if campaign_id in (None, e.campaign_id)]

    async def final(self, campaign_id: int = 1, attempt: int | None = None) -> CampaignRecord:
        return await self.sim.wait_terminal_final(
            self.tid, campaign_id, timeout_s=WAIT, attempt=attempt
        )


@contextlib.asynccontextmanager
async def running(config: SimConfig) -> AsyncIterator[Harness]:
    harness = Harness(config)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(harness.sim.run(harness.stop), name="test/sim")
        try:
            await harness.sim.wait_connected(timeout_s=WAIT)
            yield harness
        finally:
            harness.stop.set()


def collapsed(states: list[ExecState]) -> list[ExecState]:
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def _fields(e: StateEvent | SentEvent) -> tuple[Any, ...]:
    return (e.msg_id, e.seq, e.state, e.attempt, e.package, e.stage, e.error_code, e.detail)


def assert_wire_consistent(harness: Harness, *records: CampaignRecord) -> None:
    """The wire carries exactly what the records say, in an order the controller accepts."""
    events = harness.link.of_kind(MessageKind.EVENTS)
    campaigns = {r.campaign_id for r in records}
    mine = [e for e in events if e.campaign_id in campaigns]
    sent = sorted((e for r in records for e in (*r.events, *r.resent)), key=lambda e: e.seq)
    assert [_fields(e) for e in mine] == [_fields(e) for e in sent]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.msg_id for e in events}) == len(events)
    state: dict[int, ExecState] = {}
    attempt: dict[int, int | None] = {}
    for event in mine:
        cid = event.campaign_id
        current = state.get(cid, S.PENDING)
        if event.attempt != attempt.get(cid) and current in FINAL:
            current = S.PENDING  # the controller re-admits the execution for a new attempt
        assert can_move(current, event.state) or current == event.state, (current, event)
        state[cid], attempt[cid] = event.state, event.attempt


def event_state(payload: bytes) -> str:
    return str(json.loads(payload)["state"])


FETCH = [S.DOWNLOADING, S.DOWNLOADED, S.VERIFYING, S.VERIFIED]
INSTALL_WITH_REBOOT = [S.BACKING_UP, S.INSTALLING, S.REBOOTING, S.SELF_TESTING]
HAPPY = [S.QUEUED, *FETCH, *INSTALL_WITH_REBOOT, S.SUCCEEDED]


# -- the update sequence ------------------------------------------------------------


async def test_bundle_installs_in_kind_order(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        before_data, before_txns = h.terminal.data_checksum, h.terminal.pending_txns
        fw, app, params = bundle(http)
        h.update([params, app, fw])
        record = await h.final()

        assert record.final_state is S.SUCCEEDED
        assert record.attempt == 1
        assert collapsed(record.states) == [
            S.QUEUED,
            *FETCH * 3,
            *INSTALL_WITH_REBOOT * 2,
            # Parameters apply without a reboot.
            *[S.BACKING_UP, S.INSTALLING, S.SELF_TESTING],
            S.SUCCEEDED,
        ]
        steps = [(e.state, e.package) for e in record.events if e.state is not S.DOWNLOADING]
        assert [p for s, p in steps if s in {S.VERIFIED, S.SELF_TESTING}] == [
            "os",
            "pay",
            "cfg",
        ] * 2
        assert record.events[0].package is None
        assert record.events[-1].package is None
        progress = [e.progress for e in record.events if e.state is S.DOWNLOADING]
        assert progress.count(0) == 3
        assert set(progress) <= {0, 25, 50, 75}
        assert len(progress) > 3  # intermediate progress was reported
        assert_wire_consistent(h, record)
        assert [r[0] for r in http.requests] == [
            "/artifacts/os-2.0",
            "/artifacts/pay-3.1",
            "/artifacts/cfg-2",
        ]

        assert h.terminal.versions == {"os": "2.0", "pay": "3.1", "cfg": "2"}
        assert record.data_intact
        assert h.terminal.pending_txns == before_txns
        assert h.terminal.data_checksum == before_data

        hellos = h.link.of_kind(MessageKind.HELLO)
        assert len(hellos) == 3
        assert len({hello.boot_id for hello in hellos}) == 3
        assert hellos[1].versions == {"os": "2.0", "pay": "1.0", "cfg": "1"}
        assert hellos[2].versions == {"os": "2.0", "pay": "3.1", "cfg": "1"}
        assert h.link.disconnects == 2

        seen = len(h.link.published)
        await h.link.wait_for(
            lambda: any(t.endswith("/heartbeat") for t, _, _ in h.link.published[seen:])
        )
        beat = h.link.of_kind(MessageKind.HEARTBEAT)[-1]
        assert beat.versions == {"os": "2.0", "pay": "3.1", "cfg": "2"}


async def test_app_self_test_failure_rolls_back_the_app_alone(http: ArtifactServer) -> None:
    faults = Faults(self_test_fail_versions={"pay": "3.1"})
    async with running(make_config(faults=faults)) as h:
        txns = h.terminal.pending_txns
        fw, app, params = bundle(http)
        h.update([fw, app, params])
        record = await h.final()

        assert record.final_state is S.ROLLED_BACK
        assert record.error_code == "SELF_TEST_FAILED"
        assert collapsed(record.states) == [
            S.QUEUED,
            *FETCH * 3,
            *INSTALL_WITH_REBOOT * 2,
            S.ROLLED_BACK,
        ]
        last = record.events[-1]
        assert (last.package, last.stage, last.detail) == ("pay", "self_test", "not attempted: cfg")
        # The firmware installed before the app stays; the app and parameters are old.
        assert h.terminal.versions == {"os": "2.0", "pay": "1.0", "cfg": "1"}
        assert record.versions_after == h.terminal.versions
        assert h.terminal.pending_txns == txns
        assert record.data_intact
        assert_wire_consistent(h, record)


async def test_incompatible_model_is_rejected(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.update([package(http, models=["OTHER"])])
        record = await h.final()
        assert record.states == [S.REJECTED]
        assert record.events[0].error_code == "INCOMPATIBLE_MODEL"
        assert record.events[0].stage == "check"
        assert record.events[0].attempt == 1
        assert http.requests == []


async def test_already_installed(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.update([package(http, version="1.0")])
        record = await h.final()
        assert record.states == [S.ALREADY_INSTALLED]
        assert http.requests == []


async def test_corrupt_download_fails_verification(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(corrupt_rate=1.0))) as h:
        fw, app, _ = bundle(http)
        h.update([fw, app])
        record = await h.final()
        assert record.final_state is S.FAILED
        assert record.error_code == "HASH_MISMATCH"
        last = record.events[-1]
        assert (last.stage, last.package) == ("verify", "os")
        assert last.detail is not None
        assert last.detail.endswith("; not attempted: pay")
        assert collapsed(record.states)[-2:] == [S.VERIFYING, S.FAILED]
        assert [r[0] for r in http.requests] == ["/artifacts/os-2.0"]
        assert h.terminal.versions == INITIAL
        assert record.data_intact
        assert_wire_consistent(h, record)


async def test_dropped_download_resumes_with_range(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(download_drop_rate=1.0))) as h:
        h.update([package(http)])
        record = await h.final()
        assert record.final_state is S.SUCCEEDED
        ranges = [r for _, r in http.requests]
        assert ranges[0] is None
        assert ranges[1] is not None
        assert ranges[1].startswith("bytes=")
        assert ranges[1] != "bytes=0-"
        assert_wire_consistent(h, record)


async def test_download_gives_up_after_attempts(http: ArtifactServer) -> None:
    http.status = 503
    config = make_config(faults=Faults(max_download_attempts=2))
    async with running(config) as h:
        h.update([package(http)])
        record = await h.final()
        assert record.final_state is S.FAILED
        assert record.error_code == "DOWNLOAD_FAILED"
        last = record.events[-1]
        assert (last.stage, last.package) == ("download", "os")
        assert last.detail is not None
        assert "not attempted" not in last.detail
        assert len(http.requests) == 2


async def test_install_fault_rolls_back(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(install_fail_rate=1.0))) as h:
        txns = h.terminal.pending_txns
        h.update([package(http)])
        record = await h.final()
        assert record.final_state is S.ROLLED_BACK
        assert record.error_code == "INSTALL_FAILED"
        last = record.events[-1]
        assert (last.stage, last.package, last.detail) == ("install", "os", None)
        assert collapsed(record.states)[-3:] == [S.BACKING_UP, S.INSTALLING, S.ROLLED_BACK]
        assert h.terminal.versions == INITIAL
        assert h.terminal.pending_txns == txns
        assert record.data_intact
        assert_wire_consistent(h, record)


async def test_self_test_fault_of_a_model_fails_the_first_package(http: ArtifactServer) -> None:
    faults = Faults(self_test_fail_models=frozenset({MODEL}))
    async with running(make_config(faults=faults)) as h:
        txns = h.terminal.pending_txns
        fw, app, _ = bundle(http)
        h.update([app, fw])
        record = await h.final()
        assert record.final_state is S.ROLLED_BACK
        assert record.error_code == "SELF_TEST_FAILED"
        last = record.events[-1]
        assert (last.stage, last.package, last.detail) == ("self_test", "os", "not attempted: pay")
        assert collapsed(record.states) == [
            S.QUEUED,
            *FETCH * 2,
            *INSTALL_WITH_REBOOT,
            S.ROLLED_BACK,
        ]
        assert h.terminal.versions == INITIAL
        assert record.versions_after == record.versions_before
        assert h.terminal.pending_txns == txns
        assert record.data_intact
        assert len(h.link.of_kind(MessageKind.HELLO)) == 2
        assert_wire_consistent(h, record)


async def test_busy_terminal_defers_then_proceeds(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.terminal.set_busy(True)
        h.update([package(http)])
        await h.link.wait_for(functools.partial(deferred, h.link))
        assert http.requests == []
        h.terminal.set_busy(False)
        record = await h.final()
        assert record.final_state is S.SUCCEEDED
        assert collapsed(record.states) == [S.QUEUED, S.DEFERRED, *HAPPY[1:]]
        deferred_event = record.events[1]
        assert deferred_event.stage == "busy"
        assert_wire_consistent(h, record)


async def test_random_busy_period_defers(http: ArtifactServer) -> None:
    async with running(make_config(timing=timing(busy_probability=1))) as h:
        h.update([package(http)])
        record = await h.final()
        assert collapsed(record.states) == [S.QUEUED, S.DEFERRED, *HAPPY[1:]]


# -- admission: start, desired state, cancel ------------------------------------------


async def test_desired_state_alone_never_starts(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.publish_desired(desired([package(http)]))
        h.publish_desired(desired([package(http)], revision=2))
        # A barrier: campaign 2 is admitted after both; once it settles, the desired
        # states of campaign 1 have long been handled.
        h.update([package(http, "pay", PackageKind.APP)], campaign_id=2)
        await h.final(2)
        assert [r.campaign_id for r in h.terminal.records()] == [2]
        assert {e.campaign_id for e in h.events()} == {2}
        assert h.terminal.desired[GROUP].campaign_id == 2


async def test_start_is_held_until_its_desired_state_is_active(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        pkg = package(http)
        h.start(1)  # overtook the retained desired state, which is not even there yet
        h.publish_desired(desired([pkg], status="paused"))
        h.update([package(http, "pay", PackageKind.APP)], campaign_id=2)  # a barrier
        await h.final(2)
        assert h.terminal.record(1) is None

        h.publish_desired(desired([pkg], revision=2))
        record = await h.final(1)
        assert (record.final_state, record.attempt) == (S.SUCCEEDED, 1)
        assert_wire_consistent(h, record)


async def test_paused_after_admission_waits_for_resume(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        pkg = package(http)
        # Campaign 1 holds the worker (busy) while campaign 2 is queued, then paused.
        h.terminal.set_busy(True)
        h.update([pkg], campaign_id=1)
        await h.link.wait_for(functools.partial(deferred, h.link))
        h.update([pkg], campaign_id=2)
        h.publish_desired(desired([pkg], campaign_id=2, revision=2, status="paused"))
        h.terminal.set_busy(False)
        first = await h.final(1)
        assert first.final_state is S.SUCCEEDED

        h.update([package(http, version="3.0")], campaign_id=3)  # a barrier
        await h.final(3)
        assert h.terminal.record(2) is None
        assert {e.campaign_id for e in h.events()} == {1, 3}

        # Resumed: a later active revision lets the admitted attempt start.
        h.publish_desired(desired([pkg], campaign_id=2, revision=3))
        resumed = await h.final(2)
        assert (resumed.final_state, resumed.attempt) == (S.SUCCEEDED, 1)
        assert h.terminal.versions["os"] == "2.0"


async def test_repeated_start_repeats_the_final_state(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(install_fail_rate=1.0))) as h:
        fw, app, _ = bundle(http)
        h.terminal.set_busy(True)
        h.update([fw, app])
        await h.link.wait_for(functools.partial(deferred, h.link))
        h.start(1, 1)  # the running attempt: it will report by itself
        h.start(1, 2)  # a newer attempt while one runs: it runs once that one ends
        h.terminal.set_busy(False)
        record = await h.final(attempt=1)
        assert record.final_state is S.ROLLED_BACK
        second = await h.final(attempt=2)
        assert second.final_state is S.ROLLED_BACK

        # The controller missed the report and asks again.
        reported = h.events()
        h.start(1, 1)
        await h.link.wait_for(lambda: len(h.events()) == len(reported) + 1)
        original = next(e for e in reported if e.attempt == 1 and e.state is S.ROLLED_BACK)
        repeat = h.events()[-1]
        assert repeat.state is S.ROLLED_BACK
        assert (repeat.attempt, repeat.package, repeat.stage, repeat.error_code) == (
            1,
            "os",
            "install",
            "INSTALL_FAILED",
        )
        assert repeat.detail == original.detail == "not attempted: pay"
        assert repeat.msg_id != original.msg_id
        assert repeat.seq > original.seq
        assert [_fields(e) for e in record.resent] == [_fields(repeat)]
        assert record.states.count(S.ROLLED_BACK) == 1

        h.update([package(http, "pay", PackageKind.APP)], campaign_id=2)  # a barrier
        await h.final(2)
        assert [r.attempt for r in h.terminal.records() if r.campaign_id == 1] == [1, 2]


async def test_postponed_attempt_then_forced_start_completes(http: ArtifactServer) -> None:
    async with running(make_config(timing=timing(postpone_probability=1.0))) as h:
        h.publish_desired(desired([package(http)]))
        h.start(1, 1, may_postpone=True)
        first = await h.sim.wait_terminal_settled(h.tid, 1, timeout_s=WAIT)
        assert first.postponed
        assert first.final_state is None
        assert first.states == [S.QUEUED, S.DEFERRED]
        assert first.events[-1].stage == "postponed"
        assert http.requests == []
        with pytest.raises(TimeoutError):
            await h.sim.wait_final(1, timeout_s=0)

        h.start(1, 1, may_postpone=True)  # no final state to repeat: ignored
        h.start(1, 2, may_postpone=False)  # a forced update cannot be postponed
        second = await h.final(1, attempt=2)
        assert second.final_state is S.SUCCEEDED
        assert second.states[0] is S.QUEUED
        assert collapsed(second.states) == HAPPY
        assert {e.attempt for e in second.events} == {2}
        assert [r.attempt for r in h.terminal.records()] == [1, 2]
        assert await h.sim.wait_final(1, timeout_s=WAIT) == [second]
        assert_wire_consistent(h, first, second)

        campaign = h.sim.report()["campaigns"]["1"]
        assert (campaign["attempts"], campaign["postponed"]) == (2, 1)
        assert campaign["final"] == {"succeeded": 1}


def cancel_on(h: Harness, state: ExecState) -> list[bool]:
    """Send a cancel when the terminal reports `state`; note whether it was still pending."""
    pending_then: list[bool] = []

    def hook(topic: str, payload: bytes) -> None:
        if not topic.endswith("/events"):
            return
        if event_state(payload) == state.value and not pending_then:
            h.command(CommandKind.CANCEL, campaign_id=1)
            pending_then.append(False)
        elif pending_then and not pending_then[-1]:
            # The next event: by now the terminal has read the cancel.
            pending_then.append(h.terminal._cancel_requested)

    h.link.on_publish = hook
    return pending_then


async def test_cancel_while_downloading_abandons_with_canceled(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        fw, app, _ = bundle(http)
        cancel_on(h, S.DOWNLOADING)
        h.update([fw, app])
        record = await h.final()
        assert record.final_state is S.CANCELED
        assert record.abandoned
        last = record.events[-1]
        assert (last.stage, last.attempt, last.package) == ("downloading", 1, None)
        assert S.BACKING_UP not in record.states
        assert h.terminal.versions == INITIAL
        assert record.data_intact
        assert_wire_consistent(h, record)


async def test_cancel_during_install_is_ignored(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        seen = cancel_on(h, S.INSTALLING)
        h.update([package(http)])
        record = await h.final()
        assert seen[:2] == [False, True]  # the cancel arrived while installing
        assert record.final_state is S.SUCCEEDED
        assert not record.abandoned
        assert h.terminal.versions["os"] == "2.0"
        assert_wire_consistent(h, record)


async def test_cancel_while_deferred_then_a_later_start(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(install_fail_rate=1.0))) as h:
        h.terminal.set_busy(True)
        h.update([package(http)])
        await h.link.wait_for(functools.partial(deferred, h.link))
        h.command(CommandKind.CANCEL, campaign_id=1)
        record = await h.final(1)
        assert record.abandoned
        assert record.states == [S.QUEUED, S.DEFERRED, S.CANCELED]
        assert record.events[-1].stage == "deferred"
        h.terminal.set_busy(False)

        h.start(1, 2)
        retried = await h.final(1, attempt=2)
        assert retried.final_state is S.ROLLED_BACK
        assert retried.events[0].seq == record.events[-1].seq + 1
        assert_wire_consistent(h, record, retried)


async def test_cancel_drops_a_held_start(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.start(1)  # held: no desired state yet
        h.command(CommandKind.CANCEL, campaign_id=1)
        h.publish_desired(desired([package(http)]))
        h.update([package(http, "pay", PackageKind.APP)], campaign_id=2)  # a barrier
        await h.final(2)
        assert h.terminal.record(1) is None
        assert {e.campaign_id for e in h.events()} == {2}


# -- misbehaving releases and health --------------------------------------------------


async def test_bricked_release_never_comes_back(http: ArtifactServer) -> None:
    config = make_config(count=2, faults=Faults(bricked_versions={"os": "2.0"}))
    async with running(config) as h:
        bricked, healthy = h.sim.terminals.values()
        link, other = h.links[bricked.tid], h.links[healthy.tid]
        h.publish_desired(desired([package(http)]))
        h.start(1, tid=bricked.tid)
        await h.sim.wait_for(lambda: bricked.bricked, timeout_s=WAIT)
        record = bricked.record(1)
        assert record is not None
        assert record.bricked
        assert not record.settled
        assert record.states[-1] is S.REBOOTING
        published = len(link.published)
        assert not link.of_kind(MessageKind.PRESENCE)[-1].online

        # Time passes (the healthy terminal beats on) and the bricked one stays silent,
        # even when told to reboot.
        h.command(CommandKind.REBOOT, tid=bricked.tid)
        beats = len(other.of_kind(MessageKind.HEARTBEAT))
        await other.wait_for(lambda: len(other.of_kind(MessageKind.HEARTBEAT)) >= beats + 5)
        assert len(link.published) == published
    assert len(link.published) == published
    assert link.connects == 1
    assert len(link.of_kind(MessageKind.HELLO)) == 1
    report = h.sim.report()
    assert report["bricked"] == 1
    assert report["campaigns"]["1"]["in_progress"] == 1
    assert report["integrity"]["ok"], report["integrity"]


async def test_heartbeat_error_rate_baseline_and_degraded(http: ArtifactServer) -> None:
    faults = Faults(degraded_versions={"os": "2.0"}, txn_error_rate=0.02, degraded_error_rate=0.4)
    # Heartbeats only at boot: the periodic ones are an hour apart.
    async with running(make_config(faults=faults, timing=timing(heartbeat_s=3600))) as h:
        rate = protocol.HEALTH_TXN_ERROR_RATE
        h.update([package(http)])
        await h.final()
        h.update([package(http, version="3.0")], campaign_id=2)
        await h.final(2)
        # One at each boot, and one after each update's final report.
        await h.link.wait_for(lambda: len(h.link.of_kind(MessageKind.HEARTBEAT)) == 5)
        beats = h.link.of_kind(MessageKind.HEARTBEAT)
        assert [(b.versions["os"], b.health[rate]) for b in beats] == [
            ("1.0", 0.02),
            ("2.0", 0.4),
            ("2.0", 0.4),
            ("3.0", 0.02),
            ("3.0", 0.02),
        ]
        assert h.terminal.heartbeat().health[rate] == 0.02


async def test_boot_heartbeat_after_every_boot(http: ArtifactServer) -> None:
    async with running(make_config(timing=timing(heartbeat_s=3600))) as h:
        h.command(CommandKind.REBOOT)
        await h.link.wait_for(lambda: len(h.link.of_kind(MessageKind.HEARTBEAT)) == 2)
        kinds = [topic.rsplit("/", 1)[1] for topic, _, _ in h.link.published]
        assert kinds == [
            "hello",
            "presence",
            "heartbeat",
            "presence",
            "hello",
            "presence",
            "heartbeat",
        ]
        hellos = h.link.of_kind(MessageKind.HELLO)
        beats = h.link.of_kind(MessageKind.HEARTBEAT)
        assert [b.health["boots"] for b in beats] == [1, 2]
        assert hellos[1].boot_id == h.terminal.boot_id
        assert h.terminal.heartbeats_sent == 2


@pytest.mark.parametrize(
    ("now", "skew", "error_rate", "versions", "busy"),
    [
        (1_795_705_102.668478, 0.0, 0.02, INITIAL, False),
        (1_700_000_000.0, -3.25, 1e-05, {"os": "1.0"}, True),
        (4_099_999_999.999999, 0.125, 0.0, {'ü "k\\': "2.0+b.1", "pay": "1"}, False),
    ],
)
def test_heartbeat_bytes_are_the_models(
    monkeypatch: pytest.MonkeyPatch,
    now: float,
    skew: float,
    error_rate: float,
    versions: dict[str, str],
    busy: bool,
) -> None:
    """The cached encoder sends exactly what `Heartbeat(...).to_bytes()` encodes."""
    config = make_config(faults=Faults(txn_error_rate=error_rate))
    profile = dataclasses.replace(
        TerminalProfile.from_config(config, 0), versions=versions, clock_skew_s=skew
    )
    terminal = Terminal(profile, config, FakeLink({}))
    terminal._busy_forced = busy
    monkeypatch.setattr(protocol, "now", lambda: now - skew)
    clock = iter(range(10_000, 20_000, 7))
    monkeypatch.setattr(device_module.time, "monotonic", lambda: float(next(clock)))
    # The first beat of a release goes through the model, the next ones do not.
    for _ in range(3):
        payload = terminal._heartbeat_payload()
        fields = json.loads(payload)
        assert payload == protocol.Heartbeat(**fields).to_bytes()
        assert fields["ts"] == now
        assert fields["versions"] == versions
        assert fields["health"][protocol.HEALTH_TXN_ERROR_RATE] == error_rate
        assert fields["busy"] is busy
    beat = terminal.heartbeat()
    assert beat.versions == versions


def test_heartbeat_out_of_range_still_fails_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the checked release, a value the model would refuse still raises."""
    terminal = Terminal(TerminalProfile.from_config(make_config(), 0), make_config(), FakeLink({}))
    terminal._heartbeat_payload()
    monkeypatch.setattr(protocol, "now", lambda: 5e9)
    with pytest.raises(pydantic.ValidationError):
        terminal._heartbeat_payload()


# -- commands -----------------------------------------------------------------------


async def test_groups_command_resubscribes(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        assert protocol.desired_topic(GROUP) in h.link.subscriptions
        h.command(CommandKind.GROUPS, groups=["g2", "g3"])
        await h.link.wait_for(lambda: protocol.desired_topic("g3") in h.link.subscriptions)
        assert protocol.desired_topic(GROUP) not in h.link.subscriptions
        assert h.terminal.groups == {"g2", "g3"}


async def test_expired_command_is_ignored_and_reboot_works(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.command(CommandKind.REBOOT, expires_at=protocol.now() - 1)
        h.command(CommandKind.REBOOT)
        await h.link.wait_for(lambda: len(h.link.of_kind(MessageKind.HELLO)) == 2)
        assert h.link.disconnects == 1


# -- connection loss, shutdown and what the terminal last heard -----------------------


async def test_resume_after_drop_announces_with_hello(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        first = h.link.of_kind(MessageKind.HELLO)
        assert len(first) == 1
        h.link.subscriptions.clear()  # as if the broker had forgotten them
        h.link.drop()
        await h.link.wait_for(lambda: len(h.link.of_kind(MessageKind.HELLO)) == 2)
        await h.link.wait_for(lambda: protocol.desired_topic(GROUP) in h.link.subscriptions)
        assert h.link.connects == 2
        hello = h.link.of_kind(MessageKind.HELLO)[-1]
        assert hello.boot_id == first[0].boot_id  # the same boot, a new connection
        assert h.link.of_kind(MessageKind.PRESENCE)[-1].online
        assert protocol.terminal_topic(h.tid, MessageKind.CMD) in h.link.subscriptions

        # Still working: an update goes all the way through.
        h.update([package(http)])
        assert (await h.final()).final_state is S.SUCCEEDED


async def test_resume_and_reboot_never_connect_at_once(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.link.connect_delay = 0.05

        def drop_during_reboot(link: FakeLink) -> None:
            # The reboot is connecting when the old connection's loss is noticed.
            if link.connect_attempts == 2:
                link.drop()

        h.link.on_connect = drop_during_reboot
        h.command(CommandKind.REBOOT)
        # Boot, reboot, resume: three attempts, none overlapping another.
        await h.link.wait_for(lambda: h.link.connect_attempts >= 3 and not h.link.connecting)
        assert h.link.max_connecting == 1
        await h.link.wait_for(lambda: len(h.link.of_kind(MessageKind.HELLO)) >= 3)
        h.update([package(http)])
        assert (await h.final()).final_state is S.SUCCEEDED


def deferred(link: FakeLink) -> bool:
    return any(e.state is S.DEFERRED for e in link.of_kind(MessageKind.EVENTS))


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_shutdown_is_prompt_mid_update_and_mid_reconnect(
    http: ArtifactServer, how: str
) -> None:
    h = Harness(make_config(count=2))
    task = asyncio.create_task(h.sim.run(h.stop))
    try:
        await h.sim.wait_connected(timeout_s=WAIT)
        updating, reconnecting = h.sim.terminals.values()
        for terminal in (updating, reconnecting):
            terminal.set_busy(True)
        h.update([package(http)])
        for terminal in (updating, reconnecting):
            await h.links[terminal.tid].wait_for(functools.partial(deferred, h.links[terminal.tid]))
        link = h.links[reconnecting.tid]
        link.refuse = True
        link.drop()
        tries = link.connect_attempts
        await link.wait_for(lambda: link.connect_attempts >= tries + 2)
    except BaseException:
        task.cancel()
        raise

    started = time.monotonic()
    if how == "stop":
        h.stop.set()
        async with asyncio.timeout(1):
            await task
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(1):
                await task
    assert time.monotonic() - started < 1
    for terminal in (updating, reconnecting):
        record = terminal.record(1)
        assert record is not None
        assert not record.settled
    assert not h.links[updating.tid].of_kind(MessageKind.PRESENCE)[-1].online
    assert h.links[updating.tid].disconnects == 1
    assert h.links[reconnecting.tid].disconnects == 1


async def test_wait_desired_sees_what_every_terminal_heard(http: ArtifactServer) -> None:
    async with running(make_config(count=3)) as h:
        pkg = package(http)
        h.publish_desired(desired([pkg], status="paused"))
        tids = await h.sim.wait_desired((1, "paused"), timeout_s=WAIT)
        assert tids == sorted(h.sim.terminals)
        for terminal in h.sim.terminals.values():
            assert terminal.desired[GROUP].revision == 1
            assert terminal.record(1) is None
        with pytest.raises(TypeError):
            h.terminal.desired["x"] = h.terminal.desired[GROUP]  # type: ignore[index]

        with pytest.raises(TimeoutError):
            await h.sim.wait_desired((1, "active"), timeout_s=0.05)
        h.publish_desired(desired([pkg], revision=3, status="canceled"))
        # A stale revision arriving late does not replace what the terminal holds.
        h.publish_desired(desired([pkg], revision=2, status="active"))
        await h.sim.wait_desired(
            lambda d: d.campaign_id == 1 and d.revision == 3, count=3, timeout_s=WAIT
        )
        for tid in h.sim.terminals:
            h.start(1, tid=tid)  # would run if the stale "active" had been taken
        h.update([package(http, "pay", PackageKind.APP)], campaign_id=2)  # a barrier
        await h.sim.wait_desired((2, "active"), timeout_s=WAIT)
        await h.sim.wait_final(2, 3, timeout_s=WAIT)
        assert all(t.record(1) is None for t in h.sim.terminals.values())

        # Leaving a group forgets what it said.
        h.command(CommandKind.GROUPS, groups=["g2"])
        await h.link.wait_for(lambda: protocol.desired_topic("g2") in h.link.subscriptions)
        assert dict(h.terminal.desired) == {}
        assert await h.sim.wait_desired((2, "active"), count=2, timeout_s=WAIT) == sorted(
            set(h.sim.terminals) - {h.tid}
        )


# -- fleet and download details ----------------------------------------------------


async def test_simulator_many_terminals_and_report(http: ArtifactServer) -> None:
    faults = Faults(install_fail_rate=0.3, corrupt_rate=0.2)
    async with running(make_config(count=30, connect_concurrency=4, faults=faults)) as h:
        assert h.sim.connected_count == 30
        assert len({t.model for t in h.sim.terminals.values()}) == 1
        h.update([package(http, size=20_000)])
        records = await h.sim.wait_final(1, 30, timeout_s=WAIT)
        assert len(records) == 30
        assert await h.sim.wait_final(1, timeout_s=WAIT) == records
        report = h.sim.report()
    assert report["integrity"]["ok"], report["integrity"]
    assert report["integrity"]["checked"] == 30
    assert report["bricked"] == 0
    campaign = report["campaigns"]["1"]
    finals = campaign["final"]
    assert sum(finals.values()) == 30
    assert set(finals) <= {"succeeded", "rolled_back", "failed"}
    assert (campaign["attempts"], campaign["postponed"], campaign["in_progress"]) == (30, 0, 0)
    assert campaign["duration_s"]["p50"] > 0
    json.dumps(report)


async def test_profiles_are_deterministic() -> None:
    config = make_config(count=5, start=10, models={"A": 1.0, "B": 1.0}, groups=["x", "y"])
    one = Simulator(config, link_factory=lambda _p: FakeLink({}))
    two = Simulator(config, link_factory=lambda _p: FakeLink({}))
    assert list(one.terminals) == [f"T{i:06d}" for i in range(10, 15)]
    assert [t.profile for t in one.terminals.values()] == [
        t.profile for t in two.terminals.values()
    ]
    assert [t.profile.groups for t in one.terminals.values()] == [
        ("x",),
        ("y",),
        ("x",),
        ("y",),
        ("x",),
    ]


async def test_download_refuses_more_than_advertised(http: ArtifactServer) -> None:
    url, size, _ = http.add("/big", b"x" * 1000)
    http.extra = b"y" * 10

    async def ignore(_offset: int) -> None:
        return None

    with pytest.raises(DownloadFailedError) as caught:
        await download(DownloadPlan(url=url, size=size), ignore)
    assert caught.value.code == "SIZE_EXCEEDED"


async def test_download_hash_continues_across_resume(http: ArtifactServer) -> None:
    data = bytes(range(256)) * 400
    url, size, digest = http.add("/resume", data)
    offsets: list[int] = []

    async def track(offset: int) -> None:
        offsets.append(offset)

    plan = DownloadPlan(url=url, size=size, chunk_bytes=4096, drop_at=30_000, retry_s=0)
    result = await download(plan, track)
    assert (result.length, result.sha256, result.resumed) == (size, digest, 1)
    assert offsets == sorted(offsets)
    dropped_at = next(o for o in offsets if o >= 30_000)
    assert http.requests[1] == ("/resume", f"bytes={dropped_at}-")


# -- smoke test of the real aiomqtt link against a private Mosquitto ------------------


async def provision(broker: Any, tids: list[str]) -> None:
    async with BrokerAdmin(
        broker.host,
        broker.port,
        dynsec.admin_username(CONTROLLER_USERNAME),
        CONTROLLER_PASSWORD,
        reserved_usernames=dynsec.reserved_usernames(CONTROLLER_USERNAME),
    ) as admin:
        await admin.ensure_terminals(tids, TERMINAL_SECRET)
        await admin.ensure_group(GROUP)
        await admin.add_to_group(GROUP, tids)


def controller_client(broker: Any, identifier: str = CONTROLLER_USERNAME) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=CONTROLLER_USERNAME,
        password=CONTROLLER_PASSWORD,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


def broker_config(broker: Any, **overrides: Any) -> SimConfig:
    return make_config(
        broker_host=broker.host, broker_port=broker.port, secret=TERMINAL_SECRET, **overrides
    )


async def test_wire_link_against_real_broker(broker: Any, http: ArtifactServer) -> None:
    config = make_config(
        count=3,
        broker_host=broker.host,
        broker_port=broker.port,
        secret=TERMINAL_SECRET,
        timing=make_config().timing.model_copy(update={"heartbeat_s": 0.2}),
    )
    await provision(broker, config.terminal_ids())
    async with controller_client(broker) as controller:
        await controller.subscribe("fleet/v1/t/+/+", qos=1)
        await controller.publish(
            protocol.desired_topic(GROUP), desired([package(http)]), qos=1, retain=True
        )
        sim = Simulator(config)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sim.run(stop), name="test/sim")
            try:
                await sim.wait_connected(timeout_s=WAIT)
                assert len(await sim.wait_desired((1, "active"), timeout_s=WAIT)) == 3
                for tid in config.terminal_ids():
                    ts = protocol.now()
                    start = Command(
                        msg_id=protocol.new_message_id(),
                        tid=tid,
                        kind=CommandKind.START,
                        issued_at=ts,
                        expires_at=ts + 60,
                        campaign_id=1,
                        attempt=1,
                        may_postpone=False,
                    )
                    topic = protocol.terminal_topic(tid, MessageKind.CMD)
                    await controller.publish(topic, start.to_bytes(), qos=1)
                records = await sim.wait_final(1, 3, timeout_s=WAIT)
            finally:
                stop.set()
        assert {r.final_state for r in records} == {S.SUCCEEDED}
        for terminal in sim.terminals.values():
            link = terminal._link
            assert isinstance(link, WireLink)
            assert link._connection is None  # powered off with a clean DISCONNECT
        expected = {(r.tid, e.msg_id) for r in records for e in r.events}

        got: set[tuple[str, str]] = set()
        kinds: set[MessageKind] = set()
        async with asyncio.timeout(WAIT):
            async for message in controller.messages:
                if str(message.topic).endswith("/cmd"):
                    continue  # our own start commands
                decoded = protocol.decode(str(message.topic), bytes(message.payload))
                kinds.add(protocol.parse_terminal_topic(str(message.topic))[1])
                if isinstance(decoded, protocol.StateEvent):
                    got.add((decoded.tid, decoded.msg_id))
                if expected <= got and MessageKind.HEARTBEAT in kinds:
                    break
        assert kinds >= {MessageKind.HELLO, MessageKind.PRESENCE, MessageKind.EVENTS}


async def test_publish_timeout_on_live_connection_reconnects(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = broker_config(
        broker, timing=make_config().timing.model_copy(update={"heartbeat_s": 0.05})
    )
    tid = config.terminal_ids()[0]
    await provision(broker, [tid])
    real_publish = mqtt_wire.Connection.publish
    timed_out = asyncio.Event()

    async def publish(self: mqtt_wire.Connection, topic: str, *args: Any, **kwargs: Any) -> None:
        if topic.endswith("/heartbeat") and not timed_out.is_set():
            # As if no PUBACK came in time; the connection stays up.
            timed_out.set()
            raise TimeoutError
        await real_publish(self, topic, *args, **kwargs)

    monkeypatch.setattr(mqtt_wire.Connection, "publish", publish)
    async with controller_client(broker) as controller:
        await controller.subscribe(f"fleet/v1/t/{tid}/+", qos=1)
        sim = Simulator(config)
        stop = asyncio.Event()
        kinds: list[MessageKind] = []
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sim.run(stop), name="test/sim")
            try:
                async with asyncio.timeout(WAIT):
                    async for message in controller.messages:
                        kind = protocol.parse_terminal_topic(str(message.topic))[1]
                        kinds.append(kind)
                        hellos = [i for i, k in enumerate(kinds) if k is MessageKind.HELLO]
                        beats = [i for i, k in enumerate(kinds) if k is MessageKind.HEARTBEAT]
                        # Reconnected, announced again, and still beating after that.
                        if len(hellos) == 2 and beats and beats[-1] > hellos[1]:
                            break
            finally:
                stop.set()

    async with controller_client(broker, "probe") as probe:
        await probe.subscribe(protocol.terminal_topic(tid, MessageKind.PRESENCE), qos=1)
        async with asyncio.timeout(WAIT):
            message = await anext(aiter(probe.messages))
    # Stopped cleanly: the retained presence is the terminal's own last word.
    presence = protocol.decode(str(message.topic), bytes(message.payload))
    assert isinstance(presence, protocol.Presence)
    assert not presence.online


async def test_concurrent_connects_share_one_client(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = broker_config(broker)
    profile = TerminalProfile.from_config(config, 0)
    await provision(broker, [profile.tid])
    link = wire_link_factory(config)(profile)
    assert isinstance(link, WireLink)
    made: list[mqtt_wire.Connection] = []
    real_open = wire_link.open_connection

    async def open_connection(*args: Any, **kwargs: Any) -> mqtt_wire.Connection:
        made.append(await real_open(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(wire_link, "open_connection", open_connection)
    await asyncio.gather(*(link.connect() for _ in range(3)))
    assert len(made) == 1
    await link.connect()
    assert len(made) == 1
    topic = protocol.terminal_topic(profile.tid, MessageKind.PRESENCE)
    online = protocol.Presence(tid=profile.tid, online=True, ts=protocol.now()).to_bytes()
    await link.publish(topic, online, retain=True, wait=False)

    # A disconnect racing a connect is serialised: one after the other, never interleaved.
    await asyncio.gather(link.disconnect(), link.connect())
    assert len(made) == 2
    await link.connect()
    assert len(made) == 2
    with pytest.raises(LinkLostError):
        await asyncio.gather(link.disconnect(), link.subscribe(["x"]))
    await link.disconnect()
