"""The webhook spool (issue 13 §4–5): the journal on its own, replay into the real database, the receive path with
a backlog, `zapsync webhooks replay`, and PostgreSQL stopped in the middle of a burst of 5,000 message webhooks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from api.inbox import RepeatFilter
from api.spool import (
    Journal,
    Replayer,
    SpoolFull,
    SpoolRecord,
    apply_record,
    decode_records,
    encode_record,
    read_journal,
)
from core.domain import Provider
from db.engine import session_scope
from tests.factories import count, make_instance, make_organization

CUSTOMER = "5511987654321@s.whatsapp.net"
SECRET = {"x-webhook-secret": "org-secret"}
ADMIN = {"authorization": "Bearer test-admin-token"}  # ZAPSYNC_ADMIN_TOKEN in tests/conftest.py (/metrics may need it)


def upsert(key_id: str, *, instance: str = "acme-01", jid: str = CUSTOMER, text_: str = "oi") -> dict[str, Any]:
    """An Evolution `messages.upsert` delivery of one message."""
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": {"remoteJid": jid, "fromMe": False, "id": key_id},
            "pushName": "Ana",
            "status": "DELIVERY_ACK",
            "message": {"conversation": text_},
            "messageType": "conversation",
            "messageTimestamp": int(datetime.now(UTC).timestamp()),
        },
        "date_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "sender": "5511999990000@s.whatsapp.net",
        "apikey": None,
    }


def record(key_id: str, org: uuid.UUID | None = None, **kwargs: Any) -> SpoolRecord:
    body = orjson.dumps(upsert(key_id, **kwargs))
    return SpoolRecord(datetime.now(UTC), org or uuid.uuid4(), Provider.EVOLUTION, None, body)


def key_ids(records: Any) -> list[str]:
    return [orjson.loads(r.body)["data"]["key"]["id"] for r in records]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "spool", max_bytes=1024 * 1024).open()
    yield opened
    opened.close()


# -- the journal on its own --------------------------------------------------------------------------------------


@pytest.mark.pure
def test_record_round_trip_keeps_the_exact_body() -> None:
    raw = b'{"event": "messages.upsert",  "odd spacing": "\\u0000 kept as sent"}'
    original = SpoolRecord(datetime.now(UTC), uuid.uuid4(), Provider.WAHA, "messages-upsert", raw)
    data = encode_record(original) * 2
    found, end = decode_records(data)
    assert [r for _, r in found] == [original, original]
    assert end == len(data)


@pytest.mark.pure
async def test_appends_are_durable_counted_and_read_back_in_order(journal: Journal) -> None:
    await asyncio.gather(*(journal.append(record(f"K{i:03d}")) for i in range(100)))
    assert journal.depth()["records"] == 100
    assert journal.depth()["bytes"] == sum(p.stat().st_size for p in journal.folder.glob("seg-*.log"))
    assert key_ids(read_journal(journal.folder)) == [f"K{i:03d}" for i in range(100)]
    reopened = Journal(journal.root, max_bytes=1024 * 1024)
    journal.close()  # the slot is free again: the next process takes it over with what it holds
    reopened.open()
    try:
        assert reopened.folder == journal.folder
        assert reopened.depth() == {"records": 100, "bytes": journal.bytes}
    finally:
        reopened.close()


@pytest.mark.pure
async def test_a_torn_last_record_is_skipped_and_new_appends_stay_readable(journal: Journal) -> None:
    for i in range(3):
        await journal.append(record(f"K{i}"))
    journal.close()
    segment = next(journal.folder.glob("seg-*.log"))
    whole = segment.stat().st_size
    with segment.open("ab") as torn:  # a crash in the middle of the fourth record
        torn.write(encode_record(record("K3"))[:40])
    assert key_ids(read_journal(journal.folder)) == ["K0", "K1", "K2"]
    reopened = Journal(journal.root, max_bytes=1024 * 1024).open()
    try:
        assert reopened.depth() == {"records": 3, "bytes": whole}
        await reopened.append(record("K4"))  # written to a new segment, after the torn one
        assert key_ids(read_journal(reopened.folder)) == ["K0", "K1", "K2", "K4"]
    finally:
        reopened.close()


@pytest.mark.pure
async def test_a_corrupt_record_ends_the_readable_part(journal: Journal) -> None:
    for i in range(3):
        await journal.append(record(f"K{i}"))
    segment = next(journal.folder.glob("seg-*.log"))
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last record's body: its checksum no longer matches
    segment.write_bytes(bytes(data))
    assert key_ids(read_journal(journal.folder)) == ["K0", "K1"]


@pytest.mark.pure
async def test_a_full_journal_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    one = len(encode_record(record("K0")))
    small = Journal(tmp_path / "spool", max_bytes=one * 2 + 10).open()
    try:
        await small.append(record("K0"))
        await small.append(record("K1"))
        with pytest.raises(SpoolFull, match="full"):
            await small.append(record("K2"))
        assert small.depth()["records"] == 2
        assert key_ids(read_journal(small.folder)) == ["K0", "K1"]
    finally:
        small.close()


@pytest.mark.pure
def test_two_processes_on_one_machine_take_separate_slots(tmp_path: Path) -> None:
    first = Journal(tmp_path / "spool", max_bytes=4096).open()
    second = Journal(tmp_path / "spool", max_bytes=4096).open()
    try:
        assert (first.folder.name, second.folder.name) == ("0", "1")
    finally:
        first.close()
        second.close()


@pytest.mark.pure
async def test_without_a_usable_folder_the_api_runs_without_a_spool(tmp_path: Path) -> None:
    from api.main import create_app
    from api.spool import app_spool, running_spool

    app = create_app(check_database=False)
    (tmp_path / "taken").write_text("a file where the spool folder should be")
    async with running_spool(app, tmp_path / "taken", 4096) as spool:
        assert spool is None and app_spool(app) is None


# -- replay into the database ------------------------------------------------------------------------------------


@pytest.fixture
async def org() -> uuid.UUID:
    organization = await make_organization()
    await make_instance(organization, "acme-01", status="connected")
    await make_instance(organization, "acme-02", status="connected")
    return organization


async def stored_messages() -> list[tuple[str, int]]:
    async with session_scope() as session:
        rows = await session.execute(text("SELECT external_id, count(*) FROM messages GROUP BY 1 ORDER BY 1"))
        return [(r[0], r[1]) for r in rows]


async def test_the_replayer_drains_in_order_and_deletes_applied_segments(journal: Journal, org: uuid.UUID) -> None:
    journal.segment_bytes = 2000  # several segments
    for i in range(30):
        await journal.append(record(f"R{i:02d}", org, instance="acme-01" if i % 2 else "acme-02", text_=f"m{i}"))
    repeats = RepeatFilter(0)

    async def apply(r: SpoolRecord) -> Any:
        return await apply_record(r, repeats)

    replayer = Replayer(journal, apply, batch=7)
    totals = await replayer.drain()
    assert totals["applied"] == 30 and journal.depth() == {"records": 0, "bytes": 0}
    assert list(journal.folder.glob("seg-*.log")) == []
    assert await stored_messages() == [(f"R{i:02d}", 1) for i in range(30)]
    # The same records again (a crash before the cursor moved): duplicates, nothing stored twice.
    for i in range(30):
        await journal.append(record(f"R{i:02d}", org, instance="acme-01" if i % 2 else "acme-02"))
    assert (await replayer.drain())["duplicate"] == 30
    assert await count("messages") == 30


async def test_a_delivery_behind_a_backlog_is_spooled_then_applied(tmp_path: Path, org: uuid.UUID) -> None:
    from api.main import create_app
    from api.spool import running_spool

    app = create_app(check_database=False)
    transport = httpx.ASGITransport(app=app)
    async with (
        running_spool(app, tmp_path / "spool", 1024 * 1024) as spool,
        httpx.AsyncClient(transport=transport, base_url="http://zapsync") as client,
    ):
        assert spool is not None
        replayer = app.state.spool_replayer
        await spool.append(record("OLD", org))  # an older delivery still waiting
        answer = await client.post(
            f"/webhooks/evolution/{org}",
            content=orjson.dumps(upsert("NEW")),
            headers={"x-webhook-secret": "org-secret"},
        )
        assert answer.status_code == 202 and answer.json()["outcome"] == "spooled"
        assert key_ids(read_journal(spool.folder))[-1] == "NEW"
        wrong = await client.post(
            f"/webhooks/evolution/{org}", content=orjson.dumps(upsert("BAD")), headers={"x-webhook-secret": "nope"}
        )
        assert wrong.status_code == 401  # only authenticated deliveries are spooled
        ready = (await client.get("/readyz")).json()
        assert ready["spool"]["records"] >= 1
        replayer.wake()
        deadline = asyncio.get_running_loop().time() + 30
        while spool.backlog:
            assert asyncio.get_running_loop().time() < deadline, "the spool was not drained"
            await asyncio.sleep(0.05)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        metrics = (await client.get("/metrics", headers=ADMIN)).text
        assert "zapsync_webhook_spool_depth 0.0" in metrics
    assert [k for k, _ in await stored_messages()] == ["NEW", "OLD"]
    assert [n for _, n in await stored_messages()] == [1, 1]


async def test_a_full_spool_answers_503_with_retry_after(tmp_path: Path, org: uuid.UUID) -> None:
    from api.main import create_app

    app = create_app(check_database=False)
    one = len(encode_record(record("OLD", org)))
    app.state.spool = Journal(tmp_path / "spool", max_bytes=one + 100).open()  # no replayer: it stays full
    try:
        await app.state.spool.append(record("OLD", org))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
            answer = await client.post(
                f"/webhooks/evolution/{org}", content=orjson.dumps(upsert("NEW")), headers=SECRET
            )
        assert answer.status_code == 503 and answer.headers["retry-after"] == "30"
        assert answer.json()["error"] == "SpoolFull"
        assert app.state.spool.depth()["records"] == 1
    finally:
        app.state.spool.close()
    assert await count("messages") == 0


async def test_what_a_previous_process_left_is_replayed_at_start(tmp_path: Path, org: uuid.UUID) -> None:
    from api.main import create_app
    from api.spool import running_spool

    left = Journal(tmp_path / "spool", max_bytes=1024 * 1024).open()
    for key in ("P0", "P1", "P2"):
        await left.append(record(key, org))
    left.close()  # the process died
    app = create_app(check_database=False)
    async with running_spool(app, tmp_path / "spool", 1024 * 1024) as spool:
        assert spool is not None and spool.depth()["records"] == 3
        deadline = asyncio.get_running_loop().time() + 30
        while spool.backlog:
            assert asyncio.get_running_loop().time() < deadline, "the spool was not drained"
            await asyncio.sleep(0.05)
    assert await stored_messages() == [("P0", 1), ("P1", 1), ("P2", 1)]


# -- zapsync webhooks replay -------------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str, str]:
    from zapsync import cli

    result = CliRunner().invoke(cli.app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


async def test_replay_cli_reapplies_inbox_and_a_copied_journal(tmp_path: Path, org: uuid.UUID) -> None:
    from api.main import create_app

    app = create_app(check_database=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
        for i in range(3):
            posted = await client.post(
                f"/webhooks/evolution/{org}",
                content=orjson.dumps(upsert(f"I{i}")),
                headers={"x-webhook-secret": "org-secret"},
            )
            assert posted.status_code == 200
    async with session_scope() as session:  # a bug once lost one delivery's effect: its inbox row stayed
        await session.execute(text("DELETE FROM messages WHERE external_id = 'I1'"))
    # A journal from another machine: two new messages and one already stored.
    copied = Journal(tmp_path / "elsewhere", max_bytes=1024 * 1024).open()
    for key in ("J0", "J1", "I0"):
        await copied.append(record(key, org))
    copied.close()

    def run() -> list[tuple[int, str, str]]:
        return [
            invoke("webhooks", "replay", "--since", "1h", "--org", str(org), "--json"),
            invoke("webhooks", "replay", "--since", "1h", "--event", "connection.update", "--json"),
            invoke("webhooks", "replay", "--spool", str(tmp_path / "elsewhere"), "--json"),
            invoke("webhooks", "replay", "--since", "yesterday-ish"),
            invoke("webhooks", "replay"),
            invoke("webhooks", "replay", "--spool", str(tmp_path / "missing")),
        ]

    inbox, filtered, journal_copy, bad_since, nothing, missing = await asyncio.to_thread(run)
    assert inbox[0] == 0, inbox[2]
    # Applied again (the lost message comes back; the others stay one row each).
    assert json.loads(inbox[1]) == {"applied": 3, "duplicate": 0, "ignored": 0, "failed": 0}
    assert json.loads(filtered[1]) == {"applied": 0, "duplicate": 0, "ignored": 0, "failed": 0}
    assert journal_copy[0] == 0, journal_copy[2]
    assert json.loads(journal_copy[1]) == {"applied": 2, "duplicate": 1, "ignored": 0, "failed": 0}
    assert await stored_messages() == [(k, 1) for k in ("I0", "I1", "I2", "J0", "J1")]
    for code, _, err in (bad_since, nothing, missing):
        assert code == 2 and "Traceback" not in err and err.startswith("zapsync: ")
    assert "--since" in bad_since[2] and "--spool" in nothing[2] and "no spool journal" in missing[2]


# -- PostgreSQL stopped in the middle of a burst (acceptance) ------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """`zapsync api` in a child process (as in production: its own process, its own pool and spool), logging to
    ``log`` (a pipe nobody reads would fill up and stall it)."""
    command = [sys.executable, "-m", "zapsync.cli", "api", "--port", str(port)]
    with log.open("w") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
async def test_postgres_stopped_during_a_burst_loses_nothing(tmp_path: Path, org: uuid.UUID) -> None:
    from tests.pg_control import start_postgres, stop_postgres

    total, concurrency = 5000, 50
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ZAPSYNC_SPOOL_DIR": str(tmp_path / "spool")}
    log = tmp_path / "api.log"
    api = start_api(port, env, log)
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    dropped: list[int] = []  # issue 13 §7 (bursts are answered) is fixed elsewhere: counted here, then retried
    spooled = 0
    down_depth: dict[str, int] = {}
    socket_dir: str | None = None
    try:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                assert api.poll() is None, log.read_text()[-3000:]
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "the API did not start"
                await asyncio.sleep(0.1)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(total):
                queue.put_nowait(i)
            done = 0
            stop_at, start_at = 1000, 3000
            stopped, started = asyncio.Event(), asyncio.Event()

            async def sender() -> None:
                nonlocal done, spooled
                while not queue.empty():
                    i = queue.get_nowait()
                    jid = f"55119{i % 97:08d}@s.whatsapp.net"
                    body = orjson.dumps(upsert(f"B{i:05d}", instance=f"acme-0{1 + i % 2}", jid=jid))
                    for attempt in range(5):  # as a gateway does: a connection closed without an answer is retried
                        try:
                            answer = await client.post(f"/webhooks/evolution/{org}", content=body, headers=SECRET)
                            break
                        except httpx.TransportError:
                            dropped.append(i)
                            if attempt == 4:
                                raise
                    statuses.append(answer.status_code)
                    spooled += answer.status_code == 202
                    done += 1
                    if done == stop_at:
                        stopped.set()
                    if done == start_at:
                        started.set()

            async def fault() -> None:
                nonlocal socket_dir, down_depth
                await stopped.wait()
                socket_dir = await asyncio.to_thread(stop_postgres)
                await started.wait()
                async with httpx.AsyncClient(base_url=base, timeout=60) as probe:  # not a connection of the senders'
                    ready = await probe.get("/readyz")
                assert ready.status_code == 503
                down_depth = ready.json()["spool"]
                await asyncio.to_thread(start_postgres, socket_dir)
                socket_dir = None

            await asyncio.gather(fault(), *(sender() for _ in range(concurrency)))
            logging.getLogger(__name__).warning("connections closed without an answer (retried): %d", len(dropped))
            assert len(statuses) == total
            assert set(statuses) == {200, 202}, sorted(set(statuses))
            assert spooled >= start_at - stop_at - concurrency
            assert down_depth["records"] > 0 and down_depth["bytes"] > 0
            deadline = asyncio.get_running_loop().time() + 300
            while True:
                ready = await client.get("/readyz")
                if ready.status_code == 200 and "spool" not in ready.json():
                    break
                assert asyncio.get_running_loop().time() < deadline, f"not drained: {ready.json()}"
                await asyncio.sleep(0.2)
            assert "zapsync_webhook_spool_depth 0.0" in (await client.get("/metrics", headers=ADMIN)).text
    finally:
        if socket_dir is not None:
            start_postgres(socket_dir)
        api.terminate()
        api.wait(timeout=30)
    async with session_scope() as session:
        found = (await session.execute(text("SELECT count(*), count(DISTINCT external_id) FROM messages"))).one()
        events = (await session.execute(text("SELECT count(*) FROM webhook_events"))).scalar_one()
    assert tuple(found) == (total, total)
    assert events == total
