"""Secrets zapsync must give back later (an organization's webhook secret, written into a gateway's webhook config)
are sealed at rest with Fernet (AES-128-CBC + HMAC-SHA256) under one server key; digests still serve the checks."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from core.errors import ZapsyncError
from core.settings import Settings, get_settings


class SealingKeyError(ZapsyncError):
    """The sealing key is missing, malformed, or not the one a sealed value was made with."""


def _load_or_create(path: Path) -> bytes:
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:  # O_EXCL: two processes starting together keep one key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    return key


def sealer(settings: Settings | None = None) -> Fernet:
    """The Fernet of ``ZAPSYNC_SECRET_KEY``, else of the key file in ``$ZAPSYNC_HOME`` (made on first use)."""
    settings = settings or get_settings()
    raw = settings.secret_key.get_secret_value().encode() if settings.secret_key else None
    try:
        return Fernet(raw or _load_or_create(settings.secret_key_file))
    except (ValueError, TypeError) as exc:
        raise SealingKeyError(
            "ZAPSYNC_SECRET_KEY is not a Fernet key (32 url-safe base64-encoded bytes); "
            'make one with: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        ) from exc


def seal(secret: str, settings: Settings | None = None) -> str:
    """``secret`` sealed for storage."""
    return sealer(settings).encrypt(secret.encode()).decode()


def unseal(sealed: str, settings: Settings | None = None) -> str:
    """The secret of a value made by :func:`seal`; SealingKeyError when the key is not the one it was sealed with."""
    try:
        return sealer(settings).decrypt(sealed.encode()).decode()
    except InvalidToken as exc:
        raise SealingKeyError(
            "a sealed secret cannot be opened with this ZAPSYNC_SECRET_KEY (was it changed?): "
            "set the key it was sealed with, or rotate the organization's webhook secret"
        ) from exc
