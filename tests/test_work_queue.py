"""The durable work queue against the real PostgreSQL: idempotent enqueue, leased claims that never overlap,
fencing by lease token, retries, stats and pruning; the pure backoff policy; migration 0005 both ways.

Lease expiry is simulated without waiting: a claimed item's ``lease_until`` is moved into the past with an UPDATE.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, inspect, pool, text

from core.policies.backoff import retry_delay, should_give_up
from core.settings import Settings
from db.engine import database_url, dispose_engine, get_engine, session_factory, session_scope
from db.repositories import work_queue as q
from tests.factories import make_instance, make_organization

IMPORT = "import"


async def enqueue(key: str, payload: dict[str, Any] | None = None, **kwargs: Any) -> q.Enqueued:
    async with session_scope() as session:
        return await q.enqueue(session, kind=kwargs.pop("kind", IMPORT), key=key, payload=payload, **kwargs)


async def claim(limit: int = 10, *, lease: float = 60, kind: str = IMPORT) -> list[q.ClaimedItem]:
    async with session_scope() as session:
        return await q.claim(session, kind=kind, limit=limit, lease_seconds=lease)


async def rows() -> list[dict[str, Any]]:
    async with session_scope() as session:
        found = await session.execute(text("SELECT * FROM work_items ORDER BY id"))
        return [dict(r) for r in found.mappings().all()]


async def row(item_id: int) -> dict[str, Any]:
    return next(r for r in await rows() if r["id"] == item_id)


async def execute(sql: str, **params: Any) -> None:
    async with session_scope() as session:
        await session.execute(text(sql), params)


async def expire_lease(item_id: int) -> None:
    await execute("UPDATE work_items SET lease_until = now() - interval '1 second' WHERE id = :id", id=item_id)


@contextmanager
def statements() -> Iterator[list[str]]:
    """SQL statements sent to the database while the block runs (transaction control excluded)."""
    sent: list[str] = []
    engine = get_engine().sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


# --- enqueue --------------------------------------------------------------------------------------------------


async def test_enqueue_is_idempotent_per_kind_and_key() -> None:
    first = await enqueue("inst-1", {"full": False})
    again = await enqueue("inst-1", {"full": True})
    other_key = await enqueue("inst-2")
    other_kind = await enqueue("inst-1", kind="send")

    assert first.created and other_key.created and other_kind.created
    assert again == q.Enqueued(id=first.id, created=False)
    assert len({first.id, other_key.id, other_kind.id}) == 3
    stored = await rows()
    assert len(stored) == 3
    assert stored[0]["payload"] == {"full": False}  # without merge, the first request's payload stays
    assert stored[0]["state"] == "pending" and stored[0]["attempts"] == 0


async def test_merge_lets_true_stick_and_newer_values_win() -> None:
    item = await enqueue("inst-1", {"full": True, "history_days": 7})
    await enqueue("inst-1", {"full": False, "history_days": 30, "trigger": "sync"}, merge=("full",))
    assert (await row(item.id))["payload"] == {"full": True, "history_days": 30, "trigger": "sync"}

    other = await enqueue("inst-2", {"full": False})
    await enqueue("inst-2", {"full": True}, merge=("full",))
    await enqueue("inst-2", {"full": False}, merge=("full",))
    assert (await row(other.id))["payload"] == {"full": True}


async def test_enqueue_belongs_to_the_callers_transaction() -> None:
    async def failing_webhook() -> None:
        async with session_scope() as session:
            await q.enqueue(session, kind=IMPORT, key="inst-1")
            raise RuntimeError("webhook failed")

    with pytest.raises(RuntimeError, match="webhook failed"):
        await failing_webhook()
    assert await rows() == []


async def test_enqueue_while_running_adds_one_follow_up_that_waits_for_it() -> None:
    first = await enqueue("inst-1", {"full": False})
    [running] = await claim()
    follow_up = await enqueue("inst-1", {"full": False}, merge=("full",))
    merged = await enqueue("inst-1", {"full": True}, merge=("full",))

    assert follow_up.created and follow_up.id != first.id
    assert merged == q.Enqueued(id=follow_up.id, created=False)
    assert [(r["state"], r["payload"]) for r in await rows()] == [
        ("running", {"full": False}),
        ("pending", {"full": True}),
    ]
    assert await claim() == []  # the key is running: its follow-up waits

    async with session_scope() as session:
        assert await q.complete(session, running.id, running.lease_token)
    [next_one] = await claim()
    assert next_one.id == follow_up.id and next_one.payload == {"full": True}


async def test_enqueue_many_is_one_statement_with_a_result_per_request() -> None:
    org = await make_organization()
    instance = await make_instance(org, "acme-01")
    existing = await enqueue("inst-0", {"full": False})
    requests = [
        q.WorkRequest(IMPORT, "inst-0", org, instance, {"full": True}),
        q.WorkRequest(IMPORT, "inst-1", org, instance, {"full": False}),
        q.WorkRequest("send", "msg-1", org, None, {"text": "hi"}),
        q.WorkRequest(IMPORT, "inst-1", org, instance, {"full": True}),
    ]
    async with session_scope() as session:
        with statements() as sent:
            results = await q.enqueue_many(session, requests, merge=("full",))
        assert await q.enqueue_many(session, []) == []
    assert len(sent) == 1

    assert results[0] == q.Enqueued(id=existing.id, created=False)
    assert results[1].created and results[2].created
    assert results[3] == results[1]  # a duplicate within the call shares the item
    by_key = {r["key"]: r for r in await rows()}
    assert len(by_key) == 3
    assert by_key["inst-0"]["payload"] == {"full": True}
    assert by_key["inst-1"]["payload"] == {"full": True}
    assert (by_key["inst-1"]["organization_id"], by_key["inst-1"]["instance_id"]) == (org, instance)
    assert (by_key["msg-1"]["kind"], by_key["msg-1"]["instance_id"]) == ("send", None)


async def test_items_go_with_their_instance() -> None:
    org = await make_organization()
    instance = await make_instance(org, "acme-01")
    await enqueue(str(instance), organization_id=org, instance_id=instance)
    await enqueue("msg-1", kind="send", organization_id=org)
    await execute("DELETE FROM whatsapp_instances WHERE id = :id", id=instance)
    assert [r["key"] for r in await rows()] == ["msg-1"]
    await execute("DELETE FROM organizations WHERE id = :id", id=org)
    assert await rows() == []


# --- claim ----------------------------------------------------------------------------------------------------


async def test_claim_leases_due_items_oldest_first() -> None:
    ids = {key: (await enqueue(key)).id for key in ("a", "b", "c", "later")}
    await execute(
        "UPDATE work_items SET next_attempt_at = now() + CASE key WHEN 'a' THEN interval '-3 min' "
        "WHEN 'b' THEN interval '-1 min' WHEN 'c' THEN interval '-2 min' ELSE interval '1 hour' END"
    )
    await enqueue("other-kind", kind="send")

    async with session_scope() as session:
        with statements() as sent:
            first = await q.claim(session, kind=IMPORT, limit=2, lease_seconds=60)
    assert len(sent) == 1
    assert [i.key for i in first] == ["a", "c"]
    assert all(i.attempts == 1 and i.kind == IMPORT for i in first)
    assert first[0].lease_token != first[1].lease_token
    stored = await row(ids["a"])
    assert stored["state"] == "running" and stored["lease_token"] == first[0].lease_token
    async with session_scope() as session:
        ahead = (await session.execute(text("SELECT :at - now()"), {"at": stored["lease_until"]})).scalar_one()
    assert timedelta(seconds=55) < ahead <= timedelta(seconds=60)

    assert [i.key for i in await claim()] == ["b"]  # "later" is not due, "other-kind" is another kind
    assert await claim() == []
    assert await claim(0) == []


async def test_two_claimers_in_open_transactions_get_disjoint_items() -> None:
    async with session_scope() as session:
        await q.enqueue_many(session, [q.WorkRequest(IMPORT, f"k{n}") for n in range(10)])
    make = session_factory()
    async with make() as first, first.begin():
        mine = await q.claim(first, kind=IMPORT, limit=4, lease_seconds=60)
        async with make() as second, second.begin():
            theirs = await q.claim(second, kind=IMPORT, limit=10, lease_seconds=60)
    assert len(mine) == 4 and len(theirs) == 6
    assert {i.id for i in mine}.isdisjoint({i.id for i in theirs})
    stored = await rows()
    assert all(r["state"] == "running" and r["attempts"] == 1 for r in stored)
    tokens = {i.id: i.lease_token for i in [*mine, *theirs]}
    assert {r["id"]: r["lease_token"] for r in stored} == tokens


async def test_concurrent_claimers_take_every_item_exactly_once() -> None:
    async with session_scope() as session:
        await q.enqueue_many(session, [q.WorkRequest(IMPORT, f"k{n}") for n in range(60)])

    async def drain() -> list[int]:
        taken: list[int] = []
        while batch := await claim(7):
            taken.extend(i.id for i in batch)
        return taken

    results = await asyncio.gather(*(drain() for _ in range(5)))
    everything = [item_id for taken in results for item_id in taken]
    assert len(everything) == 60 and len(set(everything)) == 60


async def test_an_expired_lease_is_reclaimed_before_its_keys_follow_up() -> None:
    await enqueue("inst-1")
    [first] = await claim()
    follow_up = await enqueue("inst-1")
    await expire_lease(first.id)

    [again] = await claim(10)
    assert (again.id, again.attempts) == (first.id, 2)
    assert again.lease_token != first.lease_token
    assert (await row(first.id))["last_error"] == q.LEASE_EXPIRED
    assert (await row(follow_up.id))["state"] == "pending"


async def test_a_fenced_off_claimer_cannot_finish_the_item() -> None:
    await enqueue("inst-1")
    [old] = await claim()
    await expire_lease(old.id)
    [new] = await claim()

    async with session_scope() as session:
        assert not await q.complete(session, old.id, old.lease_token)
        assert not await q.fail(session, old.id, old.lease_token, error="late")
        assert await q.retry_later(session, old.id, old.lease_token, error="late", delay_seconds=1) is None
        assert not await q.extend_lease(session, old.id, old.lease_token, 60)
    stored = await row(new.id)
    assert (stored["state"], stored["lease_token"], stored["attempts"]) == ("running", new.lease_token, 2)

    async with session_scope() as session:
        assert await q.complete(session, new.id, new.lease_token)
        assert not await q.complete(session, new.id, new.lease_token)  # once
    stored = await row(new.id)
    assert stored["state"] == "done" and stored["finished_at"] is not None and stored["lease_token"] is None


async def test_extend_lease_keeps_the_item_from_being_reclaimed() -> None:
    await enqueue("inst-1")
    [item] = await claim(lease=1)
    await expire_lease(item.id)
    async with session_scope() as session:
        assert await q.extend_lease(session, item.id, item.lease_token, 60)  # not taken yet: still ours
    assert await claim() == []
    async with session_scope() as session:
        assert await q.complete(session, item.id, item.lease_token)


# --- retry and failure ----------------------------------------------------------------------------------------


async def test_retry_later_puts_the_item_back_after_the_delay() -> None:
    await enqueue("inst-1")
    [item] = await claim()
    async with session_scope() as session:
        assert await q.retry_later(session, item.id, item.lease_token, error="gateway 503", delay_seconds=30) == (
            "pending"
        )
        due_in = text("SELECT next_attempt_at - now() FROM work_items WHERE id = :id")
        ahead = (await session.execute(due_in, {"id": item.id})).scalar_one()
    assert ahead == timedelta(seconds=30)
    stored = await row(item.id)
    assert (stored["state"], stored["last_error"], stored["lease_token"]) == ("pending", "gateway 503", None)
    assert await claim() == []  # not due yet

    await execute("UPDATE work_items SET next_attempt_at = now() - interval '1 second'")
    [again] = await claim()
    assert (again.id, again.attempts) == (item.id, 2)


async def test_retry_later_is_superseded_by_a_pending_follow_up() -> None:
    await enqueue("inst-1")
    [item] = await claim()
    follow_up = await enqueue("inst-1")
    async with session_scope() as session:
        assert await q.retry_later(session, item.id, item.lease_token, error="boom", delay_seconds=30) == "done"
    stored = await row(item.id)
    assert (stored["state"], stored["last_error"]) == ("done", q.SUPERSEDED)
    assert stored["finished_at"] is not None
    [next_one] = await claim()
    assert next_one.id == follow_up.id


async def test_retry_later_racing_an_uncommitted_follow_up_is_superseded() -> None:
    """The follow-up is inserted, not yet committed, when the retry runs: the retry waits on it, then yields."""
    await enqueue("inst-1")
    [item] = await claim()
    make = session_factory()
    async with make() as enqueuer, enqueuer.begin(), make() as retrier, retrier.begin():
        follow_up = await q.enqueue(enqueuer, kind=IMPORT, key="inst-1")
        pid = (await retrier.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        retry = asyncio.create_task(q.retry_later(retrier, item.id, item.lease_token, error="boom", delay_seconds=30))
        await wait_until_blocked(pid, retry)
        await enqueuer.commit()
        assert await retry == "done"
    stored = await row(item.id)
    assert (stored["state"], stored["last_error"]) == ("done", q.SUPERSEDED)
    assert (await row(follow_up.id))["state"] == "pending"


async def wait_until_blocked(pid: int, task: asyncio.Task[Any]) -> None:
    """Until the backend ``pid`` waits on a lock (polled: there is no event to wait for)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert not task.done(), "the retry finished without waiting for the uncommitted follow-up"
        async with session_scope() as session:
            waiting = (
                await session.execute(
                    text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                )
            ).scalar_one_or_none()
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the retry never waited on the follow-up")


