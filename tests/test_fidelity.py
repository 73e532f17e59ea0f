"""Faithful to the real gateways (issue 12 §4): deletions, untracked floods, secrets in payloads, refused keys,
reasons of missing instances. Real PostgreSQL, the simulator over loopback, real Prefect runs for syncs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from sqlalchemy import text

from db.engine import session_scope
from tests.factories import count, history, instance_row, make_instance, make_organization


def evolution(event: str, instance: str, data: object, *, at: datetime | None = None) -> dict[str, object]:
    """A real-shaped Evolution v2 delivery (gateways.md §2.1), the instance token exposed in `apikey`."""
    return {
        "event": event,
        "instance": instance,
        "data": data,
        "destination": "https://sync.example/webhooks/evolution",
        "date_time": (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "sender": "5511999990000@s.whatsapp.net",
        "server_url": "https://evo.example",
        "apikey": "B5F0A0A1-INSTANCE-TOKEN-7C2D",
    }


async def post(client: httpx.AsyncClient, org: uuid.UUID, body: object) -> httpx.Response:
    return await client.post(
        f"/webhooks/evolution/{org}",
        content=orjson.dumps(body),
        headers={"content-type": "application/json", "x-webhook-secret": "org-secret"},
    )


async def live_kinds(org: uuid.UUID) -> list[str]:
    async with session_scope() as session:
        rows = await session.execute(
            text("SELECT kind FROM live_events WHERE organization_id = :org ORDER BY id"), {"org": org}
        )
        return [r[0] for r in rows.all()]


@pytest.mark.parametrize("event", ["instance.delete", "remove.instance"])
async def test_a_deletion_at_the_gateway_disconnects_the_instance(client: httpx.AsyncClient, event: str) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01", status="connected")

    response = await post(client, org, evolution(event, "acme-01", {"instanceName": "acme-01", "instanceId": "u1"}))

    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    row = await instance_row(instance_id)
    assert row["status"] == "disconnected" and row["status_reason"] == "deleted at the gateway"
    assert await history(instance_id) == [("connected", "disconnected", "webhook")]
    assert "instance.status" in await live_kinds(org)


async def test_a_deletion_of_a_disconnected_instance_writes_its_reason(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01", observed_at=datetime.now(UTC) - timedelta(minutes=5))

    response = await post(
        client, org, evolution("remove.instance", "acme-01", {"instanceName": "acme-01", "instanceId": "u1"})
    )

    assert response.status_code == 200
    row = await instance_row(instance_id)
    assert row["status"] == "disconnected" and row["status_reason"] == "deleted at the gateway"
    assert await history(instance_id) == []


@pytest.mark.usefixtures("prefect_server")
async def test_an_instance_missing_at_the_gateway_gets_its_reason_without_a_status_change(simulator) -> None:
    from flows.sync_status import sync_status

    org = await make_organization()
    instance_id = await make_instance(org, "gone-01", status="disconnected")

    report = await sync_status(mode="apply")

    assert report.checked == 1 and report.drifted == 0
    row = await instance_row(instance_id)
    assert row["status"] == "disconnected" and row["status_reason"] == "instance not found at the gateway"
    assert await count("instance_status_changes") == 0


def _client_without_memory() -> httpx.AsyncClient:
    """The API in-process with its in-memory repeat filter off: every delivery reaches PostgreSQL."""
    from api.inbox import RepeatFilter
    from api.main import create_app

    app = create_app(check_database=False)
    app.state.repeat_filter = RepeatFilter(0)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync")


async def test_a_reconnect_flood_from_an_untracked_instance_adds_at_most_one_row_per_event(database: str) -> None:
    org = await make_organization()
    await make_instance(org, "tracked-01")
    start = datetime.now(UTC) - timedelta(seconds=30)
    outcomes: list[str] = []
    async with _client_without_memory() as client:
        for i in range(600):
            at = start + timedelta(milliseconds=40 * i)
            state = "connecting" if i % 2 else "close"
            data = {"instance": "stranger", "state": state, "statusReason": 428 if i % 2 else 401}
            response = await post(client, org, evolution("connection.update", "stranger", data, at=at))
            outcomes.append(response.json()["outcome"])
            if i % 100 == 0:  # the loop's other deliveries: a QR code and Evolution's status.instance
                qr = {"qrcode": {"instance": "stranger", "pairingCode": None, "code": f"2@{i}", "base64": ""}}
                await post(client, org, evolution("qrcode.updated", "stranger", qr, at=at))
                await post(client, org, evolution("status.instance", "stranger", {"status": "closed"}, at=at))
                await post(client, org, evolution("chats.upsert", "tracked-01", [{"remoteJid": f"{i}@g.us"}], at=at))

    assert outcomes[0] == "ignored" and set(outcomes[1:]) == {"duplicate"}
    async with session_scope() as session:
        rows = (
            await session.execute(
                text("SELECT instance_name, event, count(*) FROM webhook_events GROUP BY 1, 2 ORDER BY 1, 2")
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("stranger", "connection.update", 1),
        ("stranger", "qrcode.updated", 1),
        ("stranger", "status.instance", 1),
        ("tracked-01", "chats.upsert", 6),  # a tracked instance's events are all kept
    ]


async def test_an_untracked_instances_row_is_refreshed_after_the_window_not_duplicated(
    client: httpx.AsyncClient,
) -> None:
    org = await make_organization()
    first = evolution("connection.update", "stranger", {"instance": "stranger", "state": "connecting"})
    await post(client, org, first)
    async with session_scope() as session:
        await session.execute(text("UPDATE webhook_events SET received_at = now() - interval '2 hours'"))

    later = datetime.now(UTC) + timedelta(seconds=1)
    refreshed = await post(
        client, org, evolution("connection.update", "stranger", {"instance": "stranger", "state": "open"}, at=later)
    )

    assert refreshed.json()["outcome"] == "ignored"
    async with session_scope() as session:
        rows = (await session.execute(text("SELECT payload, received_at FROM webhook_events"))).all()
    assert len(rows) == 1
    assert rows[0][0]["data"]["state"] == "open"
    assert rows[0][1] > datetime.now(UTC) - timedelta(minutes=5)


TOKEN = "B5F0A0A1-INSTANCE-TOKEN-7C2D"


@pytest.mark.pure
def test_token_like_fields_are_redacted_at_any_depth() -> None:
    from core.redaction import REDACTED, redact

    payload = {
        "apikey": TOKEN,
        "ApiKey": None,
        "data": {
            "key": {"id": "3EB0", "remoteJid": "5511@s.whatsapp.net"},
            "webhook": {"headers": {"jwt_key": "k", "X-Webhook-Secret": "s", "Authorization": "Bearer t"}},
            "rows": [{"accessToken": "t", "passwordHash": "h", "name": "Ana"}],
            "credentials": {"user": "u"},
        },
    }

    clean = redact(payload)

    assert clean["apikey"] == REDACTED and clean["ApiKey"] is None
    assert clean["data"]["key"] == payload["data"]["key"]
    assert set(clean["data"]["webhook"]["headers"].values()) == {REDACTED}
    assert clean["data"]["rows"] == [{"accessToken": REDACTED, "passwordHash": REDACTED, "name": "Ana"}]
    assert clean["data"]["credentials"] == REDACTED
    assert payload["apikey"] == TOKEN  # the input is left as it was


async def test_stored_payloads_and_logs_keep_no_instance_token(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    org = await make_organization()
    await make_instance(org, "acme-01")
    message = {
        "key": {"remoteJid": "5511977776666@s.whatsapp.net", "fromMe": False, "id": "3EB0C0BD05DC"},
        "pushName": "Ana",
        "status": "DELIVERY_ACK",
        "message": {"conversation": "oi"},
        "messageType": "conversation",
        "messageTimestamp": int(datetime.now(UTC).timestamp()),
        "instanceId": "uuid",
        "source": "android",
    }
    deliveries = [
        evolution("connection.update", "acme-01", {"instance": "acme-01", "state": "connecting", "statusReason": 200}),
        evolution("messages.upsert", "acme-01", message),
        evolution("chats.upsert", "acme-01", [{"remoteJid": "5511977776666@s.whatsapp.net", "token": TOKEN}]),
        evolution("connection.update", "stranger", {"instance": "stranger", "state": "connecting"}),
        evolution("status.instance", "acme-01", {"status": "closed", "apiKey": TOKEN}),
    ]

    answers = [await post(client, org, body) for body in deliveries]

    assert [a.json()["outcome"] for a in answers] == ["applied", "applied", "stored", "ignored", "stored"]
    async with session_scope() as session:
        stored = (await session.execute(text("SELECT payload::text FROM webhook_events"))).scalars().all()
    assert len(stored) == 5
    assert all(TOKEN not in payload and '"apikey": "[redacted]"' in payload for payload in stored)
    assert "[WEBHOOK]" in caplog.text and TOKEN not in caplog.text


@pytest.fixture
def refused_evolution_key(simulator):
    """The Evolution gateway configured with a key the simulator refuses (401), restored afterwards."""
    import os

    from core.settings import get_settings

    right = os.environ["EVOLUTION_API_KEY"]
    os.environ["EVOLUTION_API_KEY"] = "not-the-key"
    get_settings.cache_clear()
    yield simulator
    os.environ["EVOLUTION_API_KEY"] = right
    get_settings.cache_clear()


@pytest.mark.usefixtures("prefect_server")
async def test_a_refused_key_is_reported_as_an_authentication_failure(refused_evolution_key, client) -> None:
    from flows.sync_status import sync_status

    simulator = refused_evolution_key
    org = await make_organization()
    simulator.add_instance("evo-01", "evolution", "open")
    simulator.add_instance("mega-01", "megaapi", "open")
    evo = await make_instance(org, "evo-01", status="disconnected")
    mega = await make_instance(org, "mega-01", gateway="megaapi", status="disconnected")

    report = await sync_status(mode="apply")

    assert report.failed_gateways == ["evolution"]
    error = report.by_gateway["evolution"].auth_error
    assert error and "HTTP 401" in error and "authentication failed" in error and "EVOLUTION_API_KEY" in error
    assert report.by_gateway["megaapi"].auth_error is None
    assert (await instance_row(evo))["status"] == "disconnected"  # a refused key changes no status
    assert (await instance_row(mega))["status"] == "connected"
    assert "Authentication failed" in report.to_markdown()

    metrics = (await client.get("/metrics", headers={"authorization": "Bearer test-admin-token"})).text
    assert 'zapsync_gateway_auth_failed{gateway="evolution"} 1.0' in metrics
    assert 'zapsync_gateway_auth_failed{gateway="megaapi"} 0.0' in metrics

    from tests.factories import auth_headers

    page = await client.get("/", headers=await auth_headers(org))
    assert 'id="gateway-auth-evolution"' in page.text and "EVOLUTION_API_KEY" in page.text


@pytest.mark.usefixtures("prefect_server", "served_deployments")
async def test_the_cron_answers_502_after_a_sync_that_could_not_read_a_gateway(refused_evolution_key, client) -> None:
    from flows.runs import wait_for_run
    from flows.sync_status import sync_status

    org = await make_organization()
    refused_evolution_key.add_instance("evo-01", "evolution", "open")
    await make_instance(org, "evo-01", status="disconnected")
    await sync_status(mode="apply")

    cron = await client.get("/cron/sync-status", headers={"authorization": "Bearer test-cron-secret"})

    assert cron.status_code == 502, cron.text
    assert cron.json()["failed_gateways"] == ["evolution"] and "EVOLUTION_API_KEY" in cron.json()["detail"]
    assert (await wait_for_run(uuid.UUID(cron.json()["flow_run"]["id"]), timeout=120)).final  # it did start


@pytest.mark.usefixtures("prefect_server")
def test_zapsync_sync_exits_non_zero_when_a_gateway_refuses_its_key(refused_evolution_key, monkeypatch) -> None:
    from typer.testing import CliRunner

    from zapsync import cli

    monkeypatch.setattr(cli, "configure_prefect_env", lambda: None)
    refused_evolution_key.add_instance("evo-01", "evolution", "open")
    org = CliRunner().invoke(cli.app, ["org", "create", "Acme", "--json"], catch_exceptions=False)
    org_id = orjson.loads(org.stdout)["id"]
    CliRunner().invoke(cli.app, ["instance", "add", "--org", org_id, "--gateway", "evolution", "evo-01"])

    result = CliRunner().invoke(cli.app, ["sync", "--org", org_id], catch_exceptions=False)

    assert result.exit_code == 1
    assert "Authentication failed at gateway evolution" in result.stdout
    assert "could not read gateway(s) evolution" in result.stderr and "EVOLUTION_API_KEY" in result.stderr
    status = CliRunner().invoke(cli.app, ["status"], catch_exceptions=False)
    assert status.exit_code == 0 and "Authentication failed at gateway evolution" in status.stderr
