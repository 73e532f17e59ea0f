"""Deployments: schedules, default parameters and concurrency, served by `zapsync serve` (mirrored in prefect.yaml).

Every flow has a scheduled deployment and an on-demand one. The scheduled one never overlaps itself
(`CANCEL_NEW`) and passes its interval as `late_after_seconds`, so a run that starts late after downtime skips.
On-demand runs (API, CLI, webhooks) queue behind a small limit instead of being cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Interval

from flows.sync_status import FLOW_NAME as SYNC_FLOW
from flows.sync_status import sync_status
from zapsync.settings import get_settings

TAGS = ["zapsync"]


@dataclass(frozen=True)
class DeploymentName:
    """`<flow>/<deployment>` as Prefect addresses it."""

    flow: str
    deployment: str

    def __str__(self) -> str:
        return f"{self.flow}/{self.deployment}"


SYNC_SCHEDULED = DeploymentName(SYNC_FLOW, "scheduled")
SYNC_ON_DEMAND = DeploymentName(SYNC_FLOW, "on-demand")


def build_deployments() -> list[RunnerDeployment]:
    """The deployments this process serves."""
    settings = get_settings()
    interval = settings.sync_interval_seconds
    module = EntrypointType.MODULE_PATH
    return [
        sync_status.to_deployment(
            name=SYNC_SCHEDULED.deployment,
            schedules=[Interval(interval, parameters={"mode": "apply", "late_after_seconds": interval})],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description=f"Status sync of every instance, every {interval} s.",
            tags=TAGS, entrypoint_type=module,
        ),
        sync_status.to_deployment(
            name=SYNC_ON_DEMAND.deployment,
            concurrency_limit=ConcurrencyLimitConfig(limit=4, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Status sync on demand (API, CLI, cron endpoint): one instance, one organization or all.",
            tags=TAGS, entrypoint_type=module,
        ),
    ]
