"""Organizations, their webhook secrets and API tokens.

Tokens are stored as sha256 digests only. A webhook secret is stored as a digest (what deliveries are checked
against) and sealed (``core.sealing``), because zapsync writes it into the webhook config of the instances it creates.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from core.sealing import seal, unseal
from db.models import ApiToken, Organization


def digest(secret: str) -> str:
    """sha256 hex digest of a secret (what the database keeps)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    """A fresh random secret, recognisable by its prefix."""
    return f"{prefix}_{secrets.token_urlsafe(24)}"


async def create_organization(session: AsyncSession, *, name: str, webhook_secret: str) -> Organization:
    """A new organization that accepts webhooks carrying ``webhook_secret``."""
    org = Organization(
        name=name, webhook_secret_hash=digest(webhook_secret), webhook_secret_sealed=seal(webhook_secret)
    )
    session.add(org)
    await session.flush()
    return org


async def set_webhook_secret(session: AsyncSession, organization_id: uuid.UUID, webhook_secret: str) -> bool:
    """Replace the organization's webhook secret (digest and sealed copy); False when there is no such organization.

    Gateways configured with the old secret are refused from now on: update their webhook config.
    """
    result = await session.execute(
        text(
            "UPDATE organizations SET webhook_secret_hash = :h, webhook_secret_sealed = :s, updated_at = now() "
            "WHERE id = :id"
        ),
        {"h": digest(webhook_secret), "s": seal(webhook_secret), "id": organization_id},
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


async def webhook_secret(session: AsyncSession, organization_id: uuid.UUID) -> str | None:
    """The organization's webhook secret in clear, to write into a gateway's webhook config; None when it was set
    before secrets were sealed (rotate it with `zapsync org rotate-secret`)."""
    sealed = (
        await session.execute(
            text("SELECT webhook_secret_sealed FROM organizations WHERE id = :id"), {"id": organization_id}
        )
    ).scalar_one_or_none()
    return unseal(sealed) if sealed else None


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


@dataclass(frozen=True)
class WebhookCredentials:
    """What checking one organization's deliveries needs: the secret's digest, the secret itself when it is sealed
    (signed deliveries are keyed by it), and the organization's choice of method per provider."""

    secret_hash: str | None
    sealed_secret: str | None
    webhook_auth: dict[str, Any] = field(default_factory=dict)

    def secret(self) -> str | None:
        """The secret in clear (unsealed on demand); None for organizations created before secrets were sealed."""
        return unseal(self.sealed_secret) if self.sealed_secret else None


async def webhook_credentials(session: AsyncSession, organization_id: uuid.UUID) -> WebhookCredentials | None:
    """The organization's webhook credentials; None when there is no such organization."""
    row = (
        await session.execute(
            text("SELECT webhook_secret_hash, webhook_secret_sealed, webhook_auth FROM organizations WHERE id = :id"),
            {"id": organization_id},
        )
    ).one_or_none()
    if row is None:
        return None
    secret_hash, sealed, auth = row
    return WebhookCredentials(secret_hash=secret_hash, sealed_secret=sealed, webhook_auth=dict(auth or {}))
