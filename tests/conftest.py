"""Shared fixtures: private PostgreSQL and Mosquitto servers, and a clean environment."""

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from fleet.db import Repository, connect, migrate
from fleet.embedded import ExternalPostgres, Mosquitto, Postgres, PostgresServer

CONTROLLER_USERNAME = "controller"
CONTROLLER_PASSWORD = "test-controller-password"
TERMINAL_SECRET = "test-terminal-secret"
ONE_TERMINAL = "T000001"
# Read once at import: the autouse fixture below clears FLEET_* for each test.
EXTERNAL_DATABASE_URL = os.environ.get("FLEET_TEST_DATABASE_URL")


@pytest.fixture(autouse=True)
def _clean_fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's FLEET_* variables from leaking into settings under test."""
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session: private, or FLEET_TEST_DATABASE_URL."""
    if EXTERNAL_DATABASE_URL:
        yield ExternalPostgres(EXTERNAL_DATABASE_URL)
        return
    # Not under pytest's tmp dir: that is mode 0700 and, as root, the server runs as
    # the `postgres` OS user, who must be able to reach its files.
    workdir = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
    workdir.chmod(0o755)
    server = Postgres()
    try:
        server.start(workdir)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh private broker per test, bootstrapped with the controller identities."""
    server = Mosquitto(controller_username=CONTROLLER_USERNAME)
    server.start(tmp_path / "mosquitto", CONTROLLER_PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def terminal_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh private broker that knows one terminal, `ONE_TERMINAL`, besides the controller."""
    server = Mosquitto(controller_username=CONTROLLER_USERNAME)
    server.start(
        tmp_path / "mosquitto",
        CONTROLLER_PASSWORD,
        terminals=[ONE_TERMINAL],
        terminal_secret=TERMINAL_SECRET,
    )
    try:
        yield server
    finally:
        server.stop()


# -- databases -------------------------------------------------------------------------

TEMPLATE_DB = "fleet_template"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def db_template(pg_server: PostgresServer) -> str:
    """A database migrated once per session, cloned by every test that needs one."""
    with contextlib.suppress(Exception):
        asyncio.run(_drop_database(pg_server.dsn(), TEMPLATE_DB))
    pg_server.create_database(TEMPLATE_DB)
    asyncio.run(migrate(pg_server.dsn(TEMPLATE_DB)))
    return TEMPLATE_DB


@pytest.fixture
def database_url(pg_server: PostgresServer, db_template: str) -> str:
    """A fresh database of the current schema for one test."""
    name = f"fleet_test_{os.getpid()}_{next(_db_counter)}"
    pg_server.create_database(name, template=db_template)
    return pg_server.dsn(name)


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[Repository]:
    """A repository on the test's own database."""
    repository = await connect(database_url, pool_size=4)
    try:
        yield repository
    finally:
        await repository.close()


async def _drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


# -- diagnosis -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def _dump_tasks_on_sigusr1() -> AsyncIterator[None]:
    """On SIGUSR1, write every asyncio task's stack to $TMPDIR/fleet-tasks-<pid>.txt."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        # pytest captures fd 2, so the stacks go to a file named after this process.
        path = Path(tempfile.gettempdir()) / f"fleet-tasks-{os.getpid()}.txt"
        with path.open("w") as out:
            for task in asyncio.all_tasks(loop):
                out.write(f"--- task {task.get_name()}: {task!r}\n")
                task.print_stack(limit=30, file=out)

    loop.add_signal_handler(signal.SIGUSR1, dump)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