async def test_fail_is_final_and_a_new_request_starts_afresh() -> None:
    first = await enqueue("inst-1")
    [item] = await claim()
    async with session_scope() as session:
        assert await q.fail(session, item.id, item.lease_token, error="number banned")
    stored = await row(first.id)
    assert (stored["state"], stored["last_error"]) == ("failed", "number banned")
    assert stored["finished_at"] is not None
    assert await claim() == []
    again = await enqueue("inst-1")
    assert again.created and again.id != first.id


# --- stats, pruning, the safety net ---------------------------------------------------------------------------


async def test_queue_stats_per_kind() -> None:
    async with session_scope() as session:
        assert await q.queue_stats(session) == []
        assert await q.queue_stats(session, kinds=[IMPORT]) == [q.QueueStats(IMPORT, 0, 0, 0, None)]

    for key in ("run", "fail", "done"):
        await enqueue(key)
    claimed = {i.key: i for i in await claim()}
    async with session_scope() as session:
        await q.fail(session, claimed["fail"].id, claimed["fail"].lease_token, error="x")
        await q.complete(session, claimed["done"].id, claimed["done"].lease_token)
    await enqueue("old")
    await enqueue("new")
    await execute("UPDATE work_items SET created_at = now() - interval '10 minutes' WHERE key = 'old'")
    await enqueue("msg-1", kind="send")

    async with session_scope() as session:
        stats = await q.queue_stats(session, kinds=[IMPORT, "send", "other"])
    assert [s.kind for s in stats] == [IMPORT, "other", "send"]
    imports, other, sends = stats
    assert (imports.pending, imports.running, imports.failed) == (2, 1, 1)
    assert imports.oldest_pending_age_seconds is not None and 600 <= imports.oldest_pending_age_seconds < 900
    assert other == q.QueueStats("other", 0, 0, 0, None)
    assert (sends.pending, sends.running, sends.failed) == (1, 0, 0)
    assert sends.oldest_pending_age_seconds is not None and 0 <= sends.oldest_pending_age_seconds < 300


