"""Cluster mode against the real broker and database: shared ingest, one leader, takeover.

Replicas run as separate processes (`Stack.spawn_controller`), so each has its own
metrics and a stop or a crash is a real one. Against Mosquitto, which makes the client id
the username, the second replica has its own broker identity (``--replica``).
"""

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from device_sim.fleet import Simulator
from fleet import protocol
from fleet.db import Repository
from fleet.embedded import Mosquitto, find_postgres_bindir
from fleet.leader import Leadership
from fleet.mqtt import subscriptions
from fleet.mqtt_wire import Connection, ConnectOptions, Message, open_connection
from tests.conftest import CONTROLLER_PASSWORD, CONTROLLER_USERNAME, TERMINAL_SECRET
from tests.stack import (
    Stack,
    eventually,
    make_settings,
    running,
    sim_config,
    terminal_ids,
    wait_status,
)

REPLICA_B = "controller-b"
GROUP = "ingest"
LEASE_S = 0.5


@pytest.fixture
def cluster_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that knows a second controller identity, for the second replica."""
    server = Mosquitto(controller_username=CONTROLLER_USERNAME)
    server.start(tmp_path / "mosquitto", CONTROLLER_PASSWORD, replicas=[REPLICA_B])
    try:
        yield server
    finally:
        server.stop()


def _ignore(_connection: Connection, _message: Message) -> None:
    return None


async def _connect(broker: Mosquitto, username: str, password: str) -> Connection:
    options = ConnectOptions(client_id=username, username=username, password=password)
    return await open_connection(broker.host, broker.port, options, _ignore)


# -- the broker's ACLs ------------------------------------------------------------------


async def test_controllers_may_share_subscriptions_and_terminals_may_not(
    cluster_broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    stack = Stack(make_settings(cluster_broker, database_url, tmp_path), repo, tmp_path)
    await stack.provision(["T000001"], {})
    for username in (CONTROLLER_USERNAME, REPLICA_B):
        controller = await _connect(cluster_broker, username, CONTROLLER_PASSWORD)
        try:
            codes = await controller.subscribe([(f, 1, 1) for f in subscriptions(GROUP)])
        finally:
            controller.disconnect()
        assert all(code < 0x80 for code in codes), (username, codes)

    password = protocol.derive_terminal_password(TERMINAL_SECRET, "T000001")
    terminal = await _connect(cluster_broker, "T000001", password)
    try:
        codes = await terminal.subscribe(
            [
                (f"$share/{GROUP}/fleet/v1/t/+/events", 1, 0),
                ("$share/x/fleet/v1/t/T000001/cmd", 1, 0),
            ]
        )
    finally:
        terminal.disconnect()
    assert codes == [0x87, 0x87]


# -- leadership, on its own -------------------------------------------------------------


async def _lock_holder(database_url: str) -> str | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            """
            SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE l.locktype = 'advisory' AND l.objid = 7207002 AND l.granted
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """
        )
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _competing(database_url: str, *names: str) -> AsyncIterator[list[Leadership]]:
    stops = [asyncio.Event() for _ in names]
    leaders = [Leadership(database_url, lease_s=LEASE_S, name=name) for name in names]
    async with asyncio.TaskGroup() as tasks:
        for leader, stop in zip(leaders, stops, strict=True):
            tasks.create_task(leader.run(stop), name=f"leadership {leader.name}")
        try:
            yield leaders
        finally:
            for stop in stops:
                stop.set()


async def _first_leader(leaders: list[Leadership]) -> Leadership:
    async with asyncio.timeout(10):
        waits = {asyncio.ensure_future(leader.leading.wait()): leader for leader in leaders}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
    return waits[done.pop()]


async def test_one_leader_and_a_fenced_succession_when_its_session_is_killed(
    database_url: str,
) -> None:
    async with _competing(database_url, "a", "b") as leaders:
        first = await _first_leader(leaders)
        [other] = [leader for leader in leaders if leader is not first]
        assert not other.leading.is_set()
        assert await _lock_holder(database_url) == first.application_name

        async def next_leader_after_step_down() -> Leadership:
            await first.following.wait()
            # The fence: nobody leads before the old leader has stepped down.
            assert not other.leading.is_set()
            return await _first_leader(leaders)

        async with asyncio.TaskGroup() as tasks:
            succession = tasks.create_task(next_leader_after_step_down())
            # What a dead or cut-off leader looks like to the server: its session ends.
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = $1",
                    first.application_name,
                )
            finally:
                await conn.close()
        # Either may win the lock again; exactly one leads, after waiting out the lease.
        successor = succession.result()
        [loser] = [leader for leader in leaders if leader is not successor]
        assert not loser.leading.is_set()
        assert successor.terms == (2 if successor is first else 1)
        assert await _lock_holder(database_url) == successor.application_name
        # The other competes still, as a follower.
        await eventually(
            lambda: _waiting_for_lock(database_url, loser.application_name),
            what="the follower to wait for the lock",
        )


async def _waiting_for_lock(database_url: str, application_name: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )
    finally:
        await conn.close()
    return bool(found)


async def test_a_stopping_leader_hands_over(database_url: str) -> None:
    stop_a = asyncio.Event()
    a = Leadership(database_url, lease_s=LEASE_S, name="a")
    task_a = asyncio.create_task(a.run(stop_a), name="leadership a")
    async with asyncio.timeout(10):
        await a.leading.wait()
    async with _competing(database_url, "b") as [b]:
        stop_a.set()
        await task_a
        assert not a.leading.is_set()
        async with asyncio.timeout(10):
            await b.leading.wait()
        assert b.terms == 1


_FROZEN_LEADER = """
import asyncio, sys
from fleet.leader import Leadership

