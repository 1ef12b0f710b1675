"""Ingest's batch logic against fakes of our own repository seam (no broker, no database)."""

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.db.repository import EventRow
from fleet.errors import QueryRefusedError
from fleet.ingest import Ingest, _rounds
from fleet.mqtt import Incoming
from fleet.protocol import MessageKind, StateEvent, new_message_id, terminal_topic
from fleet.states import ExecState


@dataclass
class _Outcome:
    known: bool = True
    inserted: bool = True
    moved: bool = True
    new_state: str | None = None


@dataclass
class FakeQueries:
    """Stands in for `Queries`: refuses one message id, records the rest."""

    store: "FakeRepository"

    async def plan_each_run(self) -> None:
        pass

    async def record_events(self, rows: list[EventRow], _at: Any) -> list[_Outcome]:
        if any(row.msg_id == self.store.poison for row in rows):
            raise QueryRefusedError("22003", "value out of range")
        self.store.pending.extend(row.msg_id for row in rows)
        return [_Outcome() for _ in rows]

    async def add_dead_letters(self, rows: list[tuple[str, str, str, bytes]]) -> None:
        self.store.pending_dead.extend(rows)


@dataclass
class FakeRepository:
    """Transactions commit what their queries recorded only if the block ends cleanly."""

    poison: str
    events: list[str] = field(default_factory=list)
    dead: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    pending_dead: list[tuple[str, str, str, bytes]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeQueries]:
        self.pending, self.pending_dead = [], []
        yield FakeQueries(self)
        self.events.extend(self.pending)
        self.dead.extend(self.pending_dead)


@dataclass
class FakeAcker:
    acked: list[int] = field(default_factory=list)

    def ack_many(self, messages: Sequence[Incoming]) -> None:
        self.acked.extend(message.mid for message in messages)


def _incoming(mid: int, msg_id: str) -> Incoming:
    event = StateEvent(
        msg_id=msg_id, tid="T1", seq=mid, campaign_id=1, state=ExecState.QUEUED,
        ts=1_764_000_000.0,
    )  # fmt: skip
    return Incoming(
        topic=terminal_topic("T1", MessageKind.EVENTS),
        payload=event.to_bytes(),
        mid=mid,
        qos=1,
        retain=False,
    )


async def test_one_refused_message_does_not_stall_its_batch() -> None:
    ids = [new_message_id() for _ in range(5)]
    repo = FakeRepository(poison=ids[2])
    acker = FakeAcker()
    ingest = Ingest(repo, acker, batch_max=10, batch_wait_s=0)  # type: ignore[arg-type]
    result = await ingest._write_until_done(
        [_incoming(n, i) for n, i in enumerate(ids, start=1)], None
    )  # type: ignore[arg-type]
    assert result is not None
    assert repo.events == [ids[0], ids[1], ids[3], ids[4]]
    assert [(reason, topic) for topic, reason, _, _ in repo.dead] == [
        ("unstorable", "fleet/v1/t/T1/events")
    ]


def test_rounds_name_each_terminal_once_and_keep_its_order() -> None:
    def event(tid: str, seq: int) -> StateEvent:
        return StateEvent(
            msg_id=new_message_id(), tid=tid, campaign_id=1, seq=seq, state=ExecState.QUEUED, ts=2e9
        )

    events = [event("A", 1), event("B", 1), event("A", 2), event("A", 3), event("B", 2)]
    rounds = _rounds(events)
    assert [[(e.tid, e.seq) for e in r] for r in rounds] == [
        [("A", 1), ("B", 1)],
        [("A", 2), ("B", 2)],
        [("A", 3)],
    ]
    # B replays A's first message id: it waits for a round where that id is stored.
    replay = event("B", 3).model_copy(update={"msg_id": events[0].msg_id})
    rounds = _rounds([events[0], events[1], replay])
    assert [[(e.tid, e.seq) for e in r] for r in rounds] == [[("A", 1), ("B", 1)], [("B", 3)]]
    rounds = _rounds([events[0], replay, events[1]])  # B's own order is kept too
    assert [[(e.tid, e.seq) for e in r] for r in rounds] == [[("A", 1)], [("B", 3)], [("B", 1)]]
