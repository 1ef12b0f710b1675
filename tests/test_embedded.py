"""The private service harness: ports, PostgreSQL."""

import asyncpg

from fleet.embedded import ExternalPostgres, PostgresServer, free_port


def test_free_port_is_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(20)}
    assert all(1024 < port < 32768 for port in ports)


async def test_pg_server_creates_databases_that_accept_connections(
    pg_server: PostgresServer,
) -> None:
    pg_server.create_database("smoke_template")
    connection = await asyncpg.connect(pg_server.dsn("smoke_template"))
    try:
        await connection.execute("CREATE TABLE marker (id int)")
    finally:
        await connection.close()

    pg_server.create_database("smoke_copy", template="smoke_template")
    connection = await asyncpg.connect(pg_server.dsn("smoke_copy"))
    try:
        assert await connection.fetchval("SELECT 1") == 1
        assert await connection.fetchval("SELECT count(*) FROM marker") == 0
    finally:
        await connection.close()


async def test_external_server_url_is_usable_the_same_way(pg_server: PostgresServer) -> None:
    external = ExternalPostgres(pg_server.dsn("postgres"))
    external.create_database("smoke_external")
    connection = await asyncpg.connect(external.dsn("smoke_external"))
    try:
        assert await connection.fetchval("SELECT current_database()") == "smoke_external"
    finally:
        await connection.close()
