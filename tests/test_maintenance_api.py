"""Maintenance API through served deployments (dry run and apply, `wait` for the report) and organization settings."""

from __future__ import annotations

import uuid

import httpx
import pytest

from flows.runs import wait_for_run
from tests.factories import count, make_instance, make_organization
from tests.maintenance_rows import add_conversation, add_session, ago, conversation, org_token

ADMIN = {"authorization": "Bearer test-admin-token"}


@pytest.mark.usefixtures("served_deployments")
async def test_close_inactive_through_the_deployment_waits_for_its_report(client: httpx.AsyncClient) -> None:
    org_a, org_b = await make_organization("A"), await make_organization("B")
    a_inst = await make_instance(org_a, "a-01")
    b_inst = await make_instance(org_b, "b-01")
    mine = await add_conversation(org_a, a_inst, last_message_at=ago(hours=30))
    theirs = await add_conversation(org_b, b_inst, last_message_at=ago(hours=30))

    response = await client.post(
        "/maintenance/close-inactive-conversations",
        json={"wait": True, "timeout_seconds": 90},
        headers=await org_token(org_a),
    )

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["flow_run"]["deployment"] == "close-inactive-conversations/on-demand"
    assert body["flow_run"]["state"] == "Completed"
    assert body["report"]["dry_run"] is False and body["report"]["closed"] == 1
    assert body["report"]["organization_id"] == str(org_a)  # an organization token acts on its own rows only
    assert (await conversation(mine))["status"] == "closed"
    assert (await conversation(theirs))["status"] == "in_progress"


@pytest.mark.usefixtures("served_deployments")
async def test_cleanup_dry_run_returns_the_run_at_once_and_its_report_once_finished(
    client: httpx.AsyncClient,
) -> None:
    org = await make_organization()
    instance = await make_instance(org, "a-01")
    await add_session(instance, connected_at=ago(days=50), disconnected_at=ago(days=45))

    started = await client.post(
        "/maintenance/cleanup-sessions", json={"dry_run": True, "retention_days": 40}, headers=ADMIN
    )
    assert started.status_code == 202 and started.json()["report"] is None
    run = started.json()["flow_run"]
    assert run["deployment"] == "cleanup-sessions/on-demand"
    finished = await wait_for_run(uuid.UUID(run["id"]), timeout=90)
    report = (await client.get(f"/flow-runs/{run['id']}", headers=ADMIN)).json()["report"]

    assert finished.state == "Completed"
    assert report["dry_run"] is True and report["retention_days"] == 40
    assert report["deleted"]["sessions"] == 1  # would delete
    assert await count("whatsapp_sessions") == 1


async def test_maintenance_routes_need_a_token_and_stay_in_the_tokens_organization(client: httpx.AsyncClient) -> None:
    org_a, org_b = await make_organization("A"), await make_organization("B")
    headers = await org_token(org_a)

    anonymous = await client.post("/maintenance/cleanup-sessions")
    elsewhere = await client.post(
        "/maintenance/close-inactive-conversations", json={"organization_id": str(org_b)}, headers=headers
    )
    invalid = await client.post("/maintenance/cleanup-sessions", json={"retention_days": 0}, headers=headers)

    assert anonymous.status_code == 401
    assert elsewhere.status_code == 403
    assert invalid.status_code == 422


async def test_organization_settings_read_and_update(client: httpx.AsyncClient) -> None:
    org_a, org_b = await make_organization("A"), await make_organization("B")
    headers = await org_token(org_a)

    read = await client.get(f"/organizations/{org_a}/settings", headers=headers)
    assert read.status_code == 200
    assert {
        k: read.json()[k]
        for k in (
            "inactivity_hours",
            "session_retention_days",
            "auto_reconnect",
            "import_history_days",
            "close_waiting_conversations",
        )
    } == {
        "inactivity_hours": 24,
        "session_retention_days": 30,
        "auto_reconnect": True,
        "import_history_days": None,
        "close_waiting_conversations": False,
    }

    changed = await client.patch(
        f"/organizations/{org_a}/settings",
        headers=headers,
        json={"inactivity_hours": 48, "auto_reconnect": False, "import_history_days": 7},
    )
    assert changed.status_code == 200
    assert (changed.json()["inactivity_hours"], changed.json()["auto_reconnect"]) == (48, False)
    reread = (await client.get(f"/organizations/{org_a}/settings", headers=headers)).json()
    assert (reread["inactivity_hours"], reread["import_history_days"], reread["session_retention_days"]) == (48, 7, 30)

    assert (await client.get(f"/organizations/{org_b}/settings", headers=headers)).status_code == 403
    assert (
        await client.patch(f"/organizations/{org_a}/settings", headers=headers, json={"inactivity_hours": 0})
    ).status_code == 422
    assert (
        await client.patch(f"/organizations/{org_a}/settings", headers=headers, json={"auto_reconnect": None})
    ).status_code == 422
    admin = await client.patch(
        f"/organizations/{org_b}/settings", headers=ADMIN, json={"close_waiting_conversations": True}
    )
    assert admin.status_code == 200 and admin.json()["close_waiting_conversations"] is True
