"""The FastAPI application: routers, error handlers and per-process state, assembled in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.inbox import RepeatFilter, wake_imports_on_connect
from api.limits import BodyLimits
from api.metrics import Metrics
from api.routes import (
    conversation_page,
    conversations,
    dashboard,
    events,
    flow_runs,
    instance_health,
    instances,
    maintenance,
    metrics,
    organizations,
    probes,
    provisioning,
    queue,
    webhooks,
)
from api.routes import outbox as outbox_routes
from api.spool import install_spool_handlers, running_spool
from core.settings import get_settings
from db.engine import check_migrated, dispose_engine
from flows.runs import Waker

log = logging.getLogger("zapsync.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Refuse to serve an unmigrated database; run the webhook spool's replayer; close the pool on shutdown."""
    await check_migrated()
    settings = get_settings()
    async with running_spool(app, settings.spool_folder, settings.spool_max_bytes):
        yield
    await dispose_engine()


def create_app(*, check_database: bool = True) -> FastAPI:
    """Build the API (no side effects until it starts serving)."""
    app = FastAPI(
        title="zapsync",
        version="0.1.0",
        lifespan=lifespan if check_database else None,
        description="Keeps a CRM's PostgreSQL in step with its WhatsApp gateways.",
    )
    app.state.repeat_filter = RepeatFilter(get_settings().webhook_repeat_window_seconds)
    app.state.waker = Waker()
    app.state.after_webhook = [wake_imports_on_connect(app.state.waker)]
    app.state.metrics = Metrics()
    app.add_middleware(BodyLimits)  # added before RequestIds, so inside it: a 413 carries the request id
    install_error_handlers(app)
    install_spool_handlers(app)
    for router in (
        probes.router,
        instances.router,
        webhooks.router,
        flow_runs.router,
        metrics.router,
        dashboard.router,
        conversation_page.router,
        instance_health.router,
        maintenance.router,
        organizations.router,
        events.router,
        conversations.router,
        queue.router,
    ):
        app.include_router(router)
    app.include_router(provisioning.router)
    app.include_router(outbox_routes.router)  # sending (issue 11 §2)
    app.include_router(organizations.token_router)  # token listing and revocation (issue 13 §1)
    return app
