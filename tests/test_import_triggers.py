"""Imports start on connect — from a `connection.update` webhook or a status-sync transition — through the served
import deployment, once per connection; the sync also picks up imports that never finished."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun
from sqlalchemy import text

from api.inbox import wait_for_import_starts
from core.names import IMPORT_ON_DEMAND
from db.engine import session_scope
from db.repositories.import_runs import pending_imports
from flows.runs import wait_for_run
from flows.sync_status import sync_status
from tests.factories import count, make_instance, make_organization

pytestmark = pytest.mark.usefixtures("served_deployments")


async def import_runs(instance_id: uuid.UUID) -> list[FlowRun]:
    """Flow runs of the import deployment for one instance."""
    async with get_client() as prefect:
        deployment = await prefect.read_deployment_by_name(str(IMPORT_ON_DEMAND))
        runs = await prefect.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
    return [r for r in runs if r.parameters.get("instance_id") == str(instance_id)]


def opened(instance: str, at: datetime) -> dict[str, object]:
    """`connection.update` open (gateways.md §2.3)."""
    return {
        "event": "connection.update",
        "instance": instance,
        "date_time": at.isoformat().replace("+00:00", "Z"),
        "data": {
            "instance": instance,
            "state": "open",
            "statusReason": 200,
            "wuid": "5511988887777@s.whatsapp.net",
            "profileName": "Acme",
        },
        "destination": "http://zapsync/webhooks",
        "sender": "5511988887777@s.whatsapp.net",
        "server_url": "http://evolution",
        "apikey": None,
    }


async def test_open_webhook_delivered_three_times_starts_one_import_that_really_runs(client, simulator) -> None:
    org = await make_organization()
    simulator.add_instance("acme-01", "evolution", "open")
    simulator.set_history("acme-01", chats=3, messages_per_chat=4, group_chats=1, newest_at=datetime.now(UTC))
    instance_id = await make_instance(org, "acme-01", status="disconnected")
    body = orjson.dumps(opened("acme-01", datetime.now(UTC) - timedelta(seconds=2)))

    outcomes = []
    for _ in range(3):
        response = await client.post(
            f"/webhooks/evolution/{org}",
            content=body,
            headers={"content-type": "application/json", "x-webhook-secret": "org-secret"},
        )
        outcomes.append(response.json()["outcome"])
    await wait_for_import_starts()

    assert outcomes == ["applied", "duplicate", "duplicate"]
    (run,) = await import_runs(instance_id)
    assert run.parameters["trigger"] == "connect"
    assert run.parameters["connection_key"].startswith(f"import:{instance_id}:")
    assert run.idempotency_key == run.parameters["connection_key"]

    overlapping = await sync_status(mode="apply")  # a sync that sees the same connection starts nothing new
    assert overlapping.applied == 0
    assert [r.id for r in await import_runs(instance_id)] == [run.id]

    finished = await wait_for_run(run.id, timeout=90)
    assert finished.state == "Completed"
    assert await count("messages") == 12 and await count("conversations") == 3
    async with session_scope() as session:
        stored = (await session.execute(text("SELECT trigger, connection_key, state FROM import_runs"))).one()
    assert tuple(stored) == ("connect", run.parameters["connection_key"], "completed")


async def test_sync_transition_to_connected_starts_the_import(simulator) -> None:
    org = await make_organization()
    simulator.add_instance("evo-sync", "evolution", "open")
    simulator.set_history("evo-sync", chats=2, messages_per_chat=3, newest_at=datetime.now(UTC))
    instance_id = await make_instance(org, "evo-sync", status="disconnected")

    report = await sync_status(mode="apply")

    assert report.became_connected == [instance_id]
    (run,) = await import_runs(instance_id)
    assert run.parameters["trigger"] == "sync" and run.parameters["connection_key"]
    assert (await wait_for_run(run.id, timeout=90)).state == "Completed"
    assert await count("messages") == 6

    await sync_status(mode="apply")  # imported since it connected: nothing more to start
    assert len(await import_runs(instance_id)) == 1


async def test_pending_imports_covers_never_finished_and_new_connections() -> None:
    org = await make_organization()
    now = datetime.now(UTC)
    ids = {
        name: await make_instance(org, name, status="connected")
        for name in ("never", "failed", "dead", "busy", "done", "reconnected")
    }
    await make_instance(org, "offline", status="disconnected")
    await make_instance(org, "mega", gateway="megaapi", status="connected")
    runs = {
        "failed": ("failed", now - timedelta(hours=1), now),
        "dead": ("running", now - timedelta(hours=2), None),
        "busy": ("running", now - timedelta(minutes=1), now),
        "done": ("completed", now - timedelta(hours=1), None),
        "reconnected": ("completed", now - timedelta(days=2), None),
    }
    async with session_scope() as session:
        for name, instance_id in ids.items():
            connected = now - timedelta(days=1) if name != "reconnected" else now - timedelta(hours=3)
            await session.execute(
                text(
                    "INSERT INTO whatsapp_sessions (instance_id, status, connected_at, last_activity_at) "
                    "VALUES (:i, 'active', :c, :c)"
                ),
                {"i": instance_id, "c": connected},
            )
        for name, (state, started, beat) in runs.items():
            await session.execute(
                text(
                    "INSERT INTO import_runs (instance_id, trigger, state, started_at, cursor) VALUES "
                    "(:i, 'connect', :s, :t, CAST(:cursor AS jsonb))"
                ),
                {
                    "i": ids[name],
                    "s": state,
                    "t": started,
                    "cursor": orjson.dumps({"at": beat.isoformat()} if beat else {}).decode(),
                },
            )
        pending = await pending_imports(session, gateways=["evolution"], first=[ids["reconnected"]])

    reasons = {item.instance_id: item.reason for item in pending}
    assert reasons == {
        ids["reconnected"]: "connected",
        ids["never"]: "never_imported",
        ids["failed"]: "unfinished",
        ids["dead"]: "unfinished",
    }
    assert pending[0].instance_id == ids["reconnected"]  # just-connected instances first
