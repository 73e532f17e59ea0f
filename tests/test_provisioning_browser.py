"""Connect a number in headless Chromium (issue 11 acceptance): the QR code is shown live and decodes to the
simulator's QR string, a refreshed QR code replaces it, the simulator's scan connects the number without a reload and
its import is queued; "Reconnect now" on a disconnected number brings a new QR code."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import text

from db.engine import session_scope
from gateways.simulator import SimulatorState, WebhookEmitter
from tests.factories import auth_headers, instance_row, make_organization
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_provisioning import api, decode_qr, default_gateway, emitter  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
]


async def test_connect_a_number_shows_the_qr_live_and_the_number_connected(
    api: httpx.AsyncClient,  # noqa: F811
    simulator: SimulatorState,
    emitter: WebhookEmitter,  # noqa: F811
) -> None:
    from playwright.async_api import async_playwright

    org = await make_organization("Demo")
    headers = await auth_headers(org)
    token = headers["authorization"].removeprefix("Bearer ")
    base = str(api.base_url).rstrip("/")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await page.goto(base + "/")
        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#connect-form")
        await page.locator("#live-state", has_text="live updates on").wait_for(timeout=15_000)
        await page.evaluate("window.__sameDocument = true")

        await page.fill("#connect-user", "browser-user")
        await page.click("#connect-submit")
        await page.wait_for_selector("#connect-qr", timeout=30_000)
        first = await page.get_attribute("#connect-qr", "src")
        first_code = simulator.require("user_browser-user").qr_code
        assert first is not None and decode_qr(first) == first_code

        refreshed = simulator.emit_qr("user_browser-user")  # the gateway's next QR code arrives by webhook
        await emitter.flush()
        await page.wait_for_function(
            "(old) => document.getElementById('connect-qr')?.getAttribute('src') !== old", arg=first, timeout=15_000
        )
        second = await page.get_attribute("#connect-qr", "src")
        assert second is not None and decode_qr(second) == refreshed.code != first_code

        simulator.scan("user_browser-user")
        await emitter.flush()
        connected = page.locator("[data-connect=connected]")
        await connected.wait_for(timeout=15_000)
        panel = await page.inner_text("#connect-panel")
        await page.locator("#queue-import b", has_text="1").wait_for(timeout=15_000)
        row_status = page.locator("#instances tr", has_text="user_browser-user").locator("[data-field=status]")
        await row_status.filter(has_text="connected").wait_for(timeout=15_000)
        assert await page.evaluate("window.__sameDocument === true")  # no reload

        # Logged out elsewhere: "Reconnect now" asks the gateway for a new QR code.
        instance_id = uuid.UUID((await api.get("/users/browser-user/whatsapp", headers=headers)).json()["instance_id"])
        assert (await api.post(f"/instances/{instance_id}/logout", headers=headers)).status_code == 200
        reconnect = page.locator(f"button[data-action=reconnect][data-id='{instance_id}']")
        await reconnect.wait_for(timeout=15_000)
        await reconnect.click()
        await page.locator("[data-connect=qr]").wait_for(timeout=15_000)
        third = await page.get_attribute("#connect-qr", "src")
        await page.screenshot(path="/tmp/zapsync-connect.png", full_page=True)
        await browser.close()

    phone = simulator.require("user_browser-user").owner_jid
    assert phone is not None and phone.split("@")[0] in panel and "connected" in panel
    assert third is not None and decode_qr(third) == simulator.require("user_browser-user").qr_code
    assert (await instance_row(instance_id))["status"] == "qr_pending"
    async with session_scope() as session:
        imports = await session.execute(
            text("SELECT count(*) FROM work_items WHERE kind = 'import' AND instance_id = :id"), {"id": instance_id}
        )
        assert imports.scalar_one() == 1
