"""The one error tree. Each error carries the HTTP status the API answers with; nothing outside api/ knows HTTP.

ZapsyncError (500)                  ``message`` is safe to show: never holds secrets
├── DatabaseUnavailable (503)       the database cannot be reached: gateways should retry
├── DatabaseNotMigrated (503)       the schema is behind: run `zapsync db upgrade`
├── NotFound (404)
├── Forbidden (403)
├── Unauthorized (401)
├── Conflict (409)
├── InvalidInput (422)
├── PayloadTooLarge (413)           a request body over its limit
├── FlowTriggerFailed (502)         Prefect refused or could not be reached
├── StackError (500)                the local stack could not start or a part of it died
│   └── PortInUse                   a port the stack needs is taken
└── GatewayError (502)              raised by gateway clients (callers catch at the level they care about)
    ├── GatewayTransientError (503) a retry can help: network errors, timeouts, 429, 502/503/504
    │   └── GatewayUnavailable      the breaker is open: fail fast, count as unreachable
    ├── GatewayRequestError (502)   a retry cannot help: other 4xx/5xx (status, body)
    │   ├── GatewayAuthError        401/403: wrong key, logged-out instance
    │   ├── GatewayNotFound         404: the instance does not exist at the gateway
    │   ├── GatewayInstanceExists   (409) create found the name taken at the gateway (callers treat it as done)
    │   └── GatewaySendRejected     a send refused for good (number not on WhatsApp, empty text): never resent
    ├── GatewayOutcomeUnknown (504) a send's request left but no answer came: it may have been sent; never
    │                               retried blindly (reconciled against the gateway's echo first)
    └── GatewayNotSupported (501)   the provider has no such operation
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


class PayloadTooLarge(ZapsyncError):
    """A request body over its size limit."""

    status_code = 413


class FlowTriggerFailed(ZapsyncError):
    """Prefect could not start the requested flow run."""

    status_code = 502


class StackError(ZapsyncError):
    """The stack could not start or a part of it died; the CLI exits with :attr:`exit_code`."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail
        """More lines shown after the sentence (a dead child's last log lines)."""
        if exit_code is not None:
            self.exit_code = exit_code


class PortInUse(StackError):
    """A port the stack needs is taken (checked before anything starts)."""

    exit_code = 2


# -- gateways -------------------------------------------------------------------------------------------------


class GatewayError(ZapsyncError):
    """Base of every error raised by a gateway client. Messages never contain secrets."""

    status_code = 502

    def __init__(self, message: str, *, gateway: str | None = None) -> None:
        super().__init__(message)
        self.gateway = gateway


class GatewayTransientError(GatewayError):
    """A failure that a retry may cure: connection errors, timeouts, 429 and 502/503/504."""

    status_code = 503


class GatewayUnavailable(GatewayTransientError):
    """The gateway's circuit breaker is open; the call was not attempted."""


class GatewayRequestError(GatewayError):
    """The gateway answered with a permanent error; retrying will not help."""

    def __init__(self, message: str, *, upstream_status: int, body: str = "", gateway: str | None = None) -> None:
        super().__init__(message, gateway=gateway)
        self.upstream_status = upstream_status
        """The gateway's own HTTP status (``status_code`` stays the one zapsync answers with: 502)."""
        self.body = body[:500]


class GatewayAuthError(GatewayRequestError):
    """401/403: the key was refused, or the instance is logged out."""


class GatewayNotFound(GatewayRequestError):
    """404: the instance does not exist at the gateway."""


class GatewayInstanceExists(GatewayRequestError):
    """Create found the instance name already taken at the gateway (Evolution: 403 `This name "x" is already in use.`).

    Provisioning treats it as success: the instance it wanted exists.
    """

    status_code = 409


class GatewaySendRejected(GatewayRequestError):
    """The gateway refused a send for a reason a retry cannot cure (number not on WhatsApp, invalid media)."""


class GatewayOutcomeUnknown(GatewayError):
    """A send timed out (or the connection broke) after its request left: the message may have gone out.

    Not a :class:`GatewayTransientError` on purpose: nothing retries it automatically, because a duplicate message
    to a customer is worse than a late one. The outbox reconciles it against the gateway's echo first.
    """

    status_code = 504


class GatewayNotSupported(GatewayError):
    """The provider has no API for this operation."""

    status_code = 501
