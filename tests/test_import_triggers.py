"""Imports on connect go through the work queue: a `connection.update` webhook or a status-sync transition queues one
import per instance in the transaction that records the connect, and a warm worker drains the queue in a few flow
runs; the sync also queues imports that never finished. Real PostgreSQL, the simulator over loopback, real Prefect."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime
from sqlalchemy import text

from core.names import IMPORT_FLOW
from db.engine import session_scope
from db.repositories.import_runs import pending_imports
from flows.sync_status import sync_status
from tests.conftest import WorkerProcess
from tests.factories import count, make_instance, make_organization

pytestmark = pytest.mark.usefixtures("prefect_server")


async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 90,  # noqa: ASYNC109 - a deadline for a condition, not a timeout on one call
    what: str = "condition",
) -> None:
    """Wait until ``check()`` holds (polling a condition, not sleeping for a guessed time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.05
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 1.0)


async def import_flow_runs(since: datetime) -> int:
    """Flow runs of `import-conversations` created since ``since`` (through the Prefect API)."""
    async with get_client() as prefect:
        runs = await prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[IMPORT_FLOW])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since - timedelta(seconds=1))),
        )
    return len(runs)


async def queue_items(state: str | None = None) -> list[dict[str, object]]:
    async with session_scope() as session:
        rows = await session.execute(
            text(
                "SELECT id, key, state, attempts, payload, last_error FROM work_items WHERE kind = 'import' "
                "AND (CAST(:state AS text) IS NULL OR state = :state) ORDER BY id"
            ),
            {"state": state},
        )
        return [dict(r) for r in rows.mappings().all()]


async def imported(instance_id: uuid.UUID) -> int:
    async with session_scope() as session:
        return int(
            (
                await session.execute(
                    text("SELECT count(*) FROM import_runs WHERE instance_id = :i AND state = 'completed'"),
                    {"i": instance_id},
                )
            ).scalar_one()
        )


def opened(instance: str, at: datetime) -> dict[str, object]:
    """`connection.update` open (gateways.md §2.3)."""
    return {
        "event": "connection.update",
        "instance": instance,
        "date_time": at.isoformat().replace("+00:00", "Z"),
        "data": {
            "instance": instance,
            "state": "open",
            "statusReason": 200,
            "wuid": "5511988887777@s.whatsapp.net",
            "profileName": "Acme",
        },
        "destination": "http://zapsync/webhooks",
        "sender": "5511988887777@s.whatsapp.net",
        "server_url": "http://evolution",
        "apikey": None,
    }


