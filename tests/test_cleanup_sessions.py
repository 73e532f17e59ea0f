"""Cleanup: ended sessions past each organization's retention go, open ones never; inboxes pruned; dry runs count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from core.settings import get_settings
from db.engine import session_scope
from flows.cleanup_sessions import cleanup_sessions
from tests.factories import count, make_instance, make_organization
from tests.maintenance_rows import add_session, ago, set_org

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def batch_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One row per delete batch, so batching is exercised on a handful of rows."""
    monkeypatch.setenv("ZAPSYNC_MAINTENANCE_BATCH", "1")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("ZAPSYNC_MAINTENANCE_BATCH")
    get_settings.cache_clear()


async def _world() -> dict[str, int]:
    """Two organizations (retention 30 and 7 days) with sessions on both sides of their limits."""
    org_a = await make_organization("A")
    org_b = await make_organization("B")
    await set_org(org_b, session_retention_days=7)
    a1 = await make_instance(org_a, "a-01", status="connected")
    a2 = await make_instance(org_a, "a-02")
    b1 = await make_instance(org_b, "b-01")
    sessions = {
        "a_expired": await add_session(a2, connected_at=ago(days=45), disconnected_at=ago(days=40)),
        "a_expired_long_ago": await add_session(a2, connected_at=ago(days=400), disconnected_at=ago(days=399)),
        "a_recent": await add_session(a2, connected_at=ago(days=21), disconnected_at=ago(days=20)),
        # The instance's current session: connected 100 days ago, quiet for 60 — still never deleted.
        "a_open": await add_session(
            a1, connected_at=ago(days=100), disconnected_at=None, last_activity_at=ago(days=60)
        ),
        "b_expired": await add_session(b1, connected_at=ago(days=11), disconnected_at=ago(days=10)),
        "b_recent": await add_session(b1, connected_at=ago(days=4), disconnected_at=ago(days=3)),
    }
    async with session_scope() as session:
        for org, age_days, n in ((org_a, 40, 3), (org_a, 1, 2), (org_b, 31, 1)):
            await session.execute(
                text(
                    "INSERT INTO webhook_events (organization_id, provider, event, dedupe_key, received_at, payload, "
                    "outcome) SELECT :org, 'evolution', 'messages.upsert', md5(random()::text), "
                    "now() - make_interval(days => :age), '{}'::jsonb, 'stored' FROM generate_series(1, :n)"
                ),
                {"org": org, "age": age_days, "n": n},
            )
        await session.execute(
            text(
                "INSERT INTO live_events (organization_id, kind, payload, created_at) VALUES "
                "(:a, 'instance.status', '{}', now() - interval '8 days'), (:a, 'instance.status', '{}', now())"
            ),
            {"a": org_a},
        )
        await session.execute(  # queue items: finished long ago (pruned), finished lately, and still queued (kept)
            text(
                "INSERT INTO work_items (kind, key, organization_id, state, finished_at, created_at) VALUES "
                "('import', 'old-done', :a, 'done', now() - interval '9 days', now() - interval '9 days'), "
                "('import', 'old-failed', :a, 'failed', now() - interval '8 days', now() - interval '9 days'), "
                "('import', 'recent', :a, 'done', now() - interval '1 day', now() - interval '1 day'), "
                "('import', 'waiting', :a, 'pending', NULL, now() - interval '30 days')"
            ),
            {"a": org_a},
        )
    return sessions


async def _remaining_sessions() -> set[int]:
    async with session_scope() as session:
        return {r[0] for r in (await session.execute(text("SELECT id FROM whatsapp_sessions"))).all()}


@pytest.mark.usefixtures("batch_of_one")
async def test_cleanup_deletes_exactly_the_sessions_past_retention_never_an_open_one() -> None:
    sessions = await _world()

    report = await cleanup_sessions()

    assert report.flow_run_id is not None and report.skipped is None
    assert await _remaining_sessions() == {sessions["a_recent"], sessions["a_open"], sessions["b_recent"]}
    assert report.deleted.sessions == 3
    assert report.sessions_by_retention == {30: 2, 7: 1}
    assert report.deleted.webhook_events == 4 and await count("webhook_events") == 2
    assert report.deleted.live_events == 1 and await count("live_events") == 1
    assert report.deleted.work_items == 2 and await count("work_items") == 2  # the recent and the waiting one
    assert report.batches >= 3 + 4  # one row per batch: the deletes really ran in batches

    again = await cleanup_sessions()
    assert again.deleted.sessions == 0 and await count("whatsapp_sessions") == 3


async def test_dry_run_reports_counts_and_deletes_nothing() -> None:
    await _world()

    report = await cleanup_sessions(dry_run=True)

    assert report.dry_run and report.deleted.sessions == 3 and report.deleted.webhook_events == 4
    assert report.deleted.live_events == 1
    assert await count("whatsapp_sessions") == 6
    assert await count("webhook_events") == 6 and await count("live_events") == 2


async def test_one_organization_with_a_retention_override() -> None:
    sessions = await _world()
    async with session_scope() as session:
        org_b = (await session.execute(text("SELECT id FROM organizations WHERE name = 'B'"))).scalar_one()

    report = await cleanup_sessions(organization_id=org_b, retention_days=1)

    assert report.deleted.sessions == 2  # both of B's ended sessions are older than one day
    assert report.deleted.webhook_events == 1
    assert await _remaining_sessions() == {
        sessions["a_expired"],
        sessions["a_expired_long_ago"],
        sessions["a_recent"],
        sessions["a_open"],
    }
