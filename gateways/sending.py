"""What the provider clients share to send a message once: the recipient's number, the answer's message id and
status, and the gateway's refusals as :class:`GatewaySendRejected` (gateways.md §1.2–1.3, §4, §8.5–8.6)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from core.domain import STATUS_RANK, OutgoingMessage, SendResult
from core.errors import GatewayOutcomeUnknown, GatewaySendRejected
from gateways.messages import MalformedMessage, epoch_seconds, status_from_wire

NOT_ON_WHATSAPP = "number not on WhatsApp"
_PHONE_SERVERS = ("@s.whatsapp.net", "@c.us")


def recipient_number(message: OutgoingMessage) -> str:
    """The ``number`` a gateway takes: the digits of a phone-number JID, any other JID (group, LID) as it is."""
    to = message.to.strip()
    for server in _PHONE_SERVERS:
        if to.endswith(server):
            return to.removesuffix(server)
    return to


def _decode(content: bytes) -> Any:
    try:
        return orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None


def _messages_of(body: Any) -> list[Any]:
    """The error texts of Evolution's ``{"response": {"message": [...]}}`` or MegaAPI's ``{"message": "..."}``."""
    if not isinstance(body, dict):
        return []
    response = body.get("response")
    found = response.get("message") if isinstance(response, dict) else body.get("message")
    if found is None:
        return []
    return found if isinstance(found, list) else [found]


def raise_for_send_status(gateway: str, what: str, status: int, content: bytes) -> Any:
    """The decoded body of a 2xx answer; a refusal raises.

    4xx: refused for good (GatewaySendRejected) — Evolution's 400 ``[{"exists": false, ...}]`` says the number is
    not on WhatsApp; other texts are passed on (gateways never put secrets in them). 5xx other than 503 (which
    :meth:`HttpGateway.request_once` already raised as transient): the gateway may have sent it, so the outcome is
    unknown and the outbox reconciles before any resend.
    """
    body = _decode(content)
    if 200 <= status < 300:
        return body
    if 400 <= status < 500:
        texts = _messages_of(body)
        if any(isinstance(t, dict) and t.get("exists") is False for t in texts):
            raise GatewaySendRejected(
                f"{gateway}: {NOT_ON_WHATSAPP}",
                upstream_status=status,
                body=content.decode(errors="replace"),
                gateway=gateway,
            )
        detail = "; ".join(str(t)[:200] for t in texts if t) or f"HTTP {status}"
        raise GatewaySendRejected(
            f"{gateway}: {what} refused: {detail}",
            upstream_status=status,
            body=content.decode(errors="replace"),
            gateway=gateway,
        )
    raise GatewayOutcomeUnknown(
        f"{gateway}: {what} answered HTTP {status}; the message may have gone out", gateway=gateway
    )


def send_result(gateway: str, what: str, record: Any) -> SendResult:
    """The SendResult of an accepted send's message object (``{key: {id}, status, messageTimestamp}``).

    An accepted send is at least ``sent`` (Evolution answers ``PENDING`` while Baileys still holds it; its receipts
    move it on). An answer without a message id leaves the outcome unknown: the echo will tell.
    """
    key = record.get("key") if isinstance(record, dict) else None
    key_id = key.get("id") if isinstance(key, dict) else None
    if not isinstance(key_id, str) or not key_id:
        raise GatewayOutcomeUnknown(f"{gateway}: {what} answered without a message id", gateway=gateway)
    assert isinstance(record, dict)
    status = status_from_wire(record.get("status"))
    if status is None or STATUS_RANK.get(status, 0) < STATUS_RANK["sent"] or status == "deleted":
        status = "sent"
    sent_at: datetime | None = None
    try:
        sent_at = datetime.fromtimestamp(epoch_seconds(record.get("messageTimestamp")), UTC)
    except MalformedMessage:
        sent_at = None
    return SendResult(external_id=key_id, status=status, sent_at=sent_at)
