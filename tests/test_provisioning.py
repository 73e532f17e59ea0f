"""Provisioning (issue 11 §1, seed 003) end to end: the API creates and connects instances at the simulator over
loopback, the simulator's webhooks come back to the API, and PostgreSQL holds one row per instance."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from api.main import create_app
from core.errors import GatewayInstanceExists, GatewayNotSupported
from core.settings import get_settings
from db.engine import dispose_engine, session_scope
from gateways.registry import build_gateway
from gateways.simulator import SimulatorState, WebhookEmitter
from gateways.simulator.server import SimulatorServer
from gateways.webhook_payloads import QR_LIMIT_REASON
from tests.factories import auth_headers, count, history, instance_row, make_organization


def decode_qr(data_url: str) -> str:
    """The text a phone reads from a QR PNG data URL."""
    import zxingcpp
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    found = zxingcpp.read_barcodes(image)
    assert found, "no QR code in the image"
    return str(found[0].text)


@pytest.fixture
def default_gateway(simulator_server: SimulatorServer) -> Iterator[None]:
    """Both simulated gateways are configured: make Evolution the default, and let webhooks go to the API's URL."""
    saved = {k: os.environ.get(k) for k in ("ZAPSYNC_DEFAULT_GATEWAY", "WEBHOOK_URL")}
    os.environ["ZAPSYNC_DEFAULT_GATEWAY"] = "evolution"
    os.environ.pop("WEBHOOK_URL", None)
    get_settings.cache_clear()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture
