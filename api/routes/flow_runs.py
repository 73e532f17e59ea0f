"""Follow a flow run started through the API: its Prefect state and, once finished, its report."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import PrincipalDep, SessionDep
from core.errors import NotFound
from db.repositories.reports import report_for_run, report_visible_to
from flows.runs import FlowRunRef, read_run

router = APIRouter(prefix="/flow-runs", tags=["flow runs"])


class FlowRunStatus(BaseModel):
    """A flow run's state and the report it stored (None until it finishes)."""

    flow_run: FlowRunRef
    report: dict[str, Any] | None = None


@router.get("/{flow_run_id}", response_model=FlowRunStatus)
async def flow_run_status(flow_run_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> FlowRunStatus:
    """The run's current state; its report once stored.

    Admin sees every run. An organization token sees a run only once its stored report belongs to that organization
    (stored under it, or covering one of its instances) — decided in the query, before Prefect is asked: a run over
    every organization, another organization's run and a run that has stored nothing yet are all 404 for it
    (follow an organization's own run with `wait=true`, or read its slice of the scheduled syncs on the dashboard)."""
    if principal.is_admin:
        report = await report_for_run(session, flow_run_id)
    else:
        assert principal.organization_id is not None
        report = await report_visible_to(session, flow_run_id, principal.organization_id)
        if report is None:
            raise NotFound(f"no flow run {flow_run_id}")
    run = await read_run(flow_run_id)
    return FlowRunStatus(flow_run=run, report=report)
