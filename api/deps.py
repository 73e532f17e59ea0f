"""Request dependencies: database sessions, bearer-token principals, organization scoping."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Cookie, Depends, Header
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Forbidden, Unauthorized
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.organizations import Principal, principal_for_token


async def get_session() -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed when the route returns, rolled back if it raises."""
    async with session_scope() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


SESSION_COOKIE = "zapsync_token"
"""The dashboard keeps the token the user signed in with in this HttpOnly, SameSite=Strict cookie."""


async def get_principal(
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
    cookie_token: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> Principal:
    """Who is calling: the admin token from settings, or a stored token (organization-scoped or admin)."""
    token = bearer(authorization) or cookie_token
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    admin = get_settings().admin_token
    if admin is not None and hmac.compare_digest(token.encode(), admin.get_secret_value().encode()):
        return Principal(organization_id=None, name="admin")
    principal = await principal_for_token(session, token)
    if principal is None:
        raise Unauthorized("unknown or revoked token")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_principal_briefly(
    authorization: Annotated[str | None, Header()] = None,
    cookie_token: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> Principal:
    """:func:`get_principal` in a transaction of its own, for routes that stream or wait (a request-scoped
    session would stay checked out, idle in transaction, for as long as they run)."""
    async with session_scope() as session:
        return await get_principal(session, authorization, cookie_token)


BriefPrincipalDep = Annotated[Principal, Depends(get_principal_briefly)]


def scoped_organization(principal: Principal, requested: uuid.UUID | None) -> uuid.UUID | None:
    """The organization a request may act on: its own for an organization token; any (or all) for admin."""
    if principal.is_admin:
        return requested
    if requested is not None and requested != principal.organization_id:
        raise Forbidden("this token belongs to another organization")
    return principal.organization_id
