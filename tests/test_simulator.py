"""The gateway simulator over real loopback HTTP: provider contracts, knobs, counters, webhooks, demo loop."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import gateways.simulator as simulator
from gateways.simulator import (
    SimEvent,
    SimulatorServer,
    SimulatorState,
    StateChange,
    WebhookEmitter,
    run_demo,
)
from gateways.simulator.state import RECONNECTABLE_CODES

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
pytestmark = pytest.mark.pure

UNAUTHORIZED = {"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}}


def evo(state: SimulatorState, key: str | None = None) -> dict[str, str]:
    """Evolution auth header: the global key unless ``key`` is given."""
    return {"apikey": key or state.config.evolution_api_key}


def mega(state: SimulatorState) -> dict[str, str]:
    """MegaAPI auth header."""
    return {"Authorization": f"Bearer {state.config.megaapi_token}"}


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: Any


class Receiver:
    """A webhook receiver app: records every POST; ``/fail`` answers 500."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.deliveries.append(Delivery(request.url.path, dict(request.headers), body))
        return Response(status_code=500 if request.url.path == "/fail" else 200)


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorState()) as srv:
        yield srv


@pytest.fixture
def state(sim_server: SimulatorServer) -> SimulatorState:
    assert sim_server.state is not None
    sim_server.state.reset()
    return sim_server.state


@pytest.fixture
async def client(sim_server: SimulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim_server.url, timeout=5) as http:
        yield http


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[tuple[SimulatorServer, Receiver]]:
    receiver = Receiver()
    with SimulatorServer(receiver.app) as srv:
        yield srv, receiver


@pytest.fixture
def receiver(receiver_server: tuple[SimulatorServer, Receiver]) -> tuple[str, Receiver]:
    srv, recv = receiver_server
    recv.deliveries.clear()
    return srv.url, recv


@pytest.fixture
def events(state: SimulatorState) -> Iterator[list[SimEvent]]:
    """Every event the module's state publishes during the test."""
    seen: list[SimEvent] = []
    unsubscribe = state.subscribe(seen.append)
    yield seen
    unsubscribe()


# -- Evolution: auth and envelopes ----------------------------------------------------------------------------


