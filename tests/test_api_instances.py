"""The status API: auth and organization scoping, read-only checks, on-demand syncs run warm in the API process."""

from __future__ import annotations

import uuid

import httpx
import pytest
from prefect.client.orchestration import get_client

from flows.runs import wait_for_run
from tests.factories import auth_headers as org_token
from tests.factories import count, instance_row, make_instance, make_organization

ADMIN = {"authorization": "Bearer test-admin-token"}


async def two_orgs(simulator) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID, uuid.UUID]:
    org_a = await make_organization("A")
    org_b = await make_organization("B")
    simulator.add_instance("a-01", "evolution", "open")
    simulator.add_instance("b-01", "evolution", "open")
    a = await make_instance(org_a, "a-01", status="disconnected")
    b = await make_instance(org_b, "b-01", status="disconnected")
    return org_a, org_b, a, b


async def test_management_routes_need_a_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/instances/status")).status_code == 401
    wrong = await client.get("/instances/status", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "Unauthorized"
    assert (await client.post("/instances/sync")).status_code == 401


async def test_an_admin_sync_of_an_unknown_organization_is_a_404_not_a_run(client: httpx.AsyncClient) -> None:
    unknown = uuid.uuid4()
    answer = await client.post(
        "/instances/sync", json={"organization_id": str(unknown)}, headers={"authorization": "Bearer test-admin-token"}
    )

    assert answer.status_code == 404 and str(unknown) in answer.json()["detail"]


async def test_the_token_may_also_come_from_the_dashboards_cookie(client: httpx.AsyncClient) -> None:
    signed_in = await client.post("/dashboard/login", data={"token": "test-admin-token"})
    assert signed_in.status_code == 303 and "test-admin-token" not in signed_in.headers["set-cookie"]
    by_cookie = await client.get("/instances/status")
    header_wins = await client.get("/instances/status", headers={"authorization": "Bearer nope"})
    client.cookies.clear()

    assert by_cookie.status_code == 200
    assert header_wins.status_code == 401 and header_wins.json()["detail"] == "unknown or revoked token"


async def test_openapi_declares_the_bearer_scheme_on_protected_routes(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]

    [(name, scheme)] = document["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, method in [
        ("/instances/status", "get"),
        ("/instances/sync", "post"),
        ("/events", "get"),
        ("/cron/sync-status", "get"),
        ("/webhooks/evolution/{organization_id}", "post"),
    ]:
        assert {name: []} in paths[path][method].get("security", []), path
    assert "security" not in paths["/healthz"]["get"]
    assert "security" not in paths["/readyz"]["get"]


async def test_check_is_read_only_and_scoped_to_the_tokens_organization(client: httpx.AsyncClient, simulator) -> None:
    org_a, org_b, a, b = await two_orgs(simulator)

    as_a = await client.get("/instances/status", headers=await org_token(org_a))
    as_admin = await client.get("/instances/status", headers=ADMIN)
    a_peeks_at_b = await client.get(f"/instances/status?organization_id={org_b}", headers=await org_token(org_a))

    assert as_a.status_code == 200
    assert as_a.json()["checked"] == 1
    assert [i["instance_name"] for i in as_a.json()["instances"]] == ["a-01"]
    assert as_a.json()["instances"][0]["gateway_status"] == "connected"
    assert as_admin.json()["checked"] == 2 and as_admin.json()["drifted"] == 2
    assert a_peeks_at_b.status_code == 403
    assert (await instance_row(a))["status"] == "disconnected"
    assert (await instance_row(b))["status"] == "disconnected"


async def test_instance_status_shows_live_drift_and_hides_other_orgs(client: httpx.AsyncClient, simulator) -> None:
    org_a, _, a, b = await two_orgs(simulator)
    headers = await org_token(org_a)

    mine = await client.get(f"/instances/{a}/status", headers=headers)
    theirs = await client.get(f"/instances/{b}/status", headers=headers)

    assert mine.status_code == 200
    assert mine.json()["status"] == "disconnected"
    assert mine.json()["gateway_status"] == "connected" and mine.json()["drift"] is True
    assert theirs.status_code == 404


async def test_gateway_down_is_reported_as_unreachable(client: httpx.AsyncClient, simulator) -> None:
    org_a, _, a, _ = await two_orgs(simulator)
    simulator.configure(outage=True)

    response = await client.get(f"/instances/{a}/status", headers=await org_token(org_a))

    assert response.status_code == 200
    assert response.json()["gateway_status"] == "unreachable" and response.json()["drift"] is False


@pytest.mark.usefixtures("prefect_server")
async def test_sync_runs_warm_in_the_api_and_waits_for_its_report(client: httpx.AsyncClient, simulator) -> None:
    org_a, _, a, b = await two_orgs(simulator)

    response = await client.post(
        "/instances/sync", json={"wait": True, "timeout_seconds": 90}, headers=await org_token(org_a)
    )

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["flow_run"]["state"] == "Completed"
    assert body["flow_run"]["deployment"] == "sync-status (in the API process)"
    assert body["report"]["applied"] == 1 and body["report"]["checked"] == 1
    async with get_client() as prefect:  # a real flow run, in the Prefect API like any other
        run = await prefect.read_flow_run(uuid.UUID(body["flow_run"]["id"]))
    assert run.state is not None and run.state.is_completed()
    assert (await instance_row(a))["status"] == "connected"
    assert (await instance_row(b))["status"] == "disconnected"  # another organization's instance


@pytest.mark.usefixtures("prefect_server")
async def test_sync_one_instance(client: httpx.AsyncClient, simulator) -> None:
    org_a, _, a, b = await two_orgs(simulator)
    headers = await org_token(org_a)

    other = await client.post(f"/instances/{b}/sync", headers=headers)
    mine = await client.post(f"/instances/{a}/sync", json={"wait": True, "force": True}, headers=headers)

    assert other.status_code == 404
    assert mine.status_code == 202 and mine.json()["report"]["applied"] == 1
    assert (await instance_row(a))["status"] == "connected"


@pytest.mark.usefixtures("prefect_server", "served_deployments")
async def test_cron_endpoint_needs_the_cron_secret_and_starts_one_run_per_minute(client: httpx.AsyncClient) -> None:
    refused = await client.get("/cron/sync-status", headers={"authorization": "Bearer wrong"})
    first = await client.get("/cron/sync-status", headers={"authorization": "Bearer test-cron-secret"})
    second = await client.get("/cron/sync-status", headers={"authorization": "Bearer test-cron-secret"})

    assert refused.status_code == 401
    assert first.status_code == 202
    # Let the sync-all run finish here, so that it cannot act on a later test's rows.
    for started in {first.json()["flow_run"]["id"], second.json()["flow_run"]["id"]}:
        assert (await wait_for_run(uuid.UUID(started), timeout=120)).final
    assert first.json()["flow_run"]["id"] == second.json()["flow_run"]["id"] or (
        first.json()["flow_run"]["name"] != second.json()["flow_run"]["name"]  # the minute turned in between
    )


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert await count("organizations") == 0
