"""One place that turns errors into HTTP answers: `{"error": ClassName, "detail": message}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from core.errors import GatewayError, GatewayNotSupported, GatewayTransientError, ZapsyncError

log = logging.getLogger("zapsync.api")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected errors are logged with a traceback and answered without internals."""

    @app.exception_handler(ZapsyncError)
    async def zapsync_error(_: Request, exc: ZapsyncError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        status = 501 if isinstance(exc, GatewayNotSupported) else 503 if isinstance(exc, GatewayTransientError) else 502
        return JSONResponse({"error": type(exc).__name__, "detail": exc.message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()[:10]]
        return JSONResponse(
            {"error": "InvalidInput", "detail": "; ".join(problems) or "invalid request"}, status_code=422
        )
