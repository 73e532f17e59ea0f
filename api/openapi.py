"""The OpenAPI document, made to tell the truth about errors and content types, centrally.

FastAPI declares each route's success answer and a 422 whose body (`HTTPValidationError`) zapsync never sends.
:func:`install_openapi` replaces ``app.openapi`` with a version that, from each route's dependencies and
parameters, declares what it can really answer (every error body is :class:`api.schemas.ErrorBody`):

- 401 and 403 for routes that take a principal (a bearer token or the dashboard's cookie); 401 alone for routes
  that take other credentials (the cron secret, a webhook secret or signature);
- 404 for those of them that name something by id (in the path, query or body);
- 400 (not JSON at all) for routes whose body FastAPI parses; 413 and 422 for routes with a body (webhooks
  included: they read it raw);
  422 for routes with parameters (FastAPI's own rule), with the real body shape;
- 409/501/502/504 for routes that act on a gateway, 502 for those that start or read flow runs (both by tag);
  503 for every route but the liveness probe;
- non-JSON bodies where a route sends them (``/metrics`` is Prometheus text, an event stream is
  `text/event-stream`).

New routes get the same declarations without anyone editing their decorators.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from api.deps import bearer_scheme, get_metrics_reader, get_principal, get_principal_briefly
from api.schemas import ErrorBody

ERROR_REF = "#/components/schemas/ErrorBody"

DESCRIPTIONS = {
    400: "The body is not JSON at all.",
    401: "Missing, malformed, unknown or revoked credentials.",
    403: "The credentials are valid but may not act on this organization.",
    404: "Nothing with this id (that this token may see).",
    409: "Conflicts with the current state (at the gateway or here).",
    413: "The body is over the size limit (refused before it is read in full).",
    422: "Invalid input: a parameter or the body is malformed, or a value the route refuses.",
    501: "The instance's gateway does not support this operation.",
    502: "A gateway refused or failed the request, or Prefect is unreachable or not serving the deployment.",
    503: "The database or a gateway is unavailable for now: retry later.",
    504: "The gateway did not answer in time; the outcome is unknown.",
}

PRINCIPAL_DEPENDENCIES: tuple[Callable[..., Any], ...] = (get_principal, get_principal_briefly, get_metrics_reader)
"""Dependencies that resolve a caller to an organization (or admin): 401 without a valid token, 403 across orgs
(or for an organization's token on an admin-only route)."""

GATEWAY_TAGS = frozenset({"provisioning", "sending"})
"""Routes under these tags call a gateway while the caller waits."""
GATEWAY_STATUSES = (409, 501, 502, 504)

FLOW_TAGS = frozenset({"instances", "maintenance", "flow runs"})
"""Routes under these tags start or read Prefect flow runs: 502 when Prefect is unreachable or not serving."""

NO_DATABASE = frozenset({("GET", "/healthz")})
"""Operations that never touch the database (every other one may answer 503)."""

MEDIA_TYPES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/metrics"): {
        "text/plain": {
            "schema": {"type": "string", "description": "Prometheus text exposition format (version 0.0.4)."}
        }
    },
    ("GET", "/events"): {
        "text/event-stream": {
            "schema": {"type": "string", "description": "Server-sent events: `id`, `event` and JSON `data` lines."}
        }
    },
}
"""Success bodies that are not JSON, by operation."""


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so `/openapi.json`) return the completed document."""
    base_openapi = app.openapi
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        base = base_openapi()  # FastAPI's own, cached until the routes change
        if cache.get("base") is not base:
            cache["base"], cache["document"] = base, complete(app, copy.deepcopy(base))
        document: dict[str, Any] = cache["document"]
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def complete(app: FastAPI, document: dict[str, Any]) -> dict[str, Any]:
    """Add the error answers and content types each operation of ``document`` can really send."""
    paths: dict[str, dict[str, Any]] = document.get("paths", {})
    for path, method, route in _operations(app):
        operation = paths.get(path, {}).get(method.lower())
        if operation is None:
            continue
        responses: dict[str, Any] = operation.setdefault("responses", {})
        for status in sorted(_error_statuses(path, method, route, operation)):
            _declare_error(responses, status)
        if (method, path) in MEDIA_TYPES:
            success = min((code for code in responses if code.startswith("2")), default="200")
            responses.setdefault(success, {"description": "Successful Response"})["content"] = copy.deepcopy(
                MEDIA_TYPES[method, path]
            )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    _drop_unreferenced(document, ("HTTPValidationError", "ValidationError"))
    return document


@dataclass(frozen=True)
class RouteView:
    """A route as the application serves it: included routers' prefixes applied."""

    route: BaseRoute
    path_format: str
    methods: frozenset[str]
    path_regex: re.Pattern[str] | None


