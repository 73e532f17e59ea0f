"""The webhook spool: authenticated deliveries journaled on local disk while PostgreSQL is unreachable, replayed in
order through the normal path when it returns (seed 004's fallback queue, made durable and bounded).

The journal is a folder of append-only segments (``seg-000000000001.log`` …). Each record is
``magic | length | crc32 | payload`` (big-endian), the payload being a length-prefixed JSON header (received_at,
organization_id, provider, path_event) followed by the exact raw body. A delivery is answered 202 only once its
record is written and fsync'ed (concurrent appends share one fsync). A crash can leave a torn last record: its
length or checksum does not match, and reading stops there. A process never appends to a segment it did not
create, so a torn record is always the last one of its segment.

Replay reads the oldest segment from a cursor (``cursor.json``, the offset of the first record not yet applied),
applies records in batches through :func:`api.inbox.handle_event` (idempotent by its dedupe keys; each instance's
records in order, instances concurrently), moves the cursor after each batch and deletes the segment once every
record of it is applied. A crash between a batch and its cursor replays that batch again: duplicates, never a loss.

Several API processes on one machine each claim their own slot folder (``spool/0``, ``spool/1`` …) with an
exclusive ``flock``; a restarted process takes over a slot left behind and replays what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.errors import error_body, request_id
from api.inbox import HandlingResult, RepeatFilter, handle_event
from core.domain import Provider
from core.errors import DatabaseUnavailable, ZapsyncError
from gateways.webhook_payloads import (
    MalformedPayload,
    WebhookEvent,
    parse_delivery,
)

log = logging.getLogger("zapsync.spool")

MAGIC = b"ZSJ1"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32 of the payload
_META = struct.Struct(">I")
SEGMENT_BYTES = 8 * 1024 * 1024
"""A segment is closed past this size (replay reads one segment at a time into memory)."""
RETRY_AFTER_SECONDS = 30
"""What a 503 for a full journal tells the gateway to wait."""


class SpoolFull(ZapsyncError):
    """The journal is at its size limit: the delivery is refused (503 with Retry-After) so the gateway retries."""

    status_code = 503


class Spooled(Exception):
    """Raised by the receive path once a delivery is journaled: answered 202 with ``ack`` (the routes' own return
    type stays the 200 acknowledgement)."""

    def __init__(self, ack: dict[str, Any]) -> None:
        super().__init__("spooled")
        self.ack = ack


@dataclass(frozen=True)
class SpoolRecord:
    """One journaled delivery, as received."""

    received_at: datetime
    organization_id: uuid.UUID
    provider: Provider
    path_event: str | None
    body: bytes


def encode_record(record: SpoolRecord) -> bytes:
    """The bytes of one record in the journal."""
    meta = orjson.dumps(
        {
            "received_at": record.received_at.isoformat(),
            "organization_id": str(record.organization_id),
            "provider": str(record.provider),
            "path_event": record.path_event,
        }
    )
    payload = _META.pack(len(meta)) + meta + record.body
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_records(data: bytes, start: int = 0) -> tuple[list[tuple[int, SpoolRecord]], int]:
    """The whole records in ``data`` from ``start``, each with the offset just past it, and the offset where the
    whole records end (a torn or corrupt tail after it is left unread)."""
    found: list[tuple[int, SpoolRecord]] = []
    offset = start
    while offset + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if magic != MAGIC or end > len(data):
            break
        payload = data[offset + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        (meta_length,) = _META.unpack_from(payload, 0)
        meta = orjson.loads(payload[_META.size : _META.size + meta_length])
        found.append(
            (
                end,
                SpoolRecord(
                    received_at=datetime.fromisoformat(meta["received_at"]),
                    organization_id=uuid.UUID(meta["organization_id"]),
                    provider=Provider(meta["provider"]),
                    path_event=meta.get("path_event"),
                    body=payload[_META.size + meta_length :],
                ),
            )
        )
        offset = end
    return found, offset


def read_journal(path: Path) -> Iterator[SpoolRecord]:
    """Every whole record of a journal: one segment file, a slot folder (segments in order, from its cursor) or a
    spool folder of slots."""
    if path.is_file():
        yield from (record for _, record in decode_records(path.read_bytes())[0])
        return
    slots = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for slot in slots:
        yield from read_journal(slot)
    cursor = _read_cursor(path)
    for segment in _segments(path):
        start = cursor[1] if cursor and cursor[0] == segment.name else 0
        yield from (record for _, record in decode_records(segment.read_bytes(), start)[0])


def _segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("seg-*.log"))


def _segment_number(path: Path) -> int:
    return int(path.stem.removeprefix("seg-"))


def _read_cursor(folder: Path) -> tuple[str, int] | None:
    try:
        raw = orjson.loads((folder / "cursor.json").read_bytes())
        return str(raw["segment"]), int(raw["offset"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The append-only, bounded journal of one process (see the module docstring)."""

    def __init__(self, folder: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.folder = folder
        self.records = 0
        """Records written and not yet applied."""
        self.bytes = 0
        """Their size on disk."""
        self._lock_file: IO[bytes] | None = None
        self._active: IO[bytes] | None = None
        self._active_path: Path | None = None
        self._next_number = 1
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._pending_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    # -- opening and closing --

    def open(self) -> Journal:
        """Claim a slot folder (the first one no other process holds) and count what it holds."""
        self.root.mkdir(parents=True, exist_ok=True)
        for slot in range(64):
            folder = self.root / str(slot)
            folder.mkdir(exist_ok=True)
            lock = (folder / "lock").open("ab")
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            self.folder, self._lock_file = folder, lock
            break
        else:
            raise ZapsyncError(f"every spool slot under {self.root} is held by another process")
        segments = _segments(self.folder)
        self._next_number = (_segment_number(segments[-1]) + 1) if segments else 1
        cursor = _read_cursor(self.folder)
        for segment in segments:
            start = cursor[1] if cursor and cursor[0] == segment.name else 0
            found, end = decode_records(segment.read_bytes(), start)
            self.records += len(found)
            self.bytes += end - start
        if self.records:
            log.warning("[SPOOL] %s holds %d deliveries (%d bytes) to replay", self.folder, self.records, self.bytes)
        return self

    def close(self) -> None:
        """Close the active segment and release the slot."""
        if self._active is not None:
            self._active.close()
            self._active = self._active_path = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def backlog(self) -> bool:
        """Whether deliveries are waiting (written or being written): new ones must queue behind them."""
        return self.records > 0 or bool(self._pending)

    def depth(self) -> dict[str, int]:
        """Records and bytes waiting to be replayed."""
        return {"records": self.records, "bytes": self.bytes}

    # -- appending --

    async def append(self, record: SpoolRecord) -> None:
        """Write ``record`` durably (fsync'ed, shared with concurrent appends); SpoolFull past the size limit."""
        data = encode_record(record)
        if self.bytes + self._pending_bytes + len(data) > self.max_bytes:
            raise SpoolFull(
                f"the webhook spool is full ({self.bytes} of {self.max_bytes} bytes) while the database is "
                "unreachable: retry later"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((data, future))
        self._pending_bytes += len(data)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        """Write what is pending in one go, fsync once, then answer every append of the batch."""
        while self._pending:
            batch, self._pending = self._pending, []
            size = sum(len(data) for data, _ in batch)
            try:
                async with self._write_lock:
                    await asyncio.to_thread(self._write, [data for data, _ in batch])
            except OSError as exc:
                self._pending_bytes -= size
                for _, future in batch:
                    if not future.done():
                        future.set_exception(SpoolFull(f"the webhook spool cannot be written: {exc.strerror}"))
                continue
            self._pending_bytes -= size
            self.records += len(batch)
            self.bytes += size
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _write(self, chunks: list[bytes]) -> None:
        if self._active is not None and self._active.tell() >= self.segment_bytes:
            self._seal()
        if self._active is None:
            self._active_path = self.folder / f"seg-{self._next_number:012d}.log"
            self._next_number += 1
            self._active = self._active_path.open("ab")
            _fsync_dir(self.folder)
        self._active.write(b"".join(chunks))
        self._active.flush()
        os.fsync(self._active.fileno())

    def _seal(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = self._active_path = None

    # -- replaying --

    async def oldest(self) -> tuple[Path, list[tuple[int, SpoolRecord]]] | None:
        """The oldest segment and its records not yet applied (the active segment is sealed first, so new appends
        go to a new one); None when the journal is empty."""
        segments = _segments(self.folder)
        if not segments:
            return None
        segment = segments[0]
        if segment == self._active_path:
            async with self._write_lock:
                self._seal()
        cursor = _read_cursor(self.folder)
        start = cursor[1] if cursor and cursor[0] == segment.name else 0
        found, _ = decode_records(await asyncio.to_thread(segment.read_bytes), start)
        return segment, found

    def applied(self, segment: Path, offset: int, records: int, size: int) -> None:
        """Note that the records of ``segment`` before ``offset`` are applied (the cursor moves; not fsync'ed: a
        cursor lost in a crash means a batch replayed twice, which dedupes)."""
        temporary = self.folder / "cursor.json.tmp"
        temporary.write_bytes(orjson.dumps({"segment": segment.name, "offset": offset}))
        temporary.replace(self.folder / "cursor.json")
        self.records = max(0, self.records - records)
        self.bytes = max(0, self.bytes - size)

    def discard(self, segment: Path) -> None:
        """Delete a segment whose records are all applied (and the cursor into it)."""
        with contextlib.suppress(FileNotFoundError):
            (self.folder / "cursor.json").unlink()
        segment.unlink(missing_ok=True)
        if not self._pending and not _segments(self.folder):
            self.records = self.bytes = 0  # a torn tail is never counted twice

    def quarantine(self, record: SpoolRecord) -> None:
        """Keep a record that cannot be applied in ``failed.log`` (same format), out of the way of the others."""
        with (self.folder / "failed.log").open("ab") as failed:
            failed.write(encode_record(record))
            failed.flush()
            os.fsync(failed.fileno())


# -- applying records ------------------------------------------------------------------------------------------


def parse_record(record: SpoolRecord) -> tuple[dict[str, Any], WebhookEvent]:
    """The payload and parsed event of a journaled delivery (MalformedPayload if it does not parse)."""
    return parse_delivery(record.provider, record.body, path_event=record.path_event)


AfterApply = Callable[[uuid.UUID, WebhookEvent, HandlingResult], Awaitable[None]]


async def apply_record(
    record: SpoolRecord, repeats: RepeatFilter, after: list[AfterApply] | None = None, *, reapply: bool = False
) -> HandlingResult:
    """Apply one journaled delivery through the normal path, then the after-webhook hooks (which never fail it);
    ``reapply`` applies a delivery whose inbox row exists again (see :func:`api.inbox.handle_event`)."""
    payload, event = parse_record(record)
    result = await handle_event(
        record.organization_id, event, payload, repeats=repeats, received_at=record.received_at, reapply=reapply
    )
    for hook in after or []:
        try:
            await hook(record.organization_id, event, result)
        except Exception:
            log.exception("[SPOOL] after-webhook hook failed for a replayed %s", event.event)
    return result


def _order_key(record: SpoolRecord) -> str:
    """Records with the same key are applied in journal order (one instance's); others may run concurrently."""
    try:
        _, event = parse_record(record)
    except MalformedPayload:
        return "-"
    return f"{record.organization_id}|{record.provider}|{event.instance_name or '-'}"


async def apply_in_order(
    records: list[SpoolRecord],
    apply: Callable[[SpoolRecord], Awaitable[HandlingResult]],
    *,
    concurrency: int = 8,
    on_failure: Callable[[SpoolRecord, Exception], None] | None = None,
) -> Counter[str]:
    """Apply ``records``, each instance's in order, instances concurrently; counts by outcome (``failed`` for a
    record that raised anything but DatabaseUnavailable, which stops the whole batch)."""
    groups: dict[str, list[SpoolRecord]] = {}
    for record in records:
        groups.setdefault(_order_key(record), []).append(record)
    counts: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)

    async def run(group: list[SpoolRecord]) -> None:
        async with gate:
            for record in group:
                try:
                    result = await apply(record)
                except DatabaseUnavailable:
                    raise
                except Exception as exc:
                    log.warning("[SPOOL] a %s delivery could not be applied: %s", record.provider, exc)
                    counts["failed"] += 1
                    if on_failure is not None:
                        on_failure(record, exc)
                    continue
                counts[result.outcome] += 1

    try:
        async with asyncio.TaskGroup() as tasks:
            for group in groups.values():
                tasks.create_task(run(group))
    except ExceptionGroup as group:
        unreachable = group.subgroup(DatabaseUnavailable)
        if unreachable is not None:
            raise unreachable.exceptions[0] from group
        raise
    return counts


class Replayer:
    """Drains the journal into the database whenever it holds records, backing off while the database is down."""

    def __init__(
        self,
        journal: Journal,
        apply: Callable[[SpoolRecord], Awaitable[HandlingResult]],
        *,
        batch: int = 200,
        concurrency: int = 8,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.journal = journal
        self.apply = apply
        self.batch = batch
        self.concurrency = concurrency
        self.max_backoff = max_backoff_seconds
        self.totals: Counter[str] = Counter()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the journal now (a record was appended)."""
        self._wake.set()

    async def run(self) -> None:
        """Run until cancelled."""
        delay = 0.2
        while True:
            if self.journal.records:
                if await self._drain_once():
                    delay = 0.2
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
                    continue
            self._wake.clear()
            if not self.journal.records:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def _drain_once(self) -> bool:
        """One drain; False when it stopped early (the database is unreachable, or something unexpected failed)."""
        try:
            await self.drain()
        except DatabaseUnavailable:
            log.info("[SPOOL] the database is unreachable: %d deliveries wait", self.journal.records)
            return False
        except Exception:
            log.exception("[SPOOL] replay failed; retrying")
            return False
        return True

    async def drain(self) -> Counter[str]:
        """Apply every record, oldest first; DatabaseUnavailable stops it where it was."""
        while (oldest := await self.journal.oldest()) is not None:
            segment, found = oldest
            previous = _read_cursor(self.journal.folder)
            offset = previous[1] if previous and previous[0] == segment.name else 0
            for first in range(0, len(found), self.batch):
                chunk = found[first : first + self.batch]
                counts = await apply_in_order(
                    [record for _, record in chunk],
                    self.apply,
                    concurrency=self.concurrency,
                    on_failure=lambda record, _exc: self.journal.quarantine(record),
                )
                self.totals.update(counts)
                end = chunk[-1][0]
                self.journal.applied(segment, end, len(chunk), end - offset)
                offset = end
            self.journal.discard(segment)
            if found:
                log.info("[SPOOL] replayed %d deliveries of %s (%s)", len(found), segment.name, dict(self.totals))
        return self.totals


# -- wiring into the app ---------------------------------------------------------------------------------------


def install_spool_handlers(app: FastAPI) -> None:
    """Answer :class:`Spooled` with 202 and :class:`SpoolFull` with 503 and Retry-After."""

    @app.exception_handler(Spooled)
    async def spooled(_: Request, exc: Spooled) -> JSONResponse:
        return JSONResponse(exc.ack, status_code=202)

    @app.exception_handler(SpoolFull)
    async def spool_full(request: Request, exc: SpoolFull) -> JSONResponse:
        return JSONResponse(
            error_body(type(exc).__name__, exc.message, request_id(request)),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


def app_spool(app: FastAPI) -> Journal | None:
    """The app's journal (None when the app runs without one: no lifespan, as in most tests)."""
    return getattr(app.state, "spool", None)


async def spool_delivery(app: FastAPI, record: SpoolRecord, event: WebhookEvent, why: str) -> NoReturn:
    """Journal a delivery durably and raise :class:`Spooled` (the 202); SpoolFull when there is no room."""
    journal = app_spool(app)
    assert journal is not None
    await journal.append(record)
    replayer: Replayer | None = getattr(app.state, "spool_replayer", None)
    if replayer is not None:
        replayer.wake()
    app.state.metrics.webhook_events.labels(str(record.provider), event.event, "spooled").inc()
    log.info("[WEBHOOK] %s %s %s -> spooled (%s)", record.provider, event.event, event.instance_name or "-", why)
    raise Spooled(
        {
            "outcome": "spooled",
            "event": event.event,
            "instance": event.instance_name,
            "detail": f"kept in the local spool ({why}); applied when the database is back",
        }
    )


@contextlib.asynccontextmanager
async def running_spool(app: FastAPI, folder: Path, max_bytes: int) -> AsyncIterator[Journal | None]:
    """Open the journal and run its replayer for the app's lifetime (without a usable folder the app runs without a
    spool, answering 503 during outages as before, and says so)."""
    try:
        journal = await asyncio.to_thread(Journal(folder, max_bytes=max_bytes).open)
    except (OSError, ZapsyncError) as exc:
        log.error("[SPOOL] no webhook spool (%s): deliveries get 503 while the database is unreachable", exc)
        yield None
        return
    repeats: RepeatFilter = app.state.repeat_filter

    async def apply(record: SpoolRecord) -> HandlingResult:
        result = await apply_record(record, repeats, getattr(app.state, "after_webhook", []))
        app.state.metrics.webhook_events.labels(str(record.provider), "replayed", result.outcome).inc()
        return result

    replayer = Replayer(journal, apply)
    app.state.spool, app.state.spool_replayer = journal, replayer
    task = asyncio.get_running_loop().create_task(replayer.run(), name="webhook-spool-replay")
    try:
        yield journal
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        app.state.spool = app.state.spool_replayer = None
        journal.close()
