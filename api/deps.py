"""Request dependencies: database sessions, bearer-token principals, organization scoping."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Cookie, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Forbidden, Unauthorized
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.organizations import Principal, principal_for_token


async def get_session() -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed when the route returns (before the response is sent, so a client
    that follows the answer, or a webhook that the answer causes, finds the rows), rolled back if it raises."""
    async with session_scope() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description="An API token (`zapsync token create`); `/cron/sync-status` takes CRON_SECRET, webhooks may take "
    "the organization's webhook secret.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
"""The `Authorization: Bearer <token>` credentials, or None (routes decide what a missing token means)."""


def bearer(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The token of parsed `Authorization: Bearer <token>` credentials."""
    return credentials.credentials if credentials is not None else None


SESSION_COOKIE = "zapsync_token"
"""The dashboard keeps the token the user signed in with in this HttpOnly, SameSite=Strict cookie."""
CookieToken = Annotated[str | None, Cookie(alias=SESSION_COOKIE)]


async def principal_for(session: AsyncSession, token: str | None) -> Principal:
    """Who ``token`` speaks for: the admin token from settings, or a stored token (organization-scoped or admin)."""
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    admin = get_settings().admin_token
    if admin is not None and hmac.compare_digest(token.encode(), admin.get_secret_value().encode()):
        return Principal(organization_id=None, name="admin")
    principal = await principal_for_token(session, token)
    if principal is None:
        raise Unauthorized("unknown or revoked token")
    return principal


async def get_principal(session: SessionDep, credentials: BearerDep, cookie_token: CookieToken = None) -> Principal:
    """Who is calling: the bearer token, else the dashboard's cookie."""
    return await principal_for(session, bearer(credentials) or cookie_token)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_principal_briefly(credentials: BearerDep, cookie_token: CookieToken = None) -> Principal:
    """:func:`get_principal` in a transaction of its own, for routes that stream or wait (a request-scoped
    session would stay checked out, idle in transaction, for as long as they run)."""
    async with session_scope() as session:
        return await principal_for(session, bearer(credentials) or cookie_token)


BriefPrincipalDep = Annotated[Principal, Depends(get_principal_briefly)]


def scoped_organization(principal: Principal, requested: uuid.UUID | None) -> uuid.UUID | None:
    """The organization a request may act on: its own for an organization token; any (or all) for admin."""
    if principal.is_admin:
        return requested
    if requested is not None and requested != principal.organization_id:
        raise Forbidden("this token belongs to another organization")
    return principal.organization_id