async def test_version_probe_needs_no_key(state: SimulatorState, client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.json()["version"] == "2.3.6"
    assert response.json()["clientName"] == "evolution"


async def test_missing_or_wrong_apikey_is_401_with_envelope(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="open")
    for headers in ({}, {"apikey": "wrong"}):
        response = await client.get("/instance/connectionState/acme-01", headers=headers)
        assert response.status_code == 401
        assert response.json() == UNAUTHORIZED
    response = await client.get("/instance/fetchInstances")
    assert (response.status_code, response.json()) == (401, UNAUTHORIZED)


async def test_unknown_instance_is_404_before_auth(state: SimulatorState, client: httpx.AsyncClient) -> None:
    for headers in (evo(state), {}):
        response = await client.get("/instance/connectionState/ghost", headers=headers)
        assert response.status_code == 404
        assert response.json() == {
            "status": 404,
            "error": "Not Found",
            "response": {"message": ['The "ghost" instance does not exist']},
        }


async def test_instance_token_only_reaches_its_own_instance(state: SimulatorState, client: httpx.AsyncClient) -> None:
    a = state.add_instance("acme-01", live_state="open")
    state.add_instance("acme-02", live_state="open")
    own = evo(state, a.token)
    assert (await client.get("/instance/connectionState/acme-01", headers=own)).status_code == 200
    assert (await client.get("/instance/connectionState/acme-02", headers=own)).status_code == 401
    assert (await client.post("/instance/restart/acme-02", headers=own)).status_code == 401
    rows = (await client.get("/instance/fetchInstances", headers=own)).json()
    assert [row["name"] for row in rows] == ["acme-01"]
    create = await client.post(
        "/instance/create", headers=own, json={"instanceName": "acme-03", "integration": "WHATSAPP-BAILEYS"}
    )
    assert (create.status_code, create.json()) == (401, UNAUTHORIZED)


# -- Evolution: fetchInstances vs connectionState -------------------------------------------------------------


async def test_fetch_instances_returns_prisma_rows(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.seed_instances(3, prefix="acme", connected_ratio=1.0)
    state.add_instance("mega-01", "megaapi", "open")
    response = await client.get("/instance/fetchInstances", headers=evo(state))
    assert response.status_code == 200
    rows = response.json()
    assert [row["name"] for row in rows] == ["acme-00001", "acme-00002", "acme-00003"]
    row, inst = rows[0], state.instances["acme-00001"]
    assert row["id"] == inst.instance_id
    assert row["token"] == inst.token
    assert row["connectionStatus"] == "open"
    assert row["ownerJid"] == inst.owner_jid
    assert row["ownerJid"].endswith("@s.whatsapp.net")
    assert row["profileName"] == inst.profile_name
    assert row["clientName"] == "evolution"
    assert row["integration"] == "WHATSAPP-BAILEYS"
    assert ISO_MS.match(row["createdAt"])
    assert ISO_MS.match(row["updatedAt"])
    assert set(row["_count"]) == {"Message", "Contact", "Chat"}
    assert row["Setting"]["instanceId"] == inst.instance_id
    assert "groupsIgnore" in row["Setting"]
    assert {"Chatwoot", "Proxy", "Rabbitmq", "Nats", "Sqs", "Websocket", "disconnectionReasonCode"} <= set(row)

    one = await client.get("/instance/fetchInstances", params={"instanceName": "acme-00002"}, headers=evo(state))
    assert [r["name"] for r in one.json()] == ["acme-00002"]
    missing = await client.get("/instance/fetchInstances", params={"instanceName": "nope"}, headers=evo(state))
    assert missing.status_code == 404
    assert missing.json()["response"]["message"] == ['Instance "nope" not found']


async def test_reconnectable_drop_lags_the_column(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="open")
    before = (await client.get("/instance/fetchInstances", headers=evo(state))).json()[0]
    change = state.set_state("acme-01", "close", reason_code=428)
    assert (change.old, change.new, change.column) == ("open", "close", "open")

    row = (await client.get("/instance/fetchInstances", headers=evo(state))).json()[0]
    live = (await client.get("/instance/connectionState/acme-01", headers=evo(state))).json()
    assert row["connectionStatus"] == "open"
    assert row["updatedAt"] == before["updatedAt"]  # the row was not written
    assert live == {"instance": {"instanceName": "acme-01", "state": "close"}}

    state.config.lagging_column = False
    state.set_state("acme-01", "connecting", reason_code=515)
    row = (await client.get("/instance/fetchInstances", headers=evo(state))).json()[0]
    assert row["connectionStatus"] == "connecting"


async def test_non_reconnectable_close_writes_the_column(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="open")
    change = state.set_state("acme-01", "close", reason_code=401)
    assert change.column == "close"
    row = (await client.get("/instance/fetchInstances", headers=evo(state))).json()[0]
    assert row["connectionStatus"] == "close"
    assert row["disconnectionReasonCode"] == 401
    assert ISO_MS.match(row["disconnectionAt"])
    assert not state.instances["acme-01"].paired


# -- Evolution: create, connect, restart, logout, delete ------------------------------------------------------


async def test_create_instance_contract(state: SimulatorState, client: httpx.AsyncClient) -> None:
    body = {
        "instanceName": "acme-01",
        "integration": "WHATSAPP-BAILEYS",
        "qrcode": True,
        "groupsIgnore": True,
        "webhook": {"url": "https://sync.example/hook", "headers": {"x-secret": "s"}, "events": []},
    }
    response = await client.post("/instance/create", headers=evo(state), json=body)
    assert response.status_code == 201
    created = response.json()
    assert created["instance"]["instanceName"] == "acme-01"
    assert created["instance"]["status"] == "connecting"
    assert created["hash"] == state.instances["acme-01"].token
    assert created["qrcode"]["count"] == 1
    assert created["qrcode"]["code"].startswith("2@")
    assert created["settings"]["groupsIgnore"] is True
    assert created["webhook"]["webhookUrl"] == "https://sync.example/hook"
    assert {"websocket", "rabbitmq", "nats", "sqs"} <= set(created)

    hook = await client.get("/webhook/find/acme-01", headers=evo(state, created["hash"]))
    assert hook.json()["url"] == "https://sync.example/hook"
    assert hook.json()["headers"] == {"x-secret": "s"}

    duplicate = await client.post("/instance/create", headers={}, json=body)
    assert duplicate.status_code == 403  # Evolution checks the name before the key
    assert duplicate.json()["response"]["message"] == ['This name "acme-01" is already in use.']
    bad = await client.post("/instance/create", headers=evo(state), json={"instanceName": "acme-02"})
    assert (bad.status_code, bad.json()["response"]["message"]) == (400, ["Invalid integration"])
    plain = await client.post(
        "/instance/create", headers=evo(state), json={"instanceName": "acme-03", "integration": "WHATSAPP-BAILEYS"}
    )
    assert plain.json()["instance"]["status"] == "close"
    assert "qrcode" not in plain.json()


async def test_connect_on_close_returns_qr_and_starts_connecting(
    state: SimulatorState, client: httpx.AsyncClient
) -> None:
    state.add_instance("acme-01", live_state="close")
    response = await client.get("/instance/connect/acme-01", params={"number": "5511999990000"}, headers=evo(state))
    qr = response.json()
    assert response.status_code == 200
    assert set(qr) == {"pairingCode", "code", "base64", "count"}
    assert qr["count"] == 1
    assert qr["code"].startswith("2@")
    assert len(qr["pairingCode"]) == 8
    assert qr["base64"].startswith("data:image/png;base64,")
    live = (await client.get("/instance/connectionState/acme-01", headers=evo(state))).json()
    assert live["instance"]["state"] == "connecting"
    assert state.instances["acme-01"].column_state == "connecting"
    again = (await client.get("/instance/connect/acme-01", headers=evo(state))).json()
    assert again["code"] == qr["code"]  # the current QR, not a new one

    state.set_state("acme-01", "open")
    opened = (await client.get("/instance/connect/acme-01", headers=evo(state))).json()
    assert opened == {"instance": {"instanceName": "acme-01", "state": "open"}}


async def test_restart_on_close_is_an_error_body_with_200(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="close")
    response = await client.post("/instance/restart/acme-01", headers=evo(state))
    assert response.status_code == 200
    assert response.json() == {"error": True, "message": 'The "acme-01" instance is not connected'}


async def test_restart_reconnects_an_open_session(
    state: SimulatorState, client: httpx.AsyncClient, events: list[SimEvent]
) -> None:
    state.add_instance("acme-01", live_state="open")
    response = await client.post("/instance/restart/acme-01", headers=evo(state))
    assert response.json() == {"instance": {"instanceName": "acme-01", "state": "open"}}
    assert [(e.old, e.new, e.reason_code) for e in events if isinstance(e, StateChange)] == [
        ("open", "connecting", 515),
        ("connecting", "open", None),
    ]


async def test_logout_contract(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="close")
    closed = await client.delete("/instance/logout/acme-01", headers=evo(state))
    assert closed.status_code == 400
    assert closed.json() == {
        "status": 400,
        "error": "Bad Request",
        "response": {"message": ['The "acme-01" instance is not connected']},
    }

    state.set_state("acme-01", "open")
    response = await client.delete("/instance/logout/acme-01", headers=evo(state))
    assert response.json() == {"status": "SUCCESS", "error": False, "response": {"message": "Instance logged out"}}
    inst = state.instances["acme-01"]
    assert (inst.live_state, inst.column_state, inst.disconnection_reason_code) == ("close", "close", 401)


async def test_delete_removes_the_instance(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="open")
    response = await client.delete("/instance/delete/acme-01", headers=evo(state))
    assert response.json() == {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}}
    assert "acme-01" not in state.instances
    assert (await client.get("/instance/connectionState/acme-01", headers=evo(state))).status_code == 404


# -- MegaAPI --------------------------------------------------------------------------------------------------


async def test_megaapi_status_contract(state: SimulatorState, client: httpx.AsyncClient) -> None:
    up = state.add_instance("megacode-up", "megaapi", "open")
    state.add_instance("megacode-down", "megaapi", "open")
    state.set_state("megacode-down", "connecting", reason_code=428)
    state.add_instance("acme-01", "evolution", "open")

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = await client.get("/rest/instance/megacode-up", headers=headers)
        assert denied.status_code == 401
        assert denied.json()["error"] is True
    ok = await client.get("/rest/instance/megacode-up", headers=mega(state))
    assert ok.json() == {
        "error": False,
        "instance": {"status": "connected", "user": {"id": up.owner_jid, "name": up.profile_name}},
    }
    down = await client.get("/rest/instance/megacode-down", headers=mega(state))
    assert down.json()["instance"]["status"] == "disconnected"
    for key in ("ghost", "acme-01"):
        missing = await client.get(f"/rest/instance/{key}", headers=mega(state))
        assert (missing.status_code, missing.json()) == (404, {"error": True, "message": "instance not found"})
    assert (await client.get("/instance/connectionState/megacode-up", headers=evo(state))).status_code == 404


async def test_megaapi_qrcode_logout_restart(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("megacode-1", "megaapi", "close")
    qr = (await client.get("/rest/instance/qrcode_base64/megacode-1", headers=mega(state))).json()
    assert qr["error"] is False
    assert qr["qrcode"].startswith("data:image/png;base64,")
    assert state.instances["megacode-1"].live_state == "connecting"

    state.set_state("megacode-1", "open")
    logout = await client.delete("/rest/instance/megacode-1/logout", headers=mega(state))
    assert logout.json() == {"error": False, "message": "Instance logged out"}
    again = await client.delete("/rest/instance/megacode-1/logout", headers=mega(state))
    assert again.status_code == 400
    assert again.json()["error"] is True

    state.set_state("megacode-1", "open")
    state.set_state("megacode-1", "close", reason_code=408)
    restart = await client.delete("/rest/instance/megacode-1/restart", headers=mega(state))
    assert restart.json()["error"] is False
    assert state.instances["megacode-1"].live_state == "open"


# -- knobs and counters ---------------------------------------------------------------------------------------


async def test_outage_answers_503_envelopes_but_not_control(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("megacode-1", "megaapi", "open")
    state.config.outage = True
    evolution = await client.get("/instance/fetchInstances", headers=evo(state))
    assert evolution.status_code == 503
    body = evolution.json()
    assert (body["status"], body["error"]) == (503, "Service Unavailable")
    assert isinstance(body["response"]["message"], list)
    megaapi = await client.get("/rest/instance/megacode-1", headers=mega(state))
    assert megaapi.status_code == 503
    assert megaapi.json()["error"] is True
    assert (await client.get("/_sim/config")).status_code == 200


async def test_latency_delays_provider_routes_only() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    state = SimulatorState(simulator.SimulatorConfig(latency_ms=200), sleep=sleep)
    async with SimulatorServer(state) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/")).status_code == 200
        assert waits == [0.2]
        assert (await http.get("/_sim/calls")).status_code == 200
        assert (await http.get("/rest/instance/megacode-1", headers=mega(state))).status_code == 404
    assert waits == [0.2, 0.2]  # the provider routes wait, the control route does not


async def test_error_rate_is_seeded_and_deterministic(state: SimulatorState, client: httpx.AsyncClient) -> None:
    async def pattern() -> list[int]:
        state.reset()
        state.configure(seed=7, error_rate=0.5)
        return [(await client.get("/")).status_code for _ in range(30)]

    first, second = await pattern(), await pattern()
    assert first == second
    assert set(first) == {200, 503}
    state.configure(error_rate=1.0)
    failed = await client.get("/")
    assert failed.status_code == 503
    assert failed.json()["status"] == 503


async def test_hang_outlasts_the_client_timeout(state: SimulatorState, sim_server: SimulatorServer) -> None:
    state.config.hang = True
    try:
        async with httpx.AsyncClient(base_url=sim_server.url, timeout=0.2) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.get("/")
    finally:
        state.config.hang = False
    assert state.calls["evolution.info"] == 1


async def test_call_counters(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.add_instance("acme-01", live_state="open")
    state.add_instance("megacode-1", "megaapi", "open")
    for _ in range(2):
        await client.get("/instance/fetchInstances", headers=evo(state))
    await client.post("/instance/restart/acme-01", headers=evo(state))
    await client.get("/rest/instance/megacode-1", headers=mega(state))
    await client.get("/_sim/config")
    expected = {"evolution.fetchInstances": 2, "evolution.restart:acme-01": 1, "megaapi.status:megacode-1": 1}
    assert dict(state.calls) == expected
    assert (await client.get("/_sim/calls")).json() == expected


# -- control routes and state semantics -----------------------------------------------------------------------


async def test_control_routes(state: SimulatorState, client: httpx.AsyncClient) -> None:
    seeded = await client.post("/_sim/instances", json={"count": 10, "prefix": "acme", "connected_ratio": 0.7})
    assert seeded.status_code == 201
    assert seeded.json()["created"] == 10
    added = await client.post("/_sim/instances", json={"name": "m-1", "provider": "megaapi", "live_state": "open"})
    assert added.json()["instances"] == ["m-1"]
    summary = (await client.get("/_sim/instances")).json()
    assert summary == {"total": 11, "live_states": {"evolution": {"open": 7, "close": 3}, "megaapi": {"open": 1}}}

    change = await client.post("/_sim/instances/m-1/state", json={"state": "close", "reason_code": 401})
    assert change.json()["old"] == "open"
    assert change.json()["column"] == "close"
    record = (await client.get("/_sim/instances/m-1")).json()
    assert record["token"] == state.instances["m-1"].token
    assert record["live_state"] == "close"
    assert (await client.get("/_sim/instances/ghost")).status_code == 404

    config = (await client.post("/_sim/config", json={"latency_ms": 5, "flap_rate": 0.5})).json()
    assert config["latency_ms"] == 5
    assert config["evolution_api_key"] == "sim-evolution-key"
    assert (await client.post("/_sim/config", json={"error_rate": 2})).status_code == 422
    ticked = (await client.post("/_sim/tick")).json()["changes"]
    assert len(ticked) >= round(11 * 0.5)

    assert (await client.post("/_sim/reset", json={"keep_config": True})).json() == {"ok": True}
    assert (await client.get("/_sim/instances")).json()["total"] == 0
    assert state.config.latency_ms == 5
    await client.post("/_sim/reset")
    assert state.config.latency_ms == 0


def test_seeding_is_deterministic() -> None:
    a, b = SimulatorState(), SimulatorState()
    first = a.seed_instances(50, prefix="acme", connected_ratio=0.7)
    second = b.seed_instances(50, prefix="acme", connected_ratio=0.7)
    assert [(i.instance_id, i.token, i.owner_jid, i.live_state) for i in first] == [
        (i.instance_id, i.token, i.owner_jid, i.live_state) for i in second
    ]
    assert sum(i.live_state == "open" for i in first) == 35
    assert first[0].name == "acme-00001"
    assert first[-1].name == "acme-00050"
    other = SimulatorState(simulator.SimulatorConfig(seed=1)).seed_instances(1, prefix="acme")
    assert other[0].token != first[0].token


def test_tick_flaps_a_fraction_with_reconnectable_codes() -> None:
    state = SimulatorState(simulator.SimulatorConfig(flap_rate=0.25))
    state.seed_instances(20, prefix="acme", connected_ratio=1.0)
    seen: list[SimEvent] = []
    state.subscribe(seen.append)
    changes = state.tick()
    assert len(changes) == 5
    assert seen == changes
    for change in changes:
        assert change.old == "open"
        assert change.new in ("connecting", "close")
        assert change.reason_code in RECONNECTABLE_CODES
        assert change.column == "open"
    back = {c.name: c for c in state.tick() if c.name in {x.name for x in changes} and c.old == "connecting"}
    assert all(c.new == "open" for c in back.values())


def test_qr_limit_ends_in_refused() -> None:
    state = SimulatorState(simulator.SimulatorConfig(qrcode_limit=2))
    state.add_instance("acme-01")
    assert state.connect("acme-01") is not None
    assert state.emit_qr("acme-01").count == 2
    limit = state.emit_qr("acme-01")
    assert limit.limit_reached
    assert state.instances["acme-01"].live_state == "refused"


async def test_fetch_instances_100k(state: SimulatorState, client: httpx.AsyncClient) -> None:
    state.seed_instances(100_000, prefix="acme")
    response = await client.get("/instance/fetchInstances", headers=evo(state), timeout=30)
    assert response.status_code == 200
    assert response.content.count(b'"connectionStatus"') == 100_000


# -- webhooks -------------------------------------------------------------------------------------------------


async def test_evolution_connection_update_envelope(state: SimulatorState, receiver: tuple[str, Receiver]) -> None:
    base, recv = receiver
    inst = state.add_instance("acme-01", live_state="open")
    url = f"{base}/hook"
    async with WebhookEmitter(
        state, evolution_url=url, megaapi_url=None, headers={"x-zapsync-secret": "s3cr3t"}, server_url="http://evo.test"
    ) as emitter:
        state.set_state("acme-01", "close", reason_code=428)  # reconnectable: Evolution sends nothing
        state.set_state("acme-01", "open")
        state.set_state("acme-01", "close", reason_code=401)
        await emitter.flush()
    assert emitter.stats == {"delivered": 2, "skipped": 1}
    bodies = sorted((d.body for d in recv.deliveries), key=lambda b: b["data"]["state"], reverse=True)
    opened, closed = bodies
    assert ISO_MS.match(opened.pop("date_time"))
    assert opened == {
        "event": "connection.update",
        "instance": "acme-01",
        "data": {
            "instance": "acme-01",
            "state": "open",
            "statusReason": 200,
            "wuid": inst.owner_jid,
            "profileName": inst.profile_name,
            "profilePictureUrl": inst.profile_pic_url,
        },
        "destination": url,
        "sender": inst.owner_jid,
        "server_url": "http://evo.test",
        "apikey": inst.token,
    }
    assert closed["data"] == {"instance": "acme-01", "state": "close", "statusReason": 401}
    for delivery in recv.deliveries:
        assert delivery.path == "/hook"
        assert delivery.headers["x-zapsync-secret"] == "s3cr3t"
        assert delivery.headers["content-type"] == "application/json"


async def test_connect_over_http_emits_qrcode_updated_by_events(
    state: SimulatorState, client: httpx.AsyncClient, receiver: tuple[str, Receiver]
) -> None:
    base, recv = receiver
    state.add_instance("acme-01", live_state="close")
    async with WebhookEmitter(state, evolution_url=f"{base}/hook", megaapi_url=None, by_events=True) as emitter:
        qr = (await client.get("/instance/connect/acme-01", headers=evo(state))).json()
        await emitter.flush()
    by_path = {d.path: d.body for d in recv.deliveries}
    assert set(by_path) == {"/hook/connection-update", "/hook/qrcode-updated"}
    assert by_path["/hook/connection-update"]["data"] == {
        "instance": "acme-01",
        "state": "connecting",
        "statusReason": 200,
    }
    qrcode = by_path["/hook/qrcode-updated"]
    assert qrcode["event"] == "qrcode.updated"
    assert qrcode["destination"] == f"{base}/hook"
    assert qrcode["data"]["qrcode"]["code"] == qr["code"]
    assert qrcode["data"]["qrcode"]["instance"] == "acme-01"


async def test_megaapi_deliveries_alternate_both_shapes(state: SimulatorState, receiver: tuple[str, Receiver]) -> None:
    base, recv = receiver
    inst = state.add_instance("megacode-1", "megaapi", "open")
    async with WebhookEmitter(
        state, evolution_url=f"{base}/evo", megaapi_url=f"{base}/mega", headers={"x-zapsync-secret": "s"}
    ) as emitter:
        state.set_state("megacode-1", "close", reason_code=428)
        state.set_state("megacode-1", "open")
        await emitter.flush()
    assert [d.path for d in recv.deliveries] == ["/mega", "/mega"]
    official = next(d.body for d in recv.deliveries if "connection_state" in d.body)
    modern = next(d.body for d in recv.deliveries if "message" in d.body)
    assert isinstance(official.pop("timestamp"), int)
    assert official == {
        "instance_key": "megacode-1",
        "messageType": "connection_update",
        "connection_state": "close",
        "closeReason": 428,
    }
    assert modern == {
        "messageType": "connection_update",
        "message": "phone_connected",
        "jid": inst.owner_jid,
        "pushName": inst.profile_name,
        "instance_key": "megacode-1",
    }
    assert all("x-zapsync-secret" not in d.headers for d in recv.deliveries)


async def test_delivery_failures_are_counted_not_raised(state: SimulatorState, receiver: tuple[str, Receiver]) -> None:
    base, _ = receiver
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/mega"
    state.add_instance("acme-01", live_state="close")
    state.add_instance("megacode-1", "megaapi", "close")
    async with WebhookEmitter(state, evolution_url=f"{base}/fail", megaapi_url=dead) as emitter:
        state.set_state("acme-01", "open")
        state.set_state("megacode-1", "open")
        await emitter.flush()
    assert emitter.stats == {"failed": 2}
    assert emitter.last_error is not None


async def test_jwt_key_header_becomes_a_signed_bearer(state: SimulatorState, receiver: tuple[str, Receiver]) -> None:
    base, recv = receiver
    state.add_instance("acme-01", live_state="close")
    async with WebhookEmitter(
        state,
        evolution_url=f"{base}/hook",
        megaapi_url=None,
        headers={"jwt_key": "org-secret-with-at-least-32-bytes!", "x-org": "7"},
    ) as emitter:
        state.set_state("acme-01", "open")
        await emitter.flush()
    (delivery,) = recv.deliveries
    assert "jwt_key" not in delivery.headers
    assert delivery.headers["x-org"] == "7"
    scheme, token = delivery.headers["authorization"].split(" ")
    claims = jwt.decode(token, "org-secret-with-at-least-32-bytes!", algorithms=["HS256"])
    assert scheme == "Bearer"
    assert claims["app"] == "evolution"
    assert claims["action"] == "webhook"
    assert claims["exp"] - claims["iat"] == 600


async def test_instance_webhook_from_create_wins_and_filters_events(
    state: SimulatorState, client: httpx.AsyncClient, receiver: tuple[str, Receiver]
) -> None:
    base, recv = receiver
    async with WebhookEmitter(state, evolution_url=f"{base}/default", megaapi_url=None) as emitter:
        body = {
            "instanceName": "acme-01",
            "integration": "WHATSAPP-BAILEYS",
            "qrcode": True,
            "webhook": {"url": f"{base}/own", "headers": {"x-org": "42"}, "events": ["QRCODE_UPDATED"]},
        }
        assert (await client.post("/instance/create", headers=evo(state), json=body)).status_code == 201
        await emitter.flush()
    (delivery,) = recv.deliveries
    assert delivery.path == "/own"
    assert delivery.headers["x-org"] == "42"
    assert delivery.body["event"] == "qrcode.updated"
    assert emitter.stats["skipped"] == 1  # connection.update is not subscribed


async def test_run_demo_ticks_and_delivers(state: SimulatorState, receiver: tuple[str, Receiver]) -> None:
    base, recv = receiver
    state.configure(flap_rate=1.0)
    state.seed_instances(4, prefix="demo", connected_ratio=1.0)
    stop = asyncio.Event()
    unsubscribe = state.subscribe(lambda _event: stop.set())
    emitter = WebhookEmitter(state, evolution_url=f"{base}/hook", megaapi_url=None)
    try:
        ticks = await asyncio.wait_for(run_demo(state, emitter, interval_s=0.01, stop=stop), timeout=5)
    finally:
        unsubscribe()
    assert ticks == 1
    assert not emitter.started  # started and closed by the demo
    assert all(inst.live_state != "open" for inst in state.instances.values())
    connecting = sum(inst.live_state == "connecting" for inst in state.instances.values())
    assert len(recv.deliveries) == emitter.stats["delivered"] == connecting
    assert emitter.stats["delivered"] + emitter.stats["skipped"] == 4


# -- server helper and package surface ------------------------------------------------------------------------


async def test_simulator_server_async_with() -> None:
    state = SimulatorState()
    async with SimulatorServer(state) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/")).status_code == 200
        url = srv.url
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(url)
    assert state.calls["evolution.info"] == 1


def test_public_api_is_exported() -> None:
    for name in (
        "SimulatorState",
        "SimInstance",
        "SimulatorConfig",
        "create_app",
        "WebhookEmitter",
        "SimulatorServer",
        "run_demo",
    ):
        assert name in simulator.__all__
        assert hasattr(simulator, name)


async def test_outage_cycle_flaps_provider_routes_but_not_control(
    state: SimulatorState, client: httpx.AsyncClient
) -> None:
    state.configure(outage_cycle="110")
    codes = [(await client.get("/")).status_code for _ in range(6)]
    assert codes == [503, 503, 200, 503, 503, 200]
    assert (await client.get("/_sim/config")).json()["outage_cycle"] == "110"  # control routes never flap
    state.configure(outage_cycle="10")  # a new cycle starts at its first character
    assert [(await client.get("/")).status_code for _ in range(3)] == [503, 200, 503]
    state.configure(outage_cycle="")
    assert {(await client.get("/")).status_code for _ in range(3)} == {200}
    assert (await client.post("/_sim/config", json={"outage_cycle": "1x"})).status_code == 422
