"""The one contract every WhatsApp gateway client fulfils, and the types it speaks.

Error hierarchy (callers catch at the level they care about)::

    GatewayError
    ├── GatewayTransientError      a retry can help: network errors, timeouts, 429, 502/503/504
    │   └── GatewayUnavailable     the breaker is open: fail fast, count as unreachable
    └── GatewayRequestError        a retry cannot help: other 4xx/5xx (status, body)
        ├── GatewayAuthError       401/403: wrong key, logged-out instance
        ├── GatewayNotFound        404: the instance does not exist at the gateway
        └── GatewayNotSupported    the provider has no such operation
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


class InstanceStatus(enum.StrEnum):
    """Normalized connection status stored for an instance (DESIGN.md §4)."""

    CONNECTED = "connected"
    CONNECTING = "connecting"
    QR_PENDING = "qr_pending"
    DISCONNECTED = "disconnected"
    ERROR = "error"


UNREACHABLE = "unreachable"
"""A check result that is not a status: the gateway could not be asked. Never stored as a status."""


class Provider(enum.StrEnum):
    """Gateway products zapsync speaks to."""

    EVOLUTION = "evolution"
    MEGAAPI = "megaapi"
    WAHA = "waha"


class StatusObservation(BaseModel):
    """What one check learned about one instance at one moment."""

    model_config = ConfigDict(frozen=True)

    instance_name: str
    status: InstanceStatus | None
    """None when the gateway was unreachable for this instance (see ``error``)."""
    observed_at: datetime
    reason: str | None = None
    phone_number: str | None = None
    profile_name: str | None = None
    error: str | None = None
    logged_out: bool = False
    """True when the gateway says the session was logged out (a new QR is needed)."""

    @property
    def reachable(self) -> bool:
        """Whether the gateway answered for this instance."""
        return self.status is not None


class ConnectResult(BaseModel):
    """What a connect (or create) call returned: QR code, pairing code, or the live state."""

    instance_name: str
    status: InstanceStatus
    qr_code: str | None = None
    pairing_code: str | None = None


class GatewayError(Exception):
    """Base of every error raised by a gateway client. Messages never contain secrets."""

    def __init__(self, message: str, *, gateway: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.gateway = gateway


class GatewayTransientError(GatewayError):
    """A failure that a retry may cure: connection errors, timeouts, 429 and 502/503/504."""


class GatewayUnavailable(GatewayTransientError):
    """The gateway's circuit breaker is open; the call was not attempted."""


class GatewayRequestError(GatewayError):
    """The gateway answered with a permanent error; retrying will not help."""

    def __init__(self, message: str, *, status_code: int, body: str = "", gateway: str | None = None) -> None:
        super().__init__(message, gateway=gateway)
        self.status_code = status_code
        self.body = body[:500]


class GatewayAuthError(GatewayRequestError):
    """401/403: the key was refused, or the instance is logged out."""


class GatewayNotFound(GatewayRequestError):
    """404: the instance does not exist at the gateway."""


class GatewayNotSupported(GatewayError):
    """The provider has no API for this operation."""


@runtime_checkable
class Gateway(Protocol):
    """One configured gateway (a provider at a base URL with its key)."""

    name: str
    provider: Provider

    async def fetch_states(
        self,
        instance_names: Sequence[str],
        *,
        db_statuses: Mapping[str, InstanceStatus | None] | None = None,
        confirm: set[str] | None = None,
    ) -> dict[str, StatusObservation]:
        """Observe the status of many instances, as few calls as the provider allows.

        ``db_statuses`` lets a provider with a lagging bulk view (Evolution) confirm only the instances where the
        bulk view disagrees with the database; ``confirm`` names instances to confirm live regardless.
        Every requested name gets an observation; an unreachable gateway yields ``status=None``.
        """
        ...

    async def create_instance(self, instance_name: str, *, webhook_url: str | None = None,
                              webhook_headers: Mapping[str, str] | None = None) -> ConnectResult:
        """Create the instance at the gateway and ask for a QR code."""
        ...

    async def connect(self, instance_name: str) -> ConnectResult:
        """Start (or resume) the instance's session; returns a QR code when one is needed."""
        ...

    async def restart(self, instance_name: str) -> None:
        """Restart the instance's session (used by the health monitor to reconnect)."""
        ...

    async def logout(self, instance_name: str) -> None:
        """Log the instance out of WhatsApp."""
        ...

    async def aclose(self) -> None:
        """Close the underlying HTTP client."""
        ...
