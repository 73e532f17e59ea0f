"""The dashboard at `/`: server-rendered instances, drift, health and conversations, with live updates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.deps import SESSION_COOKIE, BearerDep, SessionDep, bearer, principal_for
from api.spool import app_spool
from core.domain import WorkKind
from core.errors import Unauthorized
from core.names import SYNC_FLOW
from db.repositories.dashboard import instances_overview, recent_conversations, status_counts
from db.repositories.reports import latest_report
from db.repositories.work_queue import queue_stats
from flows.runs import ui_url

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parents[1] / "templates")


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, session: SessionDep, credentials: BearerDep) -> Response:
    """Instances with status, drift, health, last check and last import; the "Sync status" button."""
    try:
        principal = await principal_for(session, bearer(credentials) or request.cookies.get(SESSION_COOKIE))
    except Unauthorized:
        return templates.TemplateResponse(request, "login.html", {"error": request.query_params.get("error")})
    organization_id = principal.organization_id
    report = await latest_report(session, SYNC_FLOW, organization_id) or {}
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
    """Check the token and keep it in an HttpOnly cookie for the dashboard's own requests."""
    try:
        await principal_for(session, token.strip() or None)
    except Unauthorized:
        return RedirectResponse("/?error=unknown+token", status_code=303)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", max_age=7 * 86400
    )
    return response


@router.post("/dashboard/logout")
async def logout() -> Response:
    """Forget the dashboard's token."""
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
