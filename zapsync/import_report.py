"""The report of `import_conversations`: returned, stored in `flow_reports` and shown as a Prefect artifact."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

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
            f"Trigger {self.trigger}, {window}{', resumed from a checkpoint' if self.resumed else ''} "
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
