import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from fleet.artifacts import ArtifactStore, StoredArtifact
from fleet.http import HttpServer

HOST = "127.0.0.1"
DATA = random.Random(7).randbytes(300_000)
TIMEOUT = 10
SMUGGLED = (
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Health:
    def __init__(self) -> None:
        self.ok = True

    def __call__(self) -> bool:
        return self.ok


class SpyStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lookups: list[tuple[str, Path | None]] = []

    def path_of(self, sha256: str) -> Path | None:
        result = super().path_of(sha256)
        self.lookups.append((sha256, result))
        return result


@pytest.fixture
def store(tmp_path: Path) -> SpyStore:
    return SpyStore(tmp_path / "artifacts")


@pytest.fixture
def artifact(store: SpyStore) -> StoredArtifact:
    return store.add_bytes(DATA)


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
async def server(store: SpyStore, health: Health) -> AsyncIterator[HttpServer]:
    async with HttpServer(HOST, 0, store, health) as srv:
        yield srv


def build(
    path: str, *headers: str, method: str = "GET", close: bool = True, version: str = "HTTP/1.1"
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: test", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_reply(reader: asyncio.StreamReader, *, head: bool = False) -> Reply:
    async with asyncio.timeout(TIMEOUT):
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
        assert status_line.startswith("HTTP/1.1 ")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", "0"))
        body = await reader.readexactly(length)
    return Reply(int(status_line.split(" ")[1]), headers, body)


async def request(port: int, raw: bytes, *, head: bool = False) -> Reply:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        reply = await read_reply(reader, head=head)
        if reply.headers.get("connection") == "close":
            # Nothing may follow a response that closes the connection.
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b""
        return reply
    finally:
        writer.close()
        await writer.wait_closed()


async def get(server: HttpServer, path: str, *headers: str) -> Reply:
    return await request(server.port, build(path, *headers))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- artifacts ---------------------------------------------------------------------------


async def test_full_download(server: HttpServer, artifact: StoredArtifact) -> None:
    before = sample("fleet_artifact_bytes_served_total")
    reply = await get(server, f"/artifacts/{artifact.sha256}")
    assert reply.status == 200
    assert hashlib.sha256(reply.body).hexdigest() == artifact.sha256
    assert reply.headers["content-length"] == str(len(DATA))
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["etag"] == f'"{artifact.sha256}"'
    assert reply.headers["content-type"] == "application/octet-stream"
    assert "content-range" not in reply.headers
    assert "date" in reply.headers
    assert sample("fleet_artifact_bytes_served_total") - before == len(DATA)


async def test_resume_from_offset(server: HttpServer, artifact: StoredArtifact) -> None:
    reply = await get(server, f"/artifacts/{artifact.sha256}", "Range: bytes=100-")
    assert reply.status == 206
    assert reply.headers["content-range"] == f"bytes 100-{len(DATA) - 1}/{len(DATA)}"
    assert reply.headers["content-length"] == str(len(DATA) - 100)
    assert reply.body == DATA[100:]


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=10-10", 10, 11),
        ("bytes=299990-999999999", 299_990, 300_000),
        ("BYTES=5-9", 5, 10),
        ("bytes=-500", 299_500, 300_000),
        ("bytes=-999999", 0, 300_000),
        (f"bytes={len(DATA) - 1}-", len(DATA) - 1, len(DATA)),
    ],
)
async def test_ranges(
    server: HttpServer, artifact: StoredArtifact, spec: str, start: int, end: int
) -> None:
    reply = await get(server, f"/artifacts/{artifact.sha256}", f"Range: {spec}")
    assert reply.status == 206
    assert reply.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert reply.body == DATA[start:end]


@pytest.mark.parametrize("spec", [f"bytes={len(DATA)}-", "bytes=999999999-1999999999", "bytes=-0"])
async def test_unsatisfiable_range(server: HttpServer, artifact: StoredArtifact, spec: str) -> None:
    reply = await get(server, f"/artifacts/{artifact.sha256}", f"Range: {spec}")
    assert reply.status == 416
    assert reply.headers["content-range"] == f"bytes */{len(DATA)}"
    assert reply.body == b""


async def test_empty_artifact_range_is_unsatisfiable(server: HttpServer, store: SpyStore) -> None:
    empty = store.add_bytes(b"")
    full = await get(server, f"/artifacts/{empty.sha256}")
    assert (full.status, full.body) == (200, b"")
    ranged = await get(server, f"/artifacts/{empty.sha256}", "Range: bytes=0-")
    assert ranged.status == 416
    assert ranged.headers["content-range"] == "bytes */0"


