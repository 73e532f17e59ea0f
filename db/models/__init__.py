"""All zapsync tables, re-exported so Alembic sees them."""

from db.models.base import Base
from db.models.conversation import Contact, Conversation, ImportRun, LiveEvent, Message, PendingReceipt
from db.models.events import FlowReport, WebhookEvent
from db.models.health import GatewayHealth
from db.models.instance import InstanceStatusChange, WhatsAppInstance, WhatsAppSession
from db.models.organization import ApiToken, Client, Organization
from db.models.queue import WorkItem

__all__ = [
    "ApiToken",
    "Base",
    "Client",
    "Contact",
    "Conversation",
    "FlowReport",
    "GatewayHealth",
    "ImportRun",
    "InstanceStatusChange",
    "LiveEvent",
    "Message",
    "Organization",
    "PendingReceipt",
    "WebhookEvent",
    "WhatsAppInstance",
    "WhatsAppSession",
    "WorkItem",
]
