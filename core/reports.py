"""The pydantic reports flows return, store in `flow_reports` and show as Prefect artifacts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

REPORT_LIST_CAP = 500
"""Lists in a report stop at this many entries; the counts stay exact."""


class SyncScope(BaseModel):
    """Which instances a sync covers: all, one organization, or one instance."""

    organization_id: uuid.UUID | None = None
    instance_id: uuid.UUID | None = None

    @property
    def key(self) -> str:
        """A stable name for the scope (advisory locks, idempotency keys)."""
        if self.instance_id:
            return f"instance:{self.instance_id}"
        if self.organization_id:
            return f"organization:{self.organization_id}"
        return "all"


class Drift(BaseModel):
    """An instance whose database status differs from what its gateway says."""

    instance_id: uuid.UUID
    organization_id: uuid.UUID
    instance_name: str
    gateway: str
    db_status: str
    gateway_status: str
    reason: str | None = None
    applied: bool = False
    """True when the change was written; false in check mode or when a newer observation won."""


class UnreachableInstance(BaseModel):
    """An instance whose gateway could not be asked; its status was left alone."""

    instance_id: uuid.UUID
    instance_name: str
    gateway: str
    error: str | None = None


class GatewaySummary(BaseModel):
    """Per-gateway counts for one sync."""

    checked: int = 0
    unreachable: int = 0
    confirmed_live: int = 0
    breaker: str = "closed"
    seconds: float = 0.0
    auth_error: str | None = None
    """Set when the gateway refused zapsync's key (401/403): which gateway, and the setting to check."""
    live_in_bulk: int = 0
    """Instances whose live state came from the gateway's one `/metrics` call (no per-instance confirmation)."""
    live_state_error: str | None = None
    """Why the gateway's configured `/metrics` could not be used this run (the sync fell back), else None."""


class SyncReport(BaseModel):
    """What one `sync_status` run found and did."""

    mode: Literal["check", "apply"]
    scope: SyncScope
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    skipped: str | None = None
    """Why the run did nothing (lock held by another run, late scheduled run), else None."""
    checked: int = 0
    in_sync: int = 0
    drifted: int = 0
    applied: int = 0
    superseded: int = 0
    """Drift not written because a newer observation (e.g. a webhook) had already landed."""
    unreachable: int = 0
    by_gateway: dict[str, GatewaySummary] = Field(default_factory=dict)
    changes: list[Drift] = Field(default_factory=list)
    unreachable_instances: list[UnreachableInstance] = Field(default_factory=list)
    became_connected: list[uuid.UUID] = Field(default_factory=list)
    failed_gateways: list[str] = Field(default_factory=list)
    """Configured gateways none of whose instances could be read (down, or refusing the key): the run failed
    there (`zapsync sync` exits 1, `GET /cron/sync-status` answers 502)."""
    flow_run_id: uuid.UUID | None = None

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        lines = [
            f"# Status sync ({self.mode}, scope {self.scope.key})",
            "",
            f"{self.checked} checked, {self.in_sync} in sync, {self.drifted} drifted, {self.applied} applied, "
            f"{self.superseded} superseded by newer observations, {self.unreachable} unreachable "
            f"— {self.seconds:.2f} s",
        ]
        if self.skipped:
            lines += ["", f"Skipped: {self.skipped}"]
        if self.failed_gateways:
            lines += ["", f"Could not read gateway(s): {', '.join(self.failed_gateways)}"]
        lines += [
            f"- **Authentication failed**: {g.auth_error}" for _, g in sorted(self.by_gateway.items()) if g.auth_error
        ]
        if self.by_gateway:
            lines += [
                "",
                "| gateway | checked | unreachable | confirmed live | breaker | seconds |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {name} | {g.checked} | {g.unreachable} | {g.confirmed_live} | {g.breaker} | {g.seconds:.2f} |"
                for name, g in sorted(self.by_gateway.items())
            ]
        if self.changes:
            lines += ["", "| instance | gateway | database | gateway says | applied |", "|---|---|---|---|---|"]
            lines += [
                f"| {d.instance_name} | {d.gateway} | {d.db_status} | {d.gateway_status} | {d.applied} |"
                for d in self.changes[:50]
            ]
        return "\n".join(lines)


