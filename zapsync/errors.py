"""Domain errors. Each carries the HTTP status the API answers with; nothing outside api/ knows about HTTP.

ZapsyncError (500)
├── DatabaseUnavailable (503)   the database cannot be reached: gateways should retry
├── DatabaseNotMigrated (503)   the schema is behind: run `zapsync db upgrade`
├── NotFound (404)
├── Forbidden (403)
├── Unauthorized (401)
├── Conflict (409)
├── InvalidInput (422)
└── FlowTriggerFailed (502)     Prefect refused or could not be reached
"""

from __future__ import annotations


class ZapsyncError(Exception):
    """Base of zapsync's own errors; ``message`` is safe to show (never holds secrets)."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DatabaseUnavailable(ZapsyncError):
    """The database could not be reached."""

    status_code = 503


class DatabaseNotMigrated(ZapsyncError):
    """The database schema is not at the revision this code needs."""

    status_code = 503


class NotFound(ZapsyncError):
    """The named row does not exist (or belongs to another organization)."""

    status_code = 404


class Unauthorized(ZapsyncError):
    """Missing or wrong credentials."""

    status_code = 401


class Forbidden(ZapsyncError):
    """Valid credentials that may not do this."""

    status_code = 403


class Conflict(ZapsyncError):
    """The request conflicts with the current state."""

    status_code = 409


class InvalidInput(ZapsyncError):
    """A request that can never succeed as sent."""

    status_code = 422


class FlowTriggerFailed(ZapsyncError):
    """Prefect could not start the requested flow run."""

    status_code = 502
