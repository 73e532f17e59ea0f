"""Status of instances: read-only checks and on-demand syncs (seeds 000 and 001)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Query
from prefect.settings import PREFECT_API_URL

from api.deps import PrincipalDep, SessionDep, scoped_organization
from api.schemas import (
    FlowRunResponse,
    InstanceCheck,
    InstanceStatusResponse,
    StatusCheckResponse,
    SyncRequest,
)
from core.domain import UNREACHABLE
from core.errors import FlowTriggerFailed, NotFound
from core.reports import SyncReport, SyncScope
from db.engine import session_scope
from db.repositories.instances import get_instance
from db.repositories.organizations import organization_exists
from flows.local_runs import start_local_run
from flows.runs import FlowRunRef, ui_url
from flows.sync_status import check_status, sync_status

LOCAL_RUN = "sync-status (in the API process)"
"""What the answer names as the run's deployment: on-demand syncs run warm in the process that took the request."""

router = APIRouter(prefix="/instances", tags=["instances"])


def _checks(report: SyncReport) -> list[InstanceCheck]:
    drifted = {d.instance_id: d for d in report.changes}
    checks = [
        InstanceCheck(
            id=d.instance_id,
            organization_id=d.organization_id,
            instance_name=d.instance_name,
            gateway=d.gateway,
            db_status=d.db_status,
            gateway_status=d.gateway_status,
            drift=True,
            reason=d.reason,
        )
        for d in drifted.values()
    ]
    return checks


@router.get("/status", response_model=StatusCheckResponse)
async def check_instances(
    principal: PrincipalDep,
    organization_id: uuid.UUID | None = None,
    force: bool = Query(default=False, description="Confirm every connected instance live."),
) -> StatusCheckResponse:
    """Compare each instance's database status with its gateway's, writing nothing. Lists the drifted ones."""
    scope = SyncScope(organization_id=scoped_organization(principal, organization_id))
    report = await check_status(scope, force=force)
    return StatusCheckResponse(
        checked=report.checked,
        in_sync=report.in_sync,
        drifted=report.drifted,
        unreachable=report.unreachable,
        seconds=report.seconds,
        instances=_checks(report),
    )


async def start_sync(scope: SyncScope, request: SyncRequest) -> FlowRunResponse:
    """Run a status sync in this process, warm — a tracked flow run, shown in the Prefect UI, with no new interpreter
    per request (prefect-notes.md) — and answer as soon as it started or, with ``wait``, when it finished.

    Two syncs of one scope never overlap: the second finds the scope's lock held and reports itself skipped."""
    if not PREFECT_API_URL.value():  # never start a temporary Prefect server inside the API: its runs would be lost
        raise FlowTriggerFailed("no Prefect API configured: set PREFECT_API_URL (`zapsync up` does)")
    run = start_local_run(sync_status, {"scope": scope, "mode": request.mode, "force": request.force})
    try:
        started = await run.flow_run()
    except Exception as exc:  # the flow run could not even be created: Prefect is unreachable or refused it
        raise FlowTriggerFailed(f"could not start a status sync: {type(exc).__name__}") from exc
    report: SyncReport | None = None
    state = "Running"
    if request.wait:
        done, _ = await asyncio.wait({run.task}, timeout=request.timeout_seconds)
        if done:
            failure = run.task.exception()
            report, state = (None, "Failed") if failure is not None else (run.task.result(), "Completed")
    ref = FlowRunRef(
        id=started.id,
        name=started.name,
        deployment=LOCAL_RUN,
        state=state,
        final=state != "Running",
        ui_url=ui_url(started.id),
    )
    return FlowRunResponse(flow_run=ref, report=report)


@router.post("/sync", response_model=FlowRunResponse, status_code=202)
async def sync_instances(principal: PrincipalDep, request: SyncRequest | None = None) -> FlowRunResponse:
    """Start a status sync of every instance the token may see (or one organization); `wait` for its report."""
    request = request or SyncRequest()
    scope = SyncScope(organization_id=scoped_organization(principal, request.organization_id))
    if scope.organization_id is not None:
        async with session_scope() as session:
            if not await organization_exists(session, scope.organization_id):
                raise NotFound(f"no organization {scope.organization_id}")
    return await start_sync(scope, request)


async def _owned_instance(session: SessionDep, principal: PrincipalDep, instance_id: uuid.UUID) -> dict[str, object]:
    found = await get_instance(session, instance_id, organization_id=principal.organization_id)
    if found is None:
        raise NotFound(f"no instance {instance_id}")
    return found


@router.get("/{instance_id}/status", response_model=InstanceStatusResponse)
async def instance_status(
    instance_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> InstanceStatusResponse:
    """The instance's stored status and what its gateway says right now (nothing is written)."""
    row = await _owned_instance(session, principal, instance_id)
    report = await check_status(SyncScope(instance_id=instance_id), force=True)
    if report.unreachable:
        gateway_status = UNREACHABLE
    elif report.changes:
        gateway_status = report.changes[0].gateway_status
    else:
        gateway_status = str(row["status"])
    return InstanceStatusResponse.model_validate(
        {
            k: row[k]
            for k in (
                "id",
                "instance_name",
                "gateway",
                "status",
                "is_connected",
                "status_reason",
                "status_observed_at",
                "last_checked_at",
                "phone_number",
                "profile_name",
                "health",
            )
        }
        | {"gateway_status": gateway_status, "drift": bool(report.changes)}
    )


@router.post("/{instance_id}/sync", response_model=FlowRunResponse, status_code=202)
async def sync_instance(
    instance_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, request: SyncRequest | None = None
) -> FlowRunResponse:
    """Start a status sync of one instance (`force` confirms it live); `wait` for its report."""
    await _owned_instance(session, principal, instance_id)
    request = request or SyncRequest(force=True)
    return await start_sync(SyncScope(instance_id=instance_id), request)
