"""Follow a flow run started through the API: its Prefect state and, once finished, its report."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import PrincipalDep, SessionDep
from core.errors import NotFound
from db.repositories.reports import parameters_owned_by, report_for_run, report_visible_to
from flows.runs import FlowRunRef, read_run, read_run_and_parameters

router = APIRouter(prefix="/flow-runs", tags=["flow runs"])


class FlowRunStatus(BaseModel):
    """A flow run's state and the report it stored (None until it finishes)."""

    flow_run: FlowRunRef
    report: dict[str, Any] | None = None


@router.get("/{flow_run_id}", response_model=FlowRunStatus)
async def flow_run_status(flow_run_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> FlowRunStatus:
    """The run's current state; its report once stored.

    Admin sees every run. An organization token sees a run when its stored report belongs to that organization
    (stored under it, or covering one of its instances), decided in the query; a run still going, which has stored
    nothing yet, when it was started for that organization or one of its instances (its parameters). A run over every
    organization and another organization's run are 404 for it (its slice of scheduled syncs is on the dashboard)."""
    if principal.is_admin:
        return FlowRunStatus(flow_run=await read_run(flow_run_id), report=await report_for_run(session, flow_run_id))
    organization_id = principal.organization_id
    assert organization_id is not None
    if await report_for_run(session, flow_run_id) is not None:
        report = await report_visible_to(session, flow_run_id, organization_id)
        if report is None:
            raise NotFound(f"no flow run {flow_run_id}")
        return FlowRunStatus(flow_run=await read_run(flow_run_id), report=report)
    run, parameters = await read_run_and_parameters(flow_run_id)
    if not await parameters_owned_by(session, parameters, organization_id):
        raise NotFound(f"no flow run {flow_run_id}")
    return FlowRunStatus(flow_run=run, report=None)
