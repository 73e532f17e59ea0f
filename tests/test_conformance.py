"""One conformance suite for every gateway (issue 12 §5): the same scenarios and assertions against the Evolution,
MegaAPI and WAHA simulators over loopback, real PostgreSQL, real Prefect runs where the scenario has a flow.
A scenario a gateway cannot do is skipped with the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.qr import qr_png_data_url
from core.settings import get_settings
from gateways.registry import open_gateways
from gateways.simulator import SimulatorServer
from tests.factories import history, instance_row, make_instance, make_organization
from tests.test_provisioning import decode_qr

PROVIDERS = ("evolution", "megaapi", "waha")


@pytest.fixture
def gateway(
    request: pytest.FixtureRequest, simulator, simulator_server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The provider under test, its gateway (named as the provider) configured at the simulator."""
    monkeypatch.setenv("WAHA_API_URL", simulator_server.url)
    monkeypatch.setenv("WAHA_API_KEY", "sim-waha-key")
    get_settings.cache_clear()
    yield request.param
    monkeypatch.delenv("WAHA_API_URL")
    monkeypatch.delenv("WAHA_API_KEY")
    get_settings.cache_clear()


each_gateway = pytest.mark.parametrize("gateway", PROVIDERS, indirect=True)


@each_gateway
@pytest.mark.usefixtures("prefect_server")
async def test_status_sync_finds_and_applies_drift(gateway: str, simulator) -> None:
    from flows.sync_status import sync_status

    org = await make_organization()
    simulator.add_instance("up-01", gateway, "open")
    simulator.add_instance("down-01", gateway, "close")
    simulator.add_instance("same-01", gateway, "open")
    up = await make_instance(org, "up-01", gateway=gateway, status="disconnected")
    down = await make_instance(org, "down-01", gateway=gateway, status="connected")
    same = await make_instance(org, "same-01", gateway=gateway, status="connected")

    report = await sync_status(mode="apply")

    assert report.flow_run_id is not None and report.failed_gateways == []
    assert (report.checked, report.drifted, report.applied, report.unreachable) == (3, 2, 2, 0)
    assert (await instance_row(up))["status"] == "connected"
    assert (await instance_row(down))["status"] == "disconnected"
    assert await history(up) == [("disconnected", "connected", "sync")]
    assert await history(same) == []
    assert set(report.became_connected) == {up}


@each_gateway
async def test_connect_gives_a_raw_qr_that_decodes(gateway: str, simulator) -> None:
    simulator.add_instance("qr-01", gateway, "close")

    async with open_gateways({gateway}) as gateways:
        result = await gateways[gateway].connect("qr-01")

    assert result.qr_code, result
    # Evolution and WAHA give the raw string a phone scans; MegaAPI documents only its QR image (gateways.md §8.5).
    image = result.qr_code if gateway == "megaapi" else qr_png_data_url(result.qr_code)
    assert gateway == "megaapi" or not result.qr_code.startswith("data:image/")
    assert decode_qr(image) == simulator.instances["qr-01"].qr_code