# --- backoff policy and settings (no database) ----------------------------------------------------------------


@pytest.mark.pure
def test_retry_delay_is_full_jitter_under_a_doubling_cap() -> None:
    half = lambda: 0.5  # noqa: E731
    assert retry_delay(1, initial=5, cap=300, rand=half) == 2.5
    assert retry_delay(3, initial=5, cap=300, rand=half) == 10.0
    assert retry_delay(10, initial=5, cap=300, rand=half) == 150.0  # 5 * 2**9 is past the cap
    assert retry_delay(0, initial=5, cap=300, rand=half) == 2.5  # no attempt yet counts as the first
    assert retry_delay(10_000, initial=5, cap=300, rand=lambda: 0.99) == pytest.approx(297.0)
    assert retry_delay(4, initial=5, cap=300, rand=lambda: 0.0) == 0.0
    for attempts in range(1, 10):
        ceiling = min(300, 5 * 2 ** (attempts - 1))
        assert 0 <= retry_delay(attempts, initial=5, cap=300) < ceiling


@pytest.mark.pure
def test_should_give_up_after_max_attempts() -> None:
    assert not should_give_up(1, 5)
    assert not should_give_up(4, 5)
    assert should_give_up(5, 5)
    assert should_give_up(7, 5)


@pytest.mark.pure
def test_queue_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.queue_lease_seconds, defaults.queue_max_attempts) == (120, 5)
    assert (defaults.queue_retry_initial_seconds, defaults.queue_retry_max_seconds) == (5, 300)
    monkeypatch.setenv("ZAPSYNC_QUEUE_LEASE", "30")
    monkeypatch.setenv("ZAPSYNC_QUEUE_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("ZAPSYNC_QUEUE_RETRY_INITIAL", "0.5")
    monkeypatch.setenv("ZAPSYNC_QUEUE_RETRY_MAX", "60")
    configured = Settings()
    assert (configured.queue_lease_seconds, configured.queue_max_attempts) == (30, 3)
    assert (configured.queue_retry_initial_seconds, configured.queue_retry_max_seconds) == (0.5, 60)


# --- schema ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def sync_engine() -> AsyncIterator[Any]:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def test_the_model_matches_migration_0005(sync_engine: Any) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from db.models import Base

    with sync_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)

    def touches_work_items(diff: Any) -> bool:
        return "work_items" in repr(diff)

    assert [d for d in diffs if touches_work_items(d)] == []


