"""A small HTTP/1.1 server for artifacts, metrics and health.

Terminals download packages from ``/artifacts/{sha256}`` and resume broken downloads
with a single byte range (RFC 9110 §14). Prometheus scrapes ``/metrics``; orchestrators
probe ``/healthz``. Nothing else is served, so a framework would be more code to trust
than this module.

Everything a client can influence is bounded: the request head's size and the time to
send it, the time a stalled client may keep a response waiting, the number of requests
per connection and the number of connections. Files are streamed in chunks with
backpressure and never read whole.
"""

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import BinaryIO, Self
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from fleet.artifacts import ArtifactStore

logger = logging.getLogger(__name__)

#: Largest request head (request line and headers) accepted; larger gets 431.
MAX_HEAD_BYTES = 16 * 1024
#: Most header lines in one request; more gets 431.
MAX_HEADERS = 100
#: Bytes read from disk and written to the socket per step of a download.
CHUNK_BYTES = 64 * 1024
#: A request body up to this size is read and dropped so the connection can be reused;
#: a larger one (or a chunked one) closes the connection instead.
MAX_DISCARDED_BODY = 64 * 1024
#: Requests served on one connection before it is closed, so no client keeps a slot
#: forever by never stopping.
MAX_REQUESTS_PER_CONNECTION = 1000

ARTIFACT_PREFIX = "/artifacts/"

# Route labels of `REQUESTS`: a fixed set, so clients cannot grow the label space.
_ROUTE_ARTIFACT = "/artifacts/{sha256}"
_ROUTE_METRICS = "/metrics"
_ROUTE_HEALTH = "/healthz"
_ROUTE_OTHER = "other"

_ALLOWED_METHODS = ("GET", "HEAD")

REQUESTS = Counter(
    "fleet_http_requests",
    "HTTP requests answered, by route and status code.",
    ["path", "code"],
)
BYTES_SERVED = Counter(
    "fleet_artifact_bytes_served",
    "Artifact body bytes written to client connections.",
)

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(r"HTTP/([0-9])\.([0-9])")
_RANGE_RE = re.compile(r"bytes=([0-9]{0,30})-([0-9]{0,30})", re.IGNORECASE)
_DIGITS_RE = re.compile(r"[0-9]{1,30}")


class _HttpError(Exception):
    """The request cannot be served; answer with `status` and close the connection."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(f"{status.value} {detail}")
        self.status = status
        self.detail = detail


class _RangeNotSatisfiableError(Exception):
    """No byte of the requested range exists."""


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    version: str
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        """Return a header's value, repeated lines joined as RFC 9110 §5.3 allows."""
        values = self.headers.get(name)
        return None if values is None else ", ".join(values)


@dataclass(frozen=True, slots=True)
class _Response:
    status: HTTPStatus
    route: str
    headers: list[tuple[str, str]]
    body: bytes = b""


