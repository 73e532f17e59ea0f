"""The dashboard in headless Chromium: sign in, see the instances, press "Sync status", see the result, and find
the completed flow run in the Prefect API."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator

import pytest
from prefect.client.orchestration import get_client

from api.main import create_app
from db.engine import dispose_engine
from gateways.simulator.server import SimulatorServer
from tests.factories import instance_row, make_instance, make_organization

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def api_url() -> AsyncIterator[str]:
    """The API and dashboard served over loopback HTTP."""
    async with SimulatorServer(create_app(check_database=False), on_stop=dispose_engine) as server:
        yield server.url


@pytest.mark.usefixtures("served_deployments")
async def test_sync_status_button_runs_a_flow_and_shows_the_result(api_url: str, simulator) -> None:
    from playwright.async_api import async_playwright

    org = await make_organization("Demo")
    for i in range(5):
        simulator.add_instance(f"demo-{i:02d}", "evolution", "open" if i < 3 else "close")
        await make_instance(org, f"demo-{i:02d}", status="disconnected")
    drifted = await make_instance(org, "demo-drift", status="connected")
    simulator.add_instance("demo-drift", "evolution", "close")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await page.goto(api_url + "/")
        await page.fill("#token", "test-admin-token")
        await page.click("button[type=submit]")
        await page.wait_for_selector("#sync-all")
        rows = page.locator("#instances tr[data-instance]")
        assert await rows.count() == 6
        assert "demo-drift" in await page.inner_text("#instances")

        await page.click("#sync-all")
        result = page.locator('#sync-panel [data-result="sync"]')
        await result.wait_for(timeout=120_000)
        panel = await page.inner_text("#sync-panel")
        link = await page.get_attribute("#sync-panel a", "href")
        # The table refreshes itself after the run: the drifted instance now shows the gateway's status.
        drift_row = page.locator("#instances tr", has_text="demo-drift")
        await drift_row.locator("[data-field=status]", has_text="disconnected").wait_for(timeout=10_000)
        # The flow run (another process) published the transitions; they reached this page over /events.
        await page.locator("#live li", has_text="instance.status").first.wait_for(timeout=15_000)
        await page.screenshot(path="/tmp/zapsync-dashboard.png", full_page=True)
        await browser.close()

    assert "completed" in panel
    assert "6 checked" in panel and "4 applied" in panel
    assert link and "/runs/flow-run/" in link
    run_id = uuid.UUID(link.rsplit("/", 1)[1])
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
    assert run.state is not None and run.state.is_completed()
    assert (await instance_row(drifted))["status"] == "disconnected"


async def test_import_button_queues_the_import_and_shows_its_report(api_url: str, simulator, queue_worker) -> None:
    from datetime import UTC, datetime

    from playwright.async_api import async_playwright

    org = await make_organization("Demo")
    simulator.add_instance("demo-hist", "evolution", "open")
    simulator.set_history("demo-hist", chats=3, messages_per_chat=4, newest_at=datetime.now(UTC))
    await make_instance(org, "demo-hist", status="connected")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await page.goto(api_url + "/")
        await page.fill("#token", "test-admin-token")
        await page.click("button[type=submit]")
        await page.click("button[data-action=import]")
        result = page.locator('#sync-panel [data-result="import"]')
        await result.wait_for(timeout=120_000)
        panel = await page.inner_text("#sync-panel")
        await browser.close()

    assert "Import done" in panel and "completed: 12 messages inserted" in panel
