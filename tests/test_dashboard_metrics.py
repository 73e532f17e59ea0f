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

    text = (await client.get("/metrics")).text

    assert 'zapsync_webhook_events_total{event="connection.update",outcome="applied",provider="evolution"} 1.0' in text
    assert 'zapsync_instances{gateway="evolution",health="unknown",status="disconnected"} 1.0' in text
    assert 'zapsync_sync_drift{kind="applied"} 1.0' in text
    assert 'zapsync_gateway_breaker_open{gateway="evolution"} 0.0' in text
    assert "zapsync_sync_duration_seconds" in text
