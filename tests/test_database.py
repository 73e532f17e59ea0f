"""The embedded PostgreSQL is shared between processes; an unmigrated database is refused with a sentence."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest
from sqlalchemy import make_url

from core.errors import DatabaseNotMigrated
from core.settings import get_settings
from db.engine import check_migrated, database_url


def test_a_second_process_shares_the_running_embedded_server() -> None:
    url = database_url()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    probe = (
        "from db.engine import database_url; import psycopg;"
        "u = database_url();"
        "c = psycopg.connect(host=u.query['host'], user='postgres', dbname=u.database);"
        "print(c.execute('select pg_postmaster_start_time()').fetchone()[0].isoformat())"
    )
    child = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr[-2000:]
    with psycopg.connect(host=url.query["host"], user="postgres", dbname=url.database) as conn:
        started = conn.execute("select pg_postmaster_start_time()").fetchone()[0].isoformat()
    assert child.stdout.strip() == started  # the same server, not a second one


async def test_unmigrated_database_is_refused_with_the_command_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    url = database_url()
    with psycopg.connect(host=url.query["host"], user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS zapsync_empty")
        conn.execute("CREATE DATABASE zapsync_empty")
    empty = make_url(url.render_as_string(hide_password=False)).set(database="zapsync_empty")
    monkeypatch.setenv("DATABASE_URL", empty.render_as_string(hide_password=False))
    get_settings.cache_clear()
    try:
        from db.engine import dispose_engine

        await dispose_engine()
        with pytest.raises(DatabaseNotMigrated, match="run `zapsync db upgrade`"):
            await check_migrated()
        await dispose_engine()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    await check_migrated()  # the session's own database is at head
