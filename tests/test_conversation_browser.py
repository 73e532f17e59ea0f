"""The dashboard's conversation view in headless Chromium (issue 11): a customer's message is shown, the agent's
reply goes through the outbox (one gateway send), and its status moves to sent and then read on the page without a
reload, as the gateway's echo and receipts arrive by webhook."""

from __future__ import annotations

import httpx
import pytest

from flows.send_messages import send_queued_now
from gateways.simulator import SimulatorState, WebhookEmitter
from tests.factories import auth_headers, make_instance, make_organization
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_messages_webhooks import CUSTOMER, envelope, message, post
from tests.test_provisioning import api, default_gateway, emitter  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.usefixtures("prefect_server"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
]


async def test_reply_from_the_conversation_view_is_sent_once_and_its_status_shown_live(
    api: httpx.AsyncClient,  # noqa: F811
    simulator: SimulatorState,
    emitter: WebhookEmitter,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from playwright.async_api import async_playwright

    from core.settings import get_settings

    monkeypatch.setenv("ZAPSYNC_SEND_MIN_INTERVAL", "0")
    get_settings.cache_clear()
    org = await make_organization("Shop", secret="org-secret")
    await make_instance(org, "acme-01", status="connected")
    simulator.add_instance("acme-01", live_state="open")
    base = str(api.base_url).rstrip("/")
    simulator.set_webhook(
        "acme-01",
        {"url": f"{base}/webhooks/evolution/{org}", "headers": {"x-webhook-secret": "org-secret"}, "events": []},
    )
    simulator.configure(receipts=True)
    inbound = await post(api, org, envelope("messages.upsert", message("3EB0CUSTOMER1", text_="Is my order ready?")))
    assert inbound.status_code == 200
    headers = await auth_headers(org)
    (conversation,) = (await api.get("/conversations", headers=headers)).json()["items"]
    token = headers["authorization"].removeprefix("Bearer ")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await page.goto(base + "/")
        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await page.click(f"a[href='/dashboard/conversations/{conversation['id']}']")
        await page.wait_for_selector("#reply")
        assert "Is my order ready?" in await page.inner_text("#messages")
        await page.evaluate("window.__sameDocument = true")

        await page.fill("#reply-text", "Yes, it ships today.")
        await page.click("#reply-send")
        reply = page.locator(".msg.out", has_text="Yes, it ships today.")
        await reply.wait_for(timeout=15_000)
        assert await reply.locator("[data-field=status]").inner_text() == "pending"

        (state,) = await send_queued_now([await _only_send_item()], timeout_seconds=30)
        await emitter.flush()
        assert state.state == "done"
        await reply.locator("[data-field=status]", has_text="read").wait_for(timeout=15_000)
        assert await page.evaluate("window.__sameDocument === true")  # updated live, no reload
        await page.screenshot(path="/tmp/zapsync-conversation.png", full_page=True)
        await browser.close()

    (sent,) = simulator.sends.records
    assert (sent.to, sent.text) == (CUSTOMER, "Yes, it ships today.")
    messages = (await api.get(f"/conversations/{conversation['id']}/messages", headers=headers)).json()["items"]
    assert sorted((m["from_me"], m["status"]) for m in messages) == [(False, "delivered"), (True, "read")]


async def _only_send_item() -> int:
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        return int((await session.execute(text("SELECT id FROM work_items WHERE kind = 'send'"))).scalar_one())
