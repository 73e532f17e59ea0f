"""Import rules."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime


def connection_key(instance_id: uuid.UUID, connected_at: datetime) -> str:
    """Names one connection of one instance (when its session began): at most one import per connection."""
    return f"import:{instance_id}:{connected_at.astimezone(UTC).isoformat()}"
