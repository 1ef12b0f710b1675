"""The REST API over a real controller, broker and database: roles, errors, a whole rollout.

The API is served by the controller under test (uvicorn on its own port) and called over
real HTTP with httpx; the fuzz test drives it from its own OpenAPI spec with schemathesis.
"""

import asyncio
import hashlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from device_sim.fleet import Simulator
from fleet import protocol, tokens, webhooks
from fleet.db import Repository
from fleet.embedded import Mosquitto
from fleet.tokens import Role
from tests.conftest import TERMINAL_SECRET
from tests.mqtt_probe import Probe
from tests.stack import Stack, eventually, make_settings, running, sim_config, terminal_ids
from tests.test_webhooks import Receiver

TERMINALS = 6


@dataclass
class Api:
    """A running controller's API and one token of each role."""

    stack: Stack
    base: str
    admin: str
    operator: str
    viewer: str

    def client(self, token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=30)


@pytest.fixture
async def api(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> AsyncIterator[Api]:
    # Webhooks may only go to this machine: the fuzz test registers endpoints at random.
    settings = make_settings(broker, database_url, tmp_path).model_copy(
        update={"webhook_allowed_hosts": "127.0.0.1,localhost"}
    )
    stack = Stack(settings, repo, tmp_path)
    ids = terminal_ids(TERMINALS)
    await stack.provision(ids, {})
    issued = {}
    for role in Role:
        _, issued[role] = await tokens.issue(
            repo, name=f"{role.label}-1", role=role, actor="test", at=stack.clock.now()
        )
    await stack.start_controller()
    try:
        yield Api(
            stack=stack,
            base=f"http://127.0.0.1:{stack.settings.api_port}/api/v1",
            admin=issued[Role.ADMIN],
            operator=issued[Role.OPERATOR],
            viewer=issued[Role.VIEWER],
        )
    finally:
        await stack.stop_controller()


async def _spec(api: Api) -> dict[str, Any]:
    async with api.client(None) as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def _writes(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (method, path) of the spec that is not a read, with ids filled in."""
    found = []
    for path, operations in spec["paths"].items():
        for method in operations:
            if method.upper() not in {"GET", "HEAD", "OPTIONS"}:
                concrete = path.replace("{campaign_id}", "1").replace("{token_id}", "1")
                concrete = concrete.replace("{name}", "g1").replace("{package_id}", "1")
                concrete = concrete.replace("{webhook_id}", "1")
                found.append((method.upper(), concrete.removeprefix("/api/v1")))
    return found


async def _counts(repo: Repository) -> dict[str, int]:
    """Rows of every table an API call could change."""
    tables = [
        "audit_log",
        "groups",
        "group_members",
        "packages",
        "campaigns",
        "api_tokens",
        "webhook_endpoints",
    ]
    async with repo.connection() as q:
        counts = {t: await q._conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
        counts["live_tokens"] = await q._conn.fetchval(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL"
        )
        counts["running"] = await q._conn.fetchval(
            "SELECT count(*) FROM campaigns WHERE control <> 'draft'"
        )
    return counts


async def test_anonymous_and_viewer_tokens_cannot_change_anything(
    api: Api, repo: Repository
) -> None:
    # Something to change: a group, a package and a draft campaign, made by the operator.
    async with api.client(api.operator) as http:
        assert (await http.post("/groups", json={"name": "g1"})).status_code == 201
        upload = await http.post(
            "/packages",
            params={"name": "os", "version": "2.0.0", "kind": "firmware", "models": ["P400"]},
            content=b"firmware image",
        )
        assert upload.status_code == 201, upload.text
        created = await http.post(
            "/campaigns",
            json={"name": "c1", "groups": ["g1"], "packages": [{"name": "os", "version": "2.0.0"}]},
        )
        assert created.status_code == 201, created.text
    writes = _writes(await _spec(api))
    # Every kind of change the API offers is covered below, so a new one is too.
    assert {path.split("/")[1] for _, path in writes} >= {"groups", "packages", "campaigns"}
    before = await _counts(repo)
    bodies: dict[str, Any] = {
        "/groups": {"name": "g2"},
        "/groups/g1/members": {"terminals": ["T000000"]},
        "/campaigns": {
            "name": "c2",
            "groups": ["g1"],
            "packages": [{"name": "os", "version": "2.0.0"}],
        },
        "/tokens": {"name": "intruder", "role": "admin"},
        "/webhooks": {"url": "http://127.0.0.1:9/x", "events": ["campaign.paused"]},
    }
    forged = "fleet_" + "A" * 43
    for token, status, code in (
        (None, 401, "unauthenticated"),
        (forged, 401, "unauthenticated"),
        ("not-a-token", 401, "unauthenticated"),
        (api.viewer, 403, "forbidden"),
    ):
        async with api.client(token) as http:
            for method, path in writes:
                response = await http.request(method, path, json=bodies.get(path))
                assert response.status_code == status, (token, method, path, response.text)
                assert response.json()["error"]["code"] == code
                if status == 401:
                    assert response.headers["www-authenticate"] == "Bearer"
    # Uploads are refused before the body is read, whatever its size.
    async with api.client(api.viewer) as http:
        response = await http.post(
            "/packages",
            params={"name": "os", "version": "3.0.0", "kind": "firmware", "models": ["P400"]},
            content=b"x" * 100_000,
        )
        assert response.status_code == 403
    # The operator may not manage tokens or webhooks either.
    async with api.client(api.operator) as http:
        for method, path in writes:
            if path.startswith(("/tokens", "/webhooks")):
                response = await http.request(method, path, json=bodies.get(path))
                assert response.status_code == 403, (method, path)
    # Reads need a token too; a viewer's token reads everything.
    async with api.client(None) as http:
        assert (await http.get("/campaigns")).status_code == 401
        assert (await http.get("/terminals/T000000")).status_code == 401
    async with api.client(api.viewer) as http:
        for path in ("/campaigns", "/terminals", "/groups", "/packages", "/audit", "/campaigns/1"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/tokens")).status_code == 403
    assert await _counts(repo) == before
    assert list(await _audit_actions(repo, "test")) == []


async def _audit_actions(repo: Repository, actor: str) -> list[str]:
    async with repo.connection() as q:
        rows = await q._conn.fetch(
            "SELECT action FROM audit_log WHERE actor = $1 AND action NOT LIKE 'token_%' "
            "ORDER BY id",
            actor,
        )
    return [r["action"] for r in rows]


async def test_an_operator_rolls_out_an_update_through_the_api(
    api: Api, repo: Repository, broker: Mosquitto
) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        await _roll_out(api, repo, broker, receiver)
    finally:
        await receiver.stop()


async def _roll_out(api: Api, repo: Repository, broker: Mosquitto, receiver: Receiver) -> None:
    ids = terminal_ids(TERMINALS)
    image = os.urandom(200_000)
    simulator = Simulator(sim_config(broker, TERMINALS, ["pilot"]))
    async with running(simulator), api.client(api.operator) as http:
        await simulator.wait_connected(timeout_s=30)
        assert (await http.get("/whoami")).json() == {"name": "operator-1", "role": "operator"}
        assert (await http.post("/groups", json={"name": "pilot"})).status_code == 201
        group = await http.post("/groups/pilot/members", json={"terminals": ids})
        assert group.json()["members"] == TERMINALS
        upload = await http.post(
            "/packages",
            params={"name": "os", "version": "2.0.0", "kind": "firmware", "models": ["P400"]},
            content=image,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 201, upload.text
        package = upload.json()
        assert package["size"] == len(image)
        assert package["sha256"] == hashlib.sha256(image).hexdigest()
        again = await http.post(
            "/packages",
            params={"name": "os", "version": "2.0.0", "kind": "firmware", "models": ["P400"]},
            content=image,
        )
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "already_exists"
        other = os.urandom(1000)
        clash = await http.post(
            "/packages",
            params={"name": "os", "version": "2.0.0", "kind": "firmware", "models": ["P400"]},
            content=other,
        )
        assert clash.status_code == 409
        # A refused upload leaves nothing behind: neither in the store nor half-written.
        store = api.stack.settings.artifact_dir
        assert sorted(p.name for p in store.iterdir() if p.is_file()) == [package["sha256"]]
        assert list((store / ".uploads").iterdir()) == []

        created = await http.post(
            "/campaigns",
            json={
                "name": "api-rollout",
                "groups": ["pilot"],
                "packages": [{"name": "os", "version": "2.0.0"}],
                "policy": {
                    "waves": [{"count": 2}, {"count": TERMINALS}],
                    "window": None,
                    "health_gate": {"enabled": False},
                },
            },
        )
        assert created.status_code == 201, created.text
        campaign = created.json()
        assert campaign["status"] == "draft"
        campaign_id = campaign["id"]
        plan = await http.get(f"/campaigns/{campaign_id}/plan")
        assert plan.status_code == 200
        assert [w["wave"] for w in plan.json()["waves"]] == [1, 2]
        async with api.client(api.admin) as admin:
            hook = await admin.post(
                "/webhooks",
                json={"url": receiver.url, "events": ["campaign.started", "campaign.completed"]},
            )
            assert hook.status_code == 201, hook.text
        secret = hook.json()["secret"]
        started = await http.post(f"/campaigns/{campaign_id}/start")
        assert started.status_code == 200, started.text
        assert started.json()["enrolled"] == TERMINALS
        again = await http.post(f"/campaigns/{campaign_id}/start")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "not_draft"

        async def completed() -> bool:
            body = (await http.get(f"/campaigns/{campaign_id}")).json()
            return bool(body["status"] == "completed")

        await eventually(completed, within_s=60, what="the campaign to complete")
        progress = (await http.get(f"/campaigns/{campaign_id}")).json()
        assert progress["totals"] == {"succeeded": TERMINALS}
        assert [w["size"] for w in progress["waves"]] == [2, TERMINALS - 2]
        assert all(w["opened"] for w in progress["waves"])
        listed = (await http.get("/campaigns", params={"control": "running"})).json()
        assert [(c["id"], c["status"]) for c in listed["items"]] == [(campaign_id, "completed")]

        terminal = (await http.get(f"/terminals/{ids[0]}")).json()
        assert terminal["groups"] == ["pilot"]
        assert [(e["campaign_id"], e["state"]) for e in terminal["executions"]] == [
            (campaign_id, "succeeded")
        ]
        assert "succeeded" in {e["state"] for e in terminal["events"]}

        async def inventory_updated() -> bool:
            page = await http.get("/terminals", params={"package": "os", "version": "2.0.0"})
            return len(page.json()["items"]) == TERMINALS

        await eventually(inventory_updated, what="heartbeats to report 2.0.0")
        first = (await http.get("/terminals", params={"limit": 4, "group": "pilot"})).json()
        rest = (
            await http.get("/terminals", params={"after": first["next_cursor"], "group": "pilot"})
        ).json()
        assert [t["id"] for t in first["items"] + rest["items"]] == ids
        assert rest["next_cursor"] is None

        audit_page = (await http.get(f"/campaigns/{campaign_id}/audit")).json()
        actions = [(e["actor"], e["action"]) for e in audit_page["items"]]
        assert actions[:2] == [
            ("operator-1", "campaign_created"),
            ("operator-1", "campaign_started"),
        ]
        assert ("runner", "wave_succeeded") in actions
        verdict = (await http.get("/audit/verify")).json()
        assert verdict["intact"] is True

        # The webhook told the receiver, signed, in order; the admin sees it delivered.
        requests = await receiver.wait_for(2)
        assert [r.payload["event"] for r in requests] == ["campaign.started", "campaign.completed"]
        assert [r.payload["campaign"]["id"] for r in requests] == [campaign_id, campaign_id]
        for request in requests:
            signature = request.headers["x-fleet-signature"]
            assert webhooks.verify(secret, signature, request.body, now=time.time())
        async with api.client(api.admin) as admin:

            async def recorded() -> bool:
                # The receiver has both; the sender records each delivery after its answer.
                (listed,) = (await admin.get("/webhooks")).json()
                return bool(listed["pending"] == 0)

            await eventually(recorded, what="both deliveries to be recorded")
            (listed,) = (await admin.get("/webhooks")).json()
            assert "secret" not in listed
            assert (listed["pending"], listed["attempts"]) == (0, 0)
            deliveries = (await admin.get(f"/webhooks/{listed['id']}/deliveries")).json()
            assert [d["ok"] for d in deliveries] == [True, True]
            for url in ("ftp://x", "http://10.0.0.1/hook", "http://127.0.0.1.example.com/"):
                bad = await admin.post(
                    "/webhooks", json={"url": url, "events": ["campaign.paused"]}
                )
                assert (bad.status_code, bad.json()["error"]["code"]) == (422, "bad_url")
    assert await _audit_actions(repo, "operator-1") == [
        "group_created",
        "group_assigned",
        "package_added",
        "campaign_created",
        "campaign_started",
    ]


async def test_errors_carry_stable_codes_and_tokens_can_be_revoked(api: Api) -> None:
    async with api.client(api.operator) as http:
        missing = await http.get("/campaigns/999")
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
        unknown_route = await http.get("/nothing-here")
        assert (unknown_route.status_code, unknown_route.json()["error"]["code"]) == (
            404,
            "not_found",
        )
        invalid = await http.post("/groups", json={"name": "bad name!"})
        assert invalid.status_code == 422
        assert invalid.json()["error"]["code"] == "validation_failed"
        assert invalid.json()["error"]["fields"][0]["loc"] == ["body", "name"]
        no_member = await http.post("/groups", json={"name": "g1"})
        assert no_member.status_code == 201
        stranger = await http.post("/groups/g1/members", json={"terminals": ["NOPE"]})
        assert (stranger.status_code, stranger.json()["error"]["code"]) == (404, "not_found")
        await http.post(
            "/packages",
            params={"name": "os", "version": "2.0.0", "kind": "firmware", "models": ["P400"]},
            content=b"image",
        )
        draft = await http.post(
            "/campaigns",
            json={"name": "c1", "groups": ["g1"], "packages": [{"name": "os", "version": "2.0.0"}]},
        )
        campaign_id = draft.json()["id"]
        pause = await http.post(f"/campaigns/{campaign_id}/pause", json={"reason": "why not"})
        assert (pause.status_code, pause.json()["error"]["code"]) == (409, "not_running")
        resume = await http.post(f"/campaigns/{campaign_id}/resume")
        assert (resume.status_code, resume.json()["error"]["code"]) == (409, "not_paused")
        no_package = await http.post(
            "/campaigns",
            json={"name": "c2", "groups": ["g1"], "packages": [{"name": "os", "version": "9"}]},
        )
        assert (no_package.status_code, no_package.json()["error"]["code"]) == (404, "not_found")
        no_group = await http.post(
            "/campaigns",
            json={
                "name": "c3",
                "groups": ["nope"],
                "packages": [{"name": "os", "version": "2.0.0"}],
            },
        )
        assert (no_group.status_code, no_group.json()["error"]["code"]) == (404, "not_found")
        nul = await http.get("/terminals", params={"model": "a\x00b"})
        assert (nul.status_code, nul.json()["error"]["code"]) == (422, "refused_by_database")
        assert "\x00" not in nul.text
        empty = await http.post(
            "/packages",
            params={"name": "os", "version": "3.0.0", "kind": "firmware", "models": ["P400"]},
            content=b"",
        )
        assert (empty.status_code, empty.json()["error"]["code"]) == (422, "bad_package")
    async with api.client(api.admin) as http:
        issued = await http.post("/tokens", json={"name": "ci-bot", "role": "operator"})
        assert issued.status_code == 201
        bot = issued.json()
        assert bot["token"].startswith("fleet_")
        listed = (await http.get("/tokens")).json()
        assert "token" not in listed[-1]
        assert listed[-1]["name"] == "ci-bot"
        async with api.client(bot["token"]) as as_bot:
            assert (await as_bot.get("/whoami")).json()["name"] == "ci-bot"
            assert (await http.delete(f"/tokens/{bot['id']}")).status_code == 204
            refused = await as_bot.get("/whoami")
            assert (refused.status_code, refused.json()["error"]["code"]) == (
                401,
                "unauthenticated",
            )
        twice = await http.delete(f"/tokens/{bot['id']}")
        assert twice.status_code == 404
    # Each answer is counted by its route template, never by the concrete path.
    counted = REGISTRY.get_sample_value(
        "fleet_api_requests_total",
        {"route": "/api/v1/campaigns/{campaign_id}/pause", "method": "POST", "code": "409"},
    )
    assert counted is not None
    assert counted >= 1
    assert REGISTRY.get_sample_value(
        "fleet_api_requests_total", {"route": "other", "method": "GET", "code": "404"}
    )


async def test_the_api_survives_fuzzing_from_its_own_openapi_spec(api: Api, tmp_path: Path) -> None:
    """Schemathesis generates requests, valid and invalid, for every operation.

    No response may be a server error, and every response must match the spec (status
    codes, content types, bodies). Runs as the admin so every route is reached.
    """
    async with api.client(api.admin) as http:
        assert (await http.post("/groups", json={"name": "g1"})).status_code == 201
    st = Path(sys.executable).with_name("st")
    process = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{api.base}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--header",
        f"Authorization: Bearer {api.admin}",
        # A fuzzed DELETE /tokens/{id} could revoke the fuzzer's own token.
        "--exclude-path-regex",
        "^/api/v1/tokens/",
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--workers",
        "2",
        "--max-failures",
        "5",
        "--generation-database",
        "none",
        "--report",
        "ndjson",
        "--report-dir",
        str(tmp_path / "report"),
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    # It really ran: every selected operation was exercised, and every case passed.
    selected = re.search(r"Selected: (\d+)/(\d+)", text)
    tested = re.search(r"Tested: (\d+)", text)
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert selected, text[-3000:]
    assert tested, text[-3000:]
    assert cases, text[-3000:]
    assert int(tested[1]) == int(selected[1]) == int(selected[2]) - 1  # all but DELETE /tokens
    assert int(cases[1]) == int(cases[2]) > 100


async def test_terminals_provisioned_through_the_api_can_connect_and_are_diagnosable(
    api: Api, repo: Repository, broker: Mosquitto
) -> None:
    new = [
        {"id": "N1", "model": "A920", "timezone": "Europe/Berlin", "attributes": {"region": "eu"}},
        {"id": "N2", "model": "A920", "timezone": "Europe/Berlin"},
    ]
    async with api.client(api.operator) as http:
        provisioned = await http.post("/terminals", json={"terminals": new})
        assert provisioned.json() == {"provisioned": 2}
        bad_zone = await http.post(
            "/terminals", json={"terminals": [{"id": "N3", "timezone": "Mars/Olympus"}]}
        )
        assert (bad_zone.status_code, bad_zone.json()["error"]["code"]) == (422, "bad_timezone")

        # The new identity works at the broker; what it sends that is not valid is kept.
        probe = Probe(
            broker.host,
            broker.port,
            "N1",
            protocol.derive_terminal_password(TERMINAL_SECRET, "N1"),
        )
        assert str(await asyncio.to_thread(probe.connect)) == "Success"
        try:
            topic = protocol.terminal_topic("N1", protocol.MessageKind.EVENTS)
            await asyncio.to_thread(probe.publish, topic, b"{not json")
        finally:
            await asyncio.to_thread(probe.close)

        async def dead_letter() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = (await http.get("/dead-letters")).json()["items"]
            return items

        await eventually(
            lambda: _nonempty(dead_letter()), what="the refused message in the dead letters"
        )
        (letter,) = await dead_letter()
        assert (letter["topic"], letter["payload"]) == (topic, "{not json")

        # Provisioning again keeps what the terminal reported itself.
        async with repo.connection() as q:
            await q._conn.execute("""UPDATE terminals SET versions = '{"os": "1.0.0"}'""")
        await http.post("/terminals", json={"terminals": new})
        detail = (await http.get("/terminals/N1")).json()
        assert (detail["versions"], detail["attributes"]) == ({"os": "1.0.0"}, {"region": "eu"})

        # A model taken out of a campaign before it starts: nobody of that model enrolls.
        await http.post("/groups", json={"name": "eu"})
        await http.post("/groups/eu/members", json={"terminals": ["N1", "N2"]})
        await http.post(
            "/packages",
            params={"name": "os", "version": "2.0.0", "kind": "firmware", "models": ["A920"]},
            content=b"image",
        )
        draft = await http.post(
            "/campaigns",
            json={
                "name": "eu1",
                "groups": ["eu"],
                "packages": [{"name": "os", "version": "2.0.0"}],
            },
        )
        campaign_id = draft.json()["id"]
        excluded = await http.post(
            f"/campaigns/{campaign_id}/exclude-model", json={"model": "A920"}
        )
        assert excluded.json()["executions_removed"] == 0
        started = (await http.post(f"/campaigns/{campaign_id}/start")).json()
        assert (started["enrolled"], sum(started["excluded"].values())) == (0, 2)
        rollback = await http.post(f"/campaigns/{campaign_id}/rollback", json={"name": "back"})
        assert (rollback.status_code, rollback.json()["error"]["code"]) == (
            409,
            "nothing_to_roll_back",
        )
    # Without a token, a body is refused before anything reads it; with one, past its
    # route's limit, whether its size is declared or it comes in chunks.
    async with api.client(None) as http:
        anonymous = await http.post("/groups", content=b"[{}," * (4 * 1024 * 1024))
        assert anonymous.status_code == 401
    async with api.client(api.operator) as http:
        declared = await http.post("/groups", content=b"x" * (1024 * 1024 + 1))
        assert (declared.status_code, declared.json()["error"]["code"]) == (
            413,
            "payload_too_large",
        )

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"x" * 64 * 1024

        chunked = await http.post("/groups", content=chunks())
        assert (chunked.status_code, chunked.json()["error"]["code"]) == (413, "payload_too_large")
        # The routes that take 10,000 terminals take a larger body.
        many = {"terminals": [f"T{n:06d}" for n in range(10_000)]}
        members = await http.post("/groups/eu/members", json=many)
        assert (members.status_code, members.json()["error"]["code"]) == (404, "not_found")


async def _nonempty(items: Any) -> bool:
    return bool(await items)
