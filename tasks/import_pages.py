"""Import work, one gateway page at a time: fetch it, write it in one transaction with its checkpoint. Each page is
a plain function (callable without Prefect) wrapped by one thin task; the import calls the plain function for the
first page of a phase (inside the instance's task run) and the task for every further page.

Phases (the cursor's ``phase``): contacts (address book) → chats (one contact and one conversation per
one-to-one chat) → messages (the instance's messages, newest first, within [since, until]) → finalize (stretch
conversations over their messages) → done. Chats are prepared before their messages so that which conversation a
message lands in never depends on the order pages finish in: message pages run concurrently, and a resumed run
writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefect import task

from core.domain import ChatKind, GatewayMessage, chat_kind
from db.engine import session_scope
from db.repositories.conversations import (
    ContactInput,
    ConversationFact,
    InstanceScope,
    MessageRows,
    ensure_conversations,
    finalize_conversations,
    upsert_contacts,
)
from db.repositories.import_copy import copy_messages
from db.repositories.import_runs import Cursor, record_progress, relax_durability
from gateways.base import Gateway
from tasks.options import TASK_OPTIONS

IMPORTED = "imported"
"""`close_reason` of conversations created closed by an import."""


@dataclass(frozen=True, slots=True)
class ImportContext:
    """What every page task of one import run needs (small; re-fetched nowhere)."""

    run_id: int
    scope: InstanceScope
    page_size: int
    until: datetime
    """Messages newer than the run's start arrive by webhook; a fixed bound keeps page boundaries stable."""
    since: datetime | None = None
    incremental: bool = False
    """A reconnect's import: only what is newer than ``since`` (the last import) is read, chats listing included."""


@dataclass(frozen=True, slots=True)
class PageOutcome:
    """What one page task did: counts to report, and where the listing stands."""

    counts: dict[str, int]
    last: bool
    """No further page in this phase."""
    pages: int = 0
    total: int = 0


class ConversationTargets:
    """Contact address → conversation id for message pages (an opaque object Prefect does not walk through)."""

    __slots__ = ("by_address",)

    def __init__(self, by_address: dict[str, int]) -> None:
        self.by_address = by_address

    def find(self, message: GatewayMessage) -> int | None:
        """The conversation a message goes to, by its chat jid or its alternate address."""
        found = self.by_address.get(message.chat_jid)
        if found is None and message.alt_jid:
            found = self.by_address.get(message.alt_jid)
        return found


# -- contacts -----------------------------------------------------------------------------------------------------


async def copy_contacts_page(gateway: Gateway, ctx: ImportContext, page: int) -> PageOutcome:
    """One page of the address book: people become contacts (linked to clients by phone); groups are skipped."""
    batch = await gateway.fetch_contacts(ctx.scope.instance_name, page=page, page_size=ctx.page_size)
    people = [
        ContactInput(c.jid, c.alt_jid, c.name)
        for c in batch
        if chat_kind(c.jid) is ChatKind.CONTACT and c.kind not in ("group", "group_member")
    ]
    last = len(batch) < ctx.page_size

    def advance(cursor: Cursor) -> Cursor | None:
        if cursor.get("phase") != "contacts" or cursor.get("contacts_page") != page:
            return None
        cursor["contacts_page"] = page + 1
        if last:
            cursor["phase"] = "chats"
        return cursor

    async with session_scope() as session:
        written = await upsert_contacts(session, ctx.scope, people)
        counts = {
            "contacts_seen": len(batch),
            "contacts_skipped": len(batch) - len(people),
            "contacts_created": written.created,
            "contacts_linked": written.linked,
            "pages": 1,
        }
        await record_progress(session, ctx.run_id, counts=counts, advance=advance)
    return PageOutcome(counts=counts, last=last)


import_contacts_page = task(name="import-contacts-page", **TASK_OPTIONS)(copy_contacts_page)


# -- chats --------------------------------------------------------------------------------------------------------


async def copy_chats_page(gateway: Gateway, ctx: ImportContext, skip: int) -> PageOutcome:
    """One page of chats: each one-to-one chat with messages in the window gets its contact and conversation."""
    batch = await gateway.fetch_chats(ctx.scope.instance_name, skip=skip, take=ctx.page_size)
    counts = {"chats_seen": len(batch), "pages": 1}
    wanted = []
    for chat in batch:
        kind = chat.kind
        if kind is not ChatKind.CONTACT:
            reason = "group" if kind is ChatKind.GROUP else "broadcast"
        elif chat.last_message_at is None:
            reason = "empty"
        elif ctx.since is not None and chat.last_message_at < ctx.since:
            reason = "outside_history"
        else:
            wanted.append(chat)
            continue
        counts[f"chats_skipped_{reason}"] = counts.get(f"chats_skipped_{reason}", 0) + 1
    # Chats come most recently active first: once a whole page is older than an incremental window, so is the rest.
    stale = (
        ctx.incremental
        and ctx.since is not None
        and not wanted
        and all(chat.last_message_at is None or chat.last_message_at < ctx.since for chat in batch)
    )
    last = len(batch) < ctx.page_size or stale

    def advance(cursor: Cursor) -> Cursor | None:
        if cursor.get("phase") != "chats" or cursor.get("chats_skip") != skip:
            return None
        cursor["chats_skip"] = skip + len(batch)
        if last:
            cursor["phase"] = "messages"
        return cursor

    async with session_scope() as session:
        written = await upsert_contacts(session, ctx.scope, (ContactInput(c.jid, c.alt_jid, c.name) for c in wanted))
        refs = await ensure_conversations(
            session,
            ctx.scope,
            (
                ConversationFact(written.ids[c.jid], c.last_message_at, bool(c.last_from_me))
                for c in wanted
                if c.last_message_at is not None
            ),
            now=ctx.until,
            closed_reason=IMPORTED,
        )
        counts.update(_conversation_counts(refs.values()))
        counts.update(chats_imported=len(wanted), contacts_created=written.created, contacts_linked=written.linked)
        await record_progress(session, ctx.run_id, counts=counts, advance=advance)
    return PageOutcome(counts=counts, last=last)


