"""Prometheus metrics: counters this API process keeps, plus gauges read from the database at scrape time.

Flows run in other processes (served runs, workers), so their results are read from the reports they store rather
than counted here: any API replica answers the same.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import WorkKind
from core.names import MONITOR_FLOW, SYNC_FLOW
from db.repositories.metrics import closed_inactive_total, import_totals, instance_counts, latest_reports
from db.repositories.work_queue import queue_stats


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhook_events = Counter(
            "zapsync_webhook_events",
            "Webhook deliveries by provider, event and outcome",
            ["provider", "event", "outcome"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "zapsync_webhook_processing_seconds",
            "Time to authenticate, store and apply one delivery",
            ["provider"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.instances = Gauge(
            "zapsync_instances", "Instances by gateway, status and health", ["gateway", "status", "health"], registry=r
        )
        self.sync_seconds = Gauge("zapsync_sync_duration_seconds", "Duration of the newest status sync", registry=r)
        self.sync_drift = Gauge("zapsync_sync_drift", "Counts of the newest status sync", ["kind"], registry=r)
        self.gateway_unreachable = Gauge(
            "zapsync_gateway_unreachable_instances",
            "Instances a gateway could not answer for in the newest sync",
            ["gateway"],
            registry=r,
        )
        self.gateway_auth_failed = Gauge(
            "zapsync_gateway_auth_failed",
            "1 when the gateway refused zapsync's key (401/403) in the newest sync or health check",
            ["gateway"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "zapsync_gateway_breaker_open",
            "1 when the gateway's circuit breaker was open in the newest sync",
            ["gateway"],
            registry=r,
        )
        self.import_rows = Gauge("zapsync_import_rows", "Rows written by conversation imports", ["kind"], registry=r)
        self.import_seconds = Gauge("zapsync_import_duration_seconds", "Duration of the newest import", registry=r)
        self.closed_inactive = Gauge(
            "zapsync_conversations_closed_inactive", "Conversations closed for inactivity", registry=r
        )
        self.flow_seconds = Gauge(
            "zapsync_flow_duration_seconds", "Duration of each flow's newest run", ["flow"], registry=r
        )

        self.queue_items = Gauge(
            "zapsync_queue_items", "Queued work items by kind and state", ["kind", "state"], registry=r
        )
        self.queue_oldest = Gauge(
            "zapsync_queue_oldest_pending_seconds", "Age of the oldest pending item of each kind", ["kind"], registry=r
        )
        # -- the webhook spool (issue 13 §4): set from the API process's journal at scrape time --
        self.spool_depth = Gauge(
            "zapsync_webhook_spool_depth",
            "Webhook deliveries journaled while the database was down, not yet applied",
            registry=r,
        )
        self.spool_bytes = Gauge("zapsync_webhook_spool_bytes", "Size of the webhook spool's journal", registry=r)

    def set_spool(self, depth: dict[str, int] | None) -> None:
        """The spool gauges from the journal's depth (zero when the app runs without a spool)."""
        self.spool_depth.set((depth or {}).get("records", 0))
        self.spool_bytes.set((depth or {}).get("bytes", 0))

    def _auth_failures(self, reports: dict[str, dict[str, Any]]) -> None:
        """One gauge per gateway from the newest of the sync and health reports (health names it ``auth_failed``)."""
        newest = sorted(
            (r for r in (reports.get(SYNC_FLOW), reports.get(MONITOR_FLOW)) if r),
            key=lambda r: str(r.get("finished_at") or ""),
        )
        failed: dict[str, bool] = {}
        for report in newest:
            for gateway, summary in (report.get("by_gateway") or {}).items():
                failed[gateway] = bool(summary.get("auth_error") or summary.get("auth_failed"))
        for gateway, value in failed.items():
            self.gateway_auth_failed.labels(gateway).set(1.0 if value else 0.0)

    async def render(self, session: AsyncSession) -> bytes:
        """Refresh the database-backed gauges and return the exposition text."""
        self.instances.clear()
        for gateway, status, health, n in await instance_counts(session):
            self.instances.labels(gateway, status, health).set(n)
        reports = await latest_reports(session)
        for flow, report in reports.items():
            self.flow_seconds.labels(flow).set(float(report.get("seconds") or 0))
        sync = reports.get("sync-status")
        if sync:
            self.sync_seconds.set(float(sync.get("seconds") or 0))
            for kind in ("checked", "in_sync", "drifted", "applied", "superseded", "unreachable"):
                self.sync_drift.labels(kind).set(float(sync.get(kind) or 0))
            for gateway, summary in (sync.get("by_gateway") or {}).items():
                self.gateway_unreachable.labels(gateway).set(float(summary.get("unreachable") or 0))
                self.breaker_open.labels(gateway).set(1.0 if summary.get("breaker") == "open" else 0.0)
        self._auth_failures(reports)
        imports = await import_totals(session)
        self.import_rows.labels("messages").set(imports["messages"])
        self.import_rows.labels("contacts").set(imports["contacts"])
        self.import_seconds.set(imports["last_seconds"])
        self.closed_inactive.set(await closed_inactive_total(session))
        for stats in await queue_stats(session, kinds=list(WorkKind)):
            for state in ("pending", "running", "failed"):
                self.queue_items.labels(stats.kind, state).set(getattr(stats, state))
            self.queue_oldest.labels(stats.kind).set(stats.oldest_pending_age_seconds or 0.0)
        return generate_latest(self.registry)
