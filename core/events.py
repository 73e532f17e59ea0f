"""Live events: what `GET /events` streams; built here, published by ``db.repositories.live_events``."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.domain import AppliedChange
from core.qr import qr_image_url


@dataclass(frozen=True, slots=True)
class NewLiveEvent:
    """An event to publish to one organization's stream."""

    organization_id: uuid.UUID
    kind: str
    payload: dict[str, Any]


class Kind(enum.StrEnum):
    """Event kinds on the stream (the SSE `event:` field)."""

    INSTANCE_STATUS = "instance.status"
    INSTANCE_QR = "instance.qr"
    MESSAGE_NEW = "message.new"
    MESSAGE_STATUS = "message.status"
    HEALTH_ALERT = "health.alert"
    HEALTH_RECONNECT = "health.reconnect"
    HEALTH_RECOVERED = "health.recovered"
    GATEWAY_UNHEALTHY = "gateway.unhealthy"
    GATEWAY_RECOVERED = "gateway.recovered"
    CONVERSATIONS_CLOSED = "conversations.closed"
    FLOW_RESULT = "flow.result"


def event(organization_id: uuid.UUID, kind: Kind | str, **payload: Any) -> NewLiveEvent:
    """One event for one organization's stream."""
    return NewLiveEvent(organization_id=organization_id, kind=str(kind), payload=payload)


def status_change_events(changes: Sequence[AppliedChange], *, source: str) -> list[NewLiveEvent]:
    """`instance.status` events for transitions that were written."""
    return [
        event(
            c.organization_id,
            Kind.INSTANCE_STATUS,
            instance_id=str(c.instance_id),
            instance_name=c.instance_name,
            from_status=c.from_status,
            to_status=c.to_status,
            reason=c.reason,
            source=source,
            observed_at=c.observed_at.isoformat(),
        )
        for c in changes
    ]


def message_new_event(
    organization_id: uuid.UUID,
    *,
    instance_id: uuid.UUID,
    message_id: int,
    conversation_id: int,
    external_id: str | None,
    from_me: bool,
    sent_at: datetime,
) -> NewLiveEvent:
    """`message.new`: a message stored in a conversation (received, or queued to send)."""
    return event(
        organization_id,
        Kind.MESSAGE_NEW,
        instance_id=str(instance_id),
        message_id=message_id,
        conversation_id=conversation_id,
        external_id=external_id,
        from_me=from_me,
        sent_at=sent_at.isoformat(),
    )


def qr_event(
    organization_id: uuid.UUID,
    *,
    instance_id: uuid.UUID | str | None,
    instance_name: str,
    qr_code: str,
    pairing_code: str | None = None,
) -> NewLiveEvent:
    """`instance.qr`: ``{instance_id, instance_name, qr_code, qr_image, pairing_code}`` (qr_image a PNG data URL)."""
    return event(
        organization_id,
        Kind.INSTANCE_QR,
        instance_id=str(instance_id) if instance_id is not None else None,
        instance_name=instance_name,
        qr_code=qr_code,
        qr_image=qr_image_url(qr_code),
        pairing_code=pairing_code,
    )
