"""Status sync end to end: real PostgreSQL, the simulator over loopback HTTP, real Prefect flow runs."""

from __future__ import annotations

import os

import httpx
import pytest
from sqlalchemy import text

from core.reports import SyncScope
from db.engine import session_scope
from flows.sync_status import check_status, sync_status
from gateways.megaapi import MegaApiGateway
from gateways.resilience import BreakerPolicy, RetryPolicy
from tests.factories import count, history, instance_row, make_instance, make_organization

pytestmark = pytest.mark.usefixtures("prefect_server")


async def _world(simulator):
    """Two providers, each with one instance per kind of drift and one in sync."""
    org = await make_organization()
    simulator.add_instance("evo-up", "evolution", "open")
    simulator.add_instance("evo-down", "evolution", "close")
    simulator.add_instance("evo-same", "evolution", "open")
    simulator.add_instance("mega-up", "megaapi", "open")
    simulator.add_instance("mega-down", "megaapi", "close")
    ids = {
        "evo-up": await make_instance(org, "evo-up", status="disconnected"),
        "evo-down": await make_instance(org, "evo-down", status="connected"),
        "evo-same": await make_instance(org, "evo-same", status="connected"),
        "mega-up": await make_instance(org, "mega-up", gateway="megaapi", status="disconnected"),
        "mega-down": await make_instance(org, "mega-down", gateway="megaapi", status="connected"),
    }
    return org, ids


async def test_apply_mode_writes_drift_for_evolution_and_megaapi(simulator) -> None:
    _, ids = await _world(simulator)

    report = await sync_status(mode="apply")

    assert report.checked == 5
    assert report.drifted == 4 and report.applied == 4 and report.unreachable == 0
    assert (await instance_row(ids["evo-up"]))["status"] == "connected"
    assert (await instance_row(ids["evo-up"]))["is_connected"] is True
    assert (await instance_row(ids["evo-down"]))["status"] == "disconnected"
    assert (await instance_row(ids["mega-up"]))["status"] == "connected"
    assert (await instance_row(ids["mega-down"]))["status"] == "disconnected"
    assert (await instance_row(ids["evo-same"]))["status"] == "connected"
    assert await history(ids["evo-up"]) == [("disconnected", "connected", "sync")]
    assert await history(ids["mega-down"]) == [("connected", "disconnected", "sync")]
    assert await history(ids["evo-same"]) == []
    # Becoming connected opens a session; the phone number comes from the gateway.
    async with session_scope() as session:
        sessions = (
            await session.execute(
                text("SELECT count(*) FROM whatsapp_sessions WHERE instance_id = :id AND disconnected_at IS NULL"),
                {"id": ids["evo-up"]},
            )
        ).scalar_one()
    assert sessions == 1
    assert (await instance_row(ids["evo-up"]))["phone_number"]
    assert report.flow_run_id is not None  # it really ran as a Prefect flow run
    assert set(report.became_connected) == {ids["evo-up"], ids["mega-up"]}

    again = await sync_status(mode="apply")
    assert again.drifted == 0 and again.applied == 0 and again.in_sync == 5


async def test_check_mode_reports_drift_and_writes_nothing(simulator) -> None:
    _, ids = await _world(simulator)
    async with session_scope() as session:
        before = (await session.execute(text("SELECT * FROM whatsapp_instances ORDER BY id"))).all()

    report = await sync_status(mode="check")

    assert report.drifted == 4 and report.applied == 0
    assert {d.instance_name for d in report.changes} == {"evo-up", "evo-down", "mega-up", "mega-down"}
    assert not any(d.applied for d in report.changes)
    async with session_scope() as session:
        after = (await session.execute(text("SELECT * FROM whatsapp_instances ORDER BY id"))).all()
    assert after == before
    assert await count("instance_status_changes") == 0
    assert await count("whatsapp_sessions") == 0


