"""An organization's settings for maintenance, health and imports: read and update."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import AdminDep, PrincipalDep, SessionDep, scoped_organization
from core.domain import Provider
from core.errors import InvalidInput, NotFound
from core.webhook_signatures import WebhookAuth, allowed_modes
from db.repositories.organization_settings import read_settings, update_settings
from db.repositories.organizations import list_tokens, revoke_token

router = APIRouter(prefix="/organizations", tags=["organizations"])


class OrganizationSettings(BaseModel):
    """The settings the flows read for this organization."""

    id: uuid.UUID
    name: str
    inactivity_hours: int = Field(description="Close an open conversation after this many hours without messages.")
    session_retention_days: int = Field(description="Keep ended WhatsApp sessions this many days.")
    import_history_days: int | None = Field(description="Import this many days of history on connect (null: all).")
    auto_reconnect: bool = Field(description="Reconnect an instance after 3 failed health checks.")
    close_waiting_conversations: bool = Field(
        description="Also close idle conversations still waiting on an agent's reply."
    )
    webhook_auth: dict[str, str] = Field(
        default_factory=dict,
        description="How webhook deliveries authenticate, per provider: `secret` (header or ?secret=), `hmac` "
        "(WAHA's X-Webhook-Hmac), `jwt` (Evolution's Bearer JWT) or `any` (default: whatever the provider can send).",
    )
    updated_at: datetime


class OrganizationSettingsUpdate(BaseModel):
    """Settings to change; omitted ones keep their value."""

    inactivity_hours: int | None = Field(default=None, ge=1, le=24 * 999)
    session_retention_days: int | None = Field(default=None, ge=1, le=3650)
    import_history_days: int | None = Field(default=None, ge=1, le=3650)
    auto_reconnect: bool | None = None
    close_waiting_conversations: bool | None = None
    webhook_auth: dict[Provider, WebhookAuth] | None = Field(
        default=None, description="Replaces the whole per-provider choice; a provider left out accepts `any`."
    )


def _organization(principal: PrincipalDep, organization_id: uuid.UUID) -> uuid.UUID:
    scoped = scoped_organization(principal, organization_id)
    assert scoped is not None
    return scoped


@router.get("/{organization_id}/settings", response_model=OrganizationSettings)
async def get_organization_settings(
    organization_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> OrganizationSettings:
    """The organization's settings (an organization token reads only its own)."""
    found = await read_settings(session, _organization(principal, organization_id))
    if found is None:
        raise NotFound(f"no organization {organization_id}")
    return OrganizationSettings.model_validate(found)


@router.patch("/{organization_id}/settings", response_model=OrganizationSettings)
async def update_organization_settings(
    organization_id: uuid.UUID, changes: OrganizationSettingsUpdate, session: SessionDep, principal: PrincipalDep
) -> OrganizationSettings:
    """Change some settings; the next scheduled runs use them."""
    values = changes.model_dump(exclude_unset=True, mode="json")
    for provider, mode in (changes.webhook_auth or {}).items():
        if mode not in allowed_modes(provider):
            raise InvalidInput(f"{provider} cannot send {mode} webhooks: choose one of {_modes(provider)}")
    nulls = sorted(name for name, value in values.items() if value is None and name != "import_history_days")
    if nulls:
        raise InvalidInput(f"these settings cannot be null: {', '.join(nulls)}")
    found = await update_settings(session, _organization(principal, organization_id), values)
    if found is None:
        raise NotFound(f"no organization {organization_id}")
    return OrganizationSettings.model_validate(found)


def _modes(provider: Provider) -> str:
    return ", ".join(sorted(allowed_modes(provider)))


# -- API tokens: listing and revocation, admin only (issue 13 §1) ------------------------------------------------

token_router = APIRouter(prefix="/tokens", tags=["tokens"])


class TokenRead(BaseModel):
    """A stored API token (never the token itself)."""

    id: uuid.UUID
    name: str
    organization_id: uuid.UUID | None = Field(description="null: an admin token (every organization).")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@token_router.get("", response_model=list[TokenRead])
async def list_api_tokens(session: SessionDep, _: AdminDep) -> list[TokenRead]:
    """Every stored token, oldest first (admin only)."""
    return [TokenRead.model_validate(t, from_attributes=True) for t in await list_tokens(session)]


@token_router.post("/{token_id}/revoke", response_model=TokenRead)
async def revoke_api_token(token_id: uuid.UUID, session: SessionDep, _: AdminDep) -> TokenRead:
    """Revoke a token (admin only): from the next request on it gets 401, and its dashboard sessions end. Revoking
    a revoked token changes nothing."""
    revoked = await revoke_token(session, token_id)
    if revoked is None:
        raise NotFound(f"no token {token_id}")
    return TokenRead.model_validate(revoked, from_attributes=True)
