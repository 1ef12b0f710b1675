"""Webhooks on a real PostgreSQL, posting to a real HTTP receiver on 127.0.0.1.

Campaign events come from real operator requests (fleet.campaigns) and, in the last test,
from the real controller running a small rollout on the simulator. Tests wait on what the
receiver got, never on sleeps; backoff and polling are set short through settings.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_sim.fleet import Simulator
from fleet import audit, campaigns, webhooks
from fleet.__main__ import main
from fleet.clock import SystemClock
from fleet.db import Repository, connect
from fleet.embedded import Mosquitto
from fleet.errors import NotFoundError, WebhookError
from fleet.policy import CampaignPolicy, Wave
from fleet.runner import CampaignRunner
from fleet.settings import FleetSettings
from fleet.webhooks import WebhookSender
from tests.stack import Stack, eventually, make_settings, running, sim_config, terminal_ids

CLOCK = SystemClock()
FAST_WEBHOOKS = {
    "webhook_poll_s": 0.02,
    "webhook_timeout_s": 2.0,
    "webhook_backoff_s": 0.02,
    "webhook_max_backoff_s": 0.1,
}


# -- a real HTTP receiver ----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded

    @property
    def delivery(self) -> int:
        return int(self.headers["x-fleet-delivery"])


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server that records every request, then answers as told.

    `answer(request)` says what to do: "ok" (200), "fail" (500), "close" (drop the
    connection without a response) or "hang" (never answer).
    """

    answer: Callable[[Request], str] = lambda _: "ok"
    requests: list[Request] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def events(self) -> list[str]:
        return [r.payload["event"] for r in self.requests]

    async def wait_for(self, count: int, within_s: float = 30.0) -> list[Request]:
        async with asyncio.timeout(within_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                assert request_line.startswith(b"POST /hook HTTP/1.1")
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(headers, body)
                todo = self.answer(request)
                async with self._arrived:
                    self.requests.append(request)
                    self._arrived.notify_all()
                if todo == "close":
                    return
                if todo == "hang":
                    await self._release.wait()
                    return
                status = "200 OK" if todo == "ok" else "500 Internal Server Error"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _settings(**overrides: Any) -> FleetSettings:
    return FleetSettings.model_validate(FAST_WEBHOOKS | overrides)


@contextlib.asynccontextmanager
async def sending(repo: Repository, **overrides: Any) -> AsyncIterator[None]:
    """Run one delivery loop (one controller's `webhooks` task) for a block."""
    stop = asyncio.Event()
    task = asyncio.create_task(WebhookSender(repo, _settings(**overrides)).run(stop))
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


# -- campaign events without a controller ------------------------------------------------


async def _campaign(repo: Repository, name: str = "c", model: str = "P400") -> int:
    """A started campaign over one terminal: operator requests make its events.

    A terminal of another model than the package's is excluded: nothing is left to do.
    """
    async with repo.transaction() as q:
        await q.upsert_terminals([{"id": "T000001", "model": model}])
        await q.create_group("g")
        await q.assign_group("g", ["T000001"])
        if await q.package_by_name("os", "2.0.0") is None:
            await q.add_package("os", "firmware", "2.0.0", 10, "a" * 64, ["P400"])
    policy = CampaignPolicy(waves=[Wave(percent=100)], window=None)
    campaign_id = await campaigns.create_campaign(
        repo, CLOCK, name=name, groups=["g"], packages=[("os", "2.0.0")], policy=policy
    )
    await campaigns.start_campaign(repo, CLOCK, campaign_id)
    return campaign_id


async def _pause_resume(repo: Repository, campaign_id: int, times: int) -> None:
    for _ in range(times):
        await campaigns.pause_campaign(repo, CLOCK, campaign_id)
        await campaigns.resume_campaign(repo, CLOCK, campaign_id)


async def _add(
    repo: Repository, url: str, events: Sequence[str] = webhooks.EVENTS, **kw: Any
) -> tuple[webhooks.WebhookEndpoint, str]:
    return await webhooks.add_endpoint(
        repo, url=url, events=events, secret=kw.pop("secret", None), actor="test", at=CLOCK.now()
    )


# -- the signature -----------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":1}'
    mac = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    header = webhooks.sign("k" * 16, 1_700_000_000, body)
    assert header == f"t=1700000000,v1={mac}"
    assert webhooks.verify("k" * 16, header, body, now=1_700_000_100)
    assert not webhooks.verify("k" * 15 + "x", header, body, now=1_700_000_100)
    assert not webhooks.verify("k" * 16, header, body + b" ", now=1_700_000_100)
    assert not webhooks.verify("k" * 16, header, body, now=1_700_000_301)  # stale
    assert not webhooks.verify("k" * 16, "t=x,v1=00", body, now=1_700_000_000)
    assert not webhooks.verify("k" * 16, "", body, now=1_700_000_000)
    # While a secret rotates, any of several v1 values may match.
    rotated = f"t=1700000000,v1={'0' * 64},v1={mac}"
    assert webhooks.verify("k" * 16, rotated, body, now=1_700_000_000)


def test_operations_documents_every_event_and_its_verify_snippet_works() -> None:
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    section = text[text.index("## Webhooks") : text.index("## Metrics")]
    for event in webhooks.EVENTS:
        assert f"| `{event}` |" in section, event
    snippet = section[section.index("```python") + len("```python") : section.index("```\n\n(")]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)  # our own documentation
    body = b'{"id":1}'
    header = webhooks.sign("s" * 20, int(time.time()), body)
    assert namespace["verify"]("s" * 20, header, body)
    assert not namespace["verify"]("t" * 20, header, body)
    assert not namespace["verify"]("s" * 20, webhooks.sign("s" * 20, 1, body), body)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    for failures, step in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0), (500, 60.0)]:
        wait = webhooks.backoff_s(failures, 1.0, 60.0)
        assert step / 2 <= wait <= step