class CleanupCounts(BaseModel):
    """Rows deleted by a cleanup (or that a dry run would delete), per table."""

    sessions: int = 0
    webhook_events: int = 0
    live_events: int = 0
    flow_reports: int = 0
    work_items: int = 0
    """Finished queue items (done or failed) past the queue's retention."""


class CleanupReport(BaseModel):
    """What one `cleanup_sessions` run deleted (or, dry, would delete)."""

    dry_run: bool
    organization_id: uuid.UUID | None = None
    retention_days: int | None = None
    """Session retention forced for every organization; None uses each organization's own."""
    webhook_retention_days: int
    live_event_retention_days: int
    report_retention_days: int
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    skipped: str | None = None
    deleted: CleanupCounts = Field(default_factory=CleanupCounts)
    sessions_by_retention: dict[int, int] = Field(default_factory=dict)
    """Sessions per retention period (days) that applied to them."""
    batches: int = 0
    flow_run_id: uuid.UUID | None = None

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        verb = "would delete" if self.dry_run else "deleted"
        d = self.deleted
        lines = [
            f"# Cleanup{' (dry run)' if self.dry_run else ''}",
            "",
            f"{verb}: {d.sessions} ended sessions, {d.webhook_events} webhook events, {d.live_events} live "
            f"events, {d.flow_reports} flow reports, {d.work_items} finished queue items in {self.batches} batches "
            f"— {self.seconds:.2f} s",
        ]
        if self.skipped:
            lines += ["", f"Skipped: {self.skipped}"]
        if self.sessions_by_retention:
            lines += ["", "| session retention (days) | sessions |", "|---|---|"]
            lines += [f"| {days} | {n} |" for days, n in sorted(self.sessions_by_retention.items())]
        return "\n".join(lines)


class OrganizationClose(BaseModel):
    """Inactive-conversation closing for one organization."""

    organization_id: uuid.UUID
    inactivity_hours: int
    close_waiting: bool
    cutoff: datetime
    idle: int = 0
    """Idle conversations found (a dry run's answer)."""
    closed: int = 0
    kept_waiting: int = 0
    """Idle conversations left open because the customer still waits for an agent's reply."""
    raced: int = 0
    """Selected but not closed: a message arrived meanwhile, or another transaction held the row."""
    batches: int = 0
    seconds: float = 0.0


class CloseInactiveReport(BaseModel):
    """What one `close_inactive_conversations` run closed (or, dry, would close)."""

    dry_run: bool
    organization_id: uuid.UUID | None = None
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    skipped: str | None = None
    closed: int = 0
    idle: int = 0
    """Idle conversations found (closed unless they raced; all of them would be closed by a dry run's apply)."""
    kept_waiting: int = 0
    raced: int = 0
    organizations: list[OrganizationClose] = Field(default_factory=list)
    flow_run_id: uuid.UUID | None = None

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        lines = [
            f"# Inactive conversations{' (dry run)' if self.dry_run else ''}",
            "",
            f"{self.closed} closed, {self.idle} idle{' (would close)' if self.dry_run else ''}, "
            f"{self.kept_waiting} kept (waiting on an agent), {self.raced} raced by new activity or locks "
            f"— {self.seconds:.2f} s",
        ]
        if self.skipped:
            lines += ["", f"Skipped: {self.skipped}"]
        if self.organizations:
            lines += [
                "",
                "| organization | hours | close waiting | idle | closed | kept waiting | raced |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {o.organization_id} | {o.inactivity_hours} | {o.close_waiting} | {o.idle} | {o.closed} "
                f"| {o.kept_waiting} | {o.raced} |"
                for o in self.organizations[:50]
            ]
        return "\n".join(lines)


