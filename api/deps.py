"""Request dependencies: database sessions, bearer-token principals, organization scoping."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated

from fastapi import Cookie, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Forbidden, Unauthorized
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.organizations import Principal, digest, principal_for_dashboard_session, principal_for_token


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


SESSION_COOKIE = "zapsync_session"
"""The dashboard's HttpOnly, SameSite=Strict cookie: a random session id (never the token), looked up server-side in
`dashboard_sessions` (issue 13 §1)."""
CookieSession = Annotated[str | None, Cookie(alias=SESSION_COOKIE)]
DASHBOARD_SESSION_LIFETIME = timedelta(hours=12)
"""How long a dashboard sign-in lasts (then the login page again)."""


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


async def principal_for_session_id(session: AsyncSession, session_id: str | None) -> Principal:
    """Who a dashboard session speaks for (401 when it is unknown, expired, logged out or its token revoked)."""
    if not session_id:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    admin = get_settings().admin_token
    principal = await principal_for_dashboard_session(
        session, session_id, admin_token_hash=digest(admin.get_secret_value()) if admin is not None else None
    )
    if principal is None:
        raise Unauthorized("unknown, expired or ended dashboard session: sign in again")
    return principal


async def principal_for_request(session: AsyncSession, token: str | None, session_id: str | None) -> Principal:
    """The bearer token's principal when one is sent (it wins), else the dashboard session's."""
    if token is not None:
        return await principal_for(session, token)
    return await principal_for_session_id(session, session_id)


async def get_principal(session: SessionDep, credentials: BearerDep, session_id: CookieSession = None) -> Principal:
    """Who is calling: the bearer token, else the dashboard's session cookie."""
    return await principal_for_request(session, bearer(credentials), session_id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_principal_briefly(credentials: BearerDep, session_id: CookieSession = None) -> Principal:
    """:func:`get_principal` in a transaction of its own, for routes that stream or wait (a request-scoped
    session would stay checked out, idle in transaction, for as long as they run)."""
    async with session_scope() as session:
        return await principal_for_request(session, bearer(credentials), session_id)


BriefPrincipalDep = Annotated[Principal, Depends(get_principal_briefly)]


async def get_admin(principal: PrincipalDep) -> Principal:
    """The caller, who must hold an admin token (403 for an organization's token)."""
    if not principal.is_admin:
        raise Forbidden("this route needs an admin token")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


async def get_metrics_reader(session: SessionDep, credentials: BearerDep) -> None:
    """A `/metrics` scraper: ``ZAPSYNC_METRICS_TOKEN`` or an admin token (401 without a known token, 403 for an
    organization's token: metrics count every organization's rows)."""
    token = bearer(credentials)
    metrics_token = get_settings().metrics_token
    if (
        token is not None
        and metrics_token is not None
        and hmac.compare_digest(token.encode(), metrics_token.get_secret_value().encode())
    ):
        return
    if not (await principal_for(session, token)).is_admin:
        raise Forbidden("/metrics needs ZAPSYNC_METRICS_TOKEN or an admin token")


def scoped_organization(principal: Principal, requested: uuid.UUID | None) -> uuid.UUID | None:
    """The organization a request may act on: its own for an organization token; any (or all) for admin."""
    if principal.is_admin:
        return requested
    if requested is not None and requested != principal.organization_id:
        raise Forbidden("this token belongs to another organization")
    return principal.organization_id
