"""Health monitor: one alert at 2 failures, one reconnect at 3, never for a logged-out instance, one recovery event;
an unreachable gateway is the gateway's failure, not its instances'."""

from __future__ import annotations

import uuid

import httpx
import pytest

from api.main import create_app
from db.engine import session_scope
from db.repositories.health import gateway_health
from flows.monitor_health import monitor_health
from tests.factories import instance_row, make_instance, make_organization
from tests.maintenance_rows import add_session, ago, live_events, org_token, set_org

pytestmark = pytest.mark.usefixtures("prefect_server")


async def _connected(org: uuid.UUID, name: str, *, gateway: str = "evolution") -> uuid.UUID:
    """An instance the database knows as connected, with its open session (it has been paired)."""
    instance_id = await make_instance(org, name, gateway=gateway, status="connected", observed_at=ago(minutes=10))
    await add_session(instance_id, connected_at=ago(hours=2), disconnected_at=None)
    return instance_id


def _reconnect_calls(simulator, name: str) -> int:
    return sum(
        n
        for key, n in simulator.calls.items()
        if key.split(":", 1)[-1] == name and key.split(".", 1)[1].split(":")[0] in ("restart", "connect")
    )


async def _kinds(instance_id: uuid.UUID) -> list[str]:
    return [e["kind"] for e in await live_events("health.") if e["payload"].get("instance_id") == str(instance_id)]


async def test_two_failures_alert_once_three_reconnect_once_and_recovery_is_announced_once(simulator) -> None:
    org = await make_organization()
    simulator.add_instance("evo-h1", "evolution", "open")
    instance_id = await _connected(org, "evo-h1")
    healthy = await monitor_health()
    assert healthy.healthy == 1 and (await instance_row(instance_id))["health"] == "healthy"

    # A silent drop: Evolution's column still says "open"; the monitor's live confirmation sees "close".
    simulator.set_state("evo-h1", "close", reason_code=428)
    first = await monitor_health()
    row = await instance_row(instance_id)
    assert (row["consecutive_failures"], row["health"], row["status"]) == (1, "disconnected", "disconnected")
    assert first.alerts == 0 and await _kinds(instance_id) == []

    second = await monitor_health()
    assert second.alerts == 1 and await _kinds(instance_id) == ["health.alert"]
    assert _reconnect_calls(simulator, "evo-h1") == 0

    third = await monitor_health()
    assert third.reconnects == 1 and third.reconnect_failures == 0
    # A closed Evolution session is started with `connect` (restart refuses a closed socket).
    assert simulator.calls["evolution.connect:evo-h1"] == 1 and _reconnect_calls(simulator, "evo-h1") == 1
    assert await _kinds(instance_id) == ["health.alert", "health.reconnect"]

    for _ in range(2):  # still failing (now waiting for a QR scan): no second alert, no second reconnect
        await monitor_health()
    assert _reconnect_calls(simulator, "evo-h1") == 1
    assert (await instance_row(instance_id))["consecutive_failures"] == 5

    simulator.set_state("evo-h1", "open")
    recovered = await monitor_health()
    assert recovered.recoveries == 1
    row = await instance_row(instance_id)
    assert (row["consecutive_failures"], row["health"], row["status"]) == (0, "healthy", "connected")
    await monitor_health()
    assert await _kinds(instance_id) == ["health.alert", "health.reconnect", "health.recovered"]
    alert = next(e for e in await live_events("health.alert"))
    assert alert["organization_id"] == org and alert["payload"]["consecutive_failures"] == 2


async def test_logged_out_or_auto_reconnect_off_is_never_reconnected(simulator) -> None:
    org = await make_organization()
    manual = await make_organization("Manual")
    await set_org(manual, auto_reconnect=False)
    for name in ("evo-out", "evo-manual"):
        simulator.add_instance(name, "evolution", "open")
    logged_out = await _connected(org, "evo-out")
    no_auto = await _connected(manual, "evo-manual")
    simulator.set_state("evo-out", "close", reason_code=401)  # WhatsApp logged the number out
    simulator.set_state("evo-manual", "close", reason_code=428)

    reports = [await monitor_health() for _ in range(4)]

    assert sum(r.reconnects for r in reports) == 0
    assert _reconnect_calls(simulator, "evo-out") == 0 and _reconnect_calls(simulator, "evo-manual") == 0
    assert (await instance_row(logged_out))["logged_out"] is True
    assert await _kinds(logged_out) == ["health.alert"] and await _kinds(no_auto) == ["health.alert"]
    [alert] = [e for e in await live_events("health.alert") if e["payload"]["instance_id"] == str(logged_out)]
    assert "QR code" in alert["payload"]["message"] and alert["payload"]["reconnect"] is False


