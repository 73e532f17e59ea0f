"""Request and response bodies of the management API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from core.reports import SyncReport
from db.repositories.work_queue import ItemState
from flows.runs import FlowRunRef


class SyncRequest(BaseModel):
    """Start a status sync."""

    organization_id: uuid.UUID | None = Field(default=None, description="Admin tokens may name one organization.")
    mode: Literal["check", "apply"] = "apply"
    force: bool = Field(default=False, description="Confirm every connected instance live, not a rotating few.")
    wait: bool = Field(default=False, description="Wait for the run and include its report.")
    timeout_seconds: float = Field(default=120, gt=0, le=900)


class FlowRunResponse(BaseModel):
    """A started (and, with wait, finished) flow run."""

    flow_run: FlowRunRef
    report: SyncReport | None = None


class InstanceCheck(BaseModel):
    """One instance: what the database says, what the gateway says."""

    id: uuid.UUID
    organization_id: uuid.UUID
    instance_name: str
    gateway: str
    db_status: str
    gateway_status: str
    drift: bool
    reason: str | None = None


class StatusCheckResponse(BaseModel):
    """The read-only status check: nothing was written."""

    checked: int
    in_sync: int
    drifted: int
    unreachable: int
    seconds: float
    instances: list[InstanceCheck]


class InstanceStatusResponse(BaseModel):
    """One instance's stored status and its live check."""

    id: uuid.UUID
    instance_name: str
    gateway: str
    status: str
    is_connected: bool
    status_reason: str | None
    status_observed_at: datetime | None
    last_checked_at: datetime | None
    phone_number: str | None
    profile_name: str | None
    health: str
    gateway_status: str
    drift: bool


class WorkItemRead(BaseModel):
    """One queue item: its state, attempts, last error and, once finished, its result."""

    id: int
    kind: str
    state: str
    attempts: int
    last_error: str | None
    finished: bool
    result: dict[str, object] | None = None

    @classmethod
    def of(cls, item: ItemState) -> WorkItemRead:
        """The item as the API shows it."""
        return cls(
            id=item.id,
            kind=item.kind,
            state=item.state,
            attempts=item.attempts,
            last_error=item.last_error,
            finished=item.finished,
            result=item.result,
        )
