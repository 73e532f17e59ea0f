"""The one contract every WhatsApp gateway client fulfils, and helpers that stream its pages.

The types it speaks live in :mod:`core.domain`; its errors in :mod:`core.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from core.domain import (
    ConnectResult,
    GatewayChat,
    GatewayContact,
    InstanceStatus,
    MessagePage,
    OutgoingMessage,
    Provider,
    SendResult,
    StatusObservation,
)
from core.errors import GatewayAuthError, GatewayError


@runtime_checkable
class Gateway(Protocol):
    """One configured gateway (a provider at a base URL with its key)."""

    name: str
    provider: Provider
    supports_history: bool
    """Whether the provider lets zapsync read chats, contacts and messages (imports)."""
    bulk_states: bool
    """Whether one listing call observes every instance (so status checks are not split into batches)."""

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

    async def create_instance(
        self, instance_name: str, *, webhook_url: str | None = None, webhook_headers: Mapping[str, str] | None = None
    ) -> ConnectResult:
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

    async def delete_instance(self, instance_name: str) -> None:
        """Delete the instance at the gateway (logging it out first when the gateway needs that)."""
        ...

    async def send(self, instance_name: str, message: OutgoingMessage, *, timeout_seconds: float) -> SendResult:
        """Send one message, once: no automatic retry of a request that may have left.

        Raises ``GatewaySendRejected`` when the gateway refuses it for good (number not on WhatsApp),
        ``GatewayOutcomeUnknown`` when the request left but no answer came within ``timeout_seconds`` (or the
        connection broke), ``GatewayTransientError`` only when the gateway certainly did not take it (connect
        error, breaker open, an explicit 503/429 before processing).
        """
        ...

    async def fetch_contacts(self, instance_name: str, *, page: int, page_size: int) -> list[GatewayContact]:
        """One page (1-based) of the instance's contacts; an empty list past the end."""
        ...

    async def fetch_chats(self, instance_name: str, *, skip: int, take: int) -> list[GatewayChat]:
        """``take`` chats after the first ``skip``, most recently active first; an empty list past the end."""
        ...

    async def fetch_messages(
        self,
        instance_name: str,
        *,
        page: int,
        page_size: int,
        since: datetime | None = None,
        until: datetime | None = None,
        chat_jid: str | None = None,
    ) -> MessagePage:
        """One page (1-based) of messages sent within [since, until] (of one chat when given), newest first."""
        ...

    async def aclose(self) -> None:
        """Close the underlying HTTP client."""
        ...


async def iter_contacts(
    gateway: Gateway, instance_name: str, *, page_size: int, first_page: int = 1
) -> AsyncIterator[list[GatewayContact]]:
    """Stream the instance's contacts page by page (one page in memory at a time)."""
    page = first_page
    while batch := await gateway.fetch_contacts(instance_name, page=page, page_size=page_size):
        yield batch
        if len(batch) < page_size:
            return
        page += 1


async def iter_chats(
    gateway: Gateway, instance_name: str, *, page_size: int, skip: int = 0
) -> AsyncIterator[list[GatewayChat]]:
    """Stream the instance's chats page by page, most recently active first."""
    while batch := await gateway.fetch_chats(instance_name, skip=skip, take=page_size):
        yield batch
        if len(batch) < page_size:
            return
        skip += len(batch)


async def iter_messages(
    gateway: Gateway,
    instance_name: str,
    *,
    page_size: int,
    since: datetime | None = None,
    until: datetime | None = None,
    chat_jid: str | None = None,
    first_page: int = 1,
) -> AsyncIterator[MessagePage]:
    """Stream messages page by page, newest first, until the gateway's last page."""
    page = first_page
    while True:
        batch = await gateway.fetch_messages(
            instance_name,
            page=page,
            page_size=page_size,
            since=since,
            until=until,
            chat_jid=chat_jid,
        )
        if not batch.messages:
            return
        yield batch
        if page >= batch.pages:
            return
        page += 1


def unreachable(name: str, observed_at: datetime, exc: GatewayError) -> StatusObservation:
    """The observation of an instance its gateway did not answer for (a refused key is flagged as such)."""
    return StatusObservation(
        instance_name=name,
        status=None,
        observed_at=observed_at,
        error=exc.message,
        auth_failed=isinstance(exc, GatewayAuthError),
    )
