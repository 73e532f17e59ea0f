"""Organizations, their webhook secrets and API tokens. Secrets are stored as sha256 digests only."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import ApiToken, Organization


def digest(secret: str) -> str:
    """sha256 hex digest of a secret (what the database keeps)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    """A fresh random secret, recognisable by its prefix."""
    return f"{prefix}_{secrets.token_urlsafe(24)}"


async def create_organization(session: AsyncSession, *, name: str, webhook_secret: str) -> Organization:
    """A new organization that accepts webhooks carrying ``webhook_secret``."""
    org = Organization(name=name, webhook_secret_hash=digest(webhook_secret))
    session.add(org)
    await session.flush()
    return org


async def get_organization(session: AsyncSession, organization_id: uuid.UUID) -> Organization | None:
    """One organization by id."""
    return await session.get(Organization, organization_id)


async def webhook_secret_matches(session: AsyncSession, organization_id: uuid.UUID, presented: str) -> bool:
    """Constant-time check of a presented webhook secret against the organization's stored digest."""
    stored = (
        await session.execute(
            text("SELECT webhook_secret_hash FROM organizations WHERE id = :id"), {"id": organization_id}
        )
    ).scalar_one_or_none()
    # Compare even when the organization is unknown, so timing does not tell which ids exist.
    return hmac.compare_digest(stored or "0" * 64, digest(presented)) and stored is not None


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for: one organization, or every organization (admin)."""

    organization_id: uuid.UUID | None
    name: str

    @property
    def is_admin(self) -> bool:
        """Admin tokens see every organization."""
        return self.organization_id is None


async def create_token(
    session: AsyncSession, *, name: str, organization_id: uuid.UUID | None, token: str | None = None
) -> str:
    """Store a new bearer token and return it (the only time it is seen in clear)."""
    token = token or new_secret("zs")
    session.add(ApiToken(name=name, organization_id=organization_id, token_hash=digest(token)))
    await session.flush()
    return token


async def principal_for_token(session: AsyncSession, token: str) -> Principal | None:
    """The principal a token belongs to, or None when unknown or revoked; notes its last use."""
    row = (
        await session.execute(
            select(ApiToken).where(ApiToken.token_hash == digest(token), ApiToken.revoked_at.is_(None))
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    row.last_used_at = datetime.now(UTC)
    return Principal(organization_id=row.organization_id, name=row.name)


async def organization_exists(session: AsyncSession, organization_id: uuid.UUID) -> bool:
    """Whether an organization with this id exists."""
    found = await session.execute(text("SELECT 1 FROM organizations WHERE id = :id"), {"id": organization_id})
    return found.scalar_one_or_none() is not None