async def post_open(client, organization_id: uuid.UUID, instance: str, at: datetime) -> str:
    response = await client.post(
        f"/webhooks/evolution/{organization_id}",
        content=orjson.dumps(opened(instance, at)),
        headers={"content-type": "application/json", "x-webhook-secret": "org-secret"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["outcome"])


async def test_open_webhook_delivered_three_times_queues_one_import_that_a_worker_runs(
    client, simulator, queue_worker: WorkerProcess
) -> None:
    org = await make_organization()
    simulator.add_instance("acme-01", "evolution", "open")
    simulator.set_history("acme-01", chats=3, messages_per_chat=4, group_chats=1, newest_at=datetime.now(UTC))
    instance_id = await make_instance(org, "acme-01", status="disconnected")
    at = datetime.now(UTC) - timedelta(seconds=2)

    outcomes = [await post_open(client, org, "acme-01", at) for _ in range(3)]

    assert outcomes == ["applied", "duplicate", "duplicate"]
    (item,) = await queue_items()
    assert item["key"] == str(instance_id)
    assert item["payload"]["trigger"] == "connect"
    assert str(item["payload"]["connection_key"]).startswith(f"import:{instance_id}:")

    await eventually(lambda: imported(instance_id), what="the import")
    assert await count("messages") == 12 and await count("conversations") == 3
    await eventually(lambda: _item_done(item["id"]), what="the queue item to finish")

    overlapping = await sync_status(mode="apply")  # a sync that sees the same connection queues nothing new
    assert overlapping.applied == 0
    assert [i["id"] for i in await queue_items()] == [item["id"]]
    async with session_scope() as session:
        stored = (await session.execute(text("SELECT trigger, connection_key, state FROM import_runs"))).one()
    assert tuple(stored) == ("connect", item["payload"]["connection_key"], "completed")


async def _item_done(item_id: object) -> bool:
    return any(i["id"] == item_id and i["state"] == "done" for i in await queue_items())


async def test_sync_transition_to_connected_queues_the_import(simulator, queue_worker: WorkerProcess) -> None:
    org = await make_organization()
    simulator.add_instance("evo-sync", "evolution", "open")
    simulator.set_history("evo-sync", chats=2, messages_per_chat=3, newest_at=datetime.now(UTC))
    instance_id = await make_instance(org, "evo-sync", status="disconnected")

    report = await sync_status(mode="apply")

    assert report.became_connected == [instance_id]
    (item,) = await queue_items()
    assert item["payload"]["trigger"] == "sync" and item["payload"]["connection_key"]
    await eventually(lambda: imported(instance_id), what="the import")
    assert await count("messages") == 6
    await eventually(lambda: _item_done(item["id"]), what="the queue item to finish")

    await sync_status(mode="apply")  # imported since it connected: nothing more to queue
    assert len(await queue_items()) == 1


async def test_a_connect_storm_is_imported_once_per_instance_by_a_handful_of_runs(
    client, simulator, queue_worker: WorkerProcess
) -> None:
    org = await make_organization()
    instances: dict[str, uuid.UUID] = {}
    for n in range(100):
        name = f"storm-{n:03d}"
        simulator.add_instance(name, "evolution", "open")
        simulator.set_history(name, chats=2, messages_per_chat=2, newest_at=datetime.now(UTC))
        instances[name] = await make_instance(org, name, status="disconnected")
    began = datetime.now(UTC)
    at = began - timedelta(seconds=5)

    outcomes = [await post_open(client, org, name, at + timedelta(seconds=k)) for k in range(2) for name in instances]

    assert outcomes.count("applied") == 100  # the second delivery of each is a repeat of the stored state

    async def all_imported() -> bool:
        return await count("messages") == 100 * 4 and not await queue_items("pending") + await queue_items("running")

    await eventually(all_imported, timeout=240, what="every instance's import")
    async with session_scope() as session:
        per_instance = (
            await session.execute(
                text("SELECT instance_id, count(*) FROM import_runs GROUP BY instance_id HAVING count(*) <> 1")
            )
        ).all()
    assert per_instance == []  # exactly one import run per instance
    assert len(await queue_items("done")) == 100
    assert await import_flow_runs(began) <= 3


@pytest.mark.slow
async def test_a_killed_workers_imports_are_taken_up_after_their_lease(
    simulator, start_worker: Callable[..., WorkerProcess]
) -> None:
    from tests.test_import import SHAPE, _shape, snapshot

    org = await make_organization()
    shape = {**SHAPE, "messages_per_chat": 40, "newest_at": datetime.now(UTC).replace(microsecond=0)}
    for name in ("evo-killed", "evo-clean"):
        simulator.add_instance(name, "evolution", "open")
        simulator.set_history(name, **shape)
    killed = await make_instance(org, "evo-killed", status="connected")
    clean = await make_instance(org, "evo-clean", status="connected")
    settings = {"ZAPSYNC_QUEUE_LEASE": "3", "ZAPSYNC_IMPORT_PAGE_SIZE": "10"}
    simulator.configure(latency_ms=200)  # slow pages (36 of them), so the kill lands mid-import
    first = start_worker(**settings)

    async with session_scope() as session:
        from db.repositories.import_runs import import_request, request_imports

        await request_imports(session, [import_request(killed, org, trigger="connect")])

    async def some_messages() -> bool:
        return await count("messages") > 0

    await eventually(some_messages, what="the first pages")
    first.kill()
    (item,) = await queue_items("running")
    partial = await count("messages")
    simulator.configure(latency_ms=0)

    second = start_worker(**settings)
    await eventually(lambda: _item_done(item["id"]), timeout=120, what="the import, resumed by another worker")
    (finished,) = await queue_items("done")
    assert finished["attempts"] == 2 and partial < await count("messages")

    async with session_scope() as session:
        from db.repositories.import_runs import import_request, request_imports

        await request_imports(session, [import_request(clean, org, trigger="connect")])
    await eventually(lambda: imported(clean), timeout=120, what="the uninterrupted import")
    second.stop()
    assert _shape(await snapshot(killed)) == _shape(await snapshot(clean))


async def test_pending_imports_covers_never_finished_and_new_connections() -> None:
    org = await make_organization()
    now = datetime.now(UTC)
    ids = {
        name: await make_instance(org, name, status="connected")
        for name in ("never", "failed", "dead", "busy", "done", "reconnected", "queued")
    }
    await make_instance(org, "offline", status="disconnected")
    await make_instance(org, "mega", gateway="megaapi", status="connected")
    runs = {
        "failed": ("failed", now - timedelta(hours=1), now),
        "dead": ("running", now - timedelta(hours=2), None),
        "busy": ("running", now - timedelta(minutes=1), now),
        "done": ("completed", now - timedelta(hours=1), None),
        "reconnected": ("completed", now - timedelta(days=2), None),
    }
    async with session_scope() as session:
        for name, instance_id in ids.items():
            connected = now - timedelta(days=1) if name != "reconnected" else now - timedelta(hours=3)
            await session.execute(
                text(
                    "INSERT INTO whatsapp_sessions (instance_id, status, connected_at, last_activity_at) "
                    "VALUES (:i, 'active', :c, :c)"
                ),
                {"i": instance_id, "c": connected},
            )
        for name, (state, started, beat) in runs.items():
            await session.execute(
                text(
                    "INSERT INTO import_runs (instance_id, trigger, state, started_at, cursor) VALUES "
                    "(:i, 'connect', :s, :t, CAST(:cursor AS jsonb))"
                ),
                {
                    "i": ids[name],
                    "s": state,
                    "t": started,
                    "cursor": orjson.dumps({"at": beat.isoformat()} if beat else {}).decode(),
                },
            )
        await session.execute(  # already queued: the queue will import it
            text("INSERT INTO work_items (kind, key, instance_id) VALUES ('import', :k, :i)"),
            {"k": str(ids["queued"]), "i": ids["queued"]},
        )
        pending = await pending_imports(session, gateways=["evolution"], first=[ids["reconnected"]])

    reasons = {item.instance_id: item.reason for item in pending}
    assert reasons == {
        ids["reconnected"]: "connected",
        ids["never"]: "never_imported",
        ids["failed"]: "unfinished",
        ids["dead"]: "unfinished",
    }
    assert pending[0].instance_id == ids["reconnected"]  # just-connected instances first


async def test_the_warm_worker_yields_the_cpu_to_requests(start_worker: Callable[..., WorkerProcess]) -> None:
    import psutil

    from db.repositories.work_queue import listening_workers

    lowered, kept = start_worker(), start_worker(ZAPSYNC_WORKER_NICE="0")

    async def both_listening() -> bool:
        async with session_scope() as session:
            return await listening_workers(session) == 2

    await eventually(both_listening, what="both workers listening")
    base = psutil.Process().nice()
    assert psutil.Process(lowered.process.pid).nice() == min(base + 10, 19)  # ZAPSYNC_WORKER_NICE's default
    assert psutil.Process(kept.process.pid).nice() == base