# -- operators' requests -----------------------------------------------------------------


async def test_endpoint_requests_are_validated_audited_and_never_show_the_secret(
    repo: Repository,
) -> None:
    bad = [
        ({"url": "ftp://x/y"}, "bad_url"),
        ({"url": "http:///nohost"}, "bad_url"),
        ({"url": "https://user:pw@x/y"}, "bad_url"),
        ({"url": "http://x:99999/"}, "bad_url"),
        ({"url": "http://xn--zz.example.com/hook"}, "bad_url"),  # not a valid IDNA name
        ({"events": []}, "bad_events"),
        ({"events": ["campaign.exploded"]}, "bad_events"),
        ({"secret": "short"}, "bad_secret"),
    ]
    for change, code in bad:
        request = {"url": "https://hooks.example/x", "events": ["campaign.paused"]} | change
        with pytest.raises(WebhookError) as caught:
            await _add(repo, request["url"], request["events"], secret=change.get("secret"))
        assert caught.value.code == code, change

    endpoint, secret = await _add(repo, "https://hooks.example/x", ["campaign.paused"] * 2)
    assert len(secret) >= 40  # 32 random bytes, URL-safe base64
    assert endpoint.events == ["campaign.paused"]
    given, chosen = await _add(repo, "http://127.0.0.1:9/y", secret="s" * 20)
    assert chosen == "s" * 20
    assert given.events == list(webhooks.EVENTS)
    assert [e.id for e in await webhooks.list_endpoints(repo)] == [endpoint.id, given.id]
    assert "secret" not in json.dumps([vars(e) for e in await webhooks.list_endpoints(repo)])

    await webhooks.remove_endpoint(repo, endpoint.id, actor="test", at=CLOCK.now())
    with pytest.raises(NotFoundError) as missing:
        await webhooks.remove_endpoint(repo, endpoint.id, actor="test", at=CLOCK.now())
    assert missing.value.code == "not_found"
    with pytest.raises(NotFoundError):
        await webhooks.recent_deliveries(repo, 999, 10)
    assert [e.id for e in await webhooks.list_endpoints(repo)] == [given.id]

    async with repo.connection() as q:
        log = [(r["action"], r["detail"]) for r in await q.audit_page(0, 100)]
    assert [a for a, _ in log] == ["webhook_added", "webhook_added", "webhook_removed"]
    assert all(secret not in d and "s" * 20 not in d for _, d in log)
    # Viewers read the audit log: a receiver's own secret in a URL's path stays out of it.
    assert [json.loads(d)["url"] for _, d in log] == [
        "https://hooks.example/…",
        "http://127.0.0.1:9/…",
        "https://hooks.example/…",
    ]
    assert (await audit.verify(repo)).intact


# -- delivery ----------------------------------------------------------------------------


