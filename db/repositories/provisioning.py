"""Provisioning queries: one row per instance (and per user), the per-instance lock around "create at the gateway",
QR pairing codes, removal and adoption. Functions flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_COLUMNS = (
    "id, organization_id, user_id, gateway, instance_name, status, status_reason, phone_number, profile_name, "
    "qr_code, pairing_code, logged_out, status_observed_at"
)


async def ensure_instance(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID,
    gateway: str,
    instance_name: str,
    user_id: str | None = None,
) -> tuple[dict[str, Any] | None, bool]:
    """The row of ``instance_name`` at ``gateway`` (or of ``user_id``), inserted when missing: (row, inserted).

    One statement decides (INSERT … ON CONFLICT DO NOTHING): two requests at once make one row, the second waiting
    for the first's transaction. The row returned may belong to another organization: callers check.
    """
    inserted = await session.execute(
        text(
            "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, user_id) "
            "VALUES (:org, :gateway, :name, :uid) ON CONFLICT DO NOTHING RETURNING id"
        ),
        {"org": organization_id, "gateway": gateway, "name": instance_name, "uid": user_id},
    )
    created = inserted.scalar_one_or_none() is not None
    if user_id is not None:
        row = await find_user_instance(session, user_id)
    else:
        row = await find_named_instance(session, gateway=gateway, instance_name=instance_name)
    return row, created


async def find_user_instance(
    session: AsyncSession, user_id: str, *, organization_id: uuid.UUID | None = None
) -> dict[str, Any] | None:
    """The instance of ``user_id`` (only if it belongs to ``organization_id``, when given)."""
    found = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM whatsapp_instances WHERE user_id = :uid "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)"
        ),
        {"uid": user_id, "org": organization_id},
    )
    row = found.mappings().one_or_none()
    return dict(row) if row else None


async def find_named_instance(session: AsyncSession, *, gateway: str, instance_name: str) -> dict[str, Any] | None:
    """The instance called ``instance_name`` at ``gateway`` (any organization)."""
    found = await session.execute(
        text(f"SELECT {_COLUMNS} FROM whatsapp_instances WHERE gateway = :gateway AND instance_name = :name"),
        {"gateway": gateway, "name": instance_name},
    )
    row = found.mappings().one_or_none()
    return dict(row) if row else None


async def find_instance(
    session: AsyncSession, instance_id: uuid.UUID, *, organization_id: uuid.UUID | None = None
) -> dict[str, Any] | None:
    """One instance by id, only if it belongs to ``organization_id`` (when given)."""
    found = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM whatsapp_instances WHERE id = :id "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)"
        ),
        {"id": instance_id, "org": organization_id},
    )
    row = found.mappings().one_or_none()
    return dict(row) if row else None


async def lock_gateway_instance(session: AsyncSession, *, gateway: str, instance_name: str) -> None:
    """Hold a transaction-scoped advisory lock on (gateway, name): "create at the gateway" runs once at a time,
    across API replicas, until the transaction ends."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"zapsync.create:{gateway}:{instance_name}"},
    )


async def set_pairing_code(session: AsyncSession, instance_id: uuid.UUID, pairing_code: str | None) -> None:
    """Store (or clear) the pairing code that goes with the instance's current QR code."""
    await session.execute(
        text(
            "UPDATE whatsapp_instances SET pairing_code = :code WHERE id = :id AND pairing_code IS DISTINCT FROM :code"
        ),
        {"id": instance_id, "code": pairing_code},
    )


async def delete_instance_row(session: AsyncSession, instance_id: uuid.UUID) -> bool:
    """Delete the instance's row (its history, sessions, contacts, conversations and messages go with it)."""
    result = await session.execute(text("DELETE FROM whatsapp_instances WHERE id = :id"), {"id": instance_id})
    return int(getattr(result, "rowcount", 0) or 0) == 1


async def tracked_names(session: AsyncSession, *, gateway: str, instance_names: Sequence[str]) -> set[str]:
    """Which of ``instance_names`` already have a row at ``gateway``."""
    if not instance_names:
        return set()
    found = await session.execute(
        text("SELECT instance_name FROM whatsapp_instances WHERE gateway = :gateway AND instance_name = ANY(:names)"),
        {"gateway": gateway, "names": list(instance_names)},
    )
    return {r[0] for r in found.all()}
