"""The pydantic reports flows return, store in `flow_reports` and show as Prefect artifacts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

REPORT_LIST_CAP = 500
"""Lists in a report stop at this many entries; the counts stay exact."""


class SyncScope(BaseModel):
    """Which instances a sync covers: all, one organization, or one instance."""

    organization_id: uuid.UUID | None = None
    instance_id: uuid.UUID | None = None

    @property
    def key(self) -> str:
        """A stable name for the scope (advisory locks, idempotency keys)."""
        if self.instance_id:
            return f"instance:{self.instance_id}"
        if self.organization_id:
            return f"organization:{self.organization_id}"
        return "all"


class Drift(BaseModel):
    """An instance whose database status differs from what its gateway says."""

    instance_id: uuid.UUID
    organization_id: uuid.UUID
    instance_name: str
    gateway: str
    db_status: str
    gateway_status: str
    reason: str | None = None
    applied: bool = False
    """True when the change was written; false in check mode or when a newer observation won."""


class UnreachableInstance(BaseModel):
    """An instance whose gateway could not be asked; its status was left alone."""

    instance_id: uuid.UUID
    instance_name: str
    gateway: str
    error: str | None = None


class GatewaySummary(BaseModel):
    """Per-gateway counts for one sync."""

    checked: int = 0
    unreachable: int = 0
    confirmed_live: int = 0
    breaker: str = "closed"
    seconds: float = 0.0


class SyncReport(BaseModel):
    """What one `sync_status` run found and did."""

    mode: Literal["check", "apply"]
    scope: SyncScope
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    skipped: str | None = None
    """Why the run did nothing (lock held by another run, late scheduled run), else None."""
    checked: int = 0
    in_sync: int = 0
    drifted: int = 0
    applied: int = 0
    superseded: int = 0
    """Drift not written because a newer observation (e.g. a webhook) had already landed."""
    unreachable: int = 0
    by_gateway: dict[str, GatewaySummary] = Field(default_factory=dict)
    changes: list[Drift] = Field(default_factory=list)
    unreachable_instances: list[UnreachableInstance] = Field(default_factory=list)
    became_connected: list[uuid.UUID] = Field(default_factory=list)
    flow_run_id: uuid.UUID | None = None

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        lines = [
            f"# Status sync ({self.mode}, scope {self.scope.key})",
            "",
            f"{self.checked} checked, {self.in_sync} in sync, {self.drifted} drifted, {self.applied} applied, "
            f"{self.superseded} superseded by newer observations, {self.unreachable} unreachable "
            f"— {self.seconds:.2f} s",
        ]
        if self.skipped:
            lines += ["", f"Skipped: {self.skipped}"]
        if self.by_gateway:
            lines += ["", "| gateway | checked | unreachable | confirmed live | breaker | seconds |",
                      "|---|---|---|---|---|---|"]
            lines += [
                f"| {name} | {g.checked} | {g.unreachable} | {g.confirmed_live} | {g.breaker} | {g.seconds:.2f} |"
                for name, g in sorted(self.by_gateway.items())
            ]
        if self.changes:
            lines += ["", "| instance | gateway | database | gateway says | applied |", "|---|---|---|---|---|"]
            lines += [
                f"| {d.instance_name} | {d.gateway} | {d.db_status} | {d.gateway_status} | {d.applied} |"
                for d in self.changes[:50]
            ]
        return "\n".join(lines)
