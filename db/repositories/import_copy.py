"""Import-only message writes: a page COPYed into a staging table, then merged into `messages` in one statement.

The webhook path keeps :func:`db.repositories.conversations.insert_messages` (one ``unnest`` statement): a page of
thousands of imported messages travels faster as COPY rows, which psycopg formats in C, than as delimited strings
built and split per column. Stored rows are the same either way: text scrubbed of NUL bytes and of the delimiters
the ``unnest`` path uses, empty text as NULL, `sender` and the default `status` derived in SQL, and messages already
stored (by instance and external id) left as they are.

Functions flush, never commit; they run in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import GatewayMessage
from db.engine import driver_connection
from db.repositories.conversations import (
    CLAIM_PENDING_SQL,
    RECEIPTS_LOCK_SQL,
    InstanceScope,
    MessageRows,
    furthest_status_sql,
)

STAGE_TABLE = "zapsync_import_messages"
"""A temporary table per connection, emptied by every commit (``ON COMMIT DELETE ROWS``); each merge empties
it too, so a transaction may merge several pages."""

_STAGE_SQL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} (conv bigint, ext text, fm boolean, type text, content text, "
    "murl text, mmime text, mname text, msize bigint, ts bigint, status text) ON COMMIT DELETE ROWS"
)
_COPY_SQL = f"COPY {STAGE_TABLE} (conv, ext, fm, type, content, murl, mmime, mname, msize, ts, status) FROM STDIN"
_MERGE_SQL = f"""
WITH staged AS (DELETE FROM {STAGE_TABLE} RETURNING *),{CLAIM_PENDING_SQL.format(source="staged", inst="%(inst)s")}
INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, sender, type, content,
                      media_url, media_mime, media_name, media_size, sent_at, status)
SELECT %(org)s, %(inst)s, m.conv, m.ext, m.fm, CASE WHEN m.fm THEN 'agent' ELSE 'client' END, m.type, m.content,
       m.murl, m.mmime, m.mname, m.msize, to_timestamp(m.ts),
       {furthest_status_sql("COALESCE(m.status, CASE WHEN m.fm THEN 'sent' ELSE 'delivered' END)", "r.status")}
FROM staged m LEFT JOIN claimed r ON r.external_id = m.ext
ON CONFLICT (instance_id, external_id) DO NOTHING
"""
_LOCK_SQL = RECEIPTS_LOCK_SQL.format(mode="_shared").replace(":inst", "%(inst)s")
_FIELD = {name: index for index, name in enumerate(GatewayMessage._fields)}
_SCRUB = str.maketrans({"\x00": None, "\x1f": " ", "\x1e": " "})


def _clean(values: Sequence[str | None]) -> Sequence[str | None]:
    """Text as the ``unnest`` path stores it: '' → NULL; NUL bytes dropped, its delimiters as spaces.

    The common case — no value is empty or holds one of those characters — costs one join and a few scans.
    """
    present = [v for v in values if v is not None]
    if not present:
        return values
    joined = "\x1f".join(present)
    if "" not in present and "\x00" not in joined and "\x1e" not in joined and joined.count("\x1f") == len(present) - 1:
        return values
    return [(v.translate(_SCRUB) or None) if v else None for v in values]


def _stage_rows(rows: MessageRows) -> list[tuple[Any, ...]]:
    """The staging rows, column order of ``_COPY_SQL``."""
    columns = list(zip(*rows.messages, strict=True))  # the messages' fields, column by column

    def column(name: str) -> Sequence[Any]:
        return columns[_FIELD[name]]

    return list(
        zip(
            rows.conversation_id,
            _clean(column("external_id")),
            column("from_me"),
            column("type"),
            _clean(column("content")),
            _clean(column("media_url")),
            _clean(column("media_mime")),
            _clean(column("media_name")),
            column("media_size"),
            column("timestamp"),
            [s or None for s in column("status")],
            strict=True,
        )
    )


async def copy_messages(session: AsyncSession, scope: InstanceScope, rows: MessageRows) -> int:
    """Store the messages not stored yet (by external id): COPY into the staging table, one merge; returns how many
    were new. Each is stored at the furthest of its status and a receipt that arrived before it (see
    :func:`db.repositories.conversations.insert_messages`)."""
    if not len(rows):
        return 0
    staged = _stage_rows(rows)
    driver = await driver_connection(session)
    async with driver.cursor() as cursor:
        await cursor.execute(_STAGE_SQL)
        async with cursor.copy(_COPY_SQL) as copy:
            for row in staged:
                await copy.write_row(row)
        await cursor.execute(_LOCK_SQL, {"inst": scope.id})
        await cursor.execute(_MERGE_SQL, {"org": scope.organization_id, "inst": scope.id})
        inserted = cursor.rowcount
    return max(inserted, 0)
