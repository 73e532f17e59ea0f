"""Deployments: schedules, default parameters and concurrency, served by `zapsync serve` (mirrored in prefect.yaml).

Every flow has a scheduled deployment and an on-demand one. The scheduled one never overlaps itself
(`CANCEL_NEW`) and passes its interval as `late_after_seconds`, so a run that starts late after downtime skips.
On-demand runs (API, CLI, webhooks) queue behind a small limit instead of being cancelled.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval
from prefect.types.entrypoint import EntrypointType

from core.names import (
    CLEANUP_ON_DEMAND,
    CLEANUP_SCHEDULED,
    CLOSE_ON_DEMAND,
    CLOSE_SCHEDULED,
    IMPORT_DRAIN,
    MONITOR_SCHEDULED,
    SEND_DRAIN,
    SYNC_ON_DEMAND,
    SYNC_SCHEDULED,
)
from core.settings import get_settings
from flows.cleanup_sessions import cleanup_sessions
from flows.close_inactive import close_inactive_conversations
from flows.import_conversations import import_conversations
from flows.monitor_health import monitor_health
from flows.send_messages import send_messages
from flows.sync_status import sync_status

TAGS = ["zapsync"]


CLEANUP_CRON = "0 2 * * *"
HOURLY_CRON = "0 * * * *"
DAY, HOUR = 86_400, 3_600


def _built(*made: RunnerDeployment | Coroutine[Any, Any, RunnerDeployment]) -> list[RunnerDeployment]:
    """The deployments `Flow.to_deployment` built. It returns a coroutine only when called in a running event loop
    (Prefect's async_dispatch), which these builders never are (`zapsync serve`, tests)."""
    built = [deployment for deployment in made if isinstance(deployment, RunnerDeployment)]
    assert len(built) == len(made), "build the deployments outside an event loop"
    return built


def build_deployments() -> list[RunnerDeployment]:
    """The deployments this process serves."""
    settings = get_settings()
    interval = settings.sync_interval_seconds
    module = EntrypointType.MODULE_PATH
    return _built(
        sync_status.to_deployment(
            name=SYNC_SCHEDULED.deployment,
            schedules=[
                Interval(
                    interval,
                    active=settings.schedules_enabled,
                    parameters={"mode": "apply", "late_after_seconds": interval},
                )
            ],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description=f"Status sync of every instance, every {interval} s.",
            tags=TAGS,
            entrypoint_type=module,
        ),
        sync_status.to_deployment(
            name=SYNC_ON_DEMAND.deployment,
            concurrency_limit=ConcurrencyLimitConfig(limit=4, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Status sync on demand (API, CLI, cron endpoint): one instance, one organization or all.",
            tags=TAGS,
            entrypoint_type=module,
        ),
        *maintenance_deployments(),
        *import_deployments(),
        *send_deployments(),
    )


def import_deployments() -> list[RunnerDeployment]:
    """The import queue's drain, started where no warm worker drains it (Prefect workers only): two at most at once,
    each working `import_max_concurrency` instances at a time."""
    return _built(
        import_conversations.to_deployment(
            name=IMPORT_DRAIN.deployment,
            concurrency_limit=ConcurrencyLimitConfig(limit=2, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Drains the import queue (chats, contacts and messages of connected instances).",
            tags=TAGS,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    )


def send_deployments() -> list[RunnerDeployment]:
    """The send queue's drain (the outbox), started where no warm worker drains it. Two at most at once: their
    claims are serialized, so each instance's messages still go one at a time, in order."""
    return _built(
        send_messages.to_deployment(
            name=SEND_DRAIN.deployment,
            concurrency_limit=ConcurrencyLimitConfig(limit=2, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Drains the send queue (outbox messages through the instances' gateways).",
            tags=TAGS,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    )


def maintenance_deployments() -> list[RunnerDeployment]:
    """Cleanup (daily 02:00 in the configured zone), inactive closing (hourly), health (every minute)."""
    settings = get_settings()
    active = settings.schedules_enabled
    module = EntrypointType.MODULE_PATH
    single = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    queued = ConcurrencyLimitConfig(limit=2, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    monitor = settings.monitor_interval_seconds
    return _built(
        cleanup_sessions.to_deployment(
            name=CLEANUP_SCHEDULED.deployment,
            schedules=[
                Cron(
                    CLEANUP_CRON,
                    timezone=settings.cleanup_timezone,
                    active=active,
                    parameters={"dry_run": False, "late_after_seconds": DAY},
                )
            ],
            concurrency_limit=single,
            description=f"Deletes ended sessions past retention and prunes the inboxes, daily at 02:00 "
            f"{settings.cleanup_timezone}.",
            tags=TAGS,
            entrypoint_type=module,
        ),
        cleanup_sessions.to_deployment(
            name=CLEANUP_ON_DEMAND.deployment,
            concurrency_limit=queued,
            description="Cleanup on demand (API): one organization or all, dry run or not.",
            tags=TAGS,
            entrypoint_type=module,
        ),
        close_inactive_conversations.to_deployment(
            name=CLOSE_SCHEDULED.deployment,
            schedules=[
                Cron(
                    HOURLY_CRON,
                    timezone="UTC",
                    active=active,
                    parameters={"dry_run": False, "late_after_seconds": HOUR},
                )
            ],
            concurrency_limit=single,
            description="Closes conversations idle past each organization's inactivity_hours, hourly.",
            tags=TAGS,
            entrypoint_type=module,
        ),
        close_inactive_conversations.to_deployment(
            name=CLOSE_ON_DEMAND.deployment,
            concurrency_limit=queued,
            description="Inactive-conversation closing on demand (API): one organization or all, dry run or not.",
            tags=TAGS,
            entrypoint_type=module,
        ),
        monitor_health.to_deployment(
            name=MONITOR_SCHEDULED.deployment,
            schedules=[Interval(monitor, active=active, parameters={"late_after_seconds": monitor})],
            concurrency_limit=single,
            description=f"Health check of every instance every {monitor} s: alerts, reconnects, recoveries.",
            tags=TAGS,
            entrypoint_type=module,
        ),
    )