async def api(default_gateway: None, database: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API served over loopback HTTP (so the simulator's webhooks can reach it)."""
    async with (
        SimulatorServer(create_app(check_database=False), on_stop=dispose_engine) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        yield http


@pytest.fixture
async def emitter(simulator: SimulatorState) -> AsyncIterator[WebhookEmitter]:
    """The simulator's webhook deliveries (to each instance's own webhook, as zapsync configured it)."""
    async with WebhookEmitter(simulator, evolution_url=None, megaapi_url=None) as emitting:
        yield emitting


async def live_events(kind: str) -> list[dict[str, Any]]:
    async with session_scope() as session:
        rows = await session.execute(
            text("SELECT payload FROM live_events WHERE kind = :kind ORDER BY id"), {"kind": kind}
        )
        return [r[0] for r in rows.all()]


async def import_items(instance_id: uuid.UUID) -> int:
    async with session_scope() as session:
        found = await session.execute(
            text("SELECT count(*) FROM work_items WHERE kind = 'import' AND instance_id = :id"), {"id": instance_id}
        )
        return int(found.scalar_one())


async def test_connect_creates_the_user_instance_with_zapsync_webhook_and_shows_a_scannable_qr(
    api: httpx.AsyncClient, simulator: SimulatorState
) -> None:
    org = await make_organization("Acme", secret="acme-secret")
    headers = await auth_headers(org)

    response = await api.post("/users/u-42/whatsapp/connect", headers=headers)

    assert response.status_code == 200, response.text
    body = response.json()
    inst = simulator.get("user_u-42", "evolution")
    assert inst is not None and inst.qr_code is not None
    assert body["instance_name"] == "user_u-42" and body["user_id"] == "u-42" and body["gateway"] == "evolution"
    assert body["status"] == "qr_pending"
    assert body["qr_code"] == inst.qr_code  # the raw string, not an image
    assert decode_qr(body["qr_image"]) == inst.qr_code
    assert inst.webhook is not None
    assert inst.webhook["url"] == f"{str(api.base_url).rstrip('/')}/webhooks/evolution/{org}"
    assert inst.webhook["headers"] == {"X-Webhook-Secret": "acme-secret"}
    assert {"CONNECTION_UPDATE", "QRCODE_UPDATED", "MESSAGES_UPSERT"} <= set(inst.webhook["events"])
    row = await instance_row(uuid.UUID(body["instance_id"]))
    assert row["qr_code"] == inst.qr_code and row["organization_id"] == org
    assert await history(row["id"]) == [("disconnected", "qr_pending", "api")]
    [qr] = await live_events("instance.qr")
    assert qr == {
        "instance_id": body["instance_id"],
        "instance_name": "user_u-42",
        "qr_code": inst.qr_code,
        "qr_image": body["qr_image"],
        "pairing_code": None,
    }

    read = await api.get("/users/u-42/whatsapp", headers=headers)
    assert read.status_code == 200 and read.json()["qr_code"] == inst.qr_code
    assert (await api.get("/users/nobody/whatsapp", headers=headers)).status_code == 404


async def test_two_concurrent_connects_make_one_gateway_instance_and_one_row(
    api: httpx.AsyncClient, simulator: SimulatorState
) -> None:
    org = await make_organization()
    headers = await auth_headers(org)

    first, second = await asyncio.gather(
        api.post("/users/twice/whatsapp/connect", headers=headers),
        api.post("/users/twice/whatsapp/connect", headers=headers),
    )

    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["instance_id"] == second.json()["instance_id"]
    assert simulator.calls["evolution.create"] == 1
    assert len(simulator.instances_of("evolution")) == 1
    assert await count("whatsapp_instances") == 1


async def test_scan_connects_the_number_through_the_webhook_and_queues_its_import(
    api: httpx.AsyncClient, simulator: SimulatorState, emitter: WebhookEmitter
) -> None:
    org = await make_organization()
    headers = await auth_headers(org)
    body = (await api.post("/users/scanner/whatsapp/connect", headers=headers)).json()
    instance_id = uuid.UUID(body["instance_id"])

    first_qr = simulator.require("user_scanner").qr_code
    refreshed = simulator.emit_qr("user_scanner")
    await emitter.flush()
    assert refreshed.code != first_qr
    assert (await instance_row(instance_id))["qr_code"] == refreshed.code
    assert [e["qr_code"] for e in await live_events("instance.qr")] == [first_qr, refreshed.code]
    assert (await live_events("instance.qr"))[-1]["instance_id"] == str(instance_id)

    simulator.scan("user_scanner")
    await emitter.flush()

    row = await instance_row(instance_id)
    assert row["status"] == "connected" and row["qr_code"] is None
    owner = simulator.require("user_scanner").owner_jid
    assert owner is not None and row["phone_number"] == owner.split("@")[0]
    assert await import_items(instance_id) == 1
    read = (await api.get("/users/scanner/whatsapp", headers=headers)).json()
    assert read["status"] == "connected" and read["qr_code"] is None and read["phone_number"]
    assert emitter.stats["failed"] == 0


async def test_qr_limit_ends_in_error_with_a_reason(
    api: httpx.AsyncClient, simulator: SimulatorState, emitter: WebhookEmitter
) -> None:
    simulator.configure(qrcode_limit=2)
    org = await make_organization()
    headers = await auth_headers(org)
    body = (await api.post("/users/slow/whatsapp/connect", headers=headers)).json()

    simulator.emit_qr("user_slow")
    limit = simulator.emit_qr("user_slow")
    await emitter.flush()

    assert limit.limit_reached
    row = await instance_row(uuid.UUID(body["instance_id"]))
    assert row["status"] == "error"
    assert row["status_reason"] == QR_LIMIT_REASON == "QR code limit reached: ask for a new QR code"
    read = (await api.get("/users/slow/whatsapp", headers=headers)).json()
    assert read["status"] == "error" and read["qr_code"] is None

    # Reconnecting asks for a new session: a new QR code.
    again = await api.post("/users/slow/whatsapp/reconnect", headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "qr_pending"
    assert again.json()["qr_code"] == simulator.require("user_slow").qr_code


async def test_logout_and_delete_of_a_user_instance(
    api: httpx.AsyncClient, simulator: SimulatorState, emitter: WebhookEmitter
) -> None:
    org = await make_organization()
    headers = await auth_headers(org)
    body = (await api.post("/users/leaver/whatsapp/connect", headers=headers)).json()
    simulator.scan("user_leaver")
    await emitter.flush()

    out = await api.delete("/users/leaver/whatsapp", headers=headers)
    assert out.status_code == 200, out.text
    assert out.json()["logged_out"] is True and out.json()["row_deleted"] is False
    row = await instance_row(uuid.UUID(body["instance_id"]))
    assert row["status"] == "disconnected" and row["logged_out"] is True
    assert simulator.require("user_leaver").live_state == "close"

    gone = await api.delete("/users/leaver/whatsapp", params={"delete": "true"}, headers=headers)
    assert gone.status_code == 200, gone.text
    assert gone.json()["deleted_at_gateway"] is True and gone.json()["row_deleted"] is True
    assert simulator.get("user_leaver") is None
    assert await count("whatsapp_instances") == 0
    assert (await api.get("/users/leaver/whatsapp", headers=headers)).status_code == 404


async def test_numbers_without_a_user(
    api: httpx.AsyncClient, simulator: SimulatorState, emitter: WebhookEmitter
) -> None:
    org = await make_organization()
    headers = await auth_headers(org)
    created = await api.post("/instances", json={"instance_name": "front-desk"}, headers=headers)
    assert created.status_code == 200, created.text
    instance_id = created.json()["instance_id"]
    assert created.json()["user_id"] is None
    again = await api.post("/instances", json={"instance_name": "front-desk"}, headers=headers)
    assert again.json()["instance_id"] == instance_id and simulator.calls["evolution.create"] == 1

    qr = (await api.get(f"/instances/{instance_id}/qr", headers=headers)).json()
    assert decode_qr(qr["qr_image"]) == simulator.require("front-desk").qr_code

    simulator.scan("front-desk")
    await emitter.flush()
    out = await api.post(f"/instances/{instance_id}/logout", headers=headers)
    assert out.status_code == 200 and out.json()["status"] == "disconnected"
    # Reconnect now: the paired session comes back without a QR code.
    back = await api.post(f"/instances/{instance_id}/restart", headers=headers)
    assert back.status_code == 200, back.text
    assert simulator.require("front-desk").live_state == "connecting"
    assert back.json()["qr_code"] is not None  # logged out: a new scan is needed

    deleted = await api.delete(f"/instances/{instance_id}", params={"delete_at_gateway": "true"}, headers=headers)
    assert deleted.status_code == 200 and deleted.json()["deleted_at_gateway"] is True
    assert simulator.get("front-desk") is None and await count("whatsapp_instances") == 0


async def test_another_organization_gets_404_on_every_route(api: httpx.AsyncClient, simulator: SimulatorState) -> None:
    a, b = await make_organization("A"), await make_organization("B")
    a_headers, b_headers = await auth_headers(a), await auth_headers(b)
    user = (await api.post("/users/alice/whatsapp/connect", headers=a_headers)).json()
    named = (await api.post("/instances", json={"instance_name": "a-desk"}, headers=a_headers)).json()
    calls = dict(simulator.calls)

    attempts = [
        ("POST", "/users/alice/whatsapp/connect"),
        ("GET", "/users/alice/whatsapp"),
        ("POST", "/users/alice/whatsapp/reconnect"),
        ("DELETE", "/users/alice/whatsapp?delete=true"),
        ("GET", f"/instances/{named['instance_id']}/qr"),
        ("POST", f"/instances/{named['instance_id']}/logout"),
        ("POST", f"/instances/{named['instance_id']}/restart"),
        ("DELETE", f"/instances/{named['instance_id']}?delete_at_gateway=true"),
        ("DELETE", f"/instances/{user['instance_id']}"),
    ]
    for method, path in attempts:
        response = await api.request(method, path, headers=b_headers)
        assert response.status_code == 404, (method, path, response.text)
        assert str(a) not in response.json()["detail"]
    assert dict(simulator.calls) == calls  # nothing reached the gateway
    assert await count("whatsapp_instances") == 2
    assert (await api.get("/users/alice/whatsapp", headers=a_headers)).json()["status"] == "qr_pending"
    # An admin may act for an organization it names.
    admin = {"authorization": "Bearer test-admin-token"}
    assert (await api.get("/users/alice/whatsapp", headers=admin)).status_code == 200
    need_org = await api.post("/users/bob/whatsapp/connect", headers=admin)
    assert need_org.status_code == 422 and "organization_id" in need_org.json()["detail"]
    as_b = await api.post("/users/bob/whatsapp/connect", json={"organization_id": str(b)}, headers=admin)
    assert (
        as_b.status_code == 200 and (await instance_row(uuid.UUID(as_b.json()["instance_id"])))["organization_id"] == b
    )


async def test_refusals_say_what_to_do(api: httpx.AsyncClient, simulator: SimulatorState) -> None:
    org = await make_organization()
    headers = await auth_headers(org)
    bad = await api.post("/users/bad%20id!/whatsapp/connect", headers=headers)
    assert bad.status_code == 422
    too_long = await api.post(f"/users/{'x' * 129}/whatsapp/connect", headers=headers)
    assert too_long.status_code == 422
    unknown = await api.post("/users/u1/whatsapp/connect", json={"gateway": "nope"}, headers=headers)
    assert unknown.status_code == 422 and "no gateway 'nope'" in unknown.json()["detail"]

    async with session_scope() as session:
        await session.execute(text("UPDATE organizations SET webhook_secret_sealed = NULL WHERE id = :id"), {"id": org})
    old = await api.post("/users/u1/whatsapp/connect", headers=headers)
    assert old.status_code == 409
    assert f"zapsync org rotate-secret {org}" in old.json()["detail"]
    assert await count("whatsapp_instances") == 0 and simulator.calls["evolution.create"] == 0


async def test_several_gateways_and_no_default_is_a_422(
    simulator_server: SimulatorServer, client: httpx.AsyncClient
) -> None:
    get_settings.cache_clear()
    assert get_settings().default_gateway is None
    org = await make_organization()
    response = await client.post("/users/u1/whatsapp/connect", headers=await auth_headers(org))
    assert response.status_code == 422
    assert "ZAPSYNC_DEFAULT_GATEWAY" in response.json()["detail"]


async def test_gateway_clients_create_connect_and_delete(simulator: SimulatorState) -> None:
    settings = get_settings()
    configs = settings.gateways()
    evolution = build_gateway("evolution", configs["evolution"], settings=settings)
    megaapi = build_gateway("megaapi", configs["megaapi"], settings=settings)
    try:
        created = await evolution.create_instance("evo-1", webhook_url="http://x/h", webhook_headers={"X-A": "1"})
        assert created.status == "qr_pending" and created.qr_code == simulator.require("evo-1").qr_code
        with pytest.raises(GatewayInstanceExists):
            await evolution.create_instance("evo-1")
        simulator.add_instance("evo-2", "evolution", "close")
        waiting = await evolution.connect("evo-2")
        assert waiting.qr_code is not None and waiting.qr_code.startswith("2@")
        await evolution.delete_instance("evo-2")
        assert simulator.get("evo-2") is None

        mega = await megaapi.create_instance(
            "mega-1", webhook_url="http://x/h", webhook_headers={"X-Webhook-Secret": "s"}
        )
        assert mega.status == "qr_pending" and mega.qr_code is not None
        assert decode_qr(mega.qr_code) == simulator.require("mega-1").qr_code  # MegaAPI gives only the image
        assert simulator.require("mega-1").webhook["url"] == "http://x/h?secret=s"  # type: ignore[index]
        with pytest.raises(GatewayInstanceExists):
            await megaapi.create_instance("mega-1")
        with pytest.raises(GatewayNotSupported, match="MegaAPI panel"):
            await megaapi.delete_instance("mega-1")
    finally:
        await evolution.aclose()
        await megaapi.aclose()


async def test_cli_connect_prints_the_qr_and_exits_0_once_scanned(
    api: httpx.AsyncClient, simulator: SimulatorState, emitter: WebhookEmitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from db.repositories.live_events import listener_conninfo, listening
    from zapsync import cli

    monkeypatch.setattr(cli, "configure_prefect_env", lambda: None)
    os.environ["WEBHOOK_URL"] = str(api.base_url).rstrip("/")  # the default_gateway fixture restores it
    get_settings.cache_clear()
    org = await make_organization()
    args = ["instance", "connect", "--user", "cli-user", "--org", str(org), "--timeout", "60"]
    async with listening(listener_conninfo()) as conn:
        run = asyncio.create_task(asyncio.to_thread(CliRunner().invoke, cli.app, args, catch_exceptions=False))
        # The CLI committed the instance with its QR code (its instance.qr event is notified on commit): scan it.
        await asyncio.wait_for(anext(aiter(conn.notifies())), timeout=60)
    simulator.scan("user_cli-user")
    result = await asyncio.wait_for(run, timeout=90)

    assert result.exit_code == 0, result.output
    assert "▀" in result.output or "█" in result.output  # the QR code, drawn in the terminal
    assert "Connected: user_cli-user" in result.output
    row = await instance_row((await live_events("instance.qr"))[0]["instance_id"])
    assert row["status"] == "connected" and row["user_id"] == "cli-user"
    inst = simulator.require("user_cli-user")
    assert inst.webhook is not None and inst.webhook["url"] == f"{os.environ['WEBHOOK_URL']}/webhooks/evolution/{org}"


def test_cli_adopt_lists_and_registers_untracked_instances(
    default_gateway: None, simulator: SimulatorState, database: str
) -> None:
    from typer.testing import CliRunner

    from db.engine import session_scope as scope
    from tests.factories import make_instance
    from zapsync import cli
    from zapsync.stack import run_async

    org = run_async(lambda: make_organization())
    run_async(lambda: make_instance(org, "tracked"))
    simulator.add_instance("tracked", "evolution", "open")
    simulator.add_instance("user_9f1c", "evolution", "open")
    simulator.add_instance("front", "evolution", "close")
    runner = CliRunner()

    listed = runner.invoke(cli.app, ["instance", "adopt", "--json"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    import json

    body = json.loads(listed.stdout)
    assert [(i["instance_name"], i["user_id"], i["registered"]) for i in body["untracked"]] == [
        ("front", None, False),
        ("user_9f1c", "9f1c", False),
    ]
    assert body["gateways_not_listable"] == ["megaapi"]
    refused = runner.invoke(cli.app, ["instance", "adopt", "--apply"], catch_exceptions=False)
    assert refused.exit_code == 2

    applied = runner.invoke(cli.app, ["instance", "adopt", "--org", str(org), "--apply", "--json"])
    assert applied.exit_code == 0, applied.output
    assert all(i["registered"] for i in json.loads(applied.stdout)["untracked"])

    async def users() -> dict[str, str | None]:
        async with scope() as session:
            rows = await session.execute(text("SELECT instance_name, user_id FROM whatsapp_instances"))
            return {r[0]: r[1] for r in rows.all()}

    assert run_async(users) == {"tracked": None, "user_9f1c": "9f1c", "front": None}
    again = runner.invoke(cli.app, ["instance", "adopt", "--json"], catch_exceptions=False)
    assert json.loads(again.stdout)["untracked"] == []


def test_cli_rotate_secret(database: str) -> None:
    from typer.testing import CliRunner

    from db.engine import session_scope as scope
    from db.repositories.organizations import webhook_secret
    from zapsync import cli
    from zapsync.stack import run_async

    org = run_async(lambda: make_organization())
    result = CliRunner().invoke(cli.app, ["org", "rotate-secret", str(org), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import json

    secret = json.loads(result.stdout)["webhook_secret"]

    async def stored() -> str | None:
        async with scope() as session:
            return await webhook_secret(session, org)

    assert secret != "org-secret" and run_async(stored) == secret
    missing = CliRunner().invoke(cli.app, ["org", "rotate-secret", str(uuid.uuid4())])
    assert missing.exit_code == 1 and "no organization" in missing.stderr
