"""The dashboard at `/`: server-rendered instances, drift, health and conversations, with live updates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.deps import (
    DASHBOARD_SESSION_LIFETIME,
    SESSION_COOKIE,
    BearerDep,
    SessionDep,
    bearer,
    principal_for,
    principal_for_request,
)
from api.spool import app_spool
from core.domain import WorkKind
from core.errors import Unauthorized
from core.names import SYNC_FLOW
from db.repositories.dashboard import instances_overview, recent_conversations, status_counts
from db.repositories.organizations import close_dashboard_session, open_dashboard_session
from db.repositories.reports import latest_report, latest_sync_slice
from db.repositories.work_queue import queue_stats
from flows.runs import ui_url

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parents[1] / "templates")


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, session: SessionDep, credentials: BearerDep) -> Response:
    """Instances with status, drift, health, last check and last import; the "Sync status" button."""
    try:
        principal = await principal_for_request(session, bearer(credentials), request.cookies.get(SESSION_COOKIE))
    except Unauthorized:
        return templates.TemplateResponse(request, "login.html", {"error": request.query_params.get("error")})
    organization_id = principal.organization_id
    if organization_id is None:
        report = await latest_report(session, SYNC_FLOW) or {}
    else:  # only this organization's slice of syncs over every organization (issue 13 §1)
        report = await latest_sync_slice(session, SYNC_FLOW, organization_id) or {}
    drifted = {str(change["instance_id"]): change for change in report.get("changes", []) if not change.get("applied")}
    run_id = report.get("flow_run_id")
    context = {
        "principal": principal,
        "instances": await instances_overview(session, organization_id),
        "counts": await status_counts(session, organization_id),
        "conversations": await recent_conversations(session, organization_id),
        "drifted": drifted,
        "last_sync": report,
        "last_sync_url": ui_url(run_id) if run_id else None,
        "queue": await queue_stats(session, kinds=list(WorkKind), organization_id=organization_id),
        "spool": journal.depth() if (journal := app_spool(request.app)) is not None else None,
    }
    return templates.TemplateResponse(request, "dashboard.html", context)


@router.post("/dashboard/login")
async def login(request: Request, session: SessionDep, token: Annotated[str, Form()]) -> Response:
    """Check the token and open a server-side session; the HttpOnly cookie holds only the session's random id."""
    token = token.strip()
    try:
        principal = await principal_for(session, token or None)
    except Unauthorized:
        return RedirectResponse("/?error=unknown+token", status_code=303)
    session_id = await open_dashboard_session(session, principal, token=token, lifetime=DASHBOARD_SESSION_LIFETIME)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=int(DASHBOARD_SESSION_LIFETIME.total_seconds()),
    )
    return response


@router.post("/dashboard/logout")
async def logout(request: Request, session: SessionDep) -> Response:
    """End the dashboard's session (deleted server-side) and forget its cookie."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        await close_dashboard_session(session, session_id)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