class GatewayHealthSummary(BaseModel):
    """One gateway in one health check."""

    checked: int = 0
    reachable: bool = True
    health: Literal["healthy", "unhealthy"] = "healthy"
    consecutive_failures: int = 0
    error: str | None = None
    auth_failed: bool = False
    """The gateway refused zapsync's key (401/403); ``error`` names the setting to check."""
    transition: Literal["unhealthy", "recovered"] | None = None
    seconds: float = 0.0


class HealthTransition(BaseModel):
    """An alert, a reconnect or a recovery of one instance."""

    instance_id: uuid.UUID
    organization_id: uuid.UUID
    instance_name: str
    gateway: str
    kind: Literal["alert", "reconnect", "recovered"]
    consecutive_failures: int
    health: str
    detail: str | None = None


class HealthReport(BaseModel):
    """What one `monitor_health` run found and did."""

    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    skipped: str | None = None
    checked: int = 0
    healthy: int = 0
    failing: int = 0
    not_judged: int = 0
    """Instances of unreachable gateways: their counters were left alone."""
    status_changes: int = 0
    alerts: int = 0
    reconnects: int = 0
    reconnect_failures: int = 0
    recoveries: int = 0
    by_gateway: dict[str, GatewayHealthSummary] = Field(default_factory=dict)
    transitions: list[HealthTransition] = Field(default_factory=list)
    flow_run_id: uuid.UUID | None = None

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        lines = [
            "# Health check",
            "",
            f"{self.checked} checked: {self.healthy} healthy, {self.failing} failing, {self.not_judged} behind an "
            f"unreachable gateway; {self.alerts} alerts, {self.reconnects} reconnects "
            f"({self.reconnect_failures} failed), {self.recoveries} recoveries — {self.seconds:.2f} s",
        ]
        if self.skipped:
            lines += ["", f"Skipped: {self.skipped}"]
        if self.by_gateway:
            lines += ["", "| gateway | checked | health | failures | transition | error |", "|---|---|---|---|---|---|"]
            lines += [
                f"| {name} | {g.checked} | {g.health} | {g.consecutive_failures} | {g.transition or ''} "
                f"| {g.error or ''} |"
                for name, g in sorted(self.by_gateway.items())
            ]
        if self.transitions:
            lines += ["", "| instance | gateway | event | failures | health | detail |", "|---|---|---|---|---|---|"]
            lines += [
                f"| {t.instance_name} | {t.gateway} | {t.kind} | {t.consecutive_failures} | {t.health} "
                f"| {t.detail or ''} |"
                for t in self.transitions[:50]
            ]
        return "\n".join(lines)


# -- import-conversations --------------------------------------------------------------------------------------


SKIP_REASONS = ("group", "broadcast", "empty", "outside_history")
"""Why a chat is not imported: group chats, broadcasts/status/channels, chats without messages, chats whose
newest message is older than the history window."""


class ImportCounts(BaseModel):
    """What one import saw and wrote (cumulative over the attempts of one import run)."""

    contacts_seen: int = 0
    contacts_skipped: int = 0
    """Groups and other non-person entries of the address book."""
    contacts_created: int = 0
    contacts_linked: int = 0
    """Contacts newly linked to a CRM client by phone."""
    chats_seen: int = 0
    chats_imported: int = 0
    chats_skipped_group: int = 0
    chats_skipped_broadcast: int = 0
    chats_skipped_empty: int = 0
    chats_skipped_outside_history: int = 0
    conversations_opened: int = 0
    """New conversations left open (recent, waiting or in progress)."""
    conversations_closed: int = 0
    """New conversations created closed (reason `imported`): history older than the inactivity window."""
    messages_seen: int = 0
    messages_inserted: int = 0
    messages_present: int = 0
    """Already stored (by a webhook, or an earlier import)."""
    messages_skipped: int = 0
    """In group or broadcast chats, or not valid messages."""
    pages: int = 0

    @property
    def chats_skipped(self) -> int:
        """Chats not imported, every reason."""
        return (
            self.chats_skipped_group
            + self.chats_skipped_broadcast
            + self.chats_skipped_empty
            + self.chats_skipped_outside_history
        )


Outcome = Literal["completed", "skipped", "not_supported", "failed"]


