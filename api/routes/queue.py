"""The work queue as its users see it: depth and the age of the oldest waiting item per kind, and one item by id."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import PrincipalDep, SessionDep, scoped_organization
from api.schemas import WorkItemRead
from core.domain import WorkKind
from core.errors import NotFound
from db.repositories.work_queue import listening_workers, queue_stats, read_item

router = APIRouter(prefix="/queue", tags=["queue"])


class QueueKind(BaseModel):
    """One kind of queued work."""

    kind: str
    pending: int
    running: int
    failed: int
    oldest_pending_age_seconds: float | None


class QueueOverview(BaseModel):
    """The queue of the caller's organization (all organizations for admin), and the warm workers draining it."""

    kinds: list[QueueKind]
    workers: int
    """Warm workers (`zapsync worker`) listening right now; without any, drains run as deployment runs."""


@router.get("", response_model=QueueOverview)
async def queue_overview(
    session: SessionDep, principal: PrincipalDep, organization_id: uuid.UUID | None = None
) -> QueueOverview:
    """Items pending, running and failed per kind, with the age of the oldest pending one."""
    scope = scoped_organization(principal, organization_id)
    stats = await queue_stats(session, kinds=list(WorkKind), organization_id=scope)
    kinds = [
        QueueKind(
            kind=s.kind,
            pending=s.pending,
            running=s.running,
            failed=s.failed,
            oldest_pending_age_seconds=s.oldest_pending_age_seconds,
        )
        for s in stats
    ]
    return QueueOverview(kinds=kinds, workers=await listening_workers(session))


@router.get("/items/{item_id}", response_model=WorkItemRead)
async def queue_item(item_id: int, session: SessionDep, principal: PrincipalDep) -> WorkItemRead:
    """One item: its state, attempts, last error and (once finished) its result."""
    item = await read_item(session, item_id, organization_id=principal.organization_id)
    if item is None:
        raise NotFound(f"no work item {item_id}")
    return WorkItemRead.of(item)
