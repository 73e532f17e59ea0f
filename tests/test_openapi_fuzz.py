"""Schemathesis against the API in-process (ASGI), on the real embedded PostgreSQL, the gateway simulator and a real
Prefect server: for every operation of `/openapi.json`, a bounded number of generated requests, authenticated as
an organization or as admin, must answer no 5xx and only what the document declares (status code, content type,
body schema).

Each operation is one test (``schema.parametrize``) with a fresh organization, an instance at the simulator and
tokens; ids in paths are the real ones for about half of the examples (random ones test the 404s), so requests get
past authorization into the handlers. The examples are derandomized: a failure reproduces run after run.

Below it, direct checks of what the document declares (error bodies, webhook request bodies, content types) and of
the routing answers it describes (405/OPTIONS with every method of a path, an empty `cursor=`).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from api.main import create_app
from db.engine import dispose_engine
from db.repositories.organizations import create_token
from tests.factories import auth_headers, make_instance, make_organization

EXAMPLES = 15
REQUEST_TIMEOUT = 120
"""Seconds: generous, so a loaded machine (a slow Prefect server behind a route) is not taken for a failure."""
SECRET = "fuzz-webhook-secret"
ADMIN_TOKEN = "test-admin-token"  # tests/conftest.py

APP = create_app(check_database=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

SKIPPED = {
    # An event stream never ends; tests/test_events_stream.py covers it.
    ("GET", "/events"),
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass(frozen=True)
class Tenant:
    """What the generated requests act on and authenticate as."""

    organization_id: uuid.UUID
    instance_id: uuid.UUID
    token: str


@pytest.fixture
async def tenant(simulator) -> Tenant:
    """An organization with an instance the simulator knows, and an organization token."""
    from db.engine import session_scope

    organization_id = await make_organization("Fuzz", secret=SECRET)
    simulator.add_instance("fuzz-01", "evolution", "open")
    instance_id = await make_instance(organization_id, "fuzz-01", status="connected")
    async with session_scope() as session:
        token = await create_token(session, name="fuzz", organization_id=organization_id)
    return Tenant(organization_id, instance_id, token)


@pytest.fixture(scope="module")
def apps_pool_closed_after(database: str) -> Iterator[None]:
    """The app runs on Schemathesis' own event loop thread, so its pool is that loop's: close it there."""
    yield
    asgi._get_portal().call(dispose_engine)


@pytest.fixture(scope="module")
def registered_deployments(prefect_server: None) -> Iterator[None]:
    """zapsync's deployments registered with the test Prefect server but not served: runs the API starts stay
    scheduled. Removed afterwards with their runs, so no later test's `zapsync serve` picks those runs up."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from deployments.definitions import build_deployments

    ids = [deployment.apply() for deployment in build_deployments()]
    yield

    async def remove() -> None:
        async with get_client() as client:
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
            for run in runs:
                await client.delete_flow_run(run.id)
            for deployment_id in ids:
                await client.delete_deployment(deployment_id)

    asyncio.run(remove())


def bounded_wait(case: schemathesis.Case) -> None:
    """A body asking to `wait` for a run waits half a second at most (runs here are never executed)."""
    body = case.body
    if isinstance(body, dict) and body.get("wait") is True:
        timeout = body.get("timeout_seconds")
        if timeout is None or (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0.5):
            body["timeout_seconds"] = 0.5


_turns = itertools.count()


