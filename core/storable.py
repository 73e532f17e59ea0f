"""Text PostgreSQL refuses, made storable (issue 13 §2), and the inbox's faithful copy of it.

PostgreSQL's text and jsonb cannot hold NUL (U+0000), and UTF-8 cannot encode a lone surrogate (U+D800–U+DFFF
outside a pair), which JavaScript gateways send as `\\u0000` and `\\ud800` escapes (a WhatsApp user can type them).
zapsync's representation:

- **Business columns** (message text, contact and profile names, key ids, jids): NUL becomes U+2400 "␀"
  (:data:`NUL_STANDIN`, visible and searchable) and a lone surrogate U+FFFD "�" (:data:`SURROGATE_STANDIN`). This is
  done once, when a webhook body is parsed (:func:`sanitized`), so every writer sees storable text.
- **The inbox row** (`webhook_events.payload`) keeps the delivery as sent: a payload holding such characters is
  stored as ``{"_zapsync_json": "<the payload as JSON text, every non-ASCII character \\u-escaped>"}``
  (:func:`escaped`), which jsonb accepts; :func:`unescaped` gives the exact payload back.
"""

from __future__ import annotations

import json
import re
from typing import Any

NUL_STANDIN = "\u2400"
"""What a NUL becomes in a business column: SYMBOL FOR NULL, "␀"."""
SURROGATE_STANDIN = "\ufffd"
"""What a lone surrogate becomes in a business column: REPLACEMENT CHARACTER, "�"."""
ESCAPED_KEY = "_zapsync_json"
"""The single key of an inbox payload stored as escaped JSON text."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_STANDINS = {"\x00": NUL_STANDIN}


def has_unstorable(text: str) -> bool:
    """Whether ``text`` holds a NUL or a lone surrogate (a Python str holds surrogates only when unpaired)."""
    return _UNSTORABLE.search(text) is not None


def storable(text: str) -> str:
    """``text`` with NUL as "␀" and each lone surrogate as "�"; unchanged (the same object) when it has neither."""
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub(lambda m: _STANDINS.get(m.group(), SURROGATE_STANDIN), text)


def sanitized(value: Any) -> Any:
    """A copy of a JSON-like ``value`` whose strings (object keys too) are :func:`storable`."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(k) if isinstance(k, str) else k: sanitized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [sanitized(item) for item in value]
    return value


class SanitizedPayload(dict[str, Any]):
    """A webhook payload whose strings were made :func:`storable`; ``original`` is the payload as it was sent."""

    __slots__ = ("original",)

    def __init__(self, original: dict[str, Any]) -> None:
        super().__init__(sanitized(original))
        self.original = original


def escaped(payload: dict[str, Any]) -> dict[str, str]:
    """``payload`` (which may hold NUL or lone surrogates) in a form jsonb accepts; :func:`unescaped` reverses it."""
    return {ESCAPED_KEY: json.dumps(payload, ensure_ascii=True, separators=(",", ":"))}


def unescaped(stored: Any) -> Any:
    """The payload an inbox row holds: the original of an :func:`escaped` one, else ``stored`` itself."""
    if isinstance(stored, dict) and len(stored) == 1 and isinstance(stored.get(ESCAPED_KEY), str):
        return json.loads(stored[ESCAPED_KEY])
    return stored
