"""An organization's maintenance and health settings. Functions flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

SETTINGS = (
    "inactivity_hours",
    "session_retention_days",
    "import_history_days",
    "auto_reconnect",
    "close_waiting_conversations",
    "webhook_auth",
)
_JSON = frozenset({"webhook_auth"})
_RETURNING = "id, name, " + ", ".join(SETTINGS) + ", updated_at"


async def read_settings(session: AsyncSession, organization_id: uuid.UUID) -> dict[str, Any] | None:
    """The organization's settings, or None when it does not exist."""
    row = await session.execute(text(f"SELECT {_RETURNING} FROM organizations WHERE id = :id"), {"id": organization_id})
    found = row.mappings().one_or_none()
    return dict(found) if found else None


async def update_settings(
    session: AsyncSession, organization_id: uuid.UUID, changes: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Set the given settings (names from :data:`SETTINGS` only); None when the organization does not exist."""
    unknown = set(changes) - set(SETTINGS)
    if unknown:
        raise ValueError(f"not organization settings: {sorted(unknown)}")
    if not changes:
        return await read_settings(session, organization_id)
    assignments = ", ".join(
        f"{name} = CAST(:{name} AS jsonb)" if name in _JSON else f"{name} = :{name}" for name in changes
    )
    values = {name: orjson.dumps(value).decode() if name in _JSON else value for name, value in changes.items()}
    row = await session.execute(
        text(f"UPDATE organizations SET {assignments}, updated_at = now() WHERE id = :id RETURNING {_RETURNING}"),
        {**values, "id": organization_id},
    )
    found = row.mappings().one_or_none()
    return dict(found) if found else None
