"""Conversation import end to end: the simulator's generated history over loopback HTTP, real PostgreSQL, real
Prefect flow runs. Expectations are computed from the simulator's own description of the history."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from core.phones import phone_variants
from core.reports import ImportReport
from core.settings import get_settings
from db.engine import session_scope
from db.locks import try_advisory_lock
from flows.import_conversations import import_instance, import_queued_now
from gateways.simulator.history import History
from tests.factories import make_instance, make_organization

pytestmark = pytest.mark.usefixtures("prefect_server")


async def imported(instance_id: uuid.UUID, **options: Any) -> ImportReport:
    """Queue an import and drain it in a real flow run (the path every trigger takes); its report."""
    options.setdefault("trigger", "manual")
    item = await import_queued_now(instance_id, **options)
    assert item.finished and item.result is not None, item
    return ImportReport.model_validate(item.result)


SHAPE = {
    "chats": 9,
    "messages_per_chat": 7,
    "group_chats": 2,
    "group_messages": 4,
    "broadcast_messages": 3,
    "empty_chats": 2,
    "extra_contacts": 2,
    "lid_every": 4,
    "no_ninth_digit_every": 3,
    "media_every": 3,
    "spacing_s": 3600,
}
STATUS_ORDER = ("failed", "pending", "sent", "delivered", "read", "played")
WIRE_STATUS = {"DELIVERY_ACK": "delivered", "READ": "read"}
TYPES = {
    "conversation": "text",
    "imageMessage": "image",
    "audioMessage": "audio",
    "documentMessage": "document",
    "videoMessage": "video",
    "stickerMessage": "sticker",
}


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Gateway pages of 10 records (so a small history spans several pages and checkpoints)."""
    monkeypatch.setenv("ZAPSYNC_IMPORT_PAGE_SIZE", "10")
    get_settings.cache_clear()
    yield 10
    monkeypatch.delenv("ZAPSYNC_IMPORT_PAGE_SIZE")
    get_settings.cache_clear()


async def world(
    simulator: Any, *, newest_at: datetime, name: str = "evo-1", **shape: Any
) -> tuple[uuid.UUID, uuid.UUID, History]:
    """An organization, a connected Evolution instance and its generated history."""
    org = await make_organization()
    simulator.add_instance(name, "evolution", "open")
    history = simulator.set_history(name, **{**SHAPE, **shape, "newest_at": newest_at})
    instance_id = await make_instance(org, name, status="connected")
    return org, instance_id, history


async def add_client(organization_id: uuid.UUID, phone: str, name: str = "Client") -> uuid.UUID:
    async with session_scope() as session:
        return (
            await session.execute(
                text("INSERT INTO clients (organization_id, name, phone) VALUES (:org, :name, :phone) RETURNING id"),
                {"org": organization_id, "name": name, "phone": phone},
            )
        ).scalar_one()


async def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
    async with session_scope() as session:
        return [dict(r) for r in (await session.execute(text(sql), params)).mappings().all()]


async def snapshot(instance_id: uuid.UUID) -> dict[str, list[tuple[Any, ...]]]:
    """Every imported row of an instance, minus bookkeeping timestamps."""
    contacts = await rows(
        "SELECT id, jid, alt_jid, phone, name, client_id, is_group FROM contacts WHERE instance_id = :i ORDER BY id",
        i=instance_id,
    )
    conversations = await rows(
        "SELECT id, contact_id, status, opened_at, last_message_at, waiting_since, close_reason, closed_at IS NULL "
        "AS open FROM conversations WHERE instance_id = :i ORDER BY id",
        i=instance_id,
    )
    messages = await rows(
        "SELECT id, conversation_id, external_id, from_me, sender, type, content, media_url, media_mime, media_name, "
        "media_size, sent_at, status FROM messages WHERE instance_id = :i ORDER BY id",
        i=instance_id,
    )
    return {
        "contacts": [tuple(r.values()) for r in contacts],
        "conversations": [tuple(r.values()) for r in conversations],
        "messages": [tuple(r.values()) for r in messages],
    }


