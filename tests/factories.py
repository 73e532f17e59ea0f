"""Rows for tests, written with the product's own repositories where they exist."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text

from db.engine import session_scope
from db.repositories.organizations import create_organization


async def make_organization(name: str = "Acme", *, secret: str = "org-secret") -> uuid.UUID:
    """An organization whose webhook secret is ``secret``."""
    async with session_scope() as session:
        org = await create_organization(session, name=name, webhook_secret=secret)
        return org.id


async def make_instance(
    organization_id: uuid.UUID,
    name: str,
    *,
    gateway: str = "evolution",
    status: str = "disconnected",
    observed_at: datetime | None = None,
    user_id: str | None = None,
) -> uuid.UUID:
    """An instance row in the given status."""
    async with session_scope() as session:
        row = await session.execute(
            text(
                "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status, "
                "status_observed_at, user_id) VALUES (:org, :gw, :name, :status, :obs, :uid) RETURNING id"
            ),
            {"org": organization_id, "gw": gateway, "name": name, "status": status, "obs": observed_at, "uid": user_id},
        )
        return row.scalar_one()


async def instance_row(instance_id: uuid.UUID) -> dict[str, object]:
    """The instance's row as a dict."""
    async with session_scope() as session:
        row = await session.execute(text("SELECT * FROM whatsapp_instances WHERE id = :id"), {"id": instance_id})
        return dict(row.mappings().one())


async def history(instance_id: uuid.UUID) -> list[tuple[str | None, str, str]]:
    """(from, to, source) of every recorded transition, oldest first."""
    async with session_scope() as session:
        rows = await session.execute(
            text(
                "SELECT from_status, to_status, source FROM instance_status_changes WHERE instance_id = :id ORDER BY id"
            ),
            {"id": instance_id},
        )
        return [tuple(r) for r in rows.all()]  # type: ignore[misc]


async def count(table: str) -> int:
    """Rows in a table."""
    async with session_scope() as session:
        return int((await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def auth_headers(organization_id: uuid.UUID | None) -> dict[str, str]:
    """Authorization headers with a fresh API token of ``organization_id`` (None: an admin token)."""
    from db.repositories.organizations import create_token

    async with session_scope() as session:
        token = await create_token(session, name="test", organization_id=organization_id)
    return {"authorization": f"Bearer {token}"}
