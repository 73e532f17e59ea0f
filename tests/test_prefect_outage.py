"""Acceptance (issue 10): with the Prefect server stopped, connect webhooks are still answered 200 and their imports
are enqueued; when it comes back they run, without anyone re-sending anything. Real PostgreSQL, the simulator over
loopback, a warm worker child and a real `prefect server start` child that is only started halfway through."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from api.main import create_app
from db.engine import session_scope
from db.repositories.work_queue import listening_workers
from tests.conftest import WorkerProcess
from tests.factories import count, instance_row, make_instance, make_organization
from tests.test_import_triggers import eventually, import_flow_runs, imported, post_open, queue_items
from tests.test_work_pool import PREFECT, ROOT, free_port, stop

pytestmark = pytest.mark.slow

INSTANCES = ("outage-01", "outage-02", "outage-03")
CHATS, PER_CHAT = 2, 3


async def test_connects_during_a_prefect_outage_are_imported_when_it_comes_back(
    simulator, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"  # nothing listens here yet: Prefect is down
    org = await make_organization()
    ids: dict[str, uuid.UUID] = {}
    for name in INSTANCES:
        simulator.add_instance(name, "evolution", "open")
        simulator.set_history(name, chats=CHATS, messages_per_chat=PER_CHAT, newest_at=datetime.now(UTC))
        ids[name] = await make_instance(org, name, status="disconnected")
    at = datetime.now(UTC) - timedelta(seconds=2)
    app = create_app(check_database=False)
    server: subprocess.Popen[bytes] | None = None

    with temporary_settings(updates={PREFECT_API_URL: api_url}):  # the API process sees the outage too
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
            # Cold path: no worker listens yet, so the webhook's background wake asks Prefect (unreachable) to
            # start a drain. That must not cost the gateway its 200.
            first, *rest = INSTANCES
            assert await post_open(client, org, first, at) == "applied"
            await app.state.waker.settle()

            worker = start_worker(PREFECT_API_URL=api_url)
            try:

                async def worker_listening() -> bool:
                    assert worker.process.poll() is None, "the worker exited while Prefect was down"
                    async with session_scope() as session:
                        return await listening_workers(session) > 0

                await eventually(worker_listening, timeout=60, what="the worker to LISTEN")
                # Warm path: the enqueue's NOTIFY wakes the worker, whose drain cannot start without Prefect.
                assert [await post_open(client, org, name, at) for name in rest] == ["applied"] * len(rest)
                await app.state.waker.settle()

                items = await queue_items()
                assert sorted(str(i["key"]) for i in items) == sorted(str(i) for i in ids.values())
                assert {i["state"] for i in items} == {"pending"} and {i["attempts"] for i in items} == {0}
                assert [(await instance_row(i))["status"] for i in ids.values()] == ["connected"] * len(ids)
                assert await count("messages") == 0 and await count("import_runs") == 0
                assert worker.process.poll() is None

                began = datetime.now(UTC)
                server = _start_prefect_server(port, api_url, tmp_path)

                async def prefect_up() -> bool:
                    assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                    try:
                        async with httpx.AsyncClient(timeout=2) as http:
                            return (await http.get(f"{api_url}/health")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await eventually(prefect_up, timeout=120, what="the Prefect server to answer /health")

                # Nobody posts anything again: the worker's backoff retry starts the drain by itself.
                async def all_imported() -> bool:
                    assert worker.process.poll() is None, "the worker exited"
                    return await count("messages") == len(INSTANCES) * CHATS * PER_CHAT and all(
                        i["state"] == "done" for i in await queue_items()
                    )

                await eventually(all_imported, timeout=180, what="every queued import to run")
                assert [await imported(i) for i in ids.values()] == [1] * len(ids)
                assert len(await queue_items()) == len(INSTANCES)  # nothing was queued twice
                assert await import_flow_runs(began) >= 1  # ran as flow runs tracked by the revived server
            finally:
                worker.stop()
                if server is not None:
                    stop(server)


def _start_prefect_server(port: int, api_url: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """`prefect server start` on ``port`` with a PREFECT_HOME of its own, its output in ``tmp_path/server.log``."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "ZAPSYNC_PROJECT_DIR": str(ROOT),
    }
    with (tmp_path / "server.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
