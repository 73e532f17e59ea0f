"""`zapsync webhooks replay` (issue 13 §5): stored deliveries applied again through the normal path, idempotently.

Two sources: the inbox (``webhook_events`` rows received since a time, after a bug fix) and a spool journal copied
from another machine. Both go through :func:`api.inbox.handle_event`: inbox rows with ``reapply`` (their effects
are applied again, idempotently: a message already stored stays one row, statuses only move forward, an older status
observation is ignored), journal records as new deliveries (one already stored is a ``duplicate``). Replaying twice
changes nothing.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from api.inbox import HandlingResult, RepeatFilter
from api.spool import SpoolRecord, apply_in_order, apply_record, parse_record, read_journal
from core.domain import Provider
from db.engine import session_scope
from db.repositories.webhook_events import original_payload
from db.repositories.webhook_replay import StoredDelivery, stored_deliveries
from gateways.webhook_payloads import MalformedPayload

PAGE = 500
OUTCOMES = ("applied", "duplicate", "ignored", "failed")


def _record(row: StoredDelivery) -> SpoolRecord:
    provider = Provider(row.provider)
    # Evolution's by-events deliveries carry the event in the URL only: give it back the same way.
    path_event = row.event.replace(".", "-") if provider is Provider.EVOLUTION else None
    body = json.dumps(original_payload(row.payload)).encode()  # ASCII-escaped: keeps lone surrogates
    return SpoolRecord(row.received_at, row.organization_id, provider, path_event, body)


async def _apply(records: list[SpoolRecord], repeats: RepeatFilter, *, reapply: bool = False) -> Counter[str]:
    async def apply(record: SpoolRecord) -> HandlingResult:
        return await apply_record(record, repeats, reapply=reapply)

    return await apply_in_order(records, apply, concurrency=4)


async def replay_inbox(
    *, since: datetime, event: str | None = None, organization_id: uuid.UUID | None = None
) -> Counter[str]:
    """Apply the inbox rows received since ``since`` again (oldest first, each instance's in order)."""
    totals: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
    repeats = RepeatFilter(0)
    after: tuple[datetime, int] | None = None
    while True:
        async with session_scope() as session:
            rows = await stored_deliveries(
                session, since=since, after=after, event=event, organization_id=organization_id, limit=PAGE
            )
        if not rows:
            return totals
        totals.update(await _apply([_record(row) for row in rows], repeats, reapply=True))
        after = (rows[-1].received_at, rows[-1].id)


def _wanted(record: SpoolRecord, since: datetime | None, event: str | None, organization_id: uuid.UUID | None) -> bool:
    if since is not None and record.received_at < since:
        return False
    if organization_id is not None and record.organization_id != organization_id:
        return False
    if event is not None:
        try:
            return parse_record(record)[1].event == event
        except MalformedPayload:
            return False
    return True


async def replay_journal(
    path: Path,
    *,
    since: datetime | None = None,
    event: str | None = None,
    organization_id: uuid.UUID | None = None,
) -> Counter[str]:
    """Apply the records of a spool journal (a copy: it is only read), in journal order."""
    totals: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
    repeats = RepeatFilter(0)
    page: list[SpoolRecord] = []
    records: Iterable[SpoolRecord] = read_journal(path)
    for record in records:
        if _wanted(record, since, event, organization_id):
            page.append(record)
        if len(page) >= PAGE:
            totals.update(await _apply(page, repeats))
            page = []
    if page:
        totals.update(await _apply(page, repeats))
    return totals
