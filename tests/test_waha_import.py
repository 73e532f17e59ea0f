"""Import on connect works for WAHA: a real drained flow run reads a WAHA session's history from the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from core.settings import get_settings
from gateways.simulator import SimulatorServer
from tests.factories import make_instance, make_organization
from tests.test_import import SHAPE, expected_messages, imported, rows

pytestmark = pytest.mark.usefixtures("prefect_server")

NEWEST = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def waha_configured(simulator_server: SimulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A gateway named "waha" at the simulator (WAHA's own variables)."""
    monkeypatch.setenv("WAHA_API_URL", simulator_server.url)
    monkeypatch.setenv("WAHA_API_KEY", "sim-waha-key")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("WAHA_API_URL")
    monkeypatch.delenv("WAHA_API_KEY")
    get_settings.cache_clear()


async def test_a_waha_session_imports_its_one_to_one_history(simulator, waha_configured) -> None:
    org = await make_organization()
    simulator.add_instance("w-imp", "waha", "open")
    history = simulator.set_history("w-imp", **{**SHAPE, "newest_at": NEWEST})
    instance_id = await make_instance(org, "w-imp", gateway="waha", status="connected")

    report = await imported(instance_id)

    assert report.outcome == "completed", report
    stored = await rows(
        "SELECT m.external_id, c.jid, m.from_me, m.type, extract(epoch FROM m.sent_at)::bigint AS ts "
        "FROM messages m JOIN conversations v ON v.id = m.conversation_id JOIN contacts c ON c.id = v.contact_id "
        "WHERE m.instance_id = :i",
        i=instance_id,
    )
    expected = expected_messages(history)
    assert {r["external_id"]: (r["jid"], r["ts"], r["from_me"], r["type"]) for r in stored} == expected
    conversations = await rows("SELECT DISTINCT contact_id FROM conversations WHERE instance_id = :i", i=instance_id)
    assert len(conversations) == history.individual
    assert simulator.calls["waha.contacts:w-imp"] >= 1 and simulator.calls["waha.messages:w-imp"] >= history.individual
    assert not any(key.startswith("evolution.") for key in simulator.calls)