def served_routes(routes: list[BaseRoute]) -> Iterator[RouteView]:
    """Every route of ``routes`` as served. FastAPI 0.150 keeps an included router as one entry and resolves its
    routes lazily (`iter_route_contexts`); older versions copy them into the application's list."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI < 0.150: the list is flat
        for route in routes:
            path = getattr(route, "path_format", getattr(route, "path", ""))
            methods = frozenset(getattr(route, "methods", None) or ())
            yield RouteView(route, path, methods, getattr(route, "path_regex", None))
        return
    for context in iter_route_contexts(routes):
        path = context.path_format or context.path or ""
        methods = frozenset(context.methods or ())
        yield RouteView(context.original_route, path, methods, getattr(context, "path_regex", None))


def _operations(app: FastAPI) -> Iterator[tuple[str, str, APIRoute]]:
    for view in served_routes(app.routes):
        if isinstance(view.route, APIRoute) and view.route.include_in_schema:
            for method in sorted(view.methods):
                yield view.path_format, method, view.route


def _error_statuses(path: str, method: str, route: APIRoute, operation: dict[str, Any]) -> set[int]:
    calls = set(_calls(route.dependant))
    statuses: set[int] = set()
    if any(dependency in calls for dependency in PRINCIPAL_DEPENDENCIES):
        statuses |= {401, 403}
        if route.dependant.path_params or _names_an_id(route):
            statuses.add(404)
    elif bearer_scheme in calls:
        statuses.add(401)  # other credentials (the cron secret, a webhook's): an unknown organization is a 401 too
    has_body = route.body_field is not None or "requestBody" in operation
    if has_body:
        statuses |= {413, 422}
    if route.body_field is not None:
        statuses.add(400)  # FastAPI's answer to a body that is not JSON at all
    if has_body or operation.get("parameters"):
        statuses.add(422)
    if set(route.tags or ()) & GATEWAY_TAGS:
        statuses |= set(GATEWAY_STATUSES)
    if set(route.tags or ()) & FLOW_TAGS:
        statuses.add(502)
    if (method, path) not in NO_DATABASE:
        statuses.add(503)
    return statuses


def _names_an_id(route: APIRoute) -> bool:
    """Whether the route takes an id in its query or body (`organization_id`…): one that names nothing is a 404."""
    names = {param.name for param in route.dependant.query_params}
    body = route.body_field.field_info.annotation if route.body_field is not None else None
    for model in getattr(body, "__args__", None) or (body,):
        names |= set(getattr(model, "model_fields", {}))
    return any(name.endswith("_id") for name in names)


def _calls(dependant: Dependant) -> Iterator[object]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from _calls(dependency)


def _declare_error(responses: dict[str, Any], status: int) -> None:
    declared = responses.setdefault(str(status), {"description": DESCRIPTIONS.get(status, "Error")})
    declared["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}


def _drop_unreferenced(document: dict[str, Any], names: tuple[str, ...]) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for name in names:
        held = schemas.pop(name, None)
        if held is not None and f'"#/components/schemas/{name}"' in json.dumps(document):
            schemas[name] = held
