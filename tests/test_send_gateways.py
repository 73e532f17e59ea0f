"""Sending through the provider clients against the simulator over loopback: once, never retried after it left."""

from __future__ import annotations

import socket

import httpx
import pytest

from core.domain import OutgoingMessage, OutgoingType
from core.errors import GatewayOutcomeUnknown, GatewaySendRejected, GatewayTransientError
from gateways.evolution import EvolutionGateway
from gateways.megaapi import MegaApiGateway
from gateways.resilience import RetryPolicy
from gateways.simulator import SimulatorState
from gateways.simulator.server import SimulatorServer
from tests.conftest import SIM_EVOLUTION_KEY, SIM_MEGAAPI_TOKEN

pytestmark = pytest.mark.pure

TO = "5511988887777@s.whatsapp.net"


@pytest.fixture
def sim(simulator_server: SimulatorServer, simulator_state: SimulatorState) -> SimulatorState:
    simulator_state.reset()
    simulator_state.add_instance("acme-01", live_state="open")
    simulator_state.add_instance("mega-01", "megaapi", live_state="open")
    return simulator_state


def evolution(url: str) -> EvolutionGateway:
    return EvolutionGateway(
        name="evolution",
        base_url=url,
        api_key=SIM_EVOLUTION_KEY,
        timeout=httpx.Timeout(5.0),
        retry=RetryPolicy(attempts=3, initial_seconds=0.01, max_seconds=0.02),
    )


async def test_evolution_sends_text_and_media_once_and_answers_the_message_id(
    sim: SimulatorState, simulator_server: SimulatorServer
) -> None:
    async with evolution(simulator_server.url) as gateway:
        text = await gateway.send("acme-01", OutgoingMessage(to=TO, text="olá"), timeout_seconds=2)
        media = await gateway.send(
            "acme-01",
            OutgoingMessage(
                to=TO, type=OutgoingType.IMAGE, text="a photo", media_url="https://cdn.example/a.jpg", file_name="a.jpg"
            ),
            timeout_seconds=2,
        )
    records = sim.sends.records
    assert [(r.type, r.text, r.media_url, r.to) for r in records] == [
        ("text", "olá", None, TO),
        ("image", "a photo", "https://cdn.example/a.jpg", TO),
    ]
    assert (text.external_id, media.external_id) == (records[0].external_id, records[1].external_id)
    assert text.status == "sent"


async def test_a_send_that_times_out_after_leaving_is_unknown_and_not_retried(
    sim: SimulatorState, simulator_server: SimulatorServer
) -> None:
    sim.configure(send_timeout_rate=1.0, send_hang_s=3.0)
    async with evolution(simulator_server.url) as gateway:
        with pytest.raises(GatewayOutcomeUnknown):
            await gateway.send("acme-01", OutgoingMessage(to=TO, text="late"), timeout_seconds=0.3)
    assert len(sim.sends.records) == 1  # accepted once; the client did not try again


async def test_a_503_before_accepting_is_transient_and_sends_nothing(
    sim: SimulatorState, simulator_server: SimulatorServer
) -> None:
    sim.configure(send_error_rate=1.0)
    async with evolution(simulator_server.url) as gateway:
        with pytest.raises(GatewayTransientError):
            await gateway.send("acme-01", OutgoingMessage(to=TO, text="x"), timeout_seconds=2)
    assert sim.sends.records == []
    assert sim.calls["evolution.sendText:acme-01"] == 1  # once: a send is never retried by the client


async def test_number_not_on_whatsapp_is_rejected_for_good(
    sim: SimulatorState, simulator_server: SimulatorServer
) -> None:
    sim.configure(not_on_whatsapp=["5511988887777"])
    async with evolution(simulator_server.url) as gateway:
        with pytest.raises(GatewaySendRejected, match="number not on WhatsApp"):
            await gateway.send("acme-01", OutgoingMessage(to=TO, text="x"), timeout_seconds=2)
    assert sim.sends.records == []


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with evolution(f"http://127.0.0.1:{port}") as gateway:
        with pytest.raises(GatewayTransientError):
            await gateway.send("acme-01", OutgoingMessage(to=TO, text="x"), timeout_seconds=1)


async def test_megaapi_sends_text(sim: SimulatorState, simulator_server: SimulatorServer) -> None:
    async with MegaApiGateway(
        name="megaapi", base_url=simulator_server.url, api_key=SIM_MEGAAPI_TOKEN, timeout=httpx.Timeout(5.0)
    ) as gateway:
        result = await gateway.send("mega-01", OutgoingMessage(to=TO, text="oi"), timeout_seconds=2)
        sim.configure(not_on_whatsapp=["5511988887777"])
        with pytest.raises(GatewaySendRejected, match="number not on WhatsApp"):
            await gateway.send("mega-01", OutgoingMessage(to=TO, text="oi"), timeout_seconds=2)
    (record,) = sim.sends.records
    assert (record.instance, record.to, record.text, record.external_id) == ("mega-01", TO, "oi", result.external_id)


async def test_sim_sends_counts_duplicates(sim: SimulatorState, simulator_server: SimulatorServer) -> None:
    async with evolution(simulator_server.url) as gateway:
        for _ in range(2):
            await gateway.send("acme-01", OutgoingMessage(to=TO, text="same"), timeout_seconds=2)
    async with httpx.AsyncClient(base_url=simulator_server.url) as http:
        summary = (await http.get("/_sim/sends")).json()
    assert summary["total"] == 2
    assert summary["duplicates"] == 1
    assert summary["counts"][0]["count"] == 2