async def test_a_host_taken_off_the_allowed_list_is_held_back_until_it_is_allowed(
    repo: Repository, receiver: Receiver
) -> None:
    endpoint, _ = await _add(repo, receiver.url, ["campaign.paused", "campaign.resumed"])
    campaign_id = await _campaign(repo)
    await _pause_resume(repo, campaign_id, 1)
    async with sending(repo, webhook_allowed_hosts="hooks.example"):

        async def held_back() -> bool:
            [state] = await webhooks.list_endpoints(repo)
            return state.attempts >= 2

        await eventually(held_back, what="the held-back endpoint to be retried")
    [state] = await webhooks.list_endpoints(repo)
    assert state.pending == 2
    assert "FLEET_WEBHOOK_ALLOWED_HOSTS" in (state.last_error or "")
    assert receiver.requests == []
    async with sending(repo, webhook_allowed_hosts="127.0.0.1"):
        requests = await receiver.wait_for(2)
    assert [r.payload["event"] for r in requests] == ["campaign.paused", "campaign.resumed"]
    assert endpoint.id == state.id


async def test_events_arrive_signed_in_audit_order_and_only_the_subscribed_kinds(
    repo: Repository, receiver: Receiver
) -> None:
    everything, secret_all = await _add(repo, receiver.url)
    pauses, secret_pauses = await _add(repo, receiver.url, ["campaign.paused"])
    campaign_id = await _campaign(repo, name="spring")
    await _pause_resume(repo, campaign_id, 2)
    await campaigns.pause_campaign(repo, CLOCK, campaign_id)
    await campaigns.cancel_campaign(repo, CLOCK, campaign_id)
    async with sending(repo):
        got = await receiver.wait_for(7 + 3)
    secrets_by_id = {str(everything.id): secret_all, str(pauses.id): secret_pauses}

    by_endpoint: dict[str, list[Request]] = {}
    for request in got:
        # Which endpoint it was for: the one whose secret verifies it (and only that one).
        valid = [
            endpoint_id
            for endpoint_id, secret in secrets_by_id.items()
            if webhooks.verify(
                secret, request.headers["x-fleet-signature"], request.body, now=time.time()
            )
        ]
        assert len(valid) == 1
        by_endpoint.setdefault(valid[0], []).append(request)
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-fleet-event"] == request.payload["event"]
        assert request.payload["id"] == request.delivery
        assert request.payload["campaign"] == {"id": campaign_id, "name": "spring"}

    to_all = by_endpoint[str(everything.id)]
    assert [r.payload["event"] for r in to_all] == [
        "campaign.started",
        "campaign.paused",
        "campaign.resumed",
        "campaign.paused",
        "campaign.resumed",
        "campaign.paused",
        "campaign.canceled",
    ]
    ids = [r.delivery for r in to_all]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert to_all[1].payload["actor"] == "operator"
    assert to_all[1].payload["detail"] == {"reason": "operator"}
    assert to_all[0].payload["at"].endswith("+00:00")
    to_pauses = by_endpoint[str(pauses.id)]
    assert [r.payload["event"] for r in to_pauses] == ["campaign.paused"] * 3
    assert [r.delivery for r in to_pauses] == [ids[1], ids[3], ids[5]]

    listed = {e.id: e for e in await webhooks.list_endpoints(repo)}
    assert listed[everything.id].pending == 0
    assert listed[everything.id].delivered_through == ids[-1]
    log = await webhooks.recent_deliveries(repo, pauses.id, 10)
    assert [(d.audit_id, d.status, d.ok) for d in log] == [(i, 200, True) for i in ids[5::-2]]