@pytest.mark.parametrize(
    "spec", ["bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=-", "bytes=abc", "bytes 0-1"]
)
async def test_ignored_range_sends_whole_file(
    server: HttpServer, artifact: StoredArtifact, spec: str
) -> None:
    reply = await get(server, f"/artifacts/{artifact.sha256}", f"Range: {spec}")
    assert reply.status == 200
    assert reply.body == DATA


async def test_if_range(server: HttpServer, artifact: StoredArtifact) -> None:
    path = f"/artifacts/{artifact.sha256}"
    match = await get(server, path, "Range: bytes=5-", f'If-Range: "{artifact.sha256}"')
    assert (match.status, match.body) == (206, DATA[5:])
    for stale in [f'W/"{artifact.sha256}"', '"other"', "Sun, 06 Nov 1994 08:49:37 GMT"]:
        reply = await get(server, path, "Range: bytes=5-", f"If-Range: {stale}")
        assert (reply.status, reply.body) == (200, DATA)


async def test_head(server: HttpServer, artifact: StoredArtifact) -> None:
    raw = build(f"/artifacts/{artifact.sha256}", "Range: bytes=5-", method="HEAD")
    reply = await request(server.port, raw, head=True)
    assert reply.status == 200
    assert reply.headers["content-length"] == str(len(DATA))
    assert reply.headers["etag"] == f'"{artifact.sha256}"'
    assert reply.headers["accept-ranges"] == "bytes"
    # `request` asserted that the connection closed with no body after the head.


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "../secret",
        "%2e%2e%2fsecret",
        "UPPER",
        "0" * 64,
        "abc",
        "SHA/x",
    ],
)
async def test_bad_or_unknown_sha_is_404(
    server: HttpServer, store: SpyStore, artifact: StoredArtifact, name: str
) -> None:
    (store.root.parent / "secret").write_bytes(b"do not serve")
    name = name.replace("UPPER", artifact.sha256.upper()).replace("SHA", artifact.sha256)
    reply = await get(server, f"/artifacts/{name}")
    assert reply.status == 404
    assert b"do not serve" not in reply.body
    assert store.lookups == [(name, None)]


async def test_absolute_form_target(server: HttpServer, artifact: StoredArtifact) -> None:
    reply = await get(server, f"http://test/artifacts/{artifact.sha256}?x=1")
    assert (reply.status, reply.body) == (200, DATA)


# -- metrics and health --------------------------------------------------------------------


async def test_metrics(server: HttpServer, artifact: StoredArtifact) -> None:
    labels = {"path": "/artifacts/{sha256}", "code": "200"}
    before = sample("fleet_http_requests_total", **labels)
    await get(server, f"/artifacts/{artifact.sha256}")
    assert sample("fleet_http_requests_total", **labels) - before == 1
    reply = await get(server, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert 'fleet_http_requests_total{code="200",path="/artifacts/{sha256}"}' in text or (
        'fleet_http_requests_total{path="/artifacts/{sha256}",code="200"}' in text
    )
    assert "fleet_artifact_bytes_served_total " in text


async def test_unknown_paths_share_one_label(server: HttpServer) -> None:
    before = sample("fleet_http_requests_total", path="other", code="404")
    for path in ["/nope", "/a/b/c", "/metrics/"]:
        assert (await get(server, path)).status == 404
    assert sample("fleet_http_requests_total", path="other", code="404") - before == 3


async def test_healthz(server: HttpServer, health: Health) -> None:
    reply = await get(server, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    health.ok = False
    assert (await get(server, "/healthz")).status == 503


async def test_healthz_failing_check_is_503(store: SpyStore) -> None:
    def broken() -> bool:
        raise RuntimeError("db gone")

    async with HttpServer(HOST, 0, store, broken) as server:
        assert (await get(server, "/healthz")).status == 503


async def test_healthz_without_check(store: SpyStore) -> None:
    async with HttpServer(HOST, 0, store) as server:
        assert (await get(server, "/healthz")).status == 200


# -- protocol errors -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405(server: HttpServer, method: str) -> None:
    reply = await request(server.port, build("/healthz", method=method))
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (SMUGGLED, 400),
    ],
)
async def test_bad_requests(server: HttpServer, raw: bytes, status: int) -> None:
    reply = await request(server.port, raw)
    assert reply.status == status
    assert reply.headers["connection"] == "close"


