"""Unit tests of the device simulator: an in-memory Link and a real local HTTP server."""

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pytest

from device_sim.config import Faults, SimConfig, Timing
from device_sim.device import CampaignRecord, Terminal, TerminalProfile
from device_sim.download import DownloadFailedError, DownloadPlan, download
from device_sim.fleet import Simulator, aiomqtt_link_factory
from device_sim.link import AiomqttLink, Incoming, LinkLostError
from fleet import dynsec, protocol
from fleet.broker_admin import BrokerAdmin
from fleet.protocol import (
    BucketRange,
    Command,
    CommandKind,
    DesiredState,
    MessageKind,
    PackageKind,
    PackageRef,
)
from fleet.states import ExecState, can_move
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
        "initial_versions": {"os": "1.0", "pay": "1.0"},
        "groups": [GROUP],
        "pending_txns_max": 5,
        "timing": timing,
        "seed": 7,
    }
    base.update(overrides)
    return SimConfig(**base)


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


def desired(
    packages: list[PackageRef],
    campaign_id: int = 1,
    revision: int = 1,
    status: str = "active",
    buckets: BucketRange | None = None,
) -> bytes:
    return DesiredState(
        group=GROUP,
        campaign_id=campaign_id,
        revision=revision,
        status=status,  # type: ignore[arg-type]
        packages=packages,
        buckets=buckets or BucketRange(lo=0, hi=protocol.BUCKETS),
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

    def command(self, kind: CommandKind, **fields: Any) -> None:
        ts = protocol.now()
        cmd = Command(
            msg_id=protocol.new_message_id(),
            tid=self.tid,
            kind=kind,
            issued_at=ts,
            expires_at=fields.pop("expires_at", ts + 60),
            **fields,
        )
        self.link.deliver(protocol.terminal_topic(self.tid, MessageKind.CMD), cmd.to_bytes())

    async def final(self, campaign_id: int = 1) -> CampaignRecord:
        return await self.sim.wait_terminal_final(self.tid, campaign_id, timeout_s=WAIT)


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


def assert_wire_consistent(harness: Harness, record: CampaignRecord) -> None:
    events = harness.link.of_kind(MessageKind.EVENTS)
    mine = [e for e in events if e.campaign_id == record.campaign_id]
    assert [(e.msg_id, e.seq, e.state) for e in mine] == [
        (e.msg_id, e.seq, e.state) for e in record.events
    ]
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1))
    assert len({e.msg_id for e in events}) == len(events)
    state = S.PENDING
    for event in mine:
        assert can_move(state, event.state) or state == event.state, (state, event.state)
        state = event.state


HAPPY = [
    S.QUEUED,
    S.DOWNLOADING,
    S.DOWNLOADED,
    S.VERIFYING,
    S.VERIFIED,
    S.BACKING_UP,
    S.INSTALLING,
    S.REBOOTING,
    S.SELF_TESTING,
    S.SUCCEEDED,
]


# -- the update sequence ------------------------------------------------------------


async def test_success_path(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        before_data, before_txns = h.terminal.data_checksum, h.terminal.pending_txns
        app = package(http, "pay", PackageKind.APP, "3.1")
        fw = package(http, "os", PackageKind.FIRMWARE, "2.0")
        h.publish_desired(desired([app, fw]))
        record = await h.final()

        assert record.final_state is S.SUCCEEDED
        assert collapsed(record.states) == [
            S.QUEUED,
            *[S.DOWNLOADING, S.DOWNLOADED, S.VERIFYING, S.VERIFIED] * 2,
            *HAPPY[5:],
        ]
        progress = [e.progress for e in record.events if e.state is S.DOWNLOADING]
        assert progress.count(0) == 2
        assert set(progress) <= {0, 25, 50, 75}
        assert len(progress) > 2  # intermediate progress was reported
        assert_wire_consistent(h, record)
        assert [r[0] for r in http.requests] == ["/artifacts/os-2.0", "/artifacts/pay-3.1"]

        assert h.terminal.versions == {"os": "2.0", "pay": "3.1"}
        assert record.data_intact
        assert h.terminal.pending_txns == before_txns
        assert h.terminal.data_checksum == before_data

        hellos = h.link.of_kind(MessageKind.HELLO)
        assert len(hellos) == 2
        assert hellos[0].boot_id != hellos[1].boot_id
        assert hellos[1].versions == {"os": "2.0", "pay": "3.1"}
        assert h.link.disconnects == 1

        seen = len(h.link.published)
        await h.link.wait_for(
            lambda: any(t.endswith("/heartbeat") for t, _, _ in h.link.published[seen:])
        )
        beat = h.link.of_kind(MessageKind.HEARTBEAT)[-1]
        assert beat.versions == {"os": "2.0", "pay": "3.1"}


async def test_incompatible_model_is_rejected(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.publish_desired(desired([package(http, models=["OTHER"])]))
        record = await h.final()
        assert record.states == [S.REJECTED]
        assert record.events[0].error_code == "INCOMPATIBLE_MODEL"
        assert record.events[0].stage == "check"
        assert http.requests == []


async def test_already_installed(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.publish_desired(desired([package(http, version="1.0")]))
        record = await h.final()
        assert record.states == [S.ALREADY_INSTALLED]
        assert http.requests == []


async def test_corrupt_download_fails_verification(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(corrupt_rate=1.0))) as h:
        h.publish_desired(desired([package(http)]))
        record = await h.final()
        assert record.final_state is S.FAILED
        assert record.error_code == "HASH_MISMATCH"
        assert record.events[-1].stage == "verify"
        assert collapsed(record.states)[-2:] == [S.VERIFYING, S.FAILED]
        assert h.terminal.versions == {"os": "1.0", "pay": "1.0"}
        assert record.data_intact
        assert_wire_consistent(h, record)


async def test_dropped_download_resumes_with_range(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(download_drop_rate=1.0))) as h:
        h.publish_desired(desired([package(http)]))
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
        h.publish_desired(desired([package(http)]))
        record = await h.final()
        assert record.final_state is S.FAILED
        assert record.error_code == "DOWNLOAD_FAILED"
        assert record.events[-1].stage == "download"
        assert len(http.requests) == 2


async def test_install_fault_rolls_back(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(install_fail_rate=1.0))) as h:
        txns = h.terminal.pending_txns
        h.publish_desired(desired([package(http)]))
        record = await h.final()
        assert record.final_state is S.ROLLED_BACK
        assert record.error_code == "INSTALL_FAILED"
        assert record.events[-1].stage == "install"
        assert collapsed(record.states)[-3:] == [S.BACKING_UP, S.INSTALLING, S.ROLLED_BACK]
        assert h.terminal.versions == {"os": "1.0", "pay": "1.0"}
        assert h.terminal.pending_txns == txns
        assert record.data_intact
        assert_wire_consistent(h, record)


