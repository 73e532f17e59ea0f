"""Provider status vocabularies mapped onto zapsync's one enum (DESIGN.md §4)."""

from __future__ import annotations

from core.domain import InstanceStatus

_EVOLUTION = {
    "open": InstanceStatus.CONNECTED,
    "connecting": InstanceStatus.CONNECTING,
    "close": InstanceStatus.DISCONNECTED,
    "closed": InstanceStatus.DISCONNECTED,
    "refused": InstanceStatus.ERROR,
}
_WAHA = {
    "WORKING": InstanceStatus.CONNECTED,
    "STARTING": InstanceStatus.CONNECTING,
    "SCAN_QR_CODE": InstanceStatus.QR_PENDING,
    "STOPPED": InstanceStatus.DISCONNECTED,
    "FAILED": InstanceStatus.ERROR,
    "PASSKEY_REQUIRED": InstanceStatus.QR_PENDING,
    "PASSKEY_CONFIRMATION_REQUIRED": InstanceStatus.QR_PENDING,
}
WAHA_PASSKEY = frozenset({"PASSKEY_REQUIRED", "PASSKEY_CONFIRMATION_REQUIRED"})
"""WAHA statuses where the session waits for the owner to confirm a passkey on the phone."""
_MEGAAPI_CONNECTED = {"connected", "open", "phone_connected"}

LOGGED_OUT_CODES = frozenset({401, 403, 402, 406})
"""Evolution/Baileys close codes that are not reconnectable: the session needs a new QR."""


def from_evolution(state: str | None, *, qr_emitted: bool = False) -> InstanceStatus | None:
    """Evolution `open|connecting|close|refused`; `connecting` after a QR was emitted is `qr_pending`."""
    if state is None:
        return None
    status = _EVOLUTION.get(state.lower())
    if status is InstanceStatus.CONNECTING and qr_emitted:
        return InstanceStatus.QR_PENDING
    return status


def from_waha(status: str | None) -> InstanceStatus | None:
    """WAHA session status (`WORKING`, `SCAN_QR_CODE`, `PASSKEY_REQUIRED`, …)."""
    return _WAHA.get((status or "").upper())


def waha_reason(status: str | None) -> str | None:
    """Why a WAHA session is not connected, in words (None when it is, or the status says it all)."""
    raw = (status or "").upper()
    if raw in WAHA_PASSKEY:
        return "passkey required on the phone"
    if raw == "FAILED":
        return "session failed: restart it or scan a new QR code"
    if raw == "STOPPED":
        return "session stopped"
    return None


def from_megaapi(status: str | None) -> InstanceStatus:
    """MegaAPI: `connected` is connected; anything else is disconnected."""
    return InstanceStatus.CONNECTED if (status or "").lower() in _MEGAAPI_CONNECTED else InstanceStatus.DISCONNECTED