async def test_a_failing_delivery_is_retried_and_nothing_overtakes_it(
    repo: Repository, receiver: Receiver
) -> None:
    # The first event fails three ways (500, a dropped connection, no answer in time)
    # before it succeeds; the two after it must wait.
    script = iter(["fail", "close", "hang"])

    def answer(request: Request) -> str:
        return next(script, "ok") if request.delivery == first else "ok"

    receiver.answer = answer
    endpoint, secret = await _add(repo, receiver.url)
    campaign_id = await _campaign(repo)
    await _pause_resume(repo, campaign_id, 1)
    async with repo.connection() as q:
        first = (await q.audit_page(0, 100))[-3]["id"]  # campaign_started

    async with sending(repo, webhook_timeout_s=0.5):
        got = await receiver.wait_for(6)
    assert [r.delivery for r in got] == [first] * 4 + [first + 1, first + 2]
    assert [r.payload["event"] for r in got[3:]] == [
        "campaign.started",
        "campaign.paused",
        "campaign.resumed",
    ]
    # Each retry is signed afresh and verifies.
    assert all(
        webhooks.verify(secret, r.headers["x-fleet-signature"], r.body, now=time.time())
        for r in got
    )
    log = await webhooks.recent_deliveries(repo, endpoint.id, 10)
    oldest_first = [(d.audit_id, d.attempt, d.status) for d in reversed(log)]
    assert oldest_first == [
        (first, 1, 500),
        (first, 2, None),
        (first, 3, None),
        (first, 4, 200),
        (first + 1, 1, 200),
        (first + 2, 1, 200),
    ]
    assert log[-2].error is not None
    assert "no response within" in (log[-3].error or "")
    [listed] = await webhooks.list_endpoints(repo)
    assert (listed.attempts, listed.last_error, listed.failing_since) == (0, None, None)


async def test_an_endpoint_that_stays_down_keeps_its_events_and_shows_its_lag(
    repo: Repository, receiver: Receiver
) -> None:
    receiver.answer = lambda _: "fail"
    endpoint, _ = await _add(repo, receiver.url)
    campaign_id = await _campaign(repo)
    await _pause_resume(repo, campaign_id, 1)
    async with sending(repo):
        await receiver.wait_for(3)

        async def failing() -> bool:
            [listed] = await webhooks.list_endpoints(repo)
            return listed.attempts >= 3

        await eventually(failing, what="three failed attempts recorded")
    [listed] = await webhooks.list_endpoints(repo)
    assert listed.pending == 3
    assert listed.last_error == "HTTP 500"
    assert listed.failing_since is not None
    assert listed.next_attempt_at is not None
    # Only the oldest event was tried, again and again; the others wait behind it.
    assert {r.payload["event"] for r in receiver.requests} == {"campaign.started"}
    assert len({r.delivery for r in receiver.requests}) == 1

    receiver.answer = lambda _: "ok"
    seen = len(receiver.requests)
    async with sending(repo):
        got = await receiver.wait_for(seen + 3)
    assert [r.payload["event"] for r in got[seen:]] == [
        "campaign.started",
        "campaign.paused",
        "campaign.resumed",
    ]
    [listed] = await webhooks.list_endpoints(repo)
    assert (listed.pending, listed.attempts) == (0, 0)
    assert endpoint.id == listed.id


async def test_a_new_endpoint_starts_at_the_head_and_a_removed_one_gets_nothing_more(
    repo: Repository, receiver: Receiver
) -> None:
    campaign_id = await _campaign(repo)
    await campaigns.pause_campaign(repo, CLOCK, campaign_id)
    other = Receiver()
    await other.start()
    try:
        leaving, _ = await _add(repo, receiver.url)
        staying, _ = await _add(repo, other.url)
        async with sending(repo):
            await campaigns.resume_campaign(repo, CLOCK, campaign_id)
            await receiver.wait_for(1)
            await other.wait_for(1)
            await webhooks.remove_endpoint(repo, leaving.id, actor="test", at=CLOCK.now())
            await _pause_resume(repo, campaign_id, 2)
            await other.wait_for(5)
        # History before the endpoints existed (started, the first pause) never came.
        assert receiver.events() == ["campaign.resumed"]
        assert other.events() == ["campaign.resumed"] + ["campaign.paused", "campaign.resumed"] * 2
        assert [e.id for e in await webhooks.list_endpoints(repo)] == [staying.id]
        assert len(await webhooks.recent_deliveries(repo, leaving.id, 10)) == 1
    finally:
        await other.stop()


async def test_two_controllers_deliver_each_event_once_in_order(
    repo: Repository, receiver: Receiver, database_url: str
) -> None:
    await _add(repo, receiver.url)
    second = Receiver()
    await second.start()
    other_repo = await connect(database_url, pool_size=4)
    try:
        await _add(repo, second.url, ["campaign.paused"])
        campaign_id = await _campaign(repo)
        async with sending(repo), sending(other_repo):
            await _pause_resume(repo, campaign_id, 15)
            got = await receiver.wait_for(31)
            await second.wait_for(15)
            # Give a duplicate the chance to show: every endpoint's cursor at the head.

            async def caught_up() -> bool:
                return all(e.pending == 0 for e in await webhooks.list_endpoints(repo))

            await eventually(caught_up, what="both endpoints caught up")
        ids = [r.delivery for r in receiver.requests]
        assert len(got) == len(ids) == 31
        assert ids == sorted(set(ids))
        assert [r.delivery for r in second.requests] == sorted(
            {r.delivery for r in second.requests}
        )
        assert len(second.requests) == 15
    finally:
        await other_repo.close()
        await second.stop()