def expected_messages(history: History, since: int | None = None) -> dict[str, tuple[str, int, bool, str]]:
    """external id → (chat jid, timestamp, from_me, type) of every one-to-one message (within ``since``)."""
    found = {}
    for c in range(history.individual):
        for k in range(history.sizes[c]):
            record = history.record(c, k)
            if since is not None and record["messageTimestamp"] < since:
                continue
            found[record["key"]["id"]] = (
                record["key"]["remoteJid"],
                record["messageTimestamp"],
                record["key"]["fromMe"],
                TYPES[record["messageType"]],
            )
    return found


async def test_import_creates_exactly_the_expected_rows(simulator) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    org, instance_id, history = await world(simulator, newest_at=now - timedelta(minutes=30))
    people = [history.chat(c) for c in range(history.individual)]
    short = next(p for p in people if p.phone != p.full_phone)  # jid lacks the ninth digit
    full = next(p for p in people if p.phone == p.full_phone and p.alt_jid is None)
    lid = next(p for p in people if p.alt_jid is not None)  # keyed by @lid, phone in remoteJidAlt
    assert short.full_phone is not None and full.phone is not None and lid.phone is not None
    linked = {
        short.jid: await add_client(org, short.full_phone, "stored with the ninth digit"),
        full.jid: await add_client(org, phone_variants(full.phone)[1], "stored without it"),
        lid.alt_jid: await add_client(org, lid.phone, "LID contact"),
    }
    other_org = await make_organization("Other")
    await add_client(other_org, people[1].phone or "")  # another organization's client never links

    report = await imported(instance_id)

    assert report.outcome == "completed" and report.flow_run_id is not None
    c = report.counts
    assert (c.chats_seen, c.chats_imported) == (history.chat_total, history.individual)
    assert (c.chats_skipped_group, c.chats_skipped_broadcast, c.chats_skipped_empty) == (2, 1, 2)
    expected = expected_messages(history)
    assert (c.messages_inserted, c.messages_present) == (len(expected), 0)
    assert c.messages_skipped == 2 * 4 + 3  # group and broadcast messages
    assert c.contacts_linked == 3

    contacts = await rows(
        "SELECT jid, alt_jid, phone, name, client_id FROM contacts WHERE instance_id = :i", i=instance_id
    )
    expected_jids = {(p.alt_jid or p.jid) for p in people} | {
        history.chat(history.message_chats + e).jid for e in range(2)
    }
    expected_jids |= {f"{history._person(history.chat_total + j, 0).phone}@s.whatsapp.net" for j in range(2)}
    assert {r["jid"] for r in contacts} == expected_jids  # no groups, no broadcast; LID chats keyed by phone
    by_jid = {r["jid"]: r for r in contacts}
    assert by_jid[lid.alt_jid]["alt_jid"] == lid.jid
    assert {jid: by_jid[jid]["client_id"] for jid in linked} == linked
    assert sum(1 for r in contacts if r["client_id"]) == 3
    assert by_jid[short.jid]["phone"] == short.phone and by_jid[people[0].jid]["name"] == people[0].name

    stored = await rows(
        "SELECT m.external_id, m.sent_at, m.from_me, m.type, m.sender, m.media_mime, m.content, m.status, c.jid "
        "FROM messages m JOIN conversations v ON v.id = m.conversation_id JOIN contacts c ON c.id = v.contact_id "
        "WHERE m.instance_id = :i",
        i=instance_id,
    )
    assert len(stored) == len(expected)
    for m in stored:
        chat_jid, ts, from_me, kind = expected[m["external_id"]]
        assert (int(m["sent_at"].timestamp()), m["from_me"], m["type"]) == (ts, from_me, kind)
        assert m["jid"] in (
            chat_jid,
            by_jid.get(chat_jid, {}).get("jid"),
            history.chat_index(chat_jid) is not None and (history.chat(history.chat_index(chat_jid)).alt_jid),
        )
        assert m["sender"] == ("agent" if from_me else "client")
        assert (m["media_mime"] is not None) == (kind not in ("text",))
    assert {m["status"] for m in stored} <= {"delivered", "read"}

    conversations = await rows(
        "SELECT v.*, c.jid FROM conversations v JOIN contacts c ON c.id = v.contact_id WHERE v.instance_id = :i",
        i=instance_id,
    )
    assert len(conversations) == history.individual  # one per chat with messages
    for conv in conversations:
        chat = history.chat(
            next(i for i in range(history.individual) if conv["jid"] in (history.chat(i).jid, history.chat(i).alt_jid))
        )
        newest, oldest = history.record(chat.index, 0), history.record(chat.index, chat.messages - 1)
        assert conv["last_message_at"].timestamp() == newest["messageTimestamp"]
        assert conv["opened_at"].timestamp() == oldest["messageTimestamp"]
        # Recent history stays open: waiting on the business when the customer wrote last.
        assert conv["status"] == ("in_progress" if newest["key"]["fromMe"] else "waiting")
        if not newest["key"]["fromMe"]:
            streak = []
            for k in range(chat.messages):
                record = history.record(chat.index, k)
                if record["key"]["fromMe"]:
                    break
                streak.append(record["messageTimestamp"])
            assert conv["waiting_since"].timestamp() == min(streak)
        else:
            assert conv["waiting_since"] is None

    async with session_scope() as session:
        run = (await session.execute(text("SELECT state, cursor, counts FROM import_runs"))).one()
        stored_report = (
            await session.execute(text("SELECT result FROM work_items WHERE kind = 'import'"))
        ).scalar_one()
        drain_report = (
            await session.execute(
                text("SELECT report FROM flow_reports WHERE flow_run_id = :id"), {"id": report.flow_run_id}
            )
        ).scalar_one()
    assert run.state == "completed" and run.cursor["phase"] == "done"
    assert stored_report["counts"]["messages_inserted"] == len(expected)  # the instance's report, with its item
    assert (drain_report["kind"], drain_report["claimed"], drain_report["done"]) == ("import", 1, 1)