async def main() -> None:
    leader = Leadership(sys.argv[1], lease_s=float(sys.argv[2]), name="frozen")
    task = asyncio.create_task(leader.run(asyncio.Event()))
    await leader.leading.wait()
    print("leading", flush=True)
    await task

asyncio.run(main())
"""


async def test_a_frozen_leader_is_replaced(database_url: str) -> None:
    """A stopped process (SIGSTOP, a paused VM) keeps its socket and answers keepalives
    from its kernel: only the silence of its session can end its term."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FROZEN_LEADER,
        database_url,
        str(LEASE_S),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(20):
            assert (await child.stdout.readline()).strip() == b"leading"
        child.send_signal(signal.SIGSTOP)
        async with _competing(database_url, "b") as [b]:
            async with asyncio.timeout(15):
                await b.leading.wait()
            assert await _lock_holder(database_url) == b.application_name
    finally:
        child.kill()
        await child.wait()


# -- two controller processes -----------------------------------------------------------


def _replica(
    broker: Mosquitto, database_url: str, repo: Repository, tmp_path: Path, username: str
) -> Stack:
    workdir = tmp_path / username
    workdir.mkdir()
    settings = make_settings(broker, database_url, tmp_path).model_copy(
        update={"mqtt_username": username, "mqtt_shared_group": GROUP}
    )
    return Stack(settings, repo, workdir)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: bytes = reply.read()
    return body.decode()


async def _healthy(stack: Stack) -> bool:
    try:
        await asyncio.to_thread(_get, f"http://127.0.0.1:{stack.settings.http_port}/healthz")
    except OSError:
        return False
    return True


