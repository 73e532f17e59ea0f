"""Secrets out of stored payloads: token-like fields are redacted at any depth before a delivery is stored.

Evolution puts the instance token in every delivery's `apikey` when the server exposes it; other gateways and
integrations carry tokens, JWTs, passwords or hashes under similar names. A field is token-like when its name,
lower-cased with separators dropped, contains one of :data:`SECRET_NAME_PARTS` (so `apikey`, `api_key`, `X-Api-Key`,
`accessToken`, `jwt_key`, `Authorization`, `passwordHash` all are); its value becomes :data:`REDACTED` (a null stays
null, so "not exposed" remains visible).
"""

from __future__ import annotations

import re
from typing import Any

SECRET_NAME_PARTS = ("apikey", "token", "jwt", "password", "passwd", "secret", "authorization", "hash", "credential")
REDACTED = "[redacted]"
_SEPARATORS = re.compile(r"[^a-z0-9]")


def is_secret_name(name: str) -> bool:
    """Whether a field of this name holds a credential (case and separators ignored)."""
    folded = _SEPARATORS.sub("", name.lower())
    return any(part in folded for part in SECRET_NAME_PARTS)


def redact(value: Any) -> Any:
    """A copy of ``value`` (JSON-like) with every token-like field's value (a whole object or list too) replaced by
    :data:`REDACTED`."""
    if isinstance(value, dict):
        return {key: _field(key, item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def _field(key: Any, value: Any) -> Any:
    if isinstance(key, str) and is_secret_name(key):
        return None if value is None else REDACTED
    return redact(value)
