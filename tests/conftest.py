"""Shared fixtures: a real embedded PostgreSQL, the gateway simulator over loopback, a real Prefect server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

# Settings are read from the environment: point everything at throwaway places before zapsync is imported.
_HOME = tempfile.mkdtemp(prefix="zapsync-test-")
os.environ["ZAPSYNC_HOME"] = _HOME
for _var in (
    "DATABASE_URL",
    "EVOLUTION_API_URL",
    "EVOLUTION_API_KEY",
    "MEGA_API_HOST",
    "MEGA_API_TOKEN",
    "ZAPSYNC_GATEWAYS",
    "CRON_SECRET",
    "ZAPSYNC_ADMIN_TOKEN",
):
    os.environ.pop(_var, None)
os.environ.update(
    {
        "ZAPSYNC_GATEWAY_TIMEOUT": "0.5",
        "ZAPSYNC_GATEWAY_RETRY_INITIAL": "0.01",
        "ZAPSYNC_GATEWAY_RETRY_MAX": "0.05",
        "ZAPSYNC_GATEWAY_BREAKER_RECOVERY": "0.3",
        "CRON_SECRET": "test-cron-secret",
        "ZAPSYNC_ADMIN_TOKEN": "test-admin-token",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "ZAPSYNC_SCHEDULES_ENABLED": "false",  # served maintenance/health schedules would act on other tests' rows
    }
)

import httpx  # noqa: E402
import pytest  # noqa: E402
from sqlalchemy import text  # noqa: E402

from core.settings import get_settings  # noqa: E402
from db.engine import database_url, dispose_engine, session_scope  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from gateways.simulator import SimulatorState  # noqa: E402
from gateways.simulator.server import SimulatorServer  # noqa: E402

SIM_EVOLUTION_KEY = "sim-evolution-key"
SIM_MEGAAPI_TOKEN = "sim-megaapi-token"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a ``pure`` test that asks for the database (directly or through a fixture such as ``client``)."""
    for item in items:
        if item.get_closest_marker("pure") and "database" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked pure but requests the database")


@pytest.fixture(scope="session")
def database(_dispose_engine: None) -> str:
    """The embedded PostgreSQL, migrated to head once for the session (started by the first test that needs it)."""
    url = database_url()
    upgrade()
    return url.render_as_string(hide_password=True)


@pytest.fixture(scope="session")
def simulator_state() -> SimulatorState:
    """The simulator's in-memory world, shared by the session's server."""
    return SimulatorState()


@pytest.fixture(scope="session")
def simulator_server(simulator_state: SimulatorState) -> Iterator[SimulatorServer]:
    """The gateway simulator serving Evolution and MegaAPI routes on a loopback port."""
    with SimulatorServer(simulator_state) as server:
        os.environ.update(
            {
                "EVOLUTION_API_URL": server.url,
                "EVOLUTION_API_KEY": SIM_EVOLUTION_KEY,
                "MEGA_API_HOST": server.url,
                "MEGA_API_TOKEN": SIM_MEGAAPI_TOKEN,
            }
        )
        get_settings.cache_clear()
        yield server


@pytest.fixture
def simulator(simulator_server: SimulatorServer, simulator_state: SimulatorState) -> Iterator[SimulatorState]:
    """A fresh simulator world for one test (instances, knobs and counters reset)."""
    simulator_state.reset()
    yield simulator_state
    simulator_state.reset()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real, temporary Prefect server for the session (flows and deployments run against it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


TABLES = (
    "live_events",
    "messages",
    "conversations",
    "contacts",
    "import_runs",
    "instance_status_changes",
    "whatsapp_sessions",
    "webhook_events",
    "flow_reports",
    "api_tokens",
    "whatsapp_instances",
    "clients",
    "organizations",
    "gateway_health",
    "work_items",
)


@pytest.fixture(autouse=True)
def clean_database(request: pytest.FixtureRequest) -> None:
    """Every test starts from empty tables (flows commit for real, so there is no rollback to lean on).

    Opt-out, not opt-in: only a test marked ``pure`` skips it (and then never starts PostgreSQL), so a test that
    touches the database cannot forget its cleanup.
    """
    if request.node.get_closest_marker("pure") is None:
        request.getfixturevalue("empty_tables")


@pytest.fixture
async def empty_tables(database: str) -> None:
    """Truncate every table zapsync writes."""
    async with session_scope() as session:
        await session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
async def _dispose_engine() -> AsyncIterator[None]:
    """Close the session loop's connection pool once the database is no longer needed."""
    yield
    await dispose_engine()


@pytest.fixture
def served_deployments(prefect_server: None, simulator_server: SimulatorServer, database: str) -> Iterator[None]:
    """`zapsync serve` in a child process against the test Prefect server, for one test.

    Not for the session: a runner outliving the tests that need it would also run the drain deployments that other
    tests' enqueues start (`flows.runs.wake_drain`), with its own environment, and take their queue items.
    """
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.definitions import build_deployments

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    started = datetime.now(UTC)
    child = subprocess.Popen([sys.executable, "-m", "deployments.serve"], env=env)
    expected = {f"{d.flow_name}/{d.name}" for d in build_deployments()}
    deadline = time.monotonic() + 60

    async def polled_since_start() -> set[str]:
        async with get_client() as client:
            found = await client.read_deployments()
            flows = {f.id: f.name for f in await client.read_flows()}
        return {f"{flows.get(d.flow_id)}/{d.name}" for d in found if d.last_polled and d.last_polled >= started}

    import asyncio

    while not expected <= asyncio.run(polled_since_start()):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait()
            raise RuntimeError("the deployments were not served in time")
        time.sleep(0.2)
    yield
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()  # reap it (an unreaped child is a ResourceWarning, and an error here)


class WorkerProcess:
    """A `zapsync worker` child process (the warm queue drainer) with its own environment."""

    def __init__(self, env: dict[str, str]) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-m", "deployments.worker"], env=env)

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up."""
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=20)

    def stop(self) -> None:
        """SIGINT, then SIGKILL if it does not stop in time."""
        import signal
        import subprocess

        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_worker(simulator_server: SimulatorServer, database: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `zapsync worker` children (pointed at the session's Prefect server unless told otherwise)."""
    from prefect.settings import PREFECT_API_URL

    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        merged = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), **env}
        worker = WorkerProcess(merged)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def queue_worker(prefect_server: None, start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    """One warm queue worker for the test."""
    return start_worker()


@pytest.fixture
async def client(database: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process over ASGI (one app per test, so per-process state such as the repeat filter is fresh)."""
    from api.main import create_app

    app = create_app(check_database=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as http:
        yield http
