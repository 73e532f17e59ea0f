"""Signed webhook deliveries (gateways.md §8.3–8.4): WAHA's HMAC of the body and Evolution's JWT, both keyed by the
organization's webhook secret. Pure functions; every comparison is constant-time.

How an organization accepts deliveries is chosen per provider (``organizations.webhook_auth``, a JSON object
``{provider: mode}``): ``secret`` (the shared secret in a header or the URL), ``hmac`` (WAHA only), ``jwt``
(Evolution only) or ``any`` — the default: whichever of the provider's methods the delivery carries.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import warnings
from collections.abc import Mapping
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from core.domain import Provider


class WebhookAuth(enum.StrEnum):
    """How deliveries of one provider must authenticate."""

    ANY = "any"
    """Any method the provider can use (the default)."""
    SECRET = "secret"
    """The organization's secret as sent: `X-Webhook-Secret`, `Authorization: Bearer <secret>` or `?secret=`."""
    HMAC = "hmac"
    """WAHA: `X-Webhook-Hmac`, the hex HMAC-SHA512 of the raw body keyed by the secret."""
    JWT = "jwt"
    """Evolution: `Authorization: Bearer <HS256 JWT>` signed with the secret (its webhook `jwt_key`)."""


SIGNED_METHODS: dict[Provider, frozenset[WebhookAuth]] = {
    Provider.EVOLUTION: frozenset({WebhookAuth.JWT}),
    Provider.WAHA: frozenset({WebhookAuth.HMAC}),
    Provider.MEGAAPI: frozenset(),
}
"""The signed methods each provider can send (besides the shared secret, which all can)."""


def allowed_modes(provider: Provider) -> frozenset[WebhookAuth]:
    """The modes an organization may choose for ``provider``."""
    return frozenset({WebhookAuth.ANY, WebhookAuth.SECRET}) | SIGNED_METHODS[provider]


def mode_for(webhook_auth: Mapping[str, Any] | None, provider: Provider) -> WebhookAuth:
    """The organization's mode for ``provider`` (``any`` when unset or not one the provider allows)."""
    raw = (webhook_auth or {}).get(str(provider))
    try:
        mode = WebhookAuth(raw) if isinstance(raw, str) else WebhookAuth.ANY
    except ValueError:
        return WebhookAuth.ANY
    return mode if mode in allowed_modes(provider) else WebhookAuth.ANY


def hmac_sha512(key: str, body: bytes) -> str:
    """WAHA's signature: the hex HMAC-SHA512 of ``body`` keyed by ``key``."""
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


def hmac_matches(key: str, body: bytes, presented: str) -> bool:
    """Whether ``presented`` is the HMAC-SHA512 of ``body`` under ``key`` (hex, any case; constant-time)."""
    return hmac.compare_digest(hmac_sha512(key, body), presented.strip().lower())


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer token is a JWT (three base64url parts, a JSON header) rather than a plain secret."""
    return token.startswith("eyJ") and token.count(".") == 2


def evolution_jwt(key: str, *, issued_at: int) -> str:
    """The bearer token Evolution 2.3 sends when its webhook has a ``jwt_key`` (HS256, 10 minutes)."""
    claims = {"iat": issued_at, "exp": issued_at + 600, "app": "evolution", "action": "webhook"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm="HS256")


def jwt_matches(key: str, token: str, *, leeway_seconds: float) -> bool:
    """Whether ``token`` is an Evolution webhook JWT signed with ``key``, not expired beyond the leeway."""
    try:
        with warnings.catch_warnings():  # the key is the organization's secret, whatever its length
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            claims = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                leeway=leeway_seconds,
                options={"require": ["exp", "iat"]},
            )
    except jwt.PyJWTError:
        return False
    return claims.get("app") == "evolution" and claims.get("action") == "webhook"
