"""The guard every flow runs in (flows/guard.py): late scheduled runs, unknown organizations and held locks skip
with their reason; every finished run logs one tagged line and stores one report; a failed one stores nothing."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Scheduled
from sqlalchemy import text

from core.names import MONITOR_SCHEDULED
from core.reports import HealthReport
from db.engine import session_scope
from db.locks import try_advisory_lock
from flows.cleanup_sessions import cleanup_sessions
from flows.close_inactive import close_inactive_conversations
from flows.guard import guarded
from flows.monitor_health import MONITOR, monitor_health
from flows.runs import wait_for_run
from tests.factories import count

pytestmark = pytest.mark.usefixtures("prefect_server")


async def stored_report(flow_run_id: uuid.UUID | None) -> tuple[uuid.UUID | None, dict[str, Any]]:
    """(organization_id, report) of the one `flow_reports` row of a flow run."""
    async with session_scope() as session:
        row = (
            await session.execute(
                text("SELECT organization_id, report FROM flow_reports WHERE flow_run_id = :id"), {"id": flow_run_id}
            )
        ).one()
    return row.organization_id, row.report


@pytest.mark.parametrize("flow", [cleanup_sessions, close_inactive_conversations], ids=["cleanup", "close-inactive"])
async def test_an_unknown_organization_skips_and_the_report_is_stored_without_it(flow: Any) -> None:
    missing = uuid.uuid4()

    report = await flow(organization_id=missing)

    assert report.skipped == f"no organization {missing}"
    organization_id, stored = await stored_report(report.flow_run_id)
    assert organization_id is None and stored["skipped"] == report.skipped


@pytest.mark.parametrize(
    ("lock", "flow", "reason"),
    [
        ("monitor_health", monitor_health, "another health check is running"),
        ("cleanup_sessions:all", cleanup_sessions, "another cleanup of this scope is running"),
        ("close_inactive:all", close_inactive_conversations, "another run of this scope is running"),
    ],
    ids=["monitor", "cleanup", "close-inactive"],
)
async def test_a_held_lock_skips_with_its_reason_and_logs_one_tagged_line(
    lock: str, flow: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="prefect.flow_runs")  # the run logger (tests run Prefect at WARNING)
    async with try_advisory_lock(lock) as acquired:
        assert acquired
        report = await flow()

    assert report.skipped == reason
    assert report.finished_at is not None and report.finished_at >= report.started_at
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().endswith(f"(skipped: {reason})")]
    assert line.startswith(("[HEALTH] ", "[CLEANUP] ", "[CLOSE] "))
    assert (await stored_report(report.flow_run_id))[1]["skipped"] == reason


async def test_work_that_raises_stores_nothing_and_releases_the_lock() -> None:
    report = HealthReport(started_at=datetime.now(UTC))
    went: list[bool] = []

    async def failing_run() -> None:
        async with guarded(report, MONITOR, lock="test-guard", busy="busy") as go:
            went.append(go)
            raise RuntimeError("work failed")

    with pytest.raises(RuntimeError, match="work failed"):
        await failing_run()

    assert went == [True] and report.skipped is None and report.finished_at is None
    assert await count("flow_reports") == 0
    async with try_advisory_lock("test-guard") as acquired:
        assert acquired


@pytest.mark.usefixtures("served_deployments")
async def test_a_scheduled_run_that_starts_late_skips_and_leaves_the_work_to_the_next_one() -> None:
    async with get_client() as prefect:
        deployment = await prefect.read_deployment_by_name(str(MONITOR_SCHEDULED))
        run = await prefect.create_flow_run_from_deployment(
            deployment.id,
            parameters={"late_after_seconds": 60},
            state=Scheduled(scheduled_time=datetime.now(UTC) - timedelta(hours=1)),  # a pile-up after downtime
        )

    finished = await wait_for_run(run.id, timeout=90)

    assert finished.state == "Completed"
    _, stored = await stored_report(run.id)
    assert stored["skipped"].startswith("scheduled run started 36") and stored["skipped"].endswith(
        " s late; the next run covers it"
    )
    assert stored["checked"] == 0