async def test_head_too_large_is_431(server: HttpServer) -> None:
    raw = build("/healthz", "X-Big: " + "a" * 17_000)
    reply = await request(server.port, raw)
    assert reply.status == 431


async def test_http10_closes(server: HttpServer) -> None:
    reply = await request(server.port, build("/healthz", close=False, version="HTTP/1.0"))
    assert reply.status == 200
    assert reply.headers["connection"] == "close"


# -- connections ---------------------------------------------------------------------------


async def test_keep_alive_then_close(server: HttpServer, artifact: StoredArtifact) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(build("/healthz", close=False))
        first = await read_reply(reader)
        assert (first.status, "connection" in first.headers) == (200, False)
        # A small body is skipped so the connection stays usable.
        writer.write(
            b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            + build(f"/artifacts/{artifact.sha256}", "Range: bytes=-10", close=False)
        )
        second = await read_reply(reader)
        assert second.status == 405
        third = await read_reply(reader)
        assert (third.status, third.body) == (206, DATA[-10:])
        writer.write(build("/healthz"))
        last = await read_reply(reader)
        assert last.headers["connection"] == "close"
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_slow_head_is_dropped(store: SpyStore) -> None:
    async with HttpServer(HOST, 0, store, read_timeout_s=0.1) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b""
        finally:
            writer.close()
            await writer.wait_closed()


async def test_connection_cap(store: SpyStore) -> None:
    async with HttpServer(HOST, 0, store, max_connections=1) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            # A full exchange proves the first connection holds the only slot.
            writer.write(build("/healthz", close=False))
            assert (await read_reply(reader)).status == 200
            rejected = await request(server.port, b"")
            assert rejected.status == 503
            assert rejected.headers["retry-after"] == "1"
        finally:
            writer.close()
            await writer.wait_closed()
        # The slot frees once the first connection's handler is gone.
        async with asyncio.timeout(TIMEOUT):
            while (reply := await request(server.port, build("/healthz"))).status != 200:
                assert reply.status == 503


async def test_serve_finishes_inflight_responses_on_stop(store: SpyStore) -> None:
    big = random.Random(1).randbytes(4 * 1024 * 1024)
    artifact = store.add_bytes(big)
    loop_errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    server = HttpServer(HOST, 0, store)
    await server.start()
    port = server.port
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(stop))
    idle_reader, idle_writer = await asyncio.open_connection(HOST, port)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        idle_writer.write(build("/healthz", close=False))
        assert (await read_reply(idle_reader)).status == 200
        writer.write(build(f"/artifacts/{artifact.sha256}"))
        async with asyncio.timeout(TIMEOUT):
            await reader.readuntil(b"\r\n\r\n")
            stop.set()
            body = await reader.readexactly(len(big))
            assert await reader.read() == b""
            assert await idle_reader.read() == b""
            await serving
        assert hashlib.sha256(body).hexdigest() == artifact.sha256
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
    finally:
        for w in (writer, idle_writer):
            w.close()
            await w.wait_closed()
        loop.set_exception_handler(previous_handler)
    # Cancelling idle connections on shutdown must not look like a crash to asyncio.
    assert loop_errors == []


class DropWatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.dropped = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("HTTP connection dropped"):
            self.dropped.set()


async def test_stalled_reader_is_dropped(store: SpyStore) -> None:
    big = random.Random(2).randbytes(16 * 1024 * 1024)
    artifact = store.add_bytes(big)
    watcher = DropWatcher()
    http_logger = logging.getLogger("fleet.http")
    http_logger.addHandler(watcher)
    level = http_logger.level
    http_logger.setLevel(logging.DEBUG)
    try:
        async with HttpServer(HOST, 0, store, write_timeout_s=0.1, max_connections=1) as server:
            reader, writer = await asyncio.open_connection(HOST, server.port)
            try:
                writer.write(build(f"/artifacts/{artifact.sha256}"))
                async with asyncio.timeout(TIMEOUT):
                    await watcher.dropped.wait()
                    # The slot is free again and the stalled download was cut short.
                    assert (await get(server, "/healthz")).status == 200
                    received = 0
                    try:
                        while chunk := await reader.read(1 << 20):
                            received += len(chunk)
                    except ConnectionResetError:
                        pass
                assert received < len(big)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionResetError):
                    await writer.wait_closed()
    finally:
        http_logger.removeHandler(watcher)
        http_logger.setLevel(level)
