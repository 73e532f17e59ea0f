"""Follow a flow run started through the API: its Prefect state and, once finished, its report."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import PrincipalDep, SessionDep
from core.errors import NotFound
from db.repositories.reports import report_for_run
from flows.runs import FlowRunRef, read_run

router = APIRouter(prefix="/flow-runs", tags=["flow runs"])


class FlowRunStatus(BaseModel):
    """A flow run's state and the report it stored (None until it finishes)."""

    flow_run: FlowRunRef
    report: dict[str, Any] | None = None


@router.get("/{flow_run_id}", response_model=FlowRunStatus)
async def flow_run_status(flow_run_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> FlowRunStatus:
    """The run's current state; its report once stored. Reports of other organizations are not shown."""
    run = await read_run(flow_run_id)
    report = await report_for_run(session, flow_run_id)
    if report is not None and not principal.is_admin:
        scope = report.get("scope") or {}
        owner = report.get("organization_id") or scope.get("organization_id")
        if owner is not None and str(owner) != str(principal.organization_id):
            raise NotFound(f"no flow run {flow_run_id}")
    return FlowRunStatus(flow_run=run, report=report)