async def test_migration_0005_downgrades_and_upgrades_again(sync_engine: Any) -> None:
    from alembic import command

    from db.migrate import alembic_config

    await dispose_engine()  # no pooled connection keeps a lock or a plan on the table
    try:
        await asyncio.to_thread(command.downgrade, alembic_config(), "0004")
        with sync_engine.connect() as conn:
            assert "work_items" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0004"
    finally:
        await asyncio.to_thread(command.upgrade, alembic_config(), "head")
    with sync_engine.connect() as conn:
        names = {ix["name"] for ix in inspect(conn).get_indexes("work_items")}
    assert {"uq_work_items_pending_key", "uq_work_items_running_key", "ix_work_items_due"} <= names
    assert (await enqueue(str(uuid.uuid4()))).created


async def test_enqueue_wakes_listeners_when_its_transaction_commits() -> None:
    from db.repositories.live_events import listener_conninfo, listening

    async with listening(listener_conninfo(), q.WORK_CHANNEL) as conn:
        async with session_scope() as session:
            await q.enqueue(session, kind=IMPORT, key="inst-1")
            await q.enqueue(session, kind="send", key="msg-1")
            await q.enqueue(session, kind=IMPORT, key="inst-2")
            assert conn.pgconn.notifies() is None  # nothing before the commit
        kinds: list[str] = []
        async for note in conn.notifies(timeout=10, stop_after=2):
            kinds.append(note.payload)
    assert sorted(kinds) == ["import", "send"]


async def test_due_kinds_see_pending_and_expired_work() -> None:
    await enqueue("inst-1")
    async with session_scope() as session:
        assert await q.due_kinds(session, [IMPORT, "send"]) == {IMPORT}
    (item,) = await claim(lease=60)
    async with session_scope() as session:
        assert await q.due_kinds(session, [IMPORT]) == set()  # leased, not expired
    await execute("UPDATE work_items SET lease_until = now() - interval '1 second' WHERE id = :id", id=item.id)
    async with session_scope() as session:
        assert await q.due_kinds(session, [IMPORT]) == {IMPORT}
        assert await q.due_kinds(session, ["send"]) == set()