async def test_scope_limits_the_sync_to_one_organization_or_instance(simulator) -> None:
    org, ids = await _world(simulator)
    other = await make_organization("Other")
    simulator.add_instance("other-up", "evolution", "open")
    other_id = await make_instance(other, "other-up", status="disconnected")

    report = await sync_status(scope=SyncScope(organization_id=other), mode="apply")
    assert report.checked == 1 and report.applied == 1
    assert (await instance_row(ids["evo-up"]))["status"] == "disconnected"
    assert (await instance_row(other_id))["status"] == "connected"

    report = await sync_status(scope=SyncScope(instance_id=ids["mega-up"]), mode="apply")
    assert report.checked == 1 and report.applied == 1
    assert (await instance_row(ids["mega-down"]))["status"] == "connected"
    del org


@pytest.mark.parametrize("knob", ["outage", "hang", "error_rate"])
async def test_unreachable_gateway_never_changes_a_status(simulator, knob: str) -> None:
    _, ids = await _world(simulator)
    if knob == "hang":
        simulator.configure(hang=True, hang_s=5)
    elif knob == "error_rate":
        simulator.configure(error_rate=1.0)
    else:
        simulator.configure(outage=True)

    report = await sync_status(mode="apply")

    assert report.unreachable == 5 and report.applied == 0 and report.drifted == 0
    assert {u.instance_name for u in report.unreachable_instances} == set(ids)
    assert all(u.error for u in report.unreachable_instances)
    for name, instance_id in ids.items():
        expected = "disconnected" if name in ("evo-up", "mega-up") else "connected"
        assert (await instance_row(instance_id))["status"] == expected
    assert await count("instance_status_changes") == 0


async def test_breaker_opens_after_five_failures_and_closes_after_recovery(simulator) -> None:
    org = await make_organization()
    for i in range(12):
        name = f"mega-{i:02d}"
        simulator.add_instance(name, "megaapi", "open")
        await make_instance(org, name, gateway="megaapi", status="disconnected")
    simulator.configure(outage=True)
    clock = FakeClock()

    gateway = MegaApiGateway(
        name="megaapi",
        base_url=os.environ["MEGA_API_HOST"],
        api_key=os.environ["MEGA_API_TOKEN"],
        timeout=httpx.Timeout(1.0),
        retry=RetryPolicy(attempts=3, initial_seconds=0.01, max_seconds=0.02),
        breaker=BreakerPolicy(failure_threshold=5, recovery_seconds=30.0, clock=clock.now),
    )
    async with gateway:
        names = [f"mega-{i:02d}" for i in range(12)]
        observations = await gateway.fetch_states(names)
        assert all(obs.status is None for obs in observations.values())
        assert gateway.breaker_state == "open"
        calls_while_open = sum(v for k, v in simulator.calls.items() if k.startswith("megaapi."))
        # Once open, the breaker answers for the gateway: far fewer requests than instances × retries.
        assert calls_while_open < 12 * 3
        more = await gateway.fetch_states(names)
        assert all("breaker" in (obs.error or "") for obs in more.values())
        assert sum(v for k, v in simulator.calls.items() if k.startswith("megaapi.")) == calls_while_open

        simulator.configure(outage=False)
        clock.advance(29.5)
        assert gateway.breaker_state == "open"
        clock.advance(0.5)
        assert gateway.breaker_state == "half_open"
        recovered = await gateway.fetch_states(names[:1])
        assert recovered[names[0]].status == "connected"
        assert gateway.breaker_state == "closed"


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def now(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


async def test_lagging_evolution_column_is_confirmed_live(simulator) -> None:
    org = await make_organization()
    simulator.add_instance("evo-lag", "evolution", "open")
    instance_id = await make_instance(org, "evo-lag", status="connected")
    simulator.set_state("evo-lag", "connecting", reason_code=428)  # reconnectable drop: column keeps "open"

    report = await check_status(SyncScope())
    assert report.drifted == 1
    assert report.changes[0].gateway_status == "connecting"
    assert simulator.calls["evolution.connectionState:evo-lag"] >= 1

    report = await sync_status(mode="apply")
    assert report.applied == 1
    assert (await instance_row(instance_id))["status"] == "connecting"


async def test_skipped_when_another_run_holds_the_scope(simulator) -> None:
    from db.locks import try_advisory_lock

    await _world(simulator)
    async with try_advisory_lock("sync_status:all") as acquired:
        assert acquired
        report = await sync_status(mode="apply")
    assert report.skipped and "running" in report.skipped
    assert report.applied == 0
    assert await count("instance_status_changes") == 0