async def test_completion_is_recorded_once_by_several_runners_and_not_while_paused(
    repo: Repository, tmp_path: Path
) -> None:
    campaign_id = await _campaign(repo, model="X9")
    await campaigns.pause_campaign(repo, CLOCK, campaign_id)
    settings = FleetSettings(artifact_dir=tmp_path)
    runners = [CampaignRunner(repo, _NoPublisher(), settings, CLOCK) for _ in range(2)]
    await asyncio.gather(*(r.tick() for r in runners))

    async def completions() -> int:
        async with repo.connection() as q:
            return [r["action"] for r in await q.campaign_audit(campaign_id)].count(
                "campaign_completed"
            )

    assert await completions() == 0
    await campaigns.resume_campaign(repo, CLOCK, campaign_id)
    for _ in range(3):
        await asyncio.gather(*(r.tick() for r in runners))
    assert await completions() == 1
    assert (await campaigns.campaign_status(repo, campaign_id)).status == "completed"
    # A fresh runner (a restarted controller) does not record it again.
    await CampaignRunner(repo, _NoPublisher(), settings, CLOCK).tick()
    assert await completions() == 1


class _NoPublisher:
    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        pass


# -- the real controller -----------------------------------------------------------------


async def test_the_controller_announces_a_rollout_from_start_to_completion(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(broker, database_url, tmp_path).model_copy(update=FAST_WEBHOOKS)
    stack = Stack(settings, repo, tmp_path)
    ids = terminal_ids(4)
    await stack.provision(ids, {"g1": ids})
    await stack.add_package("os", "2.0.0", ["P400"])
    _, secret = await _add(
        repo,
        receiver.url,
        ["campaign.started", "campaign.wave_advanced", "campaign.completed"],
    )
    await stack.start_controller()
    try:
        simulator = Simulator(sim_config(broker, 4, ["g1"]))
        async with running(simulator):
            await simulator.wait_connected(timeout_s=30)
            campaign_id = await stack.campaign(["g1"], ("os", "2.0.0"), waves=[50, 100])
            got = await receiver.wait_for(3, within_s=60)
    finally:
        await stack.stop_controller()
    assert [r.payload["event"] for r in got] == [
        "campaign.started",
        "campaign.wave_advanced",
        "campaign.completed",
    ]
    assert all(r.payload["campaign"] == {"id": campaign_id, "name": "c1"} for r in got)
    assert got[1].payload["actor"] == "runner"
    assert got[1].payload["detail"]["opened"] == 2
    assert got[2].payload["detail"] == {"waves": 2, "counts": {"succeeded": 4}}
    assert all(
        webhooks.verify(secret, r.headers["x-fleet-signature"], r.body, now=time.time())
        for r in got
    )
    status = await campaigns.campaign_status(repo, campaign_id)
    assert status.status == "completed"


# -- the command line --------------------------------------------------------------------


def test_cli_adds_lists_and_removes_endpoints(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", database_url)

    def run(*argv: str) -> str:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    added = run("webhook", "add", "https://ops.example/h", "--event", "campaign.paused")
    assert "webhook 1 -> https://ops.example/h: campaign.paused" in added
    assert "secret (shown once" in added
    secret = added.rsplit(" ", 1)[1].strip()
    assert "ops.example" in run("webhook", "list")
    [listed] = json.loads(run("webhook", "list", "--json"))
    assert listed["events"] == ["campaign.paused"]
    assert secret not in json.dumps(listed)
    assert run("webhook", "deliveries", "1") == ""
    assert "webhook 1 removed" in run("webhook", "remove", "1")
    assert json.loads(run("webhook", "list", "--json")) == []
    assert main(["webhook", "remove", "1"]) == 1
    assert "no webhook endpoint '1'" in capsys.readouterr().err
    assert main(["webhook", "add", "ftp://x", "--event", "campaign.paused"]) == 1
    assert "http:// or https://" in capsys.readouterr().err
