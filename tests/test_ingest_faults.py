"""Hostile and broken input through the real broker: refused, counted, nothing else lost."""

import asyncio
import json
from pathlib import Path

from prometheus_client import REGISTRY

from fleet.db import Repository
from fleet.embedded import Mosquitto
from fleet.protocol import (
    MAX_PAYLOAD_BYTES,
    MessageKind,
    Presence,
    StateEvent,
    derive_terminal_password,
    new_message_id,
    now,
    terminal_topic,
)
from fleet.states import ExecState
from tests.conftest import TERMINAL_SECRET
from tests.mqtt_probe import Probe
from tests.stack import Stack, eventually, make_settings

NOT_AUTHORIZED = 0x87


def _rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("fleet_ingest_rejected_total", {"reason": reason}) or 0.0


def _duplicates() -> float:
    return REGISTRY.get_sample_value("fleet_event_duplicates_total") or 0.0


def _event(tid: str, campaign_id: int, seq: int, state: ExecState, **extra: object) -> StateEvent:
    return StateEvent(
        msg_id=new_message_id(),
        tid=tid,
        seq=seq,
        campaign_id=campaign_id,
        state=state,
        ts=1_764_000_000.0,
        **extra,  # type: ignore[arg-type]
    )


async def test_spoofed_malformed_oversized_and_replayed_input(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    await stack.provision(["T1", "T2"], {"g": ["T1", "T2"]})
    await stack.add_package("os", "2.0.0", ["P400"])
    campaign_id = await stack.campaign(["g"], ("os", "2.0.0"), waves=[100])
    await stack.start_controller()
    before = {r: _rejected(r) for r in ("malformed", "too_large", "tid_mismatch", "invalid")}
    duplicates_before = _duplicates()
    probe = Probe(broker.host, broker.port, "T1", derive_terminal_password(TERMINAL_SECRET, "T1"))
    try:
        await asyncio.to_thread(probe.connect)
        own = terminal_topic("T1", MessageKind.EVENTS)
        publish = lambda topic, payload: asyncio.to_thread(probe.publish, topic, payload)  # noqa: E731
        # Online, as a real terminal says first: the runner marks an offline terminal's
        # executions unreachable, which would race the reports below.
        online = Presence(tid="T1", online=True, ts=now())
        await publish(terminal_topic("T1", MessageKind.PRESENCE), online.to_bytes())

        # Under another terminal's id: the broker refuses it (MQTT 5 reason 0x87).
        spoof = _event("T2", campaign_id, 1, ExecState.QUEUED)
        code = await publish(terminal_topic("T2", MessageKind.EVENTS), spoof.to_bytes())
        assert code.value == NOT_AUTHORIZED
        # On its own topic but claiming to be T2: ingest refuses it.
        await publish(own, spoof.to_bytes())
        await publish(own, b"{this is not json")
        await publish(own, b'{"v": 1, "tid": "T1"}')
        await publish(own, json.dumps({"v": 1, "pad": "x" * MAX_PAYLOAD_BYTES}).encode())
        first = _event("T1", campaign_id, 1, ExecState.QUEUED)
        await publish(own, first.to_bytes())
        await publish(own, first.to_bytes())  # replayed
        second = _event("T1", campaign_id, 2, ExecState.DOWNLOADING, progress=10)
        await publish(own, second.to_bytes())

        async def stored() -> bool:
            async with repo.connection() as q:
                states = await q.execution_states(campaign_id)
                dead = await q.dead_letter_counts()
            return states["T1"][0] == "downloading" and sum(dead.values()) >= 4

        await eventually(stored)
        async with repo.connection() as q:
            dead = await q.dead_letter_counts()
            events = await q._conn.fetch("SELECT msg_id, terminal_id FROM update_events")
            states = await q.execution_states(campaign_id)
        assert dead == {"invalid": 1, "malformed": 1, "tid_mismatch": 1, "too_large": 1}
        assert sorted(r["msg_id"] for r in events) == sorted([first.msg_id, second.msg_id])
        # T2 never connected, so the runner marks it unreachable; no event of its stored.
        assert states["T2"][0] in {"pending", "unreachable"}, "the spoofed event moved T2"
        for reason, count in before.items():
            assert _rejected(reason) == count + 1, reason

        async def duplicate_counted() -> bool:
            return _duplicates() == duplicates_before + 1

        await eventually(duplicate_counted)

        # Larger than the broker's packet limit: the broker drops the connection.
        probe.client.publish(own, b"x" * 20_000, qos=1)
        await asyncio.to_thread(probe.wait_disconnected)
    finally:
        await asyncio.to_thread(probe.close)
    # Ingest kept running: a fresh terminal connection is still served.
    probe = Probe(broker.host, broker.port, "T1", derive_terminal_password(TERMINAL_SECRET, "T1"))
    try:
        await asyncio.to_thread(probe.connect)
        third = _event("T1", campaign_id, 3, ExecState.DOWNLOADED)
        await asyncio.to_thread(probe.publish, own, third.to_bytes())

        async def moved() -> bool:
            async with repo.connection() as q:
                return (await q.execution_states(campaign_id))["T1"][0] == "downloaded"

        await eventually(moved)
    finally:
        await asyncio.to_thread(probe.close)
        await stack.stop_controller()


def _heartbeat(tid: str, **changes: object) -> bytes:
    body: dict[str, object] = {
        "v": 1,
        "tid": tid,
        "ts": 1_764_000_000.0,
        "versions": {"os": "1.0.0"},
        "battery_pct": 80,
        "storage_free_mb": 100,
        "busy": False,
        "health": {},
    }
    body.update(changes)
    return json.dumps(body).encode()


async def test_well_formed_but_unstorable_values_and_retained_copies_are_refused(
    broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    stack = Stack(make_settings(broker, database_url, tmp_path), repo, tmp_path)
    await stack.provision(["T1"], {"g": ["T1"]})
    probe = Probe(broker.host, broker.port, "T1", derive_terminal_password(TERMINAL_SECRET, "T1"))
    topic = terminal_topic("T1", MessageKind.HEARTBEAT)
    try:
        await asyncio.to_thread(probe.connect)
        # Retained before the controller subscribes: replayed to it as a retained copy.
        await asyncio.to_thread(probe.publish, topic, _heartbeat("T1"), retain=True)
        await stack.start_controller()
        for payload in (
            _heartbeat("T1", ts=1e300),
            _heartbeat("T1").replace(b"1764000000.0", b"NaN"),
            _heartbeat("T1", storage_free_mb=2**40),
            _heartbeat("T1", health={"note": "a\u0000b"}),
        ):
            await asyncio.to_thread(probe.publish, topic, payload)
        await asyncio.to_thread(probe.publish, topic, _heartbeat("T1", battery_pct=42))

        async def settled() -> bool:
            async with repo.connection() as q:
                dead = await q.dead_letter_counts()
                stored = await q._conn.fetchval("SELECT count(*) FROM heartbeats")
            return sum(dead.values()) >= 5 and stored >= 1

        await eventually(settled)
        async with repo.connection() as q:
            dead = await q.dead_letter_counts()
            stored = await q._conn.fetch("SELECT battery_pct FROM heartbeats")
        assert dead == {"invalid": 4, "retained": 1}
        assert [r["battery_pct"] for r in stored] == [42]
    finally:
        await asyncio.to_thread(probe.publish, topic, b"", retain=True)  # clear it
        await asyncio.to_thread(probe.close)
        await stack.stop_controller()