async def _ingested(stack: Stack, kind: str) -> int:
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{stack.settings.http_port}/metrics")
    match = re.search(rf'^fleet_ingest_messages_total{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
    return int(float(match[1])) if match else 0


async def _metric(stack: Stack, name: str) -> float:
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{stack.settings.http_port}/metrics")
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


async def _metric_at_least(stack: Stack, name: str, value: float) -> bool:
    return await _metric(stack, name) >= value


@contextlib.asynccontextmanager
async def _replicas(
    broker: Mosquitto, database_url: str, repo: Repository, tmp_path: Path
) -> AsyncIterator[tuple[Stack, Stack]]:
    """Replica `a` (started first, so it leads) and `b`, as processes, both serving."""
    a = _replica(broker, database_url, repo, tmp_path, CONTROLLER_USERNAME)
    b = _replica(broker, database_url, repo, tmp_path, REPLICA_B)
    # One artifact store and one download address, as behind a load balancer: `b`'s.
    shared = {
        "artifact_dir": tmp_path / "artifacts",
        "artifact_base_url": b.settings.artifact_base_url,
    }
    a.settings = a.settings.model_copy(update=shared)
    b.settings = b.settings.model_copy(update=shared)
    try:
        a.spawn_controller()
        await eventually(lambda: _leads(database_url, a), what="replica a to lead")
        b.spawn_controller()
        for stack in (a, b):
            await eventually(lambda s=stack: _healthy(s), what="both replicas to serve")
        yield a, b
    finally:
        for stack in (a, b):
            if stack._process is not None:
                stack.terminate_controller_process()


async def _leads(database_url: str, stack: Stack) -> bool:
    name = stack.settings.mqtt_client_id or stack.settings.mqtt_username
    return await _lock_holder(database_url) == f"fleet-leader {name}"


async def test_replicas_split_ingest_and_store_every_message_once(
    cluster_broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    ids = terminal_ids(10)
    each = 20
    setup = Stack(make_settings(cluster_broker, database_url, tmp_path), repo, tmp_path)
    await setup.provision(ids, {})
    async with _replicas(cluster_broker, database_url, repo, tmp_path) as (a, b):
        sent: set[tuple[str, float]] = set()
        for n, tid in enumerate(ids):
            password = protocol.derive_terminal_password(TERMINAL_SECRET, tid)
            terminal = await _connect(cluster_broker, tid, password)
            try:
                for i in range(each):
                    ts = 1.8e9 + n * 1000 + i
                    beat = protocol.Heartbeat(
                        tid=tid,
                        ts=ts,
                        versions={"os": "1.0.0"},
                        battery_pct=90,
                        storage_free_mb=100,
                        busy=False,
                        health={},
                    )
                    topic = protocol.terminal_topic(tid, protocol.MessageKind.HEARTBEAT)
                    await terminal.publish(topic, beat.to_bytes(), qos=1)
                    sent.add((tid, ts))
            finally:
                terminal.disconnect()

        async def all_stored() -> bool:
            async with repo.connection() as q:
                stored = await q._conn.fetchval("SELECT count(*) FROM heartbeats")
            return int(stored) >= len(sent)

        await eventually(all_stored, what="every heartbeat stored")
        async with repo.connection() as q:
            rows = await q._conn.fetch(
                "SELECT terminal_id, extract(epoch FROM device_ts)::float8 AS ts FROM heartbeats"
            )
        stored = [(r["terminal_id"], r["ts"]) for r in rows]
        assert len(stored) == len(sent), "none stored twice"
        assert set(stored) == sent, "none lost"
        by_replica = [await _ingested(stack, "heartbeat") for stack in (a, b)]
        assert sum(by_replica) == len(sent), by_replica
        assert all(count > 0 for count in by_replica), by_replica


async def test_only_the_leader_runs_campaigns_and_the_other_takes_over_when_it_stops(
    cluster_broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    """The campaign runs on `b` once `a` stopped.

    Not across the handover: Mosquitto 2.0 deals a shared group's messages round-robin,
    so one terminal's events can reach both replicas and be applied out of order, which
    the state machine refuses (docs/operations.md, "Cluster mode": use a broker that
    keeps a publisher on one member, as EMQX's ``hash_clientid`` does).
    """
    count = 20
    ids = terminal_ids(count)
    async with _replicas(cluster_broker, database_url, repo, tmp_path) as (a, b):
        await a.provision(ids, {"g1": ids})
        await a.add_package("os", "2.0.0", ["P400"])
        assert await _leads(database_url, a)
        simulator = Simulator(sim_config(cluster_broker, count, ["g1"]))
        async with running(simulator):
            await simulator.wait_connected(timeout_s=30)
            await eventually(lambda: _metric_at_least(a, "fleet_campaign_ticks_total", 2))
            assert await _metric(b, "fleet_campaign_ticks_total") == 0, "b's runner never ran"
            assert await _metric(b, "fleet_leader") == 0
            assert a.terminate_controller_process() == 0
            await eventually(lambda: _leads(database_url, b), what="replica b to take over")
            campaign_id = await b.campaign(["g1"], ("os", "2.0.0"), waves=[25, 100])
            records = await simulator.wait_final(campaign_id, count, timeout_s=60)
            assert await wait_status(repo, campaign_id, {"completed"}) == "completed"
        assert {r.final_state.value for r in records if r.final_state} == {"succeeded"}
        async with repo.connection() as q:
            states = await q.execution_states(campaign_id)
        assert {state for state, _ in states.values()} == {"succeeded"}


async def test_a_killed_leader_is_replaced_within_seconds(
    cluster_broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    async with _replicas(cluster_broker, database_url, repo, tmp_path) as (a, b):
        assert await _leads(database_url, a)
        a.kill_controller_process()
        # Its socket closes with the process, so the lock is free at once; then a lease.
        await eventually(lambda: _leads(database_url, b), within_s=5, what="b to hold the lock")

        async def b_leads() -> bool:
            text = await asyncio.to_thread(_get, f"http://127.0.0.1:{b.settings.http_port}/metrics")
            return re.search(r"^fleet_leader 1\.0$", text, re.MULTILINE) is not None

        await eventually(b_leads, within_s=5, what="b to lead after the lease")


# -- the EMQX profile's authentication and authorisation queries --------------------------

EMQX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "emqx" / "emqx.conf"
EMQX_AUTH_SQL = EMQX_CONF.parent / "emqx-auth.sql"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def _emqx_queries() -> list[str]:
    return re.findall(r'^\s*query = "(.*)"$', EMQX_CONF.read_text(), re.MULTILINE)


async def _emqx_query(conn: asyncpg.Connection, query: str, **values: str) -> list[asyncpg.Record]:
    """Run a query as EMQX does: each ``${name}`` becomes a parameter of a prepared statement."""
    names: list[str] = []

    def parameter(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return await conn.fetch(_PLACEHOLDER.sub(parameter, query), *(values[n] for n in names))


async def test_the_emqx_queries_authenticate_and_isolate_terminals(
    cluster_broker: Mosquitto, repo: Repository, database_url: str, tmp_path: Path
) -> None:
    psql = find_postgres_bindir() / "psql"
    stack = Stack(make_settings(cluster_broker, database_url, tmp_path), repo, tmp_path)
    await stack.provision(["T000001", "T000002"], {"g1": ["T000001"], "g2": ["T000002"]})
    env = {
        "PATH": os.environ.get("PATH", ""),
        "EMQX_AUTH_DB_PASSWORD": "emqx-auth-test",
        "FLEET_TERMINAL_SECRET": TERMINAL_SECRET,
        "FLEET_MQTT_USERNAME": CONTROLLER_USERNAME,
        "FLEET_MQTT_PASSWORD": CONTROLLER_PASSWORD,
    }
    for _ in range(2):  # idempotent
        done = await asyncio.to_thread(
            subprocess.run,
            [str(psql), "-X", "-q", database_url, "-f", str(EMQX_AUTH_SQL)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    authn, authz = _emqx_queries()
    conn = await asyncpg.connect(database_url, user="emqx_auth", password="emqx-auth-test")
    try:
        [row] = await _emqx_query(conn, authn, username="T000001", clientid="T000001")
        expected = protocol.derive_terminal_password(TERMINAL_SECRET, "T000001")
        assert (row["password_hash"], row["is_superuser"]) == (expected, False)
        # Another terminal's client id, an unknown terminal: no row, so no login.
        assert await _emqx_query(conn, authn, username="T000001", clientid="T000002") == []
        assert await _emqx_query(conn, authn, username="T999999", clientid="T999999") == []
        [row] = await _emqx_query(conn, authn, username=CONTROLLER_USERNAME, clientid="any-id")
        assert (row["password_hash"], row["is_superuser"]) == (CONTROLLER_PASSWORD, True)

        rules = {
            (r["permission"], r["action"], r["topic"])
            for r in await _emqx_query(conn, authz, username="T000001")
        }
        own = "fleet/v1/t/T000001"
        assert rules == {
            *(
                ("allow", "publish", f"{own}/{k}")
                for k in ("events", "heartbeat", "presence", "hello")
            ),
            ("allow", "subscribe", f"{own}/cmd"),
            ("allow", "subscribe", "fleet/v1/g/g1/#"),
        }
        # The role reads ids and memberships, nothing else.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT versions FROM terminals")
    finally:
        await conn.close()