async def test_old_history_is_imported_closed(simulator) -> None:
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    _, instance_id, history = await world(simulator, newest_at=newest)

    report = await imported(instance_id)

    assert report.counts.conversations_closed == history.individual and report.counts.conversations_opened == 0
    statuses = await rows(
        "SELECT status, close_reason, waiting_since FROM conversations WHERE instance_id = :i", i=instance_id
    )
    assert {(r["status"], r["close_reason"], r["waiting_since"]) for r in statuses} == {("closed", "imported", None)}


async def test_running_the_import_twice_changes_nothing(simulator) -> None:
    _, instance_id, history = await world(simulator, newest_at=datetime.now(UTC) - timedelta(hours=2))
    first = await imported(instance_id)
    before = await snapshot(instance_id)

    second = await imported(instance_id, full=True)  # re-reads everything (a plain rerun reads only what is new)

    assert await snapshot(instance_id) == before
    assert second.counts.messages_inserted == 0
    assert second.counts.messages_present == first.counts.messages_inserted == len(expected_messages(history))
    assert second.counts.contacts_created == 0 and second.counts.conversations_opened == 0
    async with session_scope() as session:
        runs = (await session.execute(text("SELECT count(*) FROM import_runs WHERE state = 'completed'"))).scalar()
    assert runs == 2