class ImportReport(BaseModel):
    """What one `import_conversations` run found and did."""

    instance_id: uuid.UUID
    instance_name: str | None = None
    gateway: str | None = None
    trigger: str = "manual"
    connection_key: str | None = None
    full: bool = False
    outcome: Outcome = "completed"
    skipped: str | None = None
    """Why nothing was imported (another import running, connection already imported, not supported…)."""
    error: str | None = None
    import_run_id: int | None = None
    resumed: bool = False
    """True when this run continued an interrupted one from its checkpoint."""
    incremental: bool = False
    """A reconnect's import: only what is newer than the previous import was read."""
    history_days: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    counts: ImportCounts = Field(default_factory=ImportCounts)
    flow_run_id: uuid.UUID | None = None

    @property
    def messages_per_second(self) -> float:
        """Messages written or confirmed per second of the run."""
        handled = self.counts.messages_inserted + self.counts.messages_present
        return handled / self.seconds if self.seconds > 0 else 0.0

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        c = self.counts
        window = f"since {self.since:%Y-%m-%d %H:%M} UTC" if self.since else "all history"
        lines = [
            f"# Conversation import: {self.instance_name or self.instance_id} ({self.outcome})",
            "",
            f"Trigger {self.trigger}, {'incremental, ' if self.incremental else ''}{window}"
            f"{', resumed from a checkpoint' if self.resumed else ''} "
            f"— {self.seconds:.2f} s",
        ]
        if self.skipped or self.error:
            lines += ["", f"{'Error' if self.error else 'Skipped'}: {self.error or self.skipped}"]
        lines += [
            "",
            "| | seen | written | other |",
            "|---|---|---|---|",
            f"| contacts | {c.contacts_seen} | {c.contacts_created} created, {c.contacts_linked} linked to clients "
            f"| {c.contacts_skipped} skipped |",
            f"| chats | {c.chats_seen} | {c.chats_imported} imported | {c.chats_skipped_group} groups, "
            f"{c.chats_skipped_broadcast} broadcasts, {c.chats_skipped_empty} empty, "
            f"{c.chats_skipped_outside_history} outside the window |",
            f"| conversations | | {c.conversations_opened} opened, {c.conversations_closed} closed | |",
            f"| messages | {c.messages_seen} | {c.messages_inserted} inserted | {c.messages_present} already "
            f"present, {c.messages_skipped} skipped |",
        ]
        return "\n".join(lines)


# -- queue drains ---------------------------------------------------------------------------------------------


class DrainedItem(BaseModel):
    """What a drain did with one queue item."""

    item_id: int
    key: str
    instance_id: uuid.UUID | None = None
    attempt: int
    outcome: Literal["done", "retry", "failed", "superseded", "lease_lost"]
    seconds: float = 0.0
    error: str | None = None
    summary: str | None = None
    """One line about the work (an import's counts)."""


class DrainReport(BaseModel):
    """What one drain run (a flow run that works through the queue of one kind) claimed and how each item ended."""

    kind: str
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    flow_run_id: uuid.UUID | None = None
    skipped: str | None = None
    claimed: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0
    superseded: int = 0
    lease_lost: int = 0
    items: list[DrainedItem] = Field(default_factory=list)
    """The first REPORT_LIST_CAP items, in the order they finished."""

    def to_markdown(self) -> str:
        """A short human summary for the Prefect UI."""
        lines = [
            f"# Queue drain: {self.kind}",
            "",
            f"{self.claimed} claimed: {self.done} done, {self.retried} to retry, {self.failed} failed, "
            f"{self.superseded} superseded, {self.lease_lost} lost their lease — {self.seconds:.2f} s",
        ]
        if self.items:
            lines += ["", "| item | key | attempt | outcome | seconds | detail |", "|---|---|---|---|---|---|"]
            lines += [
                f"| {i.item_id} | {i.key} | {i.attempt} | {i.outcome} | {i.seconds:.2f} | "
                f"{i.error or i.summary or ''} |"
                for i in self.items[:100]
            ]
        return "\n".join(lines)
