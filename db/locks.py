"""PostgreSQL advisory locks: one run per scope, whichever process or machine it runs on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text

from db.engine import get_engine


@asynccontextmanager
async def try_advisory_lock(name: str) -> AsyncIterator[bool]:
    """Hold a session-level advisory lock named ``name`` for the block; yields False if another holds it."""
    async with get_engine().connect() as conn:
        key = {"key": name}
        acquired = bool(
            (await conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), key)).scalar()
        )
        await conn.commit()
        try:
            yield acquired
        finally:
            if acquired:
                await conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)
                await conn.commit()