@pytest.mark.usefixtures("small_pages")
async def test_a_crashed_import_resumes_at_its_checkpoint_and_matches_a_clean_one(simulator) -> None:
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    _, clean_id, _ = await world(simulator, newest_at=newest, name="clean")
    await imported(clean_id)
    clean = await snapshot(clean_id)
    org = await make_organization("Crashing")
    simulator.add_instance("crash", "evolution", "open")
    history = simulator.set_history("crash", **{**SHAPE, "newest_at": newest})
    instance_id = await make_instance(org, "crash", status="connected")
    pages = -(-history.total_messages // 10)
    assert pages >= 5
    simulator.configure(fail_find_messages_after_page=3)

    crashed_report = await import_instance(instance_id)  # a 500 is permanent: the report says why
    assert crashed_report.outcome == "failed" and "findMessages" in (crashed_report.error or "")

    async with session_scope() as session:
        run = (
            await session.execute(
                text("SELECT id, state, cursor, error FROM import_runs WHERE instance_id = :i"), {"i": instance_id}
            )
        ).one()
        partial = (
            await session.execute(text("SELECT count(*) FROM messages WHERE instance_id = :i"), {"i": instance_id})
        ).scalar()
        # A killed process leaves its run `running`: the next run takes it over just the same.
        await session.execute(text("UPDATE import_runs SET state = 'running' WHERE id = :id"), {"id": run.id})
    assert run.state == "failed" and "findMessages" in run.error
    checkpoint = run.cursor["messages"]
    done_pages = checkpoint["below"] - 1 + len(checkpoint["done"])  # pages 2–3 may have finished before the stop
    assert run.cursor["phase"] == "messages" and 1 <= done_pages <= 3
    assert 0 < partial < len(expected_messages(history))

    simulator.configure(fail_find_messages_after_page=None)
    calls_before = simulator.calls["evolution.findMessages:crash"]
    resumed = await imported(instance_id)

    assert resumed.outcome == "completed" and resumed.resumed and resumed.import_run_id == run.id
    assert simulator.calls["evolution.findMessages:crash"] - calls_before == pages - done_pages  # the rest only
    assert resumed.counts.messages_inserted == len(expected_messages(history))  # cumulative over both attempts
    assert resumed.counts.messages_present == 0
    crashed = await snapshot(instance_id)
    assert _shape(crashed) == _shape(clean)
    async with session_scope() as session:
        duplicates = (
            await session.execute(
                text("SELECT count(*) - count(DISTINCT external_id) FROM messages WHERE instance_id = :i"),
                {"i": instance_id},
            )
        ).scalar()
    assert duplicates == 0


def _shape(snap: dict[str, list[tuple[Any, ...]]]) -> dict[str, Any]:
    """A snapshot without row ids (two instances' rows compared by content)."""
    contacts = {r[0]: r[1:] for r in snap["contacts"]}
    conversation_contact = {r[0]: contacts[r[1]][0] for r in snap["conversations"]}
    return {
        "contacts": sorted(r[1:] for r in snap["contacts"]),
        "conversations": sorted((contacts[r[1]][0], *r[2:]) for r in snap["conversations"]),
        "messages": sorted((conversation_contact[r[1]], *r[2:]) for r in snap["messages"]),
    }


async def test_history_days_limits_what_is_imported(simulator) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    # Chat c's messages are 20 hours apart; the oldest chats' newest messages fall outside a 1-day window too.
    _, instance_id, history = await world(simulator, newest_at=now - timedelta(hours=1), spacing_s=20 * 3600)

    report = await imported(instance_id, history_days=1)

    since = report.since
    assert since is not None and abs((now - timedelta(days=1) - since).total_seconds()) < 120
    expected = expected_messages(history, since=int(since.timestamp()))
    assert 0 < len(expected) < len(expected_messages(history))
    assert report.counts.messages_inserted == len(expected)
    stored = {
        r["external_id"] for r in await rows("SELECT external_id FROM messages WHERE instance_id = :i", i=instance_id)
    }
    assert stored == set(expected)


async def test_organization_history_setting_is_the_default_window(simulator) -> None:
    org, instance_id, history = await world(
        simulator, newest_at=datetime.now(UTC) - timedelta(hours=1), spacing_s=20 * 3600
    )
    async with session_scope() as session:
        await session.execute(text("UPDATE organizations SET import_history_days = 1 WHERE id = :id"), {"id": org})

    report = await imported(instance_id)
    full = await imported(instance_id, full=True)

    assert report.history_days == 1 and report.counts.messages_inserted < len(expected_messages(history))
    assert full.history_days is None and not full.resumed
    assert report.counts.messages_inserted + full.counts.messages_inserted == len(expected_messages(history))


async def test_megaapi_instances_report_not_supported(simulator) -> None:
    org = await make_organization()
    simulator.add_instance("mega-1", "megaapi", "open")
    instance_id = await make_instance(org, "mega-1", gateway="megaapi", status="connected")

    report = await imported(instance_id)

    assert report.outcome == "not_supported"
    assert report.skipped is not None and "not supported by this gateway" in report.skipped
    assert not any(key.startswith("megaapi.") for key in simulator.calls)
    assert await rows("SELECT id FROM import_runs") == []


async def test_imports_of_one_instance_never_overlap(simulator) -> None:
    _, instance_id, _ = await world(simulator, newest_at=datetime.now(UTC))

    async with try_advisory_lock(f"import:{instance_id}") as acquired:
        assert acquired
        report = await imported(instance_id)

    assert report.outcome == "skipped" and "another import" in (report.skipped or "")
    assert await rows("SELECT id FROM messages") == []


async def test_a_connection_is_imported_once(simulator) -> None:
    _, instance_id, _ = await world(simulator, newest_at=datetime.now(UTC))
    key = f"import:{instance_id}:2026-01-01T00:00:00+00:00"

    first = await imported(instance_id, trigger="connect", connection_key=key)
    again = await imported(instance_id, trigger="connect", connection_key=key)

    assert first.outcome == "completed"
    assert again.outcome == "skipped" and "already imported" in (again.skipped or "")
    assert not simulator.calls["evolution.findMessages:evo-1"] > 1


@pytest.mark.usefixtures("small_pages")
async def test_a_reconnect_imports_only_what_arrived_since_the_last_import(simulator) -> None:
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    _, instance_id, history = await world(simulator, newest_at=newest, name="evo-back", chats=40)
    chat_pages = -(-history.chat_total // 10)
    first = await imported(instance_id, trigger="connect", connection_key=f"import:{instance_id}:first")
    assert first.outcome == "completed" and not first.incremental
    before = await snapshot(instance_id)
    chat = history.chat(0)
    added = simulator.add_messages("evo-back", chat=0, count=4)  # arrived at the gateway while disconnected
    calls = dict(simulator.calls)

    again = await imported(instance_id, trigger="connect", connection_key=f"import:{instance_id}:second")

    asked = {key: n - calls.get(key, 0) for key, n in simulator.calls.items() if n != calls.get(key, 0)}
    assert again.outcome == "completed" and again.incremental
    assert again.since is not None and first.until is not None and again.since < first.until
    assert again.counts.messages_inserted == 4 and again.counts.messages_present == 0
    # Paging stopped at the checkpoint: one page of messages; chats up to the first page entirely older than the
    # last import ; the address book not read again.
    assert chat_pages >= 4
    assert asked == {"evolution.findChats:evo-back": 2, "evolution.findMessages:evo-back": 1}
    after = await snapshot(instance_id)
    new_ids = {m["key"]["id"] for m in added}
    assert {row[2] for row in after["messages"]} == {row[2] for row in before["messages"]} | new_ids
    assert len(after["conversations"]) == len(before["conversations"])  # into the chat's conversation
    assert chat.jid in {row[1] for row in after["contacts"]}


async def _progress_artifacts(name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as prefect:
        return await prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"import-progress-{name}"]))
        )


