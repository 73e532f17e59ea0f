"""The conversations API: on-demand imports, filters, cursor pagination, live chats with a database fallback, and
organization scoping (an organization's token never sees another organization's rows)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from flows.import_conversations import import_queued_now
from tests.factories import auth_headers as token
from tests.factories import make_instance, make_organization

ADMIN = {"authorization": "Bearer test-admin-token"}


async def imported(
    simulator: Any, name: str, *, chats: int = 5, newest_at: datetime | None = None
) -> tuple[uuid.UUID, uuid.UUID]:
    """An organization with one Evolution instance whose generated history was imported."""
    org = await make_organization(name)
    simulator.add_instance(name, "evolution", "open")
    simulator.set_history(
        name,
        chats=chats,
        messages_per_chat=7,
        group_chats=1,
        media_every=0,
        newest_at=newest_at or datetime.now(UTC) - timedelta(minutes=5),
    )
    instance_id = await make_instance(org, name, status="connected")
    item = await import_queued_now(instance_id, trigger="manual")
    assert item.result is not None and item.result["outcome"] == "completed"
    return org, instance_id


async def pages(client: httpx.AsyncClient, url: str, headers: dict[str, str], key: str = "items") -> list[Any]:
    """Every item of a cursor-paginated listing."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        response = await client.get(url + (f"&cursor={cursor}" if cursor else ""), headers=headers)
        assert response.status_code == 200, response.text
        items += response.json()[key]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return items


@pytest.mark.usefixtures("prefect_server")
async def test_conversations_are_scoped_filtered_and_paginated(client, simulator) -> None:
    org_a, inst_a = await imported(simulator, "org-a", chats=5)
    org_b, _ = await imported(simulator, "org-b", chats=3)
    headers = await token(org_a)

    every = await pages(client, "/conversations?limit=2", headers)
    assert len(every) == 5 and len({c["id"] for c in every}) == 5
    assert {c["organization_id"] for c in every} == {str(org_a)}
    stamps = [(c["updated_at"], c["id"]) for c in every]
    assert stamps == sorted(stamps, reverse=True)
    ascending = await pages(client, "/conversations?limit=3&order=asc", headers)
    assert [c["id"] for c in ascending] == [c["id"] for c in reversed(every)]

    assert len(await pages(client, "/conversations?limit=50", ADMIN)) == 8
    assert len(await pages(client, f"/conversations?organization_id={org_b}", ADMIN)) == 3
    peek = await client.get(f"/conversations?organization_id={org_b}", headers=headers)
    assert peek.status_code == 403

    waiting = await pages(client, "/conversations?status=waiting", headers)
    assert waiting and all(c["status"] == "waiting" for c in waiting)
    assert len(await pages(client, f"/conversations?instance_id={inst_a}", headers)) == 5
    later = f"{datetime.now(UTC) + timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}"
    assert await pages(client, f"/conversations?updated_since={later}", headers) == []

    contact = every[0]["contact"]
    phone = contact["phone"]
    other_form = phone[:4] + phone[5:] if len(phone) == 13 else phone[:4] + "9" + phone[4:]
    by_phone = await pages(client, f"/conversations?phone={other_form}", headers)  # ninth digit or not
    assert [c["id"] for c in by_phone] == [every[0]["id"]]

    bad = await client.get("/conversations?cursor=not-a-cursor", headers=headers)
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"]


@pytest.mark.usefixtures("prefect_server")
async def test_messages_of_a_conversation_page_by_send_time(client, simulator) -> None:
    org_a, _ = await imported(simulator, "org-a")
    org_b, _ = await imported(simulator, "org-b", chats=1)
    headers = await token(org_a)
    conversation = (await client.get("/conversations?limit=1", headers=headers)).json()["items"][0]
    theirs = (await client.get("/conversations?limit=1", headers=await token(org_b))).json()["items"][0]

    newest_first = await pages(client, f"/conversations/{conversation['id']}/messages?limit=3", headers)
    oldest_first = await pages(client, f"/conversations/{conversation['id']}/messages?limit=4&order=asc", headers)

    assert len(newest_first) == 7 and len({m["id"] for m in newest_first}) == 7
    assert [m["id"] for m in oldest_first] == [m["id"] for m in reversed(newest_first)]
    assert newest_first[0]["sent_at"] == conversation["last_message_at"]
    assert {m["sender"] for m in newest_first} <= {"client", "agent"}
    hidden = await client.get(f"/conversations/{theirs['id']}/messages", headers=headers)
    assert hidden.status_code == 404


@pytest.mark.usefixtures("prefect_server")
async def test_live_chats_fall_back_to_the_database_and_say_so(client, simulator) -> None:
    org_a, inst_a = await imported(simulator, "org-a", chats=4)
    org_b, inst_b = await imported(simulator, "org-b", chats=1)
    headers = await token(org_a)
    mega = await make_instance(org_a, "mega-1", gateway="megaapi", status="connected")
    simulator.add_instance("mega-1", "megaapi", "open")

    live = await client.get(f"/instances/{inst_a}/chats?live=true", headers=headers)
    assert live.status_code == 200 and live.json()["source"] == "gateway"
    assert len(live.json()["items"]) == 5 and sum(c["is_group"] for c in live.json()["items"]) == 1

    simulator.configure(outage=True)
    fallback = await client.get(f"/instances/{inst_a}/chats?live=true", headers=headers)
    simulator.configure(outage=False)
    assert fallback.status_code == 200 and fallback.json()["source"] == "database"
    assert "503" in fallback.json()["fallback_reason"] or "unavailable" in fallback.json()["fallback_reason"]
    assert len(fallback.json()["items"]) == 4  # one-to-one chats only
    assert all(c["conversation_id"] and c["last_message_at"] for c in fallback.json()["items"])

    stored = await client.get(f"/instances/{inst_a}/chats?take=2", headers=headers)
    assert stored.json()["source"] == "database" and stored.json()["fallback_reason"] is None
    assert len(stored.json()["items"]) == 2
    unsupported = await client.get(f"/instances/{mega}/chats?live=true", headers=headers)
    assert unsupported.json()["source"] == "database" and "MegaAPI" in unsupported.json()["fallback_reason"]
    assert (await client.get(f"/instances/{inst_b}/chats?live=true", headers=headers)).status_code == 404
    del org_b


async def test_on_demand_import_is_queued_drained_by_a_worker_and_waited_for(client, simulator, queue_worker) -> None:
    org = await make_organization("org-a")
    other = await make_organization("org-b")
    simulator.add_instance("evo-api", "evolution", "open")
    simulator.set_history("evo-api", chats=3, messages_per_chat=5, newest_at=datetime.now(UTC))
    instance_id = await make_instance(org, "evo-api", status="connected")
    headers = await token(org)

    foreign = await client.post(f"/instances/{instance_id}/import", headers=await token(other))
    response = await client.post(
        f"/instances/{instance_id}/import", json={"wait": True, "timeout_seconds": 90}, headers=headers
    )

    assert foreign.status_code == 404
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["work_item"]["state"] == "done" and body["work_item"]["kind"] == "import"
    assert body["report"]["outcome"] == "completed" and body["report"]["trigger"] == "api"
    assert body["report"]["counts"]["messages_inserted"] == 15
    assert len(await pages(client, "/conversations?limit=10", headers)) == 3
