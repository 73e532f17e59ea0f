"""The fault suite (issue 13 §6–7): the database, the gateway, the Prefect server or the process running a flow fail in
the middle of the work, webhooks arrive ten times in any order, a burst arrives at once. Each test ends with the rows a
run without the fault leaves: nothing lost, nothing applied twice, no instance falsely marked disconnected.

Real PostgreSQL (stopped and started in place by ``tests.pg_control``), the simulator over loopback HTTP (its fault
knobs, or its server stopped), real Prefect flow runs, and the API served by uvicorn where the transport matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from core.reports import ImportReport
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.import_runs import import_request, request_imports
from flows.import_conversations import import_conversations, import_queued_now
from flows.sync_status import sync_status
from gateways.simulator import SimulatorState
from gateways.simulator.server import SimulatorServer
from tests.factories import count, history, instance_row, make_instance, make_organization
from tests.pg_control import start_postgres, stop_postgres
from tests.test_import import SHAPE, _shape, imported, small_pages, snapshot, world
from tests.test_import_triggers import eventually
from tests.test_sync_status import _world
from tests.test_work_pool import free_port

ROOT = Path(__file__).resolve().parents[1]
ZAPSYNC = [sys.executable, "-m", "zapsync.cli"]
__all__ = ["small_pages"]  # a fixture, used by name


# -- an import interrupted: the database restarted, the process killed -------------------------------------------

FAULT_PAGES = 3
"""The simulator has begun serving this many `findMessages` pages when the fault strikes (of more than 5)."""


@pytest.fixture
def quick_queue(small_pages: int) -> Iterator[None]:
    """Short leases and retries, so a killed or failed import is taken over in seconds (children inherit them)."""
    with _environment(ZAPSYNC_QUEUE_LEASE="2", ZAPSYNC_QUEUE_RETRY_INITIAL="0.2", ZAPSYNC_QUEUE_RETRY_MAX="0.5"):
        yield


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables (settings re-read) and put the previous values back afterwards."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


async def _clean_and_faulted(simulator: SimulatorState, name: str) -> tuple[dict[str, Any], uuid.UUID, int]:
    """A clean import's rows (by content) and a second instance with the same history, not imported yet."""
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    _, clean_id, _ = await world(simulator, newest_at=newest, name="clean")
    report = await imported(clean_id)
    assert report.outcome == "completed"
    org = await make_organization("Faulted")
    simulator.add_instance(name, "evolution", "open")
    history_ = simulator.set_history(name, **{**SHAPE, "newest_at": newest})
    assert -(-history_.total_messages // 10) > FAULT_PAGES + 2
    return (
        _shape(await snapshot(clean_id)),
        await make_instance(org, name, status="connected"),
        report.counts.messages_inserted,
    )


async def _pages_served(simulator: SimulatorState, name: str) -> int:
    return simulator.calls[f"evolution.findMessages:{name}"]


async def _queue_settled() -> bool:
    """No import leased by a live claimer and none waiting out a retry backoff: a new drain takes it at once."""
    return (
        await _scalar(
            "SELECT count(*) FROM work_items WHERE (state = 'running' AND lease_until > now()) "
            "OR (state = 'pending' AND next_attempt_at > now())"
        )
        == 0
    )


async def _import_again(instance_id: uuid.UUID) -> ImportReport:
    """A later run of the import, drained here (bounded: nothing else would drain it)."""
    await eventually(_queue_settled, timeout=30, what="the interrupted run's lease or backoff to end")
    item = await import_queued_now(instance_id, trigger="manual", timeout_seconds=120)
    assert item.finished and item.result is not None, item
    return ImportReport.model_validate(item.result)


async def _assert_like_a_clean_import(instance_id: uuid.UUID, clean: dict[str, Any], messages: int) -> None:
    """Same contacts, conversations and messages as the clean import (ids aside), each external message once."""
    assert _shape(await snapshot(instance_id)) == clean
    assert await _scalar("SELECT count(*) FROM messages WHERE instance_id = :i", i=instance_id) == messages
    assert (
        await _scalar(
            "SELECT count(*) - count(DISTINCT external_id) FROM messages WHERE instance_id = :i", i=instance_id
        )
        == 0
    )
    assert (
        await _scalar("SELECT count(*) FROM import_runs WHERE instance_id = :i AND state = 'completed'", i=instance_id)
        >= 1
    )


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server", "quick_queue")
async def test_postgres_restarted_in_the_middle_of_an_import(simulator: SimulatorState) -> None:
    clean, instance_id, messages = await _clean_and_faulted(simulator, "pg-fault")
    simulator.configure(latency_ms=150)  # pages slow enough to restart the database while one is in flight
    async with session_scope() as session:  # queued as any import is, drained by one flow run
        await request_imports(session, [import_request(instance_id, None, trigger="manual")])
    run = asyncio.create_task(import_conversations())

    async def at_the_fault_page() -> bool:
        return await _pages_served(simulator, "pg-fault") >= FAULT_PAGES

    await eventually(at_the_fault_page, timeout=60, what="the import to reach its fault page")
    folder = await asyncio.to_thread(stop_postgres)  # every connection cut at once
    await asyncio.to_thread(start_postgres, folder)
    simulator.configure(latency_ms=0)
    with contextlib.suppress(Exception):  # the faulted run retries (the queue's backoff) or fails: the rows decide
        await run
    if await _scalar("SELECT count(*) FROM work_items WHERE state = 'done' AND instance_id = :i", i=instance_id) == 0:
        again = await _import_again(instance_id)  # a later run resumes
        assert again.outcome == "completed", again

    await _assert_like_a_clean_import(instance_id, clean, messages)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server", "quick_queue")
async def test_the_process_running_an_import_killed_mid_page(simulator: SimulatorState, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    clean, instance_id, messages = await _clean_and_faulted(simulator, "kill-fault")
    simulator.configure(latency_ms=300)
    log = tmp_path / "import.log"
    child = _spawn(["import", str(instance_id), "--json"], log, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    try:

        async def at_the_fault_page() -> bool:
            assert child.poll() is None, log.read_text()[-2000:]
            return await _pages_served(simulator, "kill-fault") >= FAULT_PAGES

        await eventually(at_the_fault_page, timeout=90, what="the child to import its first pages")
        partial = await _scalar("SELECT count(*) FROM messages WHERE instance_id = :i", i=instance_id)
    finally:
        child.send_signal(signal.SIGKILL)  # a crash mid-page: no clean-up
        child.wait(timeout=20)
    assert child.returncode == -signal.SIGKILL
    assert partial < messages
    simulator.configure(latency_ms=0)

    again = await _import_again(instance_id)  # the import run again

    assert again.outcome == "completed", again
    await _assert_like_a_clean_import(instance_id, clean, messages)


async def _scalar(sql: str, **params: Any) -> int:
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        return int((await session.execute(text(sql), params)).scalar_one())


# -- the gateway fails during a status sync ---------------------------------------------------------------------

GATEWAY_TRUTH = {
    "evo-up": "connected",
    "evo-down": "disconnected",
    "evo-same": "connected",
    "mega-up": "connected",
    "mega-down": "disconnected",
}
"""What the gateway says of each instance of ``tests.test_sync_status._world`` (the database says otherwise for
every one but ``evo-same``)."""


class OwnGateway:
    """The simulator served on a port of its own, so the test can close the port and open it again."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state
        self.port = free_port()
        self.server: SimulatorServer | None = SimulatorServer(state, port=self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Stop the server: connections to the port are refused."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def up(self) -> None:
        """Serve again on the same port."""
        if self.server is None:
            self.server = SimulatorServer(self.state, port=self.port).start()


@pytest.fixture
def own_gateway(simulator: SimulatorState) -> Iterator[OwnGateway]:
    """Evolution and MegaAPI pointed at :class:`OwnGateway` for one test."""
    gateway = OwnGateway(simulator)
    try:
        with _environment(EVOLUTION_API_URL=gateway.url, MEGA_API_HOST=gateway.url):
            yield gateway
    finally:
        gateway.down()


def _break(gateway: OwnGateway, fault: str) -> None:
    if fault == "down":
        gateway.down()
    elif fault == "slow":  # past the client's timeout (ZAPSYNC_GATEWAY_TIMEOUT=0.5 in the suite), on every retry
        gateway.state.configure(latency_ms=2000)
    elif fault == "5xx":
        gateway.state.configure(error_rate=1.0)
    elif fault == "hang":  # accepts the connection and never answers (within the client's patience)
        gateway.state.configure(hang=True, hang_s=30)
    elif fault == "flapping":
        gateway.state.configure(outage_cycle="10")
    else:
        raise ValueError(fault)


def _repair(gateway: OwnGateway) -> None:
    gateway.up()
    gateway.state.configure(latency_ms=0, error_rate=0, hang=False, outage_cycle="")


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("fault", ["down", "slow", "5xx", "hang", "flapping"])
async def test_a_gateway_failing_during_a_sync_never_flips_an_instance(own_gateway: OwnGateway, fault: str) -> None:
    _, ids = await _world(own_gateway.state)
    before = {name: (await instance_row(i))["status"] for name, i in ids.items()}
    _break(own_gateway, fault)

    report = await sync_status(mode="apply")

    unreachable = {u.instance_name for u in report.unreachable_instances}
    assert all(u.error for u in report.unreachable_instances)
    if fault != "flapping":
        assert unreachable == set(ids) and report.unreachable == 5 and report.applied == 0
    after = {name: (await instance_row(i))["status"] for name, i in ids.items()}
    for name in ids:
        # An instance the gateway could not be asked about keeps its status; one it answered for takes the truth.
        assert after[name] == (before[name] if name in unreachable else GATEWAY_TRUTH[name]), (name, report)
        if after[name] == "disconnected" and before[name] != "disconnected":
            assert name not in unreachable and GATEWAY_TRUTH[name] == "disconnected", f"{name} falsely disconnected"

    _repair(own_gateway)
    again = await sync_status(mode="apply")

    assert again.unreachable == 0 and again.checked == 5
    assert {name: (await instance_row(i))["status"] for name, i in ids.items()} == GATEWAY_TRUTH
    for name, instance_id in ids.items():  # one history row per real transition, whichever sync applied it
        moved = [(before[name], GATEWAY_TRUTH[name], "sync")] if before[name] != GATEWAY_TRUTH[name] else []
        assert await history(instance_id) == moved, name
    settled = await sync_status(mode="apply")
    assert settled.drifted == 0 and settled.in_sync == 5


# -- bursts are answered (issue 13 §7) ---------------------------------------------------------------------------

BURST, BURST_CONCURRENCY = 5000, 50


def _burst_body(i: int) -> bytes:
    """A `messages.upsert` from one of 500 customers (gateways.md §2.3), its key id unique in the burst."""
    return orjson.dumps(
        {
            "event": "messages.upsert",
            "instance": "burst-01",
            "data": {
                "key": {"remoteJid": f"551198{i % 500:07d}@s.whatsapp.net", "fromMe": False, "id": f"BURST{i:06d}"},
                "pushName": "Ana",
                "status": "DELIVERY_ACK",
                "message": {"conversation": f"message {i}"},
                "messageType": "conversation",
                "messageTimestamp": 1_760_000_000 + i,
                "instanceId": "burst",
                "source": "android",
            },
            "destination": "http://zapsync/webhooks",
            "date_time": "2026-01-01T00:00:00.000Z",
            "sender": "5511999990000@s.whatsapp.net",
            "server_url": "http://evolution",
            "apikey": None,
        }
    )


def _spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A `zapsync` command in a child process (``api``: uvicorn as `zapsync up` serves it), its output in ``log``."""
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*ZAPSYNC, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.usefixtures("database")
async def test_a_burst_of_5000_message_webhooks_gets_5000_responses(tmp_path: Path) -> None:
    org = await make_organization()
    await make_instance(org, "burst-01", status="connected")
    port = free_port()
    api = _spawn(["api", "--port", str(port)], tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:

        async def serving() -> bool:
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-2000:]
            try:
                async with httpx.AsyncClient(timeout=2) as probe:
                    return (await probe.get(f"{base}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(serving, timeout=60, what="the API to serve")
        statuses: Counter[int] = Counter()
        failures: Counter[str] = Counter()
        pending = iter(range(BURST))
        # A gateway's client keeps idle connections longer than 5 s (Go: 90 s) and never retries for us here:
        # a connection closed without a response is counted, not hidden.
        limits = httpx.Limits(
            max_connections=BURST_CONCURRENCY, max_keepalive_connections=BURST_CONCURRENCY, keepalive_expiry=60
        )
        transport = httpx.AsyncHTTPTransport(retries=0, limits=limits)
        headers = {"content-type": "application/json", "x-webhook-secret": "org-secret"}
        async with httpx.AsyncClient(base_url=base, transport=transport, timeout=120) as gateway:

            async def deliver() -> None:
                for i in pending:
                    try:
                        response = await gateway.post(
                            f"/webhooks/evolution/{org}", content=_burst_body(i), headers=headers
                        )
                    except httpx.TransportError as exc:
                        failures[f"{type(exc).__name__}: {exc}"] += 1
                    else:
                        statuses[response.status_code] += 1

            await asyncio.gather(*(deliver() for _ in range(BURST_CONCURRENCY)))
    finally:
        _stop(api)

    assert failures == Counter(), f"connections closed without a response: {dict(failures)}"
    assert statuses == Counter({200: BURST})
    assert await count("messages") == BURST
    assert await _scalar("SELECT count(DISTINCT external_id) FROM messages") == BURST
    assert "Traceback" not in (tmp_path / "api.log").read_text()


@pytest.mark.pure
def test_the_api_keeps_idle_connections_longer_than_gateway_clients_do() -> None:
    from zapsync import cli

    options = cli.api_server_options()
    # uvicorn's default (5 s) equals httpx's and Node's idle expiry: the server closed connections clients reused.
    assert options["timeout_keep_alive"] > 90  # Go's http.Transport keeps idle connections 90 s
    assert options["backlog"] >= BURST_CONCURRENCY


# -- every webhook delivered ten times, in random order ----------------------------------------------------------

REPEATS, DELIVERY_CONCURRENCY, SEED = 10, 20, 13
SCRIPTED = (("evo-a", "evolution"), ("evo-b", "evolution"), ("mega-c", "megaapi"))
CUSTOMERS = ("5511987650001", "5511987650002", "5521987650003")


class SteppingClock:
    """The gateway's clock: one second later at every reading, so each observation has its own time."""

    def __init__(self, start: datetime) -> None:
        self.at = start

    def __call__(self) -> datetime:
        self.at += timedelta(seconds=1)
        return self.at


async def _scripted_webhooks() -> list[tuple[str, bytes]]:
    """(provider, body) of every webhook a scripted hour of three numbers sends, in the order the gateway sent them:
    connects, drops and reconnects (Evolution; MegaAPI's 2026 shape carries no time to order them by), customers'
    messages, messages typed on the phone, API sends' echoes with their receipts, a late receipt, contact names."""
    from gateways.simulator import WebhookEmitter
    from gateways.simulator.sends import delivery, evolution_bodies, megaapi_bodies, message_object, to_jid

    # Minutes ago, not more: zapsync trusts an event's own time within ZAPSYNC_WEBHOOK_EVENT_TIME_TOLERANCE (15 min).
    state = SimulatorState(clock=SteppingClock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)))
    captured: list[tuple[str, bytes]] = []

    def capture(request: httpx.Request) -> httpx.Response:
        captured.append((request.url.path.strip("/"), request.content))
        return httpx.Response(200, json={"ok": True})

    def echo_with_receipts(name: str, number: str, text: str) -> None:
        inst = state.require(name)
        message = message_object(
            inst,
            jid=to_jid(number),
            external_id=state.sends.external_id(),
            kind="text",
            text=text,
            media={},
            at=state._clock(),
        )
        bodies = (evolution_bodies if inst.provider == "evolution" else megaapi_bodies)(inst, message, receipts=True)
        state.publish_send(delivery(inst, bodies, at=state._clock()))

    transport = httpx.MockTransport(capture)
    async with WebhookEmitter(
        state,
        evolution_url="http://capture/evolution",
        megaapi_url="http://capture/megaapi",
        transport=transport,
        max_concurrency=1,
    ) as emitter:
        for name, provider in SCRIPTED:
            state.add_instance(name, provider, "open" if provider == "megaapi" else "close")
            if provider == "evolution":
                state.set_state(name, "connecting")
                state.set_state(name, "open")
            await emitter.flush()
        for round_ in range(2):
            for name, _ in SCRIPTED:
                for number in CUSTOMERS:
                    state.receive_message(name, number, f"oi {round_}", push_name=f"Cliente {number[-1]}")
                    await emitter.flush()
                typed = state.receive_message(name, CUSTOMERS[0], f"resposta {round_}", from_me=True)
                await emitter.flush()
                state.send_receipts(name, CUSTOMERS[0], typed["key"]["id"], "delivered", "read")
                echo_with_receipts(name, CUSTOMERS[1], f"envio {round_}")
                await emitter.flush()
                state.send_receipts(name, CUSTOMERS[0], typed["key"]["id"], "delivered")  # late, behind "read"
                await emitter.flush()
            for name, provider in SCRIPTED:
                if provider == "evolution" and round_ == 0:
                    state.set_state(name, "close", reason_code=401)  # logged out at the phone
                    await emitter.flush()
                    state.set_state(name, "connecting")
                    state.set_state(name, "open")
                    await emitter.flush()
        for name, provider in SCRIPTED:
            if provider == "evolution":
                contact = {"remoteJid": to_jid(CUSTOMERS[2]), "pushName": "Dona Zica", "profilePicUrl": None}
                await emitter.emit_raw("evolution", {**_envelope(name, "contacts.upsert", [contact], state._clock())})
        await emitter.flush()
        assert emitter.stats["failed"] == 0
    return captured


def _envelope(instance: str, event: str, data: Any, at: datetime) -> dict[str, Any]:
    return {
        "event": event,
        "instance": instance,
        "data": data,
        "destination": "http://capture/evolution",
        "date_time": at.isoformat().replace("+00:00", "Z"),
        "sender": "",
        "server_url": "http://evolution",
        "apikey": None,
    }


async def _scripted_world() -> tuple[uuid.UUID, dict[str, uuid.UUID]]:
    org = await make_organization()
    return org, {name: await make_instance(org, name, gateway=gw, status="disconnected") for name, gw in SCRIPTED}


async def _deliver(base: str, org: uuid.UUID, webhooks: list[tuple[str, bytes]], concurrency: int) -> Counter[int]:
    """POST each webhook over loopback HTTP, ``concurrency`` at a time; the status codes."""
    statuses: Counter[int] = Counter()
    queue = iter(webhooks)
    headers = {"content-type": "application/json", "x-webhook-secret": "org-secret"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:

        async def worker() -> None:
            for provider, body in queue:
                statuses[
                    (await http.post(f"/webhooks/{provider}/{org}", content=body, headers=headers)).status_code
                ] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def _rows_of(ids: dict[str, uuid.UUID]) -> dict[str, Any]:
    """Every row the webhooks wrote, per instance name, by content (no row ids, no bookkeeping times)."""
    from tests.test_import import rows

    found: dict[str, Any] = {}
    for name, instance_id in ids.items():
        instance = await instance_row(instance_id)
        found[name] = {
            "instance": (instance["status"], instance["is_connected"], instance["phone_number"]),
            "contacts": sorted(
                tuple(r.values())
                for r in await rows(
                    "SELECT jid, alt_jid, phone, name FROM contacts WHERE instance_id = :i", i=instance_id
                )
            ),
            "conversations": sorted(
                tuple(r.values())
                for r in await rows(
                    "SELECT c.jid, v.status, v.opened_at, v.last_message_at, v.waiting_since, v.closed_at IS NULL "
                    "FROM conversations v JOIN contacts c ON c.id = v.contact_id WHERE v.instance_id = :i",
                    i=instance_id,
                )
            ),
            "messages": sorted(
                tuple(r.values())
                for r in await rows(
                    "SELECT m.external_id, c.jid, m.from_me, m.sender, m.type, m.content, m.sent_at, m.status "
                    "FROM messages m JOIN conversations v ON v.id = m.conversation_id "
                    "JOIN contacts c ON c.id = v.contact_id WHERE m.instance_id = :i",
                    i=instance_id,
                )
            ),
            "sessions": await _scalar("SELECT count(*) FROM whatsapp_sessions WHERE instance_id = :i", i=instance_id),
        }
    return found


_TENFOLD: dict[str, Any] = {}
"""The rows of one ordered and one tenfold shuffled delivery, kept for the tests that compare them."""


async def _tenfold_delivery() -> dict[str, Any]:
    """Deliver the scripted webhooks once in order, then (from empty tables) each ten times shuffled, 20 at a time,
    over loopback HTTP to the API; the rows and history of both (computed once for this module's tests)."""
    import random

    from sqlalchemy import text

    from api.main import create_app
    from db.engine import dispose_engine, session_scope
    from tests.conftest import TABLES

    if _TENFOLD:
        return _TENFOLD
    webhooks = await _scripted_webhooks()
    assert len(webhooks) > 60 and {p for p, _ in webhooks} == {"evolution", "megaapi"}
    async with SimulatorServer(create_app(check_database=False), on_stop=dispose_engine) as api:
        org, ids = await _scripted_world()
        assert await _deliver(api.url, org, webhooks, concurrency=1) == Counter({200: len(webhooks)})
        ordered = await _rows_of(ids)
        ordered_history = {name: await history(i) for name, i in ids.items()}

        async with session_scope() as session:
            await session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        org, ids = await _scripted_world()
        tenfold = webhooks * REPEATS
        random.Random(SEED).shuffle(tenfold)
        statuses = await _deliver(api.url, org, tenfold, concurrency=DELIVERY_CONCURRENCY)
        shuffled = await _rows_of(ids)
        shuffled_history = {name: await history(i) for name, i in ids.items()}
    _TENFOLD.update(
        deliveries=len(tenfold),
        statuses=statuses,
        ordered=ordered,
        shuffled=shuffled,
        ordered_history=ordered_history,
        shuffled_history=shuffled_history,
    )
    return _TENFOLD


def _identity(rows_: dict[str, Any]) -> dict[str, Any]:
    """The rows without the session count: a stale connection state arriving after a newer one is not applied, so
    a shuffled delivery may record fewer sessions (bounded by the test below)."""
    return {name: {table: found[table] for table in found if table != "sessions"} for name, found in rows_.items()}


@pytest.mark.slow
@pytest.mark.usefixtures("database")
async def test_every_webhook_delivered_ten_times_in_random_order() -> None:
    run = await _tenfold_delivery()
    ordered, shuffled = run["ordered"], run["shuffled"]

    assert run["statuses"] == Counter({200: run["deliveries"]})  # every copy answered (a duplicate is acknowledged)
    assert not (diff := _differences(_identity(shuffled), _identity(ordered))), _describe(diff)
    # Each message once; each instance at its newest observation.
    assert sum(len(v["messages"]) for v in shuffled.values()) == len(SCRIPTED) * 2 * (len(CUSTOMERS) + 2)
    for name in ordered:
        real, seen = run["ordered_history"][name], run["shuffled_history"][name]
        # A stale observation arriving after a newer one is not applied: at most the real transitions, each once,
        # in the order they happened (and so at most as many sessions).
        assert len(seen) <= len(real), (name, seen, real)
        assert _is_subsequence([to for _, to, _ in seen], [to for _, to, _ in real]), (name, seen, real)
        assert all(a != b for (_, a, _), (_, b, _) in zip(seen, seen[1:], strict=False)), seen
        assert min(1, ordered[name]["sessions"]) <= shuffled[name]["sessions"] <= ordered[name]["sessions"]


@pytest.mark.slow
@pytest.mark.usefixtures("database")
async def test_ten_times_in_random_order_leaves_the_rows_of_one_ordered_delivery() -> None:
    run = await _tenfold_delivery()
    # Receipts before their message, an older message after a newer one, an older name after a newer one: the
    # rows are those of the ordered delivery all the same.
    assert not (diff := _differences(_identity(run["shuffled"]), _identity(run["ordered"]))), _describe(diff)


def _describe(diff: dict[tuple[str, str], Any]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in diff.items())


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    remaining = iter(whole)
    return all(item in remaining for item in part)


def _differences(got: dict[str, Any], want: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(instance, table) → (rows only in ``got``, rows only in ``want``), for a readable failure."""
    found: dict[tuple[str, str], Any] = {}
    for name in want:
        for table, rows_ in want[name].items():
            mine = got.get(name, {}).get(table)
            if mine != rows_:
                if isinstance(rows_, list) and isinstance(mine, list):
                    found[(name, table)] = ([r for r in mine if r not in rows_], [r for r in rows_ if r not in mine])
                else:
                    found[(name, table)] = (mine, rows_)
    return found


# -- the Prefect server down while webhooks arrive ----------------------------------------------------------------

PREFECT_DOWN = ("prefect-down-1", "prefect-down-2")
HISTORY_CHATS, HISTORY_PER_CHAT, LIVE_MESSAGES = 2, 3, 3


def _message_webhook(instance: str, key_id: str, at: datetime) -> dict[str, Any]:
    """A customer's `messages.upsert` arriving live (gateways.md §2.3)."""
    return _envelope(
        instance,
        "messages.upsert",
        {
            "key": {"remoteJid": "5511987659999@s.whatsapp.net", "fromMe": False, "id": key_id},
            "pushName": "Ana",
            "status": "DELIVERY_ACK",
            "message": {"conversation": f"live {key_id}"},
            "messageType": "conversation",
            "messageTimestamp": int(at.timestamp()),
            "instanceId": instance,
            "source": "android",
        },
        at,
    )


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
async def test_webhooks_during_a_prefect_outage_are_applied_and_imported_once_it_is_back(
    simulator: SimulatorState, start_worker: Any
) -> None:
    """Unlike tests/test_prefect_outage.py (connects only, a new Prefect server started), messages and connects are
    each delivered twice while the Prefect API is unreachable, and the same server comes back at the same address."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from api.main import create_app
    from db.engine import session_scope
    from db.repositories.work_queue import listening_workers
    from tests.tcp_forwarder import TcpForwarder
    from tests.test_import_triggers import imported as completed_imports
    from tests.test_import_triggers import opened, queue_items

    real = httpx.URL(str(PREFECT_API_URL.value()))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"  # nothing listens here until the forwarder starts
    org = await make_organization()
    ids: dict[str, uuid.UUID] = {}
    for name in PREFECT_DOWN:
        simulator.add_instance(name, "evolution", "open")
        simulator.set_history(
            name,
            chats=HISTORY_CHATS,
            messages_per_chat=HISTORY_PER_CHAT,
            newest_at=datetime.now(UTC) - timedelta(hours=2),
        )
        ids[name] = await make_instance(org, name, status="disconnected")
    now = datetime.now(UTC).replace(microsecond=0)
    webhooks = [opened(name, now - timedelta(seconds=30)) for name in PREFECT_DOWN] + [
        _message_webhook(name, f"LIVE-{name}-{k}", now - timedelta(seconds=20 - k))
        for name in PREFECT_DOWN
        for k in range(LIVE_MESSAGES)
    ]
    forwarder = TcpForwarder(port, real.host or "127.0.0.1", real.port or 80)
    worker = start_worker(PREFECT_API_URL=api_url)
    app = create_app(check_database=False)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):  # the API process sees the outage too

            async def worker_listening() -> bool:
                assert worker.process.poll() is None, "the worker exited while Prefect was down"
                async with session_scope() as session:
                    return await listening_workers(session) > 0

            await eventually(worker_listening, timeout=60, what="the worker to LISTEN")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
                answers = [
                    (
                        await client.post(
                            f"/webhooks/evolution/{org}",
                            content=orjson.dumps(body),
                            headers={"content-type": "application/json", "x-webhook-secret": "org-secret"},
                        )
                    ).status_code
                    for body in webhooks * 2  # a gateway redelivers what it thinks was lost
                ]
                await app.state.waker.settle()

            assert answers == [200] * len(webhooks) * 2
            assert [(await instance_row(i))["status"] for i in ids.values()] == ["connected"] * len(ids)
            assert await count("messages") == len(PREFECT_DOWN) * LIVE_MESSAGES  # applied without Prefect
            items = await queue_items()
            assert sorted(str(i["key"]) for i in items) == sorted(str(i) for i in ids.values())
            assert {i["state"] for i in items} == {"pending"} and await count("import_runs") == 0
            assert worker.process.poll() is None

            forwarder.start()  # Prefect is back, at the address everyone already uses

            async def all_imported() -> bool:
                assert worker.process.poll() is None, "the worker exited"
                return all(i["state"] == "done" for i in await queue_items())

            await eventually(all_imported, timeout=120, what="every queued import to run")
    finally:
        worker.stop()
        forwarder.stop()

    assert [await completed_imports(i) for i in ids.values()] == [1] * len(ids)
    assert len(await queue_items()) == len(PREFECT_DOWN)  # nothing queued twice
    expected = len(PREFECT_DOWN) * (HISTORY_CHATS * HISTORY_PER_CHAT + LIVE_MESSAGES)
    assert await count("messages") == expected
    assert await _scalar("SELECT count(DISTINCT (instance_id, external_id)) FROM messages") == expected
    assert [await history(i) for i in ids.values()] == [[("disconnected", "connected", "webhook")]] * len(ids)
