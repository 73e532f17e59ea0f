"""Organizations, their webhook secrets and API tokens.

Tokens are stored as sha256 digests only. A webhook secret is stored as a digest (what deliveries are checked
against) and sealed (``core.sealing``), because zapsync writes it into the webhook config of the instances it creates.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from core.sealing import seal, unseal
from db.models import ApiToken, Organization
from db.models.organization import DashboardSession


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
    token_id: uuid.UUID | None = field(default=None, compare=False)
    """The stored token's id (None for the settings' admin token)."""

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
    return Principal(organization_id=row.organization_id, name=row.name, token_id=row.id)


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


async def webhook_credentials_many(
    connection: psycopg.AsyncConnection[Any], organization_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, WebhookCredentials]:
    """The webhook credentials of each of these organizations that exists, in one statement on a raw psycopg
    connection (the webhook receive path reads them on a kept autocommit connection: one round trip)."""
    cursor = await connection.execute(
        "SELECT id, webhook_secret_hash, webhook_secret_sealed, webhook_auth FROM organizations WHERE id = ANY(%s)",
        (list(organization_ids),),
    )
    return {
        org: WebhookCredentials(secret_hash=secret_hash, sealed_secret=sealed, webhook_auth=dict(auth or {}))
        for org, secret_hash, sealed, auth in await cursor.fetchall()
    }


# -- token revocation and dashboard sessions (issue 13 §1) ------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """A stored token as `zapsync token list` shows it (never the token itself)."""

    id: uuid.UUID
    name: str
    organization_id: uuid.UUID | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def list_tokens(session: AsyncSession, *, include_revoked: bool = True) -> list[TokenInfo]:
    """Every stored token, oldest first."""
    rows = await session.execute(
        text(
            "SELECT id, name, organization_id, created_at, last_used_at, revoked_at FROM api_tokens "
            "WHERE CAST(:all AS boolean) OR revoked_at IS NULL ORDER BY created_at, id"
        ),
        {"all": include_revoked},
    )
    return [TokenInfo(*row) for row in rows.all()]


async def find_tokens(session: AsyncSession, id_or_name_prefix: str) -> list[TokenInfo]:
    """The tokens whose id is ``id_or_name_prefix``, else whose id or name starts with it."""
    prefix = id_or_name_prefix.strip()
    if not prefix:
        return []
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = await session.execute(
        text(
            "SELECT id, name, organization_id, created_at, last_used_at, revoked_at FROM api_tokens "
            "WHERE id::text = lower(:exact) OR id::text LIKE lower(:like) OR name LIKE :like "
            "ORDER BY created_at, id"
        ),
        {"exact": prefix, "like": like},
    )
    found = [TokenInfo(*row) for row in rows.all()]
    exact = [t for t in found if str(t.id) == prefix.lower()]
    return exact or found


async def revoke_token(session: AsyncSession, token_id: uuid.UUID) -> TokenInfo | None:
    """Revoke a stored token and end its dashboard sessions; None when there is no such token. Idempotent: a token
    revoked before keeps its first ``revoked_at``."""
    row = (
        await session.execute(
            text(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, now()) WHERE id = :id "
                "RETURNING id, name, organization_id, created_at, last_used_at, revoked_at"
            ),
            {"id": token_id},
        )
    ).one_or_none()
    if row is None:
        return None
    await session.execute(
        text("UPDATE dashboard_sessions SET revoked_at = now() WHERE token_id = :id AND revoked_at IS NULL"),
        {"id": token_id},
    )
    return TokenInfo(*row)


def _session_digest(session_id: str) -> str:
    return digest(session_id)


async def open_dashboard_session(
    session: AsyncSession, principal: Principal, *, token: str, lifetime: timedelta
) -> str:
    """A new dashboard session for a signed-in token; returns its random id (the cookie's value, never stored).
    Sessions expired for over a day are deleted on the way (an indexed range), so sign-ins bound the table."""
    await session.execute(text("DELETE FROM dashboard_sessions WHERE expires_at < now() - interval '1 day'"))
    session_id = secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            id_hash=_session_digest(session_id),
            token_id=principal.token_id,
            token_hash=digest(token),
            principal=principal.name,
            expires_at=datetime.now(UTC) + lifetime,
        )
    )
    await session.flush()
    return session_id


async def principal_for_dashboard_session(
    session: AsyncSession, session_id: str, *, admin_token_hash: str | None
) -> Principal | None:
    """Who a dashboard session speaks for; None when it is unknown, expired, logged out, or its token was revoked
    (for a session of the settings' admin token: when that token is no longer ``admin_token_hash``)."""
    row = (
        await session.execute(
            text(
                "SELECT s.token_id, t.organization_id, COALESCE(t.name, s.principal) "
                "FROM dashboard_sessions s LEFT JOIN api_tokens t ON t.id = s.token_id "
                "WHERE s.id_hash = :h AND s.revoked_at IS NULL AND s.expires_at > now() "
                "AND ((s.token_id IS NOT NULL AND t.revoked_at IS NULL) "
                "     OR (s.token_id IS NULL AND s.token_hash = CAST(:admin AS text)))"
            ),
            {"h": _session_digest(session_id), "admin": admin_token_hash},
        )
    ).one_or_none()
    if row is None:
        return None
    token_id, organization_id, name = row
    return Principal(organization_id=organization_id, name="admin" if token_id is None else name, token_id=token_id)


async def close_dashboard_session(session: AsyncSession, session_id: str) -> bool:
    """Delete a dashboard session (logout); False when there was none. Expired sessions are deleted on the way."""
    result = await session.execute(
        text("DELETE FROM dashboard_sessions WHERE id_hash = :h OR expires_at < now() - interval '1 day'"),
        {"h": _session_digest(session_id)},
    )
    return int(getattr(result, "rowcount", 0) or 0) > 0