import_chats_page = task(name="import-chats-page", **TASK_OPTIONS)(copy_chats_page)


def _conversation_counts(refs: Iterable[Any]) -> dict[str, int]:
    created = [r for r in refs if r.created]
    closed = sum(1 for r in created if r.status == "closed")
    return {"conversations_opened": len(created) - closed, "conversations_closed": closed}


# -- messages -----------------------------------------------------------------------------------------------------


async def copy_messages_page(
    gateway: Gateway, ctx: ImportContext, page: int, targets: ConversationTargets
) -> PageOutcome:
    """One page of the instance's messages: one-to-one ones are stored (ON CONFLICT DO NOTHING), others counted."""
    fetched = await gateway.fetch_messages(
        ctx.scope.instance_name,
        page=page,
        page_size=ctx.page_size,
        since=ctx.since,
        until=ctx.until,
    )
    rows = MessageRows()
    strays: list[GatewayMessage] = []
    skipped = fetched.skipped
    for message in fetched.messages:
        if message.kind is not ChatKind.CONTACT:
            skipped += 1
            continue
        conversation_id = targets.find(message)
        if conversation_id is None:
            strays.append(message)
        else:
            rows.append(conversation_id, message)
    pages = fetched.pages

    def advance(cursor: Cursor) -> Cursor | None:
        state = cursor.setdefault("messages", {"below": 1, "done": []})
        if page < state["below"] or page in state["done"]:
            return None
        done = set(state["done"]) | {page}
        below = state["below"]
        while below in done:
            done.discard(below)
            below += 1
        state.update(below=below, done=sorted(done), pages=pages, total=fetched.total)
        if below > pages:
            cursor["phase"] = "finalize"
        return cursor

    counts = {"messages_seen": len(fetched.messages) + fetched.skipped, "messages_skipped": skipped, "pages": 1}
    async with session_scope() as session:
        await relax_durability(session)
        if strays:
            counts.update(await _place_strays(session, ctx, strays, rows))
        inserted = await copy_messages(session, ctx.scope, rows)
        counts.update(messages_inserted=inserted, messages_present=len(rows) - inserted)
        await record_progress(session, ctx.run_id, counts=counts, advance=advance)
    return PageOutcome(counts=counts, last=page >= pages, pages=pages, total=fetched.total)


import_messages_page = task(name="import-messages-page", **TASK_OPTIONS)(copy_messages_page)


async def _place_strays(
    session: Any, ctx: ImportContext, strays: list[GatewayMessage], rows: MessageRows
) -> dict[str, int]:
    """Messages of chats the chats phase did not list (they moved while it paged): contact and conversation
    now, never splitting a closed conversation (their order among pages is not known)."""
    names = {m.chat_jid: m.push_name for m in strays if not m.from_me}
    written = await upsert_contacts(
        session, ctx.scope, (ContactInput(m.chat_jid, m.alt_jid, names.get(m.chat_jid)) for m in strays)
    )
    refs = await ensure_conversations(
        session,
        ctx.scope,
        (ConversationFact(written.ids[m.chat_jid], m.sent_at, m.from_me) for m in strays),
        now=ctx.until,
        closed_reason=IMPORTED,
        split_closed=False,
    )
    for m in strays:
        rows.append(refs[written.ids[m.chat_jid]].id, m)
    counts = _conversation_counts(refs.values())
    counts.update(contacts_created=written.created, contacts_linked=written.linked)
    return counts


# -- finalize -----------------------------------------------------------------------------------------------------


async def stretch_conversations(ctx: ImportContext) -> int:
    """Stretch conversations over their messages and mark the first unanswered one; returns conversations fixed."""

    def advance(cursor: Cursor) -> Cursor | None:
        if cursor.get("phase") != "finalize":
            return None
        cursor["phase"] = "done"
        return cursor

    async with session_scope() as session:
        fixed = await finalize_conversations(session, ctx.scope.id)
        await record_progress(session, ctx.run_id, counts={}, advance=advance)
    return fixed