@pytest.mark.slow
# Schemathesis' own strategies use `random` in one place (seen on GET /instances/{instance_id}/chats), which
# Hypothesis reports as a deprecation; the suite turns warnings into errors.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_answers_what_the_document_declares(
    case: schemathesis.Case, tenant: Tenant, registered_deployments: None, apps_pool_closed_after: None
) -> None:
    if (case.method.upper(), case.path) in SKIPPED:
        pytest.skip("streams without end")
    turn = next(_turns)
    real_ids = turn % 2 == 0 or case.path.startswith("/webhooks/")  # a wrong organization is only ever a 401 there
    if real_ids and case.path_parameters:
        for name, value in (("organization_id", tenant.organization_id), ("instance_id", tenant.instance_id)):
            if name in case.path_parameters:
                case.path_parameters[name] = str(value)
    bounded_wait(case)
    token = tenant.token if turn % 4 < 2 else ADMIN_TOKEN
    response = case.call(
        headers={"Authorization": f"Bearer {token}", "X-Webhook-Secret": SECRET}, timeout=REQUEST_TIMEOUT
    )
    # A 502 FlowTriggerFailed is the declared answer when the Prefect API does not start a run in time (a busy CI
    # machine): it must still match the document, but it is the outside world's failure, not the API's.
    prefect_late = response.status_code == 502 and "FlowTriggerFailed" in response.text
    case.validate_response(response, checks=CHECKS[1:] if prefect_late else CHECKS)


# -- the document itself, and the routing answers it describes --------------------------------------------------


@pytest.fixture
async def bare() -> AsyncIterator[httpx.AsyncClient]:
    """The app over ASGI, for requests that never reach a handler (no database)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(check_database=False)), base_url="http://z"
    ) as http:
        yield http


def error_ref(response: dict[str, Any]) -> str:
    return response["content"]["application/json"]["schema"]["$ref"]


@pytest.mark.pure
def test_errors_are_declared_with_the_body_the_app_sends() -> None:
    document = create_app(check_database=False).openapi()
    schemas = document["components"]["schemas"]
    settings_patch = document["paths"]["/organizations/{organization_id}/settings"]["patch"]["responses"]
    conversations = document["paths"]["/conversations"]["get"]["responses"]

    assert set(schemas["ErrorBody"]["properties"]) == {"error", "detail", "request_id"}
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    for status in ("400", "401", "403", "404", "413", "422", "503"):
        assert error_ref(settings_patch[status]) == "#/components/schemas/ErrorBody", status
    assert {"401", "403", "422", "503"} <= set(conversations) and "413" not in conversations
    assert "401" not in document["paths"]["/healthz"]["get"]["responses"]


@pytest.mark.pure
def test_webhooks_declare_their_bodies_per_gateway_and_other_content_types() -> None:
    paths = create_app(check_database=False).openapi()["paths"]

    titles = {}
    for path in (
        "/webhooks/evolution/{organization_id}",
        "/webhooks/megaapi/{organization_id}",
        "/webhooks/waha/{organization_id}",
    ):
        operation = paths[path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["type"] == "object" and body["additionalProperties"] is True
        assert {"401", "413", "422"} <= set(operation["responses"]) and "403" not in operation["responses"]
        titles[path.split("/")[2]] = body["title"]
    assert titles == {"evolution": "EvolutionWebhook", "megaapi": "MegaAPIWebhook", "waha": "WAHAWebhook"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/events"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]


@pytest.mark.pure
async def test_options_and_405_list_every_method_of_the_path(bare: httpx.AsyncClient) -> None:
    path = f"/organizations/{uuid.uuid4()}/settings"

    options = await bare.options(path)
    put = await bare.put(path, json={})
    nowhere = await bare.get("/no/such/route")

    assert options.status_code == 204 and options.headers["allow"] == "GET, OPTIONS, PATCH"
    assert put.status_code == 405 and put.headers["allow"] == "GET, OPTIONS, PATCH"
    assert put.json()["error"] == "MethodNotAllowed" and put.json()["request_id"] == put.headers["x-request-id"]
    assert nowhere.status_code == 404 and set(nowhere.json()) == {"error", "detail", "request_id"}


async def test_an_empty_cursor_is_the_first_page(client: httpx.AsyncClient) -> None:
    headers = await auth_headers(await make_organization("Cursor"))

    empty = await client.get("/conversations?cursor=", headers=headers)
    messages = await client.get("/conversations/1/messages?cursor=", headers=headers)
    bad = await client.get("/conversations?cursor=bm90LWEtY3Vyc29y", headers=headers)

    assert empty.status_code == 200 and empty.json() == {"items": [], "next_cursor": None}
    assert messages.status_code == 404  # the cursor is accepted; there is no conversation 1
    assert bad.status_code == 422 and bad.json()["error"] == "InvalidInput"