class HttpServer:
    """Serves artifacts, Prometheus metrics and a health probe over HTTP/1.1."""

    def __init__(
        self,
        host: str,
        port: int,
        store: ArtifactStore,
        health: Callable[[], bool] | None = None,
        *,
        max_connections: int = 256,
        read_timeout_s: float = 10.0,
        write_timeout_s: float = 30.0,
        grace_s: float = 10.0,
    ) -> None:
        """Configure the server; nothing listens until `start` or `serve`.

        Args:
            host: Address to bind.
            port: Port to bind; 0 picks a free one, then see `port`.
            store: Where ``/artifacts/{sha256}`` finds files.
            health: Called by ``/healthz``; False (or an exception) answers 503.
                Without it, the probe answers 200 while the server runs.
            max_connections: Connections served at once; more are answered 503 and
                closed.
            read_timeout_s: Time a client has to send a complete request head, and how
                long an idle keep-alive connection is kept.
            write_timeout_s: Time a client may go without accepting any bytes of a
                response before it is dropped.
            grace_s: On close, how long responses in progress may take to finish.
        """
        self._host = host
        self._requested_port = port
        self._store = store
        self._health = health
        self._slots = asyncio.Semaphore(max_connections)
        self._read_timeout_s = read_timeout_s
        self._write_timeout_s = write_timeout_s
        self._grace_s = grace_s
        self._server: asyncio.Server | None = None
        self._closing = False
        # Every connection's handler task, and whether it is idle (waiting for a request
        # head), in which case shutdown need not wait for it.
        self._connections: dict[asyncio.Task[None], bool] = {}

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for).

        Raises:
            RuntimeError: The server is not listening.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Start listening; connections are served in the background until `close`.

        Raises:
            RuntimeError: The server was already started.
        """
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        self._closing = False
        # The reader's limit caps how much of an unfinished request head is buffered.
        self._server = await asyncio.start_server(
            self._handle, self._host, self._requested_port, limit=MAX_HEAD_BYTES
        )
        logger.info("HTTP server listening on %s:%d", self._host, self.port)

    async def close(self) -> None:
        """Stop listening, let responses in progress finish within the grace period.

        Idle keep-alive connections are closed at once; responses still running when
        the grace period ends are cut off.
        """
        server = self._server
        if server is None:
            return
        self._closing = True
        server.close()
        for task, idle in list(self._connections.items()):
            if idle:
                task.cancel()
        busy = set(self._connections)
        if busy:
            _, pending = await asyncio.wait(busy, timeout=self._grace_s)
            if pending:
                logger.warning("cutting off %d HTTP responses after the grace period", len(pending))
                for task in pending:
                    task.cancel()
                # Cancelled handlers only close their sockets, which is itself bounded.
                await asyncio.wait(pending, timeout=self._write_timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._grace_s):
                await server.wait_closed()
        self._server = None
        logger.info("HTTP server closed")

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then close as `close` does.

        Starts the server unless `start` was already called, so a caller can learn the
        bound port before handing the server to a task group.

        Args:
            stop: Set it to shut the server down.
        """
        if self._server is None:
            await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def __aenter__(self) -> Self:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the server."""
        await self.close()

    # -- connections -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Shutdown cancels this inner task, never the one asyncio's streams created for
        # us: on Python 3.11 the streams code logs a cancelled handler task as an error.
        task = asyncio.create_task(self._connection(reader, writer))
        self._connections[task] = False
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # Only the inner task was cancelled: our own shutdown, not an error.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        finished = False
        try:
            if self._closing or self._slots.locked():
                await self._reject(writer)
            else:
                async with self._slots:
                    await self._serve_connection(reader, writer, task)
            finished = True
        except (ConnectionError, TimeoutError) as exc:
            logger.debug("HTTP connection dropped: %r", exc)
        except Exception:
            logger.exception("HTTP connection failed")
        finally:
            self._connections.pop(task, None)
            if finished:
                await self._close_writer(writer)
            else:
                # A graceful close waits until the client takes the buffered bytes,
                # which a stalled client never does; abort frees the socket now.
                writer.transport.abort()

    async def _reject(self, writer: asyncio.StreamWriter) -> None:
        # The request is not read: this answer must cost as little as possible.
        response = _Response(
            HTTPStatus.SERVICE_UNAVAILABLE,
            _ROUTE_OTHER,
            [("Retry-After", "1"), ("Content-Type", "text/plain; charset=utf-8")],
            b"too many connections\n",
        )
        await self._send(writer, response, head_only=False, keep_alive=False)

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[None],
    ) -> None:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            if self._closing:
                return
            self._connections[task] = True
            try:
                # One deadline for the whole head, not per read, so a client trickling
                # a byte at a time (slowloris) is dropped all the same.
                async with asyncio.timeout(self._read_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError:
                error = _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "head too large")
                await self._send_error(writer, error, head_only=False)
                return
            self._connections[task] = False
            if not head.strip():
                # RFC 9112 §2.2: empty lines before a request line are ignored.
                continue
            try:
                request = _parse_head(head)
                keep_alive = await self._consume_body(reader, request) and _keep_alive(request)
            except _HttpError as error:
                await self._send_error(writer, error, head_only=False)
                return
            keep_alive = keep_alive and not self._closing
            await self._respond(writer, request, keep_alive=keep_alive)
            if not keep_alive:
                return

    async def _consume_body(self, reader: asyncio.StreamReader, request: _Request) -> bool:
        """Skip the request body; tell whether the connection can carry another request."""
        lengths = request.headers.get("content-length")
        if "transfer-encoding" in request.headers:
            if lengths is not None:
                # RFC 9112 §6.1: both at once is how requests are smuggled.
                raise _HttpError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding with Content-Length")
            return False
        if lengths is None:
            return True
        values = {value.strip() for line in lengths for value in line.split(",")}
        if len(values) != 1 or _DIGITS_RE.fullmatch(next(iter(values))) is None:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        length = int(values.pop())
        if length > MAX_DISCARDED_BODY:
            return False
        if length:
            async with asyncio.timeout(self._read_timeout_s):
                await reader.readexactly(length)
        return True

    # -- routes ------------------------------------------------------------------------

    async def _respond(
        self, writer: asyncio.StreamWriter, request: _Request, *, keep_alive: bool
    ) -> None:
        path = request.path
        if path.startswith(ARTIFACT_PREFIX):
            route = _ROUTE_ARTIFACT
        elif path in {_ROUTE_METRICS, _ROUTE_HEALTH}:
            route = path
        else:
            error = _HttpError(HTTPStatus.NOT_FOUND, "not found")
            await self._send_error(writer, error, route=_ROUTE_OTHER, request=request)
            return
        if request.method not in _ALLOWED_METHODS:
            error = _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
            await self._send_error(writer, error, route=route, request=request)
            return
        head_only = request.method == "HEAD"
        if route == _ROUTE_ARTIFACT:
            await self._send_artifact(
                writer,
                request,
                path.removeprefix(ARTIFACT_PREFIX),
                head_only=head_only,
                keep_alive=keep_alive,
            )
            return
        response = self._metrics() if route == _ROUTE_METRICS else self._healthz()
        await self._send(writer, response, head_only=head_only, keep_alive=keep_alive)
        logger.debug("%s %s -> %d", request.method, path, response.status.value)

    def _metrics(self) -> _Response:
        return _Response(
            HTTPStatus.OK,
            _ROUTE_METRICS,
            [("Content-Type", CONTENT_TYPE_LATEST), ("Cache-Control", "no-store")],
            generate_latest(),
        )

    def _healthz(self) -> _Response:
        healthy = True
        if self._health is not None:
            try:
                healthy = self._health()
            except Exception:
                logger.exception("health check failed")
                healthy = False
        status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        body = b"ok\n" if healthy else b"unhealthy\n"
        return _Response(status, _ROUTE_HEALTH, headers, body)

    async def _send_artifact(
        self,
        writer: asyncio.StreamWriter,
        request: _Request,
        sha256: str,
        *,
        head_only: bool,
        keep_alive: bool,
    ) -> None:
        opened = await asyncio.to_thread(self._open_artifact, sha256)
        if opened is None:
            error = _HttpError(HTTPStatus.NOT_FOUND, "no such artifact")
            await self._send_error(
                writer, error, route=_ROUTE_ARTIFACT, request=request, keep_alive=keep_alive
            )
            return
        file, size = opened
        try:
            etag = f'"{sha256}"'
            headers = [
                ("Content-Type", "application/octet-stream"),
                ("Accept-Ranges", "bytes"),
                ("ETag", etag),
                # The name is the content's hash: it can never change.
                ("Cache-Control", "public, max-age=31536000, immutable"),
            ]
            try:
                selected = _select_range(request, size, etag)
            except _RangeNotSatisfiableError:
                headers.append(("Content-Range", f"bytes */{size}"))
                response = _Response(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, _ROUTE_ARTIFACT, headers
                )
                await self._send(writer, response, head_only=head_only, keep_alive=keep_alive)
                return
            if selected is None:
                status, start, end = HTTPStatus.OK, 0, size
            else:
                status, (start, end) = HTTPStatus.PARTIAL_CONTENT, selected
                headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
            headers.append(("Content-Length", str(end - start)))
            writer.write(_render_head(status, headers, keep_alive=keep_alive))
            REQUESTS.labels(_ROUTE_ARTIFACT, str(status.value)).inc()
            await self._drain(writer)
            logger.debug("%s %s -> %d", request.method, request.path, status.value)
            if not head_only:
                await self._stream(writer, file, start, end)
        finally:
            file.close()

    def _open_artifact(self, sha256: str) -> tuple[BinaryIO, int] | None:
        path = self._store.path_of(sha256)
        if path is None:
            return None
        try:
            file = path.open("rb")
        except FileNotFoundError:
            return None
        # The size comes from the open file, not the path, so it describes what is sent.
        return file, os.fstat(file.fileno()).st_size

    async def _stream(
        self, writer: asyncio.StreamWriter, file: BinaryIO, start: int, end: int
    ) -> None:
        fd = file.fileno()
        offset = start
        while offset < end:
            # Disk reads go to a thread so a slow disk does not stall every connection.
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK_BYTES, end - offset), offset)
            if not chunk:
                # The promised Content-Length can no longer be met; closing the
                # connection is the only way left to tell the client.
                raise ConnectionAbortedError("artifact shrank while being sent")
            writer.write(chunk)
            BYTES_SERVED.inc(len(chunk))
            await self._drain(writer)
            offset += len(chunk)

    # -- writing -----------------------------------------------------------------------

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        error: _HttpError,
        *,
        route: str = _ROUTE_OTHER,
        request: _Request | None = None,
        head_only: bool | None = None,
        keep_alive: bool = False,
    ) -> None:
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if error.status == HTTPStatus.METHOD_NOT_ALLOWED:
            headers.append(("Allow", ", ".join(_ALLOWED_METHODS)))
        response = _Response(error.status, route, headers, f"{error.detail}\n".encode())
        if head_only is None:
            head_only = request is not None and request.method == "HEAD"
        if request is None:
            logger.debug("bad HTTP request: %s", error)
        else:
            logger.debug("%s %s -> %d", request.method, request.path, error.status.value)
        await self._send(writer, response, head_only=head_only, keep_alive=keep_alive)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: _Response,
        *,
        head_only: bool,
        keep_alive: bool,
    ) -> None:
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        writer.write(_render_head(response.status, headers, keep_alive=keep_alive))
        if response.body and not head_only:
            writer.write(response.body)
        REQUESTS.labels(response.route, str(response.status.value)).inc()
        await self._drain(writer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        # Backpressure: wait until the client takes the bytes, but not forever.
        async with asyncio.timeout(self._write_timeout_s):
            await writer.drain()

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except OSError as exc:
            logger.debug("HTTP connection closed with %r", exc)


# -- parsing ---------------------------------------------------------------------------


def _parse_head(head: bytes) -> _Request:
    # Latin-1 maps every byte, so odd bytes fail validation below instead of decoding.
    lines = head.decode("latin-1").lstrip("\r\n").removesuffix("\r\n\r\n").split("\r\n")
    request_line, *header_lines = lines
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if _TOKEN_RE.fullmatch(method) is None:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed method")
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    if match[1] != "1":
        raise _HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.x only")
    if len(header_lines) > MAX_HEADERS:
        raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        # A name that is not a token also catches whitespace before the colon and
        # obsolete line folding, both of which RFC 9112 §5 says to reject.
        if not colon or _TOKEN_RE.fullmatch(name) is None:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header")
        value = value.strip(" \t")
        if any(char in value for char in "\r\n\0"):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header value")
        headers.setdefault(name.lower(), []).append(value)
    hosts = headers.get("host", [])
    if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
        # RFC 9112 §3.2 requires exactly this 400.
        raise _HttpError(HTTPStatus.BAD_REQUEST, "exactly one Host header required")
    return _Request(method, _target_path(target), version, headers)


def _target_path(target: str) -> str:
    if target.startswith("/"):
        path = target
    elif target[:8].lower().startswith(("http://", "https://")):
        # Absolute form, which RFC 9112 §3.2.2 says servers must accept.
        path = urlsplit(target).path or "/"
    elif target == "*":
        path = target
    else:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")
    return path.partition("?")[0]


def _keep_alive(request: _Request) -> bool:
    # HTTP/1.0 keep-alive would need its own negotiation; such clients get one request.
    if request.version != "HTTP/1.1":
        return False
    tokens = {token.strip().lower() for token in (request.header("connection") or "").split(",")}
    return "close" not in tokens


def _select_range(request: _Request, size: int, etag: str) -> tuple[int, int] | None:
    """Return the ``[start, end)`` byte span to send, or None for the whole file.

    Raises:
        _RangeNotSatisfiableError: The range asks only for bytes past the end.
    """
    # RFC 9110 §14.2: range handling is defined for GET alone; HEAD answers as a
    # plain GET would.
    value = request.header("range")
    if request.method != "GET" or value is None:
        return None
    if_range = request.header("if-range")
    # Strong comparison: a weak tag, a different tag or a date (we send no
    # Last-Modified) all mean the client's partial copy may be stale.
    if if_range is not None and if_range != etag:
        return None
    return _parse_byte_range(value.strip(), size)


def _parse_byte_range(value: str, size: int) -> tuple[int, int] | None:
    match = _RANGE_RE.fullmatch(value)
    # Other units, several ranges and malformed specifiers may all be ignored
    # (RFC 9110 §14.2); the client then gets the whole file with 200.
    if match is None or not (match[1] or match[2]):
        return None
    first, last = match[1], match[2]
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _RangeNotSatisfiableError
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _RangeNotSatisfiableError
    end = size if not last else min(int(last) + 1, size)
    return start, end


def _render_head(status: HTTPStatus, headers: list[tuple[str, str]], *, keep_alive: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Date: {formatdate(usegmt=True)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
