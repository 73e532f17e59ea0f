"""The webhook inbox and the instance lookups webhook handling needs.

A payload is stored redacted (:mod:`core.redaction`); one holding NUL or lone surrogates (a
:class:`core.storable.SanitizedPayload`) is stored as escaped JSON text, so the row keeps the delivery as sent:
read stored payloads through :func:`original_payload`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.redaction import redact
from core.storable import SanitizedPayload, escaped, unescaped


@dataclass(frozen=True, slots=True)
class LockedInstance:
    """An instance row locked for the rest of the transaction, with the fields status handling compares."""

    id: uuid.UUID
    organization_id: uuid.UUID
    gateway: str
    status: str
    status_observed_at: datetime | None
    qr_code: str | None


async def lock_instance(
    session: AsyncSession, *, organization_id: uuid.UUID, gateways: Sequence[str], instance_name: str
) -> LockedInstance | None:
    """The organization's instance of that name at one of ``gateways``, locked FOR UPDATE; None if it has none."""
    row = (
        await session.execute(
            text(
                "SELECT id, organization_id, gateway, status, status_observed_at, qr_code FROM whatsapp_instances "
                "WHERE organization_id = :org AND instance_name = :name AND gateway = ANY(:gateways) "
                "ORDER BY gateway LIMIT 1 FOR UPDATE"
            ),
            {"org": organization_id, "name": instance_name, "gateways": list(gateways)},
        )
    ).one_or_none()
    return LockedInstance(*row) if row else None


async def store_event(session: AsyncSession, row: InboxRow) -> bool:
    """Insert a delivery into the inbox, token-like fields redacted; False when the same key is already there (a
    redelivery)."""
    inserted = await session.execute(
        text(
            "INSERT INTO webhook_events (organization_id, provider, event, instance_name, dedupe_key, payload, "
            "outcome, error) VALUES (:org, :provider, :event, :instance, :key, CAST(:payload AS jsonb), "
            ":outcome, :error) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id"
        ),
        {
            "org": row.organization_id,
            "provider": row.provider,
            "event": row.event[:64],
            "instance": row.instance_name,
            "key": row.dedupe_key,
            "payload": _json(inbox_payload(row.payload)),
            "outcome": row.outcome,
            "error": row.error,
        },
    )
    return inserted.scalar_one_or_none() is not None


async def store_untracked_event(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID,
    provider: str,
    event: str,
    instance_name: str,
    dedupe_key: str,
    payload: dict[str, Any],
    outcome: str,
    error: str | None,
    refresh_after_seconds: float,
) -> bool:
    """Keep one inbox row for an instance the organization does not track, per ``dedupe_key``:
    inserted the first time, its payload and time refreshed when older than ``refresh_after_seconds``. True when a
    row was written."""
    written = await session.execute(
        text(
            "INSERT INTO webhook_events (organization_id, provider, event, instance_name, dedupe_key, payload, "
            "outcome, error) VALUES (:org, :provider, :event, :instance, :key, CAST(:payload AS jsonb), :outcome, "
            ":error) ON CONFLICT (dedupe_key) DO UPDATE SET payload = EXCLUDED.payload, received_at = now(), "
            "error = EXCLUDED.error WHERE webhook_events.received_at < now() - make_interval(secs => :refresh) "
            "RETURNING id"
        ),
        {
            "org": organization_id,
            "provider": provider,
            "event": event[:64],
            "instance": instance_name,
            "key": dedupe_key,
            "payload": _json(inbox_payload(payload)),
            "outcome": outcome,
            "error": error,
            "refresh": refresh_after_seconds,
        },
    )
    return written.scalar_one_or_none() is not None


async def set_event_outcome(session: AsyncSession, dedupe_key: str, outcome: str, error: str | None = None) -> None:
    """Record what handling a stored delivery came to."""
    await session.execute(
        text("UPDATE webhook_events SET outcome = :outcome, error = :error WHERE dedupe_key = :key"),
        {"outcome": outcome, "error": error, "key": dedupe_key},
    )


def original_payload(row_payload: Any) -> Any:
    """The payload a `webhook_events.payload` value stands for, exactly as it was delivered (secrets redacted):
    NUL and lone surrogates included, which the row holds escaped (:mod:`core.storable`)."""
    return unescaped(row_payload)


def inbox_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """What the inbox row holds for ``payload``: redacted, escaped when it was sanitized at parse time."""
    if isinstance(payload, SanitizedPayload):
        return escaped(redact(payload.original))
    return redact(payload)  # type: ignore[no-any-return]


def _json(payload: dict[str, Any]) -> str:
    import orjson

    return orjson.dumps(payload).decode()


# -- batches (group commit of webhook deliveries) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboxRow:
    """One delivery to store in the inbox, as :func:`store_event` takes it."""

    organization_id: uuid.UUID
    provider: str
    event: str
    instance_name: str | None
    dedupe_key: str
    payload: dict[str, Any]
    outcome: str
    error: str | None = None


_STORE_EVENTS_SQL = text(
    "INSERT INTO webhook_events (organization_id, provider, event, instance_name, dedupe_key, payload, outcome, "
    "error) SELECT * FROM unnest(CAST(:orgs AS uuid[]), CAST(:providers AS text[]), CAST(:events AS text[]), "
    "CAST(:instances AS text[]), CAST(:keys AS text[]), CAST(:payloads AS jsonb[]), CAST(:outcomes AS text[]), "
    "CAST(:errors AS text[])) ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key"
)


async def store_events(session: AsyncSession, rows: Sequence[InboxRow]) -> set[str]:
    """:func:`store_event` for many deliveries in one statement; returns the keys inserted (the others were there:
    redeliveries). Keys must be distinct."""
    if not rows:
        return set()
    result = await session.execute(
        _STORE_EVENTS_SQL,
        {
            "orgs": [r.organization_id for r in rows],
            "providers": [r.provider for r in rows],
            "events": [r.event[:64] for r in rows],
            "instances": [r.instance_name for r in rows],
            "keys": [r.dedupe_key for r in rows],
            "payloads": [_json(inbox_payload(r.payload)) for r in rows],
            "outcomes": [r.outcome for r in rows],
            "errors": [r.error for r in rows],
        },
    )
    return {row[0] for row in result.all()}
