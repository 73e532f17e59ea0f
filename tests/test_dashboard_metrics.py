"""Dashboard rendering and sign-in, the flow-run endpoint, and Prometheus metrics."""

from __future__ import annotations

import httpx
import pytest

from flows.sync_status import sync_status
from tests.factories import make_instance, make_organization
from tests.test_webhooks import opened, post


async def test_dashboard_asks_for_a_token_then_lists_instances(client: httpx.AsyncClient) -> None:
    org = await make_organization("Acme")
    await make_instance(org, "acme-01", status="connected")

    anonymous = await client.get("/")
    refused = await client.post("/dashboard/login", data={"token": "wrong"})
    signed_in = await client.post("/dashboard/login", data={"token": "test-admin-token"})
    page = await client.get("/")

    assert anonymous.status_code == 200 and 'name="token"' in anonymous.text
    assert refused.status_code == 303 and "error" in refused.headers["location"]
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert "acme-01" in page.text and 'id="sync-all"' in page.text
    assert "test-admin-token" not in page.text


@pytest.mark.usefixtures("prefect_server")
async def test_metrics_expose_webhooks_instances_and_the_last_sync(client: httpx.AsyncClient, simulator) -> None:
    org = await make_organization()
    await make_instance(org, "acme-01")
    simulator.add_instance("acme-01", "evolution", "close")
    assert (await post(client, org, opened("acme-01"))).status_code == 200
    await sync_status(mode="apply")  # the gateway says close: drift applied

    text = (await client.get("/metrics", headers={"authorization": "Bearer test-admin-token"})).text

    assert 'zapsync_webhook_events_total{event="connection.update",outcome="applied",provider="evolution"} 1.0' in text
    assert 'zapsync_instances{gateway="evolution",health="unknown",status="disconnected"} 1.0' in text
    assert 'zapsync_sync_drift{kind="applied"} 1.0' in text
    assert 'zapsync_gateway_breaker_open{gateway="evolution"} 0.0' in text
    assert "zapsync_sync_duration_seconds" in text


async def test_event_names_zapsync_does_not_act_on_share_one_metrics_label(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    await make_instance(org, "acme-01")
    invented = {"event": "made.up-7f3a9c", "instance": "acme-01", "data": {}}
    assert (await post(client, org, invented)).status_code == 200

    text = (await client.get("/metrics", headers={"authorization": "Bearer test-admin-token"})).text

    assert "made.up-7f3a9c" not in text
    assert 'zapsync_webhook_events_total{event="other",outcome="stored",provider="evolution"}' in text


async def test_queue_depth_in_metrics_api_and_dashboard_per_organization(client: httpx.AsyncClient) -> None:
    from db.engine import session_scope
    from db.repositories.import_runs import import_request, request_imports
    from tests.factories import auth_headers

    a, b = await make_organization("A"), await make_organization("B")
    inst = await make_instance(a, "acme-01")
    async with session_scope() as session:
        (queued,) = await request_imports(session, [import_request(inst, a, trigger="api")])

    metrics = (await client.get("/metrics", headers={"authorization": "Bearer test-admin-token"})).text
    mine = (await client.get("/queue", headers=await auth_headers(a))).json()
    theirs = (await client.get("/queue", headers=await auth_headers(b))).json()
    item = await client.get(f"/queue/items/{queued.id}", headers=await auth_headers(a))
    peek = await client.get(f"/queue/items/{queued.id}", headers=await auth_headers(b))
    page = await client.get("/", headers=await auth_headers(a))

    assert 'zapsync_queue_items{kind="import",state="pending"} 1.0' in metrics
    assert "zapsync_queue_oldest_pending_seconds" in metrics
    assert [(k["kind"], k["pending"]) for k in mine["kinds"]] == [("import", 1), ("send", 0)]
    assert [(k["kind"], k["pending"]) for k in theirs["kinds"]] == [("import", 0), ("send", 0)]
    assert item.status_code == 200 and item.json()["state"] == "pending" and not item.json()["finished"]
    assert peek.status_code == 404
    assert 'id="queue-import"' in page.text and "imports queued" in page.text
