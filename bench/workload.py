"""The ingest workload: heartbeats and state events as terminals send them (fleet.protocol).

The same messages go to the bare subscriber (the broker's ceiling) and to the controller
(ingest), and the same rows to the bare COPY (the database's ceiling).
"""

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.loadpub import Message
from fleet import protocol
from fleet.db import repository
from fleet.protocol import MessageKind
from fleet.states import ExecState

#: Heartbeat content of a terminal on the fleet's base versions.
VERSIONS = {"os": "1.0.0", "pay": "1.0.0"}
HEALTH: dict[str, protocol.HealthValue] = {protocol.HEALTH_TXN_ERROR_RATE: 0.01, "uptime_s": 86400}


@dataclass(frozen=True)
class Mix:
    """How many heartbeats from how many terminals, and how many events per terminal."""

    terminals: int
    heartbeats: int
    event_terminals: int
    events_per_terminal: int

    @property
    def events(self) -> int:
        """State events in the mix."""
        return self.event_terminals * self.events_per_terminal

    @property
    def total(self) -> int:
        """Messages in the mix."""
        return self.heartbeats + self.events


def heartbeat(tid: str, ts: float, battery: int = 80) -> bytes:
    """A terminal's heartbeat, validated by the protocol model."""
    return protocol.Heartbeat(
        tid=tid,
        ts=ts,
        versions=VERSIONS,
        battery_pct=battery,
        storage_free_mb=512,
        busy=False,
        health=HEALTH,
    ).to_bytes()


def progress_event(tid: str, campaign_id: int, seq: int, ts: float) -> bytes:
    """A download progress report (state ``downloading``), as terminals send many of."""
    return protocol.StateEvent(
        msg_id=protocol.new_message_id(),
        tid=tid,
        seq=seq,
        campaign_id=campaign_id,
        state=ExecState.DOWNLOADING,
        ts=ts,
        package="os",
        progress=min(100, seq % 100),
        stage="download",
    ).to_bytes()


def batches(
    ids: Sequence[str],
    mix: Mix,
    *,
    campaign_id: int,
    seq_base: int,
    ts: float,
    connections: int,
) -> list[list[Message]]:
    """The mix split over connections by terminal, so each terminal's events stay in order.

    Heartbeats go round-robin over the first `mix.terminals` ids; events go to the first
    `mix.event_terminals`, each with `events_per_terminal` rising sequence numbers from
    `seq_base + 1`. Within a connection, events are spread evenly among the heartbeats.
    """
    per_connection: list[list[Message]] = [[] for _ in range(connections)]
    beats: list[list[Message]] = [[] for _ in range(connections)]
    for n in range(mix.heartbeats):
        index = n % mix.terminals
        tid = ids[index]
        beats[index % connections].append(
            Message(
                protocol.terminal_topic(tid, MessageKind.HEARTBEAT), heartbeat(tid, ts, 20 + n % 80)
            )
        )
    events: list[list[Message]] = [[] for _ in range(connections)]
    for step in range(mix.events_per_terminal):
        for index in range(mix.event_terminals):
            tid = ids[index]
            events[index % connections].append(
                Message(
                    protocol.terminal_topic(tid, MessageKind.EVENTS),
                    progress_event(tid, campaign_id, seq_base + step + 1, ts),
                )
            )
    for slot in range(connections):
        hb, ev = beats[slot], events[slot]
        if not ev:
            per_connection[slot] = hb
            continue
        every = max(1, len(hb) // len(ev))
        merged: list[Message] = []
        hb_iter = iter(hb)
        for event in ev:
            merged.extend(itertools.islice(hb_iter, every))
            merged.append(event)
        merged.extend(hb_iter)
        per_connection[slot] = merged
    return per_connection


def heartbeat_rows(count: int, ids: Sequence[str], ts: float) -> list[tuple[Any, ...]]:
    """Rows of the heartbeats table, as ingest writes them, for the bare COPY."""
    at = datetime.fromtimestamp(ts, UTC)
    versions, health = json.dumps(VERSIONS), json.dumps(HEALTH)
    return [
        (ids[n % len(ids)], at, at, versions, 20 + n % 80, 512, False, health) for n in range(count)
    ]


#: The columns the product's own COPY writes, so the ceiling copies the same row shape.
HEARTBEAT_COLUMNS = list(repository.HEARTBEAT_COLUMNS)


def event_rows(
    count: int, ids: Sequence[str], campaign_id: int, ts: float
) -> list[tuple[Any, ...]]:
    """Rows of the update_events table, as ingest writes them, for the bare COPY."""
    at = datetime.fromtimestamp(ts, UTC)
    return [
        (
            protocol.new_message_id(),
            ids[n % len(ids)],
            campaign_id,
            n + 1,
            ExecState.DOWNLOADING.value,
            n % 100,
            "download",
            at,
            at,
            True,
        )
        for n in range(count)
    ]


EVENT_COLUMNS = [
    "msg_id",
    "terminal_id",
    "campaign_id",
    "seq",
    "state",
    "progress",
    "stage",
    "device_ts",
    "received_at",
    "applied",
]
