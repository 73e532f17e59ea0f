"""Webhook receivers: authentication, validation, dedupe, newest-wins and flood handling (real PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from api.inbox import RepeatFilter
from api.main import create_app
from core.batching import chunks
from core.domain import InstanceRef, InstanceStatus
from core.policies.status import diff_observations
from gateways.registry import open_gateways
from tasks.status import apply_batch, observe_batch
from tests.factories import count, history, instance_row, make_instance, make_organization


def evolution(event: str, instance: str, data: object, *, at: datetime | None = None) -> dict[str, object]:
    """An Evolution v2 delivery envelope (gateways.md §2.1)."""
    return {
        "event": event,
        "instance": instance,
        "data": data,
        "destination": "http://zapsync/webhooks",
        "date_time": (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "sender": "5511999990000@s.whatsapp.net",
        "server_url": "http://evolution",
        "apikey": None,
    }


def opened(instance: str, *, at: datetime | None = None) -> dict[str, object]:
    """`connection.update` with state open."""
    return evolution(
        "connection.update",
        instance,
        {
            "instance": instance,
            "state": "open",
            "statusReason": 200,
            "wuid": "5511988887777@s.whatsapp.net",
            "profileName": "Acme",
        },
        at=at,
    )


async def post(
    client: httpx.AsyncClient,
    org: uuid.UUID,
    body: object,
    *,
    secret: str = "org-secret",
    provider: str = "evolution",
    suffix: str = "",
) -> httpx.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post(
        f"/webhooks/{provider}/{org}{suffix}",
        content=raw,
        headers={"content-type": "application/json", "x-webhook-secret": secret},
    )


async def test_connection_open_applies_status_history_and_session(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")

    response = await post(client, org, opened("acme-01"))

    assert response.status_code == 200
    assert response.json()["outcome"] == "applied"
    row = await instance_row(instance_id)
    assert row["status"] == "connected" and row["phone_number"] == "5511988887777"
    assert row["profile_name"] == "Acme"
    assert await history(instance_id) == [("disconnected", "connected", "webhook")]
    assert await count("whatsapp_sessions") == 1
    assert await count("webhook_events") == 1


async def test_missing_or_wrong_secret_is_401_and_changes_nothing(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")

    missing = await client.post(f"/webhooks/evolution/{org}", json=opened("acme-01"))
    wrong = await post(client, org, opened("acme-01"), secret="not-the-secret")
    unknown_org = await post(client, uuid.uuid4(), opened("acme-01"))

    assert [missing.status_code, wrong.status_code, unknown_org.status_code] == [401, 401, 401]
    assert "secret" in missing.json()["detail"]
    assert (await instance_row(instance_id))["status"] == "disconnected"
    assert await count("webhook_events") == 0


async def test_the_secret_may_travel_as_a_bearer_token(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    url = f"/webhooks/evolution/{org}"

    wrong = await client.post(url, json=opened("acme-01"), headers={"authorization": "Bearer not-the-secret"})
    other_scheme = await client.post(url, json=opened("acme-01"), headers={"authorization": "Basic org-secret"})
    right = await client.post(url, json=opened("acme-01"), headers={"authorization": "Bearer org-secret"})

    assert [wrong.status_code, other_scheme.status_code, right.status_code] == [401, 401, 200]
    assert right.json()["outcome"] == "applied"
    assert (await instance_row(instance_id))["status"] == "connected"


async def test_one_organizations_secret_cannot_touch_another_organizations_instance(
    client: httpx.AsyncClient,
) -> None:
    org_a = await make_organization("A", secret="secret-a")
    org_b = await make_organization("B", secret="secret-b")
    b_instance = await make_instance(org_b, "b-01")

    via_own_url = await post(client, org_a, opened("b-01"), secret="secret-a")
    via_b_url = await post(client, org_b, opened("b-01"), secret="secret-a")

    assert via_own_url.status_code == 200 and via_own_url.json()["outcome"] == "ignored"
    assert via_b_url.status_code == 401
    assert (await instance_row(b_instance))["status"] == "disconnected"
    assert await history(b_instance) == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty body"),
        (b"[1, 2]", "JSON object"),
        (orjson.dumps({"instance": "acme-01", "data": {}}), "event"),
        (orjson.dumps({"event": "connection.update", "instance": "acme-01", "data": {}}), "data.state"),
        (orjson.dumps({"event": "connection.update", "instance": "acme-01", "data": {"state": "melted"}}), "melted"),
    ],
)
async def test_malformed_payloads_get_422_with_a_message(client: httpx.AsyncClient, body: bytes, needle: str) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")

    response = await post(client, org, body)

    assert response.status_code == 422
    assert needle in response.json()["detail"]
    assert (await instance_row(instance_id))["status"] == "disconnected"
    assert await count("webhook_events") == 0


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    huge = orjson.dumps(evolution("messages.upsert", "acme-01", {"text": "x" * 2_000_000}))

    response = await post(client, org, huge)

    assert response.status_code == 413
    assert await count("webhook_events") == 0


async def test_unknown_events_are_stored_and_acknowledged(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    body = evolution("labels.association", "acme-01", {"label": {"id": "1"}, "type": "add"})

    first = await post(client, org, body)
    again = await post(client, org, body)

    assert first.status_code == 200 and first.json()["outcome"] == "stored"
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert await count("webhook_events") == 1


async def test_redelivered_event_leaves_one_history_row(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    body = opened("acme-01")

    outcomes = [(await post(client, org, body)).json()["outcome"] for _ in range(3)]

    assert outcomes == ["applied", "duplicate", "duplicate"]
    assert await history(instance_id) == [("disconnected", "connected", "webhook")]
    assert await count("webhook_events") == 1


async def test_reconnect_loop_flood_costs_no_row_per_event(client: httpx.AsyncClient) -> None:
    """A gateway in a reconnect loop repeats the same state with a fresh timestamp each time."""
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    start = datetime.now(UTC) - timedelta(seconds=5)

    outcomes = []
    for i in range(120):
        response = await post(client, org, opened("acme-01", at=start + timedelta(milliseconds=16 * i)))
        outcomes.append(response.json()["outcome"])

    assert outcomes.count("applied") == 1
    assert await history(instance_id) == [("disconnected", "connected", "webhook")]
    assert await count("webhook_events") == 1
    assert await count("whatsapp_sessions") == 1


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_repeat_is_answered_from_memory_only_within_the_window() -> None:
    clock = Clock()
    app = create_app(check_database=False)
    app.state.repeat_filter = RepeatFilter(5.0, timer=clock)
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    start = datetime.now(UTC) - timedelta(seconds=10)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as http:
        first = await post(http, org, opened("acme-01", at=start))
        clock.now += 4.9
        within = await post(http, org, opened("acme-01", at=start + timedelta(seconds=1)))
        clock.now += 0.2
        after = await post(http, org, opened("acme-01", at=start + timedelta(seconds=2)))

    assert first.json()["outcome"] == "applied"
    assert (within.json()["outcome"], within.json()["detail"]) == ("duplicate", "repeat of the state just handled")
    assert (after.json()["outcome"], after.json()["detail"]) == ("duplicate", "state already stored")  # asked the DB
    assert await history(instance_id) == [("disconnected", "connected", "webhook")]


async def test_a_late_older_status_loses_to_a_newer_repeat_the_filter_swallowed() -> None:
    app = create_app(check_database=False)
    app.state.repeat_filter = RepeatFilter(60.0)
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    start = datetime.now(UTC) - timedelta(seconds=30)
    closed = evolution(
        "connection.update",
        "acme-01",
        {"instance": "acme-01", "state": "close", "statusReason": 428},
        at=start + timedelta(seconds=1),
    )

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as http:
        first = await post(http, org, opened("acme-01", at=start))
        newest = await post(http, org, opened("acme-01", at=start + timedelta(seconds=2)))  # a repeat: not written
        late = await post(http, org, closed)  # observed between the two: stale

    assert first.json()["outcome"] == "applied"
    assert newest.json()["outcome"] == "duplicate"
    assert late.json()["outcome"] == "ignored", late.json()
    assert await history(instance_id) == [("disconnected", "connected", "webhook")]


def test_repeat_filter_keeps_only_the_last_state_of_a_bounded_number_of_instances() -> None:
    clock = Clock()
    repeats = RepeatFilter(5.0, max_entries=2, timer=clock)

    repeats.remember("a", "open")
    repeats.remember("a", "connecting")
    assert not repeats.is_repeat("a", "open") and repeats.is_repeat("a", "connecting")

    repeats.remember("b", "open")
    repeats.remember("c", "open")  # over the bound: "a", the least recently used, goes
    assert [repeats.is_repeat(key, "open") for key in "bc"] == [True, True]
    assert not repeats.is_repeat("a", "connecting")

    clock.now += 5.0
    assert not repeats.is_repeat("c", "open")


def test_a_zero_window_disables_the_repeat_filter() -> None:
    repeats = RepeatFilter(0.0, timer=Clock())

    repeats.remember("a", "open")

    assert not repeats.is_repeat("a", "open")


async def test_real_transitions_in_a_flood_are_each_recorded(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    start = datetime.now(UTC) - timedelta(seconds=5)
    connecting = {"instance": "acme-01", "state": "connecting", "statusReason": 200}

    for i in range(6):
        at = start + timedelta(milliseconds=100 * i)
        body = opened("acme-01", at=at) if i % 2 == 0 else evolution("connection.update", "acme-01", connecting, at=at)
        assert (await post(client, org, body)).status_code == 200

    assert [to for _, to, _ in await history(instance_id)] == ["connected", "connecting"] * 3
    assert (await instance_row(instance_id))["status"] == "connecting"


async def test_older_webhook_is_ignored(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    now = datetime.now(UTC)
    instance_id = await make_instance(org, "acme-01", status="disconnected", observed_at=now - timedelta(seconds=1))

    stale = await post(client, org, opened("acme-01", at=now - timedelta(seconds=30)))

    assert stale.json()["outcome"] == "ignored"
    assert (await instance_row(instance_id))["status"] == "disconnected"
    assert await history(instance_id) == []


async def test_webhook_observed_after_the_poll_started_wins(client: httpx.AsyncClient, simulator) -> None:
    org = await make_organization()
    simulator.add_instance("acme-01", "evolution", "close")
    instance_id = await make_instance(org, "acme-01", status="connected")
    ref = InstanceRef(instance_id, org, "evolution", "acme-01", InstanceStatus.CONNECTED, None, None)

    async with open_gateways({"evolution"}) as gateways:  # the poll observes "close"…
        observations = (await observe_batch.fn(gateways["evolution"], [ref], confirm=set())).value
    assert await post(client, org, opened("acme-01")) is not None  # …then the instance reconnects: webhook
    assert (await instance_row(instance_id))["status"] == "connected"

    drifts, _, writes = diff_observations([ref], observations)
    assert drifts and drifts[0].gateway_status == "disconnected"
    applied = (await apply_batch.fn(chunks(writes, 10)[0], source="sync", flow_run_id=None)).value

    assert applied == []  # the older poll lost to the newer webhook
    row = await instance_row(instance_id)
    assert row["status"] == "connected"
    assert row["status_observed_at"] > observations[0].observed_at
    assert await history(instance_id) == []


async def test_qr_code_and_logged_out_close(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "acme-01")
    start = datetime.now(UTC) - timedelta(seconds=3)
    qr = evolution(
        "qrcode.updated",
        "acme-01",
        {
            "qrcode": {
                "instance": "acme-01",
                "pairingCode": None,
                "code": "2@abc",
                "base64": "data:image/png;base64,AAAA",
            }
        },
        at=start,
    )

    assert (await post(client, org, qr, suffix="/qrcode-updated")).json()["outcome"] == "applied"
    row = await instance_row(instance_id)
    assert row["status"] == "qr_pending" and row["qr_code"] == "2@abc"  # the raw string, never an image

    await post(client, org, opened("acme-01", at=start + timedelta(seconds=1)))
    closed = evolution(
        "connection.update",
        "acme-01",
        {"instance": "acme-01", "state": "close", "statusReason": 401},
        at=start + timedelta(seconds=2),
    )
    assert (await post(client, org, closed)).json()["outcome"] == "applied"
    row = await instance_row(instance_id)
    assert row["status"] == "disconnected" and "logged out" in row["status_reason"]
    assert row["logged_out"] is True
    assert row["qr_code"] is None
    assert [to for _, to, _ in await history(instance_id)] == ["qr_pending", "connected", "disconnected"]


@pytest.mark.parametrize("shape", ["official", "client-2026"])
async def test_megaapi_connection_update_in_both_shapes(client: httpx.AsyncClient, shape: str) -> None:
    org = await make_organization()
    instance_id = await make_instance(org, "megacode-1", gateway="megaapi")
    if shape == "official":
        body = {
            "instance_key": "megacode-1",
            "messageType": "connection_update",
            "connection_state": "open",
            "timestamp": int(datetime.now(UTC).timestamp()),
            "closeReason": None,
        }
    else:
        body = {
            "instance_key": "megacode-1",
            "messageType": "connection_update",
            "message": "phone_connected",
            "jid": "5511977776666@s.whatsapp.net",
            "pushName": "Mega",
        }

    response = await post(client, org, body, provider="megaapi")

    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    assert (await instance_row(instance_id))["status"] == "connected"


async def test_megaapi_secret_may_travel_in_the_query(client: httpx.AsyncClient) -> None:
    org = await make_organization()
    await make_instance(org, "megacode-1", gateway="megaapi")
    body = {"instance_key": "megacode-1", "messageType": "connection_update", "message": "phone_connected"}

    response = await client.post(f"/webhooks/megaapi/{org}?secret=org-secret", json=body)

    assert response.status_code == 200 and response.json()["outcome"] == "applied"
