"""Alembic environment: the URL comes from zapsync's settings (or the embedded server)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from db.engine import database_url
from db.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Run migrations on a fresh connection (NullPool: Alembic is a one-shot client)."""
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
