"""A minimal HTTP/1.1 GET client that streams, hashes, throttles and resumes with Range.

Nothing is stored: bytes are hashed as they arrive and dropped, so memory stays at one
chunk per terminal whatever the package size. The hasher and the offset survive a
dropped connection, so the retry asks for ``Range: bytes={offset}-`` and carries on. A
body that ends before the advertised size (a server or proxy that closes early) is
resumed the same way; the verification after the download still checks length and hash.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

_HEADER_LIMIT = 32_768
_USER_AGENT = "fleet-device-sim/1"


class DownloadFailedError(Exception):
    """The download gave up; `code` is the event's error code."""

    def __init__(self, code: str, detail: str) -> None:
        """Keep the error code and a short detail."""
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail[:200]


class _AttemptError(Exception):
    """One attempt failed in a way a retry may fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class DownloadPlan:
    """What to fetch, how fast, and which faults to inject."""

    url: str
    size: int
    chunk_bytes: int = 16_384
    bytes_per_s: int = 1_000_000
    timeout_s: float = 10.0
    max_attempts: int = 5
    retry_s: float = 0.5
    drop_at: int | None = None
    corrupt_at: int | None = None
    #: Injected: the server ends the body cleanly once this offset is reached.
    truncate_at: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DownloadResult:
    """What arrived: its length and SHA-256, and how many attempts it took."""

    length: int
    sha256: str
    attempts: int
    resumed: int


@dataclasses.dataclass(slots=True)
class _Progress:
    offset: int = 0
    hasher: "hashlib._Hash" = dataclasses.field(default_factory=hashlib.sha256)
    drop_at: int | None = None
    corrupt_at: int | None = None
    truncate_at: int | None = None
    resumed: int = 0
    on_fault: Callable[[str], None] | None = None

    def injected(self, kind: str) -> None:
        if self.on_fault is not None:
            self.on_fault(kind)


ProgressCallback = Callable[[int], Awaitable[None]]


async def download(
    plan: DownloadPlan,
    on_progress: ProgressCallback,
    *,
    on_fault: Callable[[str], None] | None = None,
) -> DownloadResult:
    """Fetch `plan.url`, resuming after drops, and return the length and hash received.

    `on_progress` is awaited with the byte offset after every chunk; `on_fault` is called
    with `download_drop`, `truncate` or `corrupt` when an injected fault takes effect. A
    body that ends short of `plan.size` counts as a failed attempt and is resumed.

    Raises:
        DownloadFailedError: too many failed attempts (DOWNLOAD_FAILED), or the server
            sent more than the advertised size (SIZE_EXCEEDED).
    """
    state = _Progress(
        drop_at=plan.drop_at,
        corrupt_at=plan.corrupt_at,
        truncate_at=plan.truncate_at,
        on_fault=on_fault,
    )
    for attempt in range(1, plan.max_attempts + 1):
        if attempt > 1:
            state.resumed += 1
        try:
            await _attempt(plan, state, on_progress)
        except (
            _AttemptError,
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            logger.debug("download %s attempt %d failed: %s", plan.url, attempt, exc)
            if attempt == plan.max_attempts:
                raise DownloadFailedError(
                    "DOWNLOAD_FAILED", str(exc) or type(exc).__name__
                ) from exc
            await asyncio.sleep(plan.retry_s * attempt)
            continue
        return DownloadResult(state.offset, state.hasher.hexdigest(), attempt, state.resumed)
    raise AssertionError  # pragma: no cover - the loop returns or raises


async def _attempt(plan: DownloadPlan, state: _Progress, on_progress: ProgressCallback) -> None:
    parts = urlsplit(plan.url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise DownloadFailedError("DOWNLOAD_FAILED", f"unsupported url {plan.url[:100]}")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    if state.offset >= plan.size > 0:
        return
    async with asyncio.timeout(plan.timeout_s):
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=tls, limit=_HEADER_LIMIT
        )
    try:
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {parts.netloc}",
            f"User-Agent: {_USER_AGENT}",
            "Accept-Encoding: identity",
            "Connection: close",
        ]
        if state.offset:
            lines.append(f"Range: bytes={state.offset}-")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        await writer.drain()
        async with asyncio.timeout(plan.timeout_s):
            status, headers = await _read_head(reader)
        await _read_body(
            plan, state, reader, status=status, headers=headers, on_progress=on_progress
        )
        if state.offset < plan.size:
            raise _AttemptError(f"body ended at {state.offset} of {plan.size} bytes")
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1):
                await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise _AttemptError("response head too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise _AttemptError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers


async def _read_body(
    plan: DownloadPlan,
    state: _Progress,
    reader: asyncio.StreamReader,
    *,
    status: int,
    headers: dict[str, str],
    on_progress: ProgressCallback,
) -> None:
    if status == 416 and state.offset == plan.size:
        return
    if status == 206:
        start = _content_range_start(headers.get("content-range", ""))
        if start != state.offset:
            raise _AttemptError(f"content-range starts at {start}, wanted {state.offset}")
    elif status == 200:
        if state.offset:
            # The server ignored Range: start over, hash included.
            state.offset, state.hasher = 0, hashlib.sha256()
    else:
        raise _AttemptError(f"HTTP {status}")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and state.offset + int(length) > plan.size:
        raise DownloadFailedError("SIZE_EXCEEDED", f"server announces {length} bytes")
    started, received = time.monotonic(), 0
    async for data in _body_chunks(plan, reader, headers):
        if state.offset + len(data) > plan.size:
            raise DownloadFailedError("SIZE_EXCEEDED", f"more than {plan.size} bytes")
        cut = state.truncate_at
        if cut is not None and state.offset + len(data) >= cut:
            # As if the server closed the connection cleanly here: the body just ends.
            state.truncate_at = None
            state.injected("truncate")
            head = data[: max(0, cut - state.offset)]
            if head:
                state.hasher.update(_maybe_corrupt(state, head))
                state.offset += len(head)
                await on_progress(state.offset)
            return
        chunk = _maybe_corrupt(state, data)
        state.hasher.update(chunk)
        state.offset += len(chunk)
        received += len(chunk)
        await on_progress(state.offset)
        ahead = received / plan.bytes_per_s - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
        if state.drop_at is not None and state.offset >= state.drop_at:
            state.drop_at = None
            state.injected("download_drop")
            raise _AttemptError(f"injected connection drop at {state.offset}")


def _maybe_corrupt(state: _Progress, data: bytes) -> bytes:
    at = state.corrupt_at
    if at is None or not state.offset <= at < state.offset + len(data):
        return data
    state.corrupt_at = None
    state.injected("corrupt")
    flipped = bytearray(data)
    flipped[at - state.offset] ^= 0xFF
    return bytes(flipped)


def _content_range_start(value: str) -> int | None:
    unit, _, spec = value.partition(" ")
    first = spec.split("-", 1)[0]
    if unit.strip().lower() != "bytes" or not first.isdigit():
        return None
    return int(first)


async def _body_chunks(
    plan: DownloadPlan, reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        async for data in _chunked(plan, reader):
            yield data
        return
    length = headers.get("content-length")
    remaining = int(length) if length is not None and length.isdigit() else None
    while remaining is None or remaining > 0:
        want = plan.chunk_bytes if remaining is None else min(plan.chunk_bytes, remaining)
        async with asyncio.timeout(plan.timeout_s):
            data = await reader.read(want)
        if not data:
            if remaining is None:
                return
            raise _AttemptError(f"connection closed with {remaining} bytes to go")
        if remaining is not None:
            remaining -= len(data)
        yield data


async def _chunked(plan: DownloadPlan, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        async with asyncio.timeout(plan.timeout_s):
            line = await reader.readuntil(b"\r\n")
        size_field = line.split(b";", 1)[0].strip()
        try:
            remaining = int(size_field, 16)
        except ValueError:
            raise _AttemptError("bad chunk size") from None
        if remaining == 0:
            return
        while remaining > 0:
            async with asyncio.timeout(plan.timeout_s):
                data = await reader.read(min(plan.chunk_bytes, remaining))
            if not data:
                raise _AttemptError("connection closed inside a chunk")
            remaining -= len(data)
            yield data
        async with asyncio.timeout(plan.timeout_s):
            await reader.readexactly(2)