async def test_a_gateway_outage_counts_against_the_gateway_not_its_instances(simulator) -> None:
    org = await make_organization()
    ids = {}
    for name, provider in (
        ("evo-1", "evolution"),
        ("evo-2", "evolution"),
        ("mega-1", "megaapi"),
        ("mega-2", "megaapi"),
    ):
        simulator.add_instance(name, provider, "open")
        ids[name] = await _connected(org, name, gateway=provider)
    assert (await monitor_health()).healthy == 4

    simulator.configure(outage=True)
    during = [await monitor_health() for _ in range(3)]
    for name, instance_id in ids.items():
        row = await instance_row(instance_id)
        assert (row["consecutive_failures"], row["health"], row["status"]) == (0, "healthy", "connected"), name
    assert all(r.not_judged == 4 and r.failing == 0 and r.alerts == 0 for r in during)
    assert {name: g.health for name, g in during[0].by_gateway.items()} == {
        "evolution": "unhealthy",
        "megaapi": "unhealthy",
    }
    assert during[0].by_gateway["evolution"].transition == "unhealthy"
    assert during[2].by_gateway["megaapi"].consecutive_failures == 3
    down = await live_events("gateway.unhealthy")
    assert sorted(e["payload"]["gateway"] for e in down) == ["evolution", "megaapi"]  # once each, not per run
    assert await live_events("health.") == []
    async with session_scope() as session:
        assert (await gateway_health(session, "megaapi"))["health"] == "unhealthy"

    simulator.configure(outage=False)
    after = await monitor_health()
    assert after.healthy == 4 and after.not_judged == 0
    assert sorted(e["payload"]["gateway"] for e in await live_events("gateway.recovered")) == ["evolution", "megaapi"]
    assert sum(_reconnect_calls(simulator, name) for name in ids) == 0


async def test_instance_health_shows_problems_and_uptime_from_sessions(simulator) -> None:
    org = await make_organization()
    simulator.add_instance("evo-up", "evolution", "open")
    instance_id = await make_instance(org, "evo-up", status="connected", observed_at=ago(minutes=5))
    other = await make_instance(await make_organization("Other"), "other-01")
    async with session_scope() as session:
        from sqlalchemy import text

        await session.execute(text("UPDATE whatsapp_instances SET created_at = now() - interval '10 days'"))
    await add_session(instance_id, connected_at=ago(hours=30), disconnected_at=ago(hours=18))  # 6 h of the last 24
    await add_session(instance_id, connected_at=ago(hours=6), disconnected_at=None)  # and the last 6 h
    await monitor_health()

    app = create_app(check_database=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
        headers = await org_token(org)
        mine = await client.get(f"/instances/{instance_id}/health", headers=headers)
        theirs = await client.get(f"/instances/{other}/health", headers=headers)

    assert theirs.status_code == 404
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["health"] == "healthy" and body["consecutive_failures"] == 0 and body["issues"] == []
    assert body["uptime"]["ratios"]["24h"] == pytest.approx(0.5, abs=0.01)
    assert body["uptime"]["current_session_seconds"] == pytest.approx(6 * 3600, abs=120)
    assert body["uptime"]["sessions"] == 2
    assert body["gateway_health"]["health"] == "healthy"


async def test_an_instance_the_monitor_sees_connected_gets_its_import_queued(simulator) -> None:
    from sqlalchemy import text

    org = await make_organization()
    simulator.add_instance("evo-back", "evolution", "open")
    simulator.add_instance("mega-back", "megaapi", "open")
    back = await make_instance(org, "evo-back", status="disconnected", observed_at=ago(minutes=10))
    await make_instance(org, "mega-back", gateway="megaapi", status="disconnected", observed_at=ago(minutes=10))

    await monitor_health()

    async with session_scope() as session:
        items = (await session.execute(text("SELECT key, payload->>'trigger' FROM work_items"))).all()
    assert [tuple(i) for i in items] == [(str(back), "monitor")]  # MegaAPI cannot read history: nothing queued
    assert (await instance_row(back))["status"] == "connected"
