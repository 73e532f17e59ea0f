"""On-demand maintenance (seed 001's cleanup-sessions and check-inactive-conversations), through deployments."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import BriefPrincipalDep, scoped_organization
from core.errors import NotFound
from core.names import CLEANUP_ON_DEMAND, CLOSE_ON_DEMAND, DeploymentName
from core.reports import CleanupReport, CloseInactiveReport
from db.engine import session_scope
from db.repositories.organizations import organization_exists
from db.repositories.reports import report_for_run
from flows.runs import FlowRunRef, start_run, wait_for_run

router = APIRouter(prefix="/maintenance", tags=["maintenance"])


class MaintenanceRequest(BaseModel):
    """Start a maintenance run."""

    organization_id: uuid.UUID | None = Field(
        default=None, description="Admin tokens may name one organization (all when omitted)."
    )
    dry_run: bool = Field(default=False, description="Count what would change; change nothing.")
    wait: bool = Field(default=False, description="Wait for the run and include its report.")
    timeout_seconds: float = Field(default=120, gt=0, le=900)


class CleanupRequest(MaintenanceRequest):
    """Start a cleanup."""

    retention_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="Keep ended sessions this many days for this run (default: each organization's setting).",
    )


class CleanupRunResponse(BaseModel):
    """A started (and, with wait, finished) cleanup run."""

    flow_run: FlowRunRef
    report: CleanupReport | None = None


class CloseInactiveRunResponse(BaseModel):
    """A started (and, with wait, finished) inactive-conversation run."""

    flow_run: FlowRunRef
    report: CloseInactiveReport | None = None


async def _run(
    deployment: DeploymentName, parameters: dict[str, Any], request: MaintenanceRequest
) -> tuple[FlowRunRef, dict[str, Any] | None]:
    if request.organization_id is not None:
        async with session_scope() as session:
            if not await organization_exists(session, request.organization_id):
                raise NotFound(f"no organization {request.organization_id}")
    run = await start_run(deployment, parameters)
    if not request.wait:
        return run, None
    run = await wait_for_run(run.id, timeout=request.timeout_seconds, deployment=str(deployment))
    async with session_scope() as session:
        return run, await report_for_run(session, run.id)


@router.post("/cleanup-sessions", response_model=CleanupRunResponse, status_code=202)
async def cleanup_sessions(principal: BriefPrincipalDep, request: CleanupRequest | None = None) -> CleanupRunResponse:
    """Delete ended sessions past retention and prune old webhook and live events; `dry_run` only counts."""
    request = request or CleanupRequest()
    organization_id = scoped_organization(principal, request.organization_id)
    parameters = {
        "organization_id": str(organization_id) if organization_id else None,
        "retention_days": request.retention_days,
        "dry_run": request.dry_run,
    }
    run, report = await _run(CLEANUP_ON_DEMAND, parameters, request)
    return CleanupRunResponse(flow_run=run, report=CleanupReport.model_validate(report) if report else None)


@router.post("/close-inactive-conversations", response_model=CloseInactiveRunResponse, status_code=202)
async def close_inactive_conversations(
    principal: BriefPrincipalDep, request: MaintenanceRequest | None = None
) -> CloseInactiveRunResponse:
    """Close conversations idle past the organization's `inactivity_hours`; `dry_run` only counts them."""
    request = request or MaintenanceRequest()
    organization_id = scoped_organization(principal, request.organization_id)
    parameters = {"organization_id": str(organization_id) if organization_id else None, "dry_run": request.dry_run}
    run, report = await _run(CLOSE_ON_DEMAND, parameters, request)
    return CloseInactiveRunResponse(flow_run=run, report=CloseInactiveReport.model_validate(report) if report else None)
