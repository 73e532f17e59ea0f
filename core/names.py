"""Names of the flows and of their deployments: what the API, the CLI and the flows use to address runs.

Pure constants, so that naming a deployment loads neither Prefect nor any flow; ``deployments.definitions`` builds
the deployments under these names and ``prefect.yaml`` mirrors them.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNC_FLOW = "sync-status"
IMPORT_FLOW = "import-conversations"
CLEANUP_FLOW = "cleanup-sessions"
CLOSE_FLOW = "close-inactive-conversations"
MONITOR_FLOW = "monitor-health"
SEND_FLOW = "send-messages"


@dataclass(frozen=True)
class DeploymentName:
    """`<flow>/<deployment>` as Prefect addresses it."""

    flow: str
    deployment: str

    def __str__(self) -> str:
        return f"{self.flow}/{self.deployment}"


SYNC_SCHEDULED = DeploymentName(SYNC_FLOW, "scheduled")
SYNC_ON_DEMAND = DeploymentName(SYNC_FLOW, "on-demand")
CLEANUP_SCHEDULED = DeploymentName(CLEANUP_FLOW, "scheduled")
CLEANUP_ON_DEMAND = DeploymentName(CLEANUP_FLOW, "on-demand")
CLOSE_SCHEDULED = DeploymentName(CLOSE_FLOW, "scheduled")
CLOSE_ON_DEMAND = DeploymentName(CLOSE_FLOW, "on-demand")
MONITOR_SCHEDULED = DeploymentName(MONITOR_FLOW, "scheduled")
IMPORT_DRAIN = DeploymentName(IMPORT_FLOW, "drain")
"""Drains the import queue where no warm worker does (work pools with Prefect workers only)."""
SEND_DRAIN = DeploymentName(SEND_FLOW, "drain")
"""Drains the send queue (the outbox) where no warm worker does."""
