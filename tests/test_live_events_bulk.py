"""Publishing many live events at once (a 100k-instance sync) stays within PostgreSQL's notification limit."""

from __future__ import annotations

from core.events import NewLiveEvent
from db.engine import session_scope
from db.repositories.live_events import insert_events
from tests.factories import count, make_organization


async def test_ten_thousand_events_for_one_organization_are_stored_and_notified() -> None:
    org = await make_organization()
    events = [
        NewLiveEvent(org, "instance.status", {"instance": f"i-{i}", "status": "connected"}) for i in range(10_000)
    ]

    async with session_scope() as session:  # the NOTIFYs are sent at this commit: too long a payload fails here
        ids = await insert_events(session, events)

    assert len(ids) == 10_000
    assert await count("live_events") == 10_000