async def test_self_test_fault_rolls_back(http: ArtifactServer) -> None:
    faults = Faults(self_test_fail_models=frozenset({MODEL}))
    async with running(make_config(faults=faults)) as h:
        txns = h.terminal.pending_txns
        h.publish_desired(desired([package(http)]))
        record = await h.final()
        assert record.final_state is S.ROLLED_BACK
        assert record.error_code == "SELF_TEST_FAILED"
        assert record.events[-1].stage == "self_test"
        assert collapsed(record.states) == [*HAPPY[:-1], S.ROLLED_BACK]
        assert h.terminal.versions == {"os": "1.0", "pay": "1.0"}
        assert record.versions_after == record.versions_before
        assert h.terminal.pending_txns == txns
        assert record.data_intact
        assert len(h.link.of_kind(MessageKind.HELLO)) == 2
        assert_wire_consistent(h, record)


async def test_busy_terminal_defers_then_proceeds(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        h.terminal.set_busy(True)
        h.publish_desired(desired([package(http)]))

        def deferred() -> bool:
            return any(e.state is S.DEFERRED for e in h.link.of_kind(MessageKind.EVENTS))

        await h.link.wait_for(deferred)
        assert http.requests == []
        h.terminal.set_busy(False)
        record = await h.final()
        assert record.final_state is S.SUCCEEDED
        assert collapsed(record.states) == [S.QUEUED, S.DEFERRED, *HAPPY[1:]]
        deferred_event = record.events[1]
        assert deferred_event.stage == "busy"
        assert_wire_consistent(h, record)


async def test_random_busy_period_defers(http: ArtifactServer) -> None:
    config = make_config(timing=make_config().timing.model_copy(update={"busy_probability": 1}))
    async with running(config) as h:
        h.publish_desired(desired([package(http)]))
        record = await h.final()
        assert collapsed(record.states) == [S.QUEUED, S.DEFERRED, *HAPPY[1:]]


async def test_paused_before_start_does_not_start(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        pkg = package(http)
        # Campaign 1 holds the worker (busy) while campaign 2 is queued, then paused.
        h.terminal.set_busy(True)
        h.publish_desired(desired([pkg], campaign_id=1))
        await h.link.wait_for(lambda: h.terminal.record(1) is not None)
        h.link.deliver(protocol.desired_topic(GROUP), desired([pkg], campaign_id=2))
        h.link.deliver(
            protocol.desired_topic(GROUP),
            desired([pkg], campaign_id=2, revision=2, status="paused"),
        )
        h.terminal.set_busy(False)
        first = await h.final(1)
        assert first.final_state is S.SUCCEEDED

        # Campaign 3 is a barrier: once it settles, campaign 2 would have started.
        h.link.deliver(
            protocol.desired_topic(GROUP), desired([package(http, version="3.0")], campaign_id=3)
        )
        await h.final(3)
        assert h.terminal.record(2) is None
        assert {e.campaign_id for e in h.link.of_kind(MessageKind.EVENTS)} == {1, 3}

        # Resumed: a later active revision lets it start (already on 3.0 by now).
        h.link.deliver(protocol.desired_topic(GROUP), desired([pkg], campaign_id=2, revision=3))
        resumed = await h.final(2)
        assert resumed.final_state is S.SUCCEEDED


async def test_bucket_outside_range_does_nothing(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        bucket = protocol.bucket_of(h.tid)
        outside = (
            BucketRange(lo=bucket + 1, hi=protocol.BUCKETS)
            if bucket < 9999
            else (BucketRange(lo=0, hi=bucket))
        )
        h.publish_desired(desired([package(http)], campaign_id=1, buckets=outside))
        h.link.deliver(
            protocol.desired_topic(GROUP), desired([package(http, "pay", PackageKind.APP)], 2)
        )
        await h.final(2)
        assert h.terminal.record(1) is None
        assert {e.campaign_id for e in h.link.of_kind(MessageKind.EVENTS)} == {2}

        # The next revision widens the wave to include the terminal.
        h.publish_desired(desired([package(http)], campaign_id=1, revision=2))
        assert (await h.final(1)).final_state is S.SUCCEEDED


async def test_duplicate_desired_is_handled_once(http: ArtifactServer) -> None:
    async with running(make_config()) as h:
        payload = desired([package(http)])
        h.publish_desired(payload)
        h.publish_desired(payload)
        await h.final()
        h.link.deliver(protocol.desired_topic(GROUP), desired([package(http, "pay")], 2))
        await h.final(2)
        assert [r.campaign_id for r in h.terminal.records()] == [1, 2]


# -- commands -----------------------------------------------------------------------


async def test_cancel_before_start_and_retry(http: ArtifactServer) -> None:
    async with running(make_config(faults=Faults(install_fail_rate=1.0))) as h:
        h.terminal.set_busy(True)
        h.publish_desired(desired([package(http)], campaign_id=1))
        await h.link.wait_for(
            lambda: any(e.state is S.DEFERRED for e in h.link.of_kind(MessageKind.EVENTS))
        )
        h.command(CommandKind.CANCEL, campaign_id=1)
        record = await h.final(1)
        assert record.abandoned
        assert record.final_state is None
        assert record.states == [S.QUEUED, S.DEFERRED]
        h.terminal.set_busy(False)

        h.command(CommandKind.RETRY, campaign_id=1)
        await h.link.wait_for(lambda: len(h.terminal.records()) == 2)
        retried = await h.final(1)
        assert retried.attempt == 2
        assert retried.final_state is S.ROLLED_BACK
        assert retried.events[0].seq == record.events[-1].seq + 1


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
        h.publish_desired(desired([package(http)]))
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
        h.publish_desired(desired([package(http)]))
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
        h.publish_desired(desired([package(http)]))
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
        barrier = desired([package(http, "pay", PackageKind.APP)], campaign_id=2)
        h.publish_desired(barrier)
        await h.sim.wait_desired((2, "active"), timeout_s=WAIT)
        h.publish_desired(desired([pkg], revision=2, status="active"))
        h.publish_desired(barrier)
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
        h.publish_desired(desired([package(http, size=20_000)]))
        records = await h.sim.wait_final(1, 30, timeout_s=WAIT)
        assert len(records) == 30
        report = h.sim.report()
    assert report["integrity"]["ok"], report["integrity"]
    assert report["integrity"]["checked"] == 30
    finals = report["campaigns"]["1"]["final"]
    assert sum(finals.values()) == 30
    assert set(finals) <= {"succeeded", "rolled_back", "failed"}
    assert report["campaigns"]["1"]["duration_s"]["p50"] > 0
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


async def test_aiomqtt_link_against_real_broker(broker: Any, http: ArtifactServer) -> None:
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
                records = await sim.wait_final(1, 3, timeout_s=WAIT)
            finally:
                stop.set()
        assert {r.final_state for r in records} == {S.SUCCEEDED}
        expected = {(r.tid, e.msg_id) for r in records for e in r.events}

        got: set[tuple[str, str]] = set()
        kinds: set[MessageKind] = set()
        async with asyncio.timeout(WAIT):
            async for message in controller.messages:
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
    real_publish = aiomqtt.Client.publish
    timed_out = asyncio.Event()

    async def publish(self: aiomqtt.Client, topic: str, *args: Any, **kwargs: Any) -> None:
        if topic.endswith("/heartbeat") and not timed_out.is_set():
            # What aiomqtt raises when no PUBACK came in time; the connection stays up.
            timed_out.set()
            raise aiomqtt.MqttError("Operation timed out")
        await real_publish(self, topic, *args, **kwargs)

    monkeypatch.setattr(aiomqtt.Client, "publish", publish)
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
    link = aiomqtt_link_factory(config)(profile)
    assert isinstance(link, AiomqttLink)
    made: list[aiomqtt.Client] = []
    real_new_client = AiomqttLink._new_client

    def new_client(self: AiomqttLink) -> aiomqtt.Client:
        made.append(real_new_client(self))
        return made[-1]

    monkeypatch.setattr(AiomqttLink, "_new_client", new_client)
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