async def _task_runs(flow_run_id: uuid.UUID | None, expected: int) -> list[str]:
    """The names of the flow run's task runs, once the server has recorded ``expected`` of them (it records task
    runs from their events, a moment after they ran)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tests.test_import_triggers import eventually

    assert flow_run_id is not None
    names: list[str] = []

    async def recorded() -> bool:
        async with get_client() as prefect:
            runs = await prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names[:] = [run.name for run in runs]
        return len(names) >= expected

    await eventually(recorded, timeout=30, what=f"{expected} task runs recorded")
    return names


@pytest.mark.usefixtures("small_pages")
async def test_an_instance_is_one_task_run_its_further_pages_task_runs_of_their_own(simulator) -> None:
    newest = datetime.now(UTC).replace(microsecond=0)
    _, paged, _ = await world(simulator, newest_at=newest, name="evo-paged", chats=6, messages_per_chat=5)
    _, single, _ = await world(
        simulator,
        newest_at=newest,
        name="evo-single",
        chats=1,
        messages_per_chat=3,
        group_chats=0,
        broadcast_messages=0,
    )

    many = await imported(paged)
    one = await imported(single)

    assert many.outcome == one.outcome == "completed"
    message_pages = -(-many.counts.messages_seen // 10)
    chat_pages = many.counts.chats_seen // 10 + 1  # a page shorter than 10 ends the listing
    assert message_pages > 1 and chat_pages > 1
    names = await _task_runs(many.flow_run_id, 1 + (message_pages - 1) + (chat_pages - 1))
    assert sum(n.startswith("import-messages-page") for n in names) == message_pages - 1
    assert sum(n.startswith("import-chats-page") for n in names) == chat_pages - 1
    assert sum(n.startswith("import ") for n in names) == 1
    assert await _task_runs(one.flow_run_id, 1) == [f"import {single}"]  # contacts, chats, messages: one task run

    (shown,) = await _progress_artifacts("evo-paged")
    assert shown.type == "progress" and shown.data == 100.0
    assert await _progress_artifacts("evo-single") == []  # one page: nothing to follow, no API calls spent on it
