"""Work-pool mode: a real `prefect server`, `prefect deploy --all` from prefect.yaml, a real process worker, and a
sync triggered through the API that the worker runs to completion."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from api.main import create_app
from tests.factories import instance_row, make_instance, make_organization

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (a Prefect worker ignores SIGTERM), then kill after a timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def work_pool_stack(tmp_path_factory: pytest.TempPathFactory, simulator_server, database) -> Iterator[str]:
    """Prefect server + work pool + deployments from prefect.yaml + one process worker; yields the API URL."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "ZAPSYNC_PROJECT_DIR": str(ROOT),
    }
    logs = tmp_path_factory.mktemp("logs")
    with (logs / "server.log").open("wb") as server_log:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
    worker: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (logs / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prefect server did not start"
            time.sleep(0.3)
        for command in (
            [PREFECT, "work-pool", "create", "zapsync", "--type", "process"],
            [PREFECT, "--no-prompt", "deploy", "--all"],
        ):
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with (logs / "worker.log").open("wb") as worker_log:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "zapsync"],
                env=env,
                cwd=ROOT,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
        yield api_url
    finally:
        if worker is not None:
            stop(worker)
        stop(server)


async def test_api_triggered_sync_completes_on_a_process_worker(work_pool_stack: str, simulator) -> None:
    org = await make_organization()
    simulator.add_instance("pool-01", "evolution", "open")
    instance_id = await make_instance(org, "pool-01", status="disconnected")
    app = create_app(check_database=False)

    with temporary_settings(updates={PREFECT_API_URL: work_pool_stack}):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
            response = await client.post(
                "/instances/sync",
                json={"wait": True, "timeout_seconds": 120},
                headers={"authorization": "Bearer test-admin-token"},
            )

    assert response.status_code == 202, response.text
    assert response.json()["flow_run"]["state"] == "Completed", response.json()
    assert response.json()["report"]["applied"] == 1
    assert (await instance_row(instance_id))["status"] == "connected"
