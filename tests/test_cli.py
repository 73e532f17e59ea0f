"""The `zapsync` command: output, JSON and exit codes of every command, and `zapsync up` end to end (slow).

In-process tests use typer's CliRunner against the session's embedded PostgreSQL (and the simulator and Prefect
fixtures where a command needs them); what must be seen from outside — an unreachable database, uvicorn's access
log, signals, the stack — runs in subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from sqlalchemy import make_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from core.settings import get_settings
from db.migrate import head_revision
from db.repositories.organizations import Principal, principal_for_token
from gateways.simulator import SimulatorServer, SimulatorState
from zapsync import cli, prefect_env
from zapsync.stack import adopt_demo_gateway, run_async

ZAPSYNC = [sys.executable, "-m", "zapsync.cli"]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_local_prefect_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process commands must not pick up a `zapsync up` someone runs on this machine's port 4200."""
    monkeypatch.setattr(cli, "configure_prefect_env", lambda: None)


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    result = runner.invoke(cli.app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def invoke_json(*args: str) -> dict:
    code, out, err = invoke(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a CLI subprocess, with ``overrides``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **overrides}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ZAPSYNC, *args], env=env or child_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, alive: subprocess.Popen[str] | None = None
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s (or at once if ``alive`` exits)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not condition():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process exited with {alive.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def answers(url: str, status: int = 200) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == status
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    """SIGINT, wait, and return (stdout, stderr)."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"did not stop on SIGINT:\n{out}\n{err}") from None


def one_sentence(stderr: str) -> str:
    """The single line a failure prints (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("zapsync: ") and lines[0].endswith("."), lines[0]
    return lines[0]


# -- usage -------------------------------------------------------------------------------------------------------


@pytest.mark.pure
def test_help_lists_every_command() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    for command in ("db", "org", "token", "instance", "status", "sync", "simulator", "api", "serve", "up"):
        assert command in out


@pytest.mark.parametrize(
    "args",
    [
        ("status", "--org", "not-a-uuid"),
        ("instance", "add", "--org", str(uuid.uuid4()), "no-gateway-given"),
        ("sync", "--no-such-option"),
        ("simulator", "--provider", "waha"),
        ("up", "--api-port", "0"),
        ("import", "not-a-uuid"),
        ("cleanup-sessions", "--retention-days", "0"),
        ("close-inactive", "--org", "nope"),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    code, _, err = invoke(*args)
    assert code == 2
    assert "Traceback" not in err and err.strip()


def test_empty_names_are_bad_usage() -> None:
    code, _, err = invoke("org", "create", "  ")
    assert code == 2
    assert one_sentence(err) == "zapsync: the organization name must not be empty."


# -- db ----------------------------------------------------------------------------------------------------------


def test_db_upgrade_and_status() -> None:
    code, out, _ = invoke("db", "upgrade")
    assert code == 0
    assert f"at migration {head_revision()} (latest)" in out

    status = invoke_json("db", "status")
    assert status["current"] == status["head"] == head_revision()
    assert status["up_to_date"] is True
    code, out, _ = invoke("db", "status")
    assert code == 0 and "up to date" in out


# -- organizations, tokens, instances, status --------------------------------------------------------------------


def test_org_create_prints_the_secrets_once_and_they_work() -> None:
    created = invoke_json("org", "create", "Acme")
    org_id = uuid.UUID(created["id"])
    assert created["name"] == "Acme"
    assert created["webhook_secret"].startswith("whsec_")
    assert created["token"].startswith("zs_")
    assert created["webhooks"] == {
        "evolution": f"/webhooks/evolution/{org_id}",
        "megaapi": f"/webhooks/megaapi/{org_id}",
    }
    principal = run_async(lambda: _principal(created["token"]))
    assert principal is not None and principal.organization_id == org_id

    code, out, _ = invoke("org", "create", "Beta Ltd")
    assert code == 0
    assert "Beta Ltd" in out and "whsec_" in out and "zs_" in out and "/webhooks/megaapi/" in out


async def _principal(token: str) -> Principal | None:
    from db.engine import session_scope

    async with session_scope() as session:
        return await principal_for_token(session, token)


def test_org_create_then_status_shows_instances() -> None:
    created = invoke_json("org", "create", "Acme")
    org_id = created["id"]
    other = invoke_json("org", "create", "Other")["id"]
    for name in ("acme-01", "acme-02"):
        added = invoke_json("instance", "add", "--org", org_id, "--gateway", "evolution", name)
        assert added["instance_name"] == name and added["organization_id"] == org_id
    invoke_json("instance", "add", "--org", other, "--gateway", "megaapi", "other-01")

    everything = invoke_json("status")
    assert everything["count"] == 3
    assert everything["by_status"] == {"disconnected": 3}

    mine = invoke_json("status", "--org", org_id)
    assert [i["instance_name"] for i in mine["instances"]] == ["acme-01", "acme-02"]
    first = mine["instances"][0]
    assert first["gateway"] == "evolution" and first["status"] == "disconnected" and first["health"] == "unknown"
    assert {"last_checked_at", "status_observed_at", "id"} <= set(first)

    code, out, _ = invoke("status", "--org", org_id)
    assert code == 0
    assert "acme-01" in out and "acme-02" in out and "other-01" not in out
    assert "2 instances: 2 disconnected." in out
    assert created["webhook_secret"] not in out and created["token"] not in out


def test_status_with_no_instances() -> None:
    code, out, _ = invoke("status")
    assert code == 0 and "No instances registered." in out
    assert invoke_json("status") == {"count": 0, "by_status": {}, "instances": []}


def test_instance_add_refuses_duplicates_and_unknown_organizations() -> None:
    org_id = invoke_json("org", "create", "Acme")["id"]
    invoke_json("instance", "add", "--org", org_id, "--gateway", "evolution", "acme-01")

    code, _, err = invoke("instance", "add", "--org", org_id, "--gateway", "evolution", "acme-01")
    assert code == 1
    assert one_sentence(err) == "zapsync: an instance named 'acme-01' is already registered at gateway 'evolution'."

    missing = uuid.uuid4()
    code, _, err = invoke("instance", "add", "--org", str(missing), "--gateway", "evolution", "x")
    assert code == 1
    assert one_sentence(err) == f"zapsync: no organization {missing}."
    code, _, err = invoke("status", "--org", str(missing))
    assert code == 1 and one_sentence(err) == f"zapsync: no organization {missing}."


def test_instance_add_notes_an_unconfigured_gateway() -> None:
    org_id = invoke_json("org", "create", "Acme")["id"]
    code, out, err = invoke("instance", "add", "--org", org_id, "--gateway", "nowhere", "acme-01")
    assert code == 0
    assert "Instance acme-01 registered at gateway nowhere" in out
    assert "not configured" in err


def test_token_create_for_admin_and_for_an_organization() -> None:
    admin = invoke_json("token", "create", "ops")
    assert admin["admin"] is True and admin["organization_id"] is None
    principal = run_async(lambda: _principal(admin["token"]))
    assert principal is not None and principal.is_admin

    org_id = invoke_json("org", "create", "Acme")["id"]
    scoped = invoke_json("token", "create", "--org", org_id, "crm")
    assert scoped["organization_id"] == org_id and scoped["admin"] is False
    principal = run_async(lambda: _principal(scoped["token"]))
    assert principal is not None and str(principal.organization_id) == org_id

    code, out, _ = invoke("token", "create", "--org", org_id, "crm-2")
    assert code == 0 and f"for organization {org_id}" in out and "shown only now" in out
    code, _, err = invoke("token", "create", "--org", str(uuid.uuid4()), "nope")
    assert code == 1 and "no organization" in one_sentence(err)


# -- sync (a real Prefect flow run against the simulator) --------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_sync_check_then_apply_against_the_simulator(simulator: SimulatorState) -> None:
    simulator.add_instance("evo-up", "evolution", "open")
    simulator.add_instance("evo-down", "evolution", "close")
    org_id = invoke_json("org", "create", "Acme")["id"]
    for name in ("evo-up", "evo-down"):
        invoke_json("instance", "add", "--org", org_id, "--gateway", "evolution", name)
    invoke_json("instance", "add", "--org", org_id, "--gateway", "nowhere", "lost-01")  # unconfigured gateway

    check = invoke_json("sync", "--check", "--org", org_id)
    assert check["state"] == "Completed"
    assert check["mode"] == "check" and check["flow_run_id"]
    assert check["checked"] == 3 and check["drifted"] == 1 and check["applied"] == 0
    assert [(d["instance_name"], d["db_status"], d["gateway_status"], d["applied"]) for d in check["changes"]] == [
        ("evo-up", "disconnected", "connected", False)
    ]
    assert check["unreachable"] == 1
    assert check["unreachable_instances"][0]["instance_name"] == "lost-01"
    # Check mode wrote nothing.
    assert invoke_json("status", "--org", org_id)["by_status"] == {"disconnected": 3}

    code, out, _ = invoke("sync", "--org", org_id)
    assert code == 0
    assert "Status sync (apply" in out and "Completed" in out
    assert "Drift" in out and "evo-up" in out and "Unreachable" in out and "lost-01" in out
    assert "gateway 'nowhere' is not configured" in out
    statuses = {i["instance_name"]: i["status"] for i in invoke_json("status", "--org", org_id)["instances"]}
    assert statuses == {"evo-up": "connected", "evo-down": "disconnected", "lost-01": "disconnected"}

    again = invoke_json(
        "sync",
        "--instance",
        next(i["id"] for i in invoke_json("status")["instances"] if i["instance_name"] == "evo-up"),
        "--force",
    )
    assert again["checked"] == 1 and again["drifted"] == 0 and again["in_sync"] == 1


@pytest.mark.usefixtures("prefect_server", "simulator")
def test_import_command_imports_the_generated_history(simulator: SimulatorState) -> None:
    simulator.add_instance("evo-hist", "evolution", "open")
    simulator.set_history("evo-hist", chats=4, messages_per_chat=3)
    org_id = invoke_json("org", "create", "Acme")["id"]
    instance_id = invoke_json("instance", "add", "--org", org_id, "--gateway", "evolution", "evo-hist")["id"]

    report = invoke_json("import", instance_id)
    code, text, _ = invoke("import", instance_id)

    assert report["state"] == "Completed" and report["outcome"] == "completed"
    assert report["counts"]["messages_inserted"] > 0
    assert code == 0 and "messages" in text  # the second run finds everything already present
    assert invoke("import", str(uuid.uuid4()))[0] == 1


def test_maintenance_commands_report_and_dry_run(simulator: SimulatorState) -> None:
    dry = invoke_json("cleanup-sessions", "--dry-run")
    closing = invoke_json("close-inactive", "--dry-run")
    code, text, _ = invoke("close-inactive")

    assert dry["state"] == "Completed" and dry["dry_run"] is True
    assert closing["state"] == "Completed" and closing["dry_run"] is True
    assert code == 0 and text.strip()


def test_sync_exits_1_when_the_flow_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.sync_status as module

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("gateway world ended")

    monkeypatch.setattr(module, "run_sync", broken)
    monkeypatch.setattr(module, "sync_status", module.sync_status.with_options(retries=0))
    code, out, err = invoke("sync", "--json")
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("zapsync: the sync flow run ") and "ended Failed" in last


# -- environment failures, seen from outside ---------------------------------------------------------------------


def closed_port_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/zapsync"


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("db", "status"),
        ("db", "upgrade"),
        ("org", "create", "X"),
        ("sync", "--check"),
        ("api", "--port", "0"),
    ],
)
def test_unreachable_database_exits_2_with_one_sentence(args: tuple[str, ...]) -> None:
    if args[0] == "api":
        args = ("api", "--port", str(free_port()))
    done = run_cli(*args, env=child_env(DATABASE_URL=closed_port_url()))
    assert done.returncode == 2, done.stderr
    line = one_sentence(done.stderr)
    assert "database" in line and ("unreachable" in line or "cannot reach" in line)


@pytest.fixture
def unmigrated_database(database: str) -> Iterator[str]:
    """An empty database on the session's embedded server (no migrations applied)."""
    socket_dir = make_url(database).query["host"]
    name = f"zapsync_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@/{name}?host={socket_dir}"
    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_unmigrated_database_is_refused_with_the_command_that_fixes_it(unmigrated_database: str) -> None:
    env = child_env(DATABASE_URL=unmigrated_database)
    for args in (("api", "--port", str(free_port())), ("status",), ("serve",)):
        done = run_cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert "run `zapsync db upgrade`" in one_sentence(done.stderr)

    done = run_cli("db", "status", env=env)
    assert done.returncode == 2
    assert "migration none" in done.stdout
    assert "zapsync db upgrade" in one_sentence(done.stderr)

    done = run_cli("db", "upgrade", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == head_revision()
    assert run_cli("db", "status", env=env).returncode == 0


def test_busy_ports_are_named_with_the_option_that_changes_them() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = invoke("simulator", "--port", str(port))
        assert code == 2
        assert one_sentence(err) == (
            f"zapsync: port {port} (simulator) is already in use on 127.0.0.1: stop what "
            "uses it or pass --port to choose another port."
        )
        code, _, err = invoke("api", "--port", str(port))
        assert code == 2 and "--port" in one_sentence(err)

        done = run_cli("up", "--api-port", str(port), env=child_env(ZAPSYNC_HOME=os.environ["ZAPSYNC_HOME"]))
        assert done.returncode == 2
        line = one_sentence(done.stderr)
        assert f"port {port} (API)" in line and "--api-port" in line

        done = run_cli(
            "up", "--api-port", str(free_port()), "--prefect-port", str(port), "--sim-port", str(free_port())
        )
        assert done.returncode == 2 and "--prefect-port" in one_sentence(done.stderr)


def test_up_refuses_a_second_stack_on_the_same_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack.json").write_text(json.dumps({"pid": os.getpid()}))  # a live process "runs" the stack
    done = run_cli(
        "up",
        "--api-port",
        str(free_port()),
        "--prefect-port",
        str(free_port()),
        "--sim-port",
        str(free_port()),
        env=_up_env(home),
    )
    assert done.returncode == 2
    assert f"zapsync up is already running (pid {os.getpid()})" in one_sentence(done.stderr)


def test_serve_gives_up_on_a_prefect_api_that_never_answers() -> None:
    api = f"http://127.0.0.1:{free_port()}/api"
    done = run_cli("serve", "--wait", "1", env=child_env(PREFECT_API_URL=api))
    assert done.returncode == 2
    assert one_sentence(done.stderr) == f"zapsync: the Prefect API at {api} did not answer within 1 s."


# -- api and simulator processes ---------------------------------------------------------------------------------


@pytest.mark.pure
def test_strip_query_filter_removes_query_strings() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "POST", "/webhooks/megaapi/x?secret=abc&y=1", "1.1", 401),
        None,
    )
    assert cli.StripQueryFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:1 - "POST /webhooks/megaapi/x HTTP/1.1" 401'
    config = cli.access_log_config()
    assert config["handlers"]["access"]["filters"] == ["strip_query"]


def test_api_serves_and_never_logs_query_strings() -> None:
    org_id = invoke_json("org", "create", "Acme")["id"]
    port = free_port()
    process = subprocess.Popen(
        [*ZAPSYNC, "api", "--port", str(port)],
        env=child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{base}/healthz"), timeout=60, what="the API", alive=process)
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
        refused = httpx.post(f"{base}/webhooks/megaapi/{org_id}?secret=query-secret-value", json={})
        assert refused.status_code == 401
    finally:
        out, err = stop(process)
    assert process.returncode == 0, err
    logs = out + err
    assert "died" not in logs  # no worker was killed by uvicorn's health check and restarted
    assert "query-secret-value" not in logs and "secret=" not in logs
    assert "Traceback" not in logs


class Receiver:
    """A webhook receiver recording every delivery."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], dict]] = []
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        self.deliveries.append((dict(request.headers), json.loads(await request.body())))
        return JSONResponse({"ok": True})


def test_simulator_demo_sends_webhooks_with_the_secret() -> None:
    receiver = Receiver()
    port = free_port()
    with SimulatorServer(receiver.app) as hook:
        process = subprocess.Popen(
            [
                *ZAPSYNC,
                "simulator",
                "--port",
                str(port),
                "--instances",
                "4",
                "--prefix",
                "t",
                "--demo",
                "--interval",
                "0.1",
                "--flap-rate",
                "0.5",
                "--webhook-url",
                f"{hook.url}/hook",
            ],
            env=child_env(ZAPSYNC_SIM_WEBHOOK_SECRET="sim-secret"),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: answers(f"{base}/"), timeout=30, what="the simulator", alive=process)
            listed = httpx.get(f"{base}/instance/fetchInstances", headers={"apikey": "sim-evolution-key"}).json()
            assert sorted(i["name"] for i in listed) == ["t-00001", "t-00002", "t-00003", "t-00004"]
            wait_until(lambda: len(receiver.deliveries) >= 2, timeout=30, what="demo webhooks", alive=process)
        finally:
            out, err = stop(process)
    assert process.returncode == 0, err
    assert "Simulator on http://127.0.0.1:" in out and "4 evolution instances" in out and "demo ticks" in out
    headers, body = receiver.deliveries[0]
    assert headers["x-webhook-secret"] == "sim-secret"
    assert body["instance"].startswith("t-0000")
    assert "Traceback" not in err


# -- prefect_env -------------------------------------------------------------------------------------------------


def test_configure_prefect_env_points_at_a_recorded_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def health(_: Request) -> Response:
        return JSONResponse(True)

    monkeypatch.setenv("PREFECT_API_URL", "")  # recorded, so that the value set below is undone too
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setattr(prefect_env, "_already_configured", lambda: None)
    monkeypatch.setattr(prefect_env, "DEFAULT_PREFECT_PORT", free_port())  # nothing answers there
    assert prefect_env.configure_prefect_env(tmp_path) is None
    assert "PREFECT_API_URL" not in os.environ

    with SimulatorServer(Starlette(routes=[Route("/api/health", health)])) as fake:
        (tmp_path / prefect_env.STACK_FILE).write_text(json.dumps({"prefect_api_url": f"{fake.url}/api"}))
        assert prefect_env.configure_prefect_env(tmp_path) == f"{fake.url}/api"
        assert os.environ["PREFECT_API_URL"] == f"{fake.url}/api"

    monkeypatch.setenv("PREFECT_API_URL", "http://example.invalid/api")
    monkeypatch.setattr(prefect_env, "_already_configured", lambda: os.environ.get("PREFECT_API_URL"))
    assert prefect_env.configure_prefect_env(tmp_path) == "http://example.invalid/api"


def test_a_running_demo_stack_lends_its_simulator_to_other_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("EVOLUTION_API_URL", "EVOLUTION_API_KEY", "MEGA_API_HOST", "MEGA_API_TOKEN", "ZAPSYNC_GATEWAYS"):
        monkeypatch.setenv(name, "")  # recorded, so that what the function sets is undone too
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    try:
        assert adopt_demo_gateway(tmp_path) is None  # no stack running
        record = {"pid": os.getpid(), "demo": True, "simulator_url": "http://127.0.0.1:9"}
        (tmp_path / prefect_env.STACK_FILE).write_text(json.dumps(record))
        assert adopt_demo_gateway(tmp_path) == "http://127.0.0.1:9"
        assert get_settings().gateways()["evolution"].url == "http://127.0.0.1:9"
        assert adopt_demo_gateway(tmp_path) is None  # a configured gateway is never replaced
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


# -- zapsync up, end to end --------------------------------------------------------------------------------------


def _up_env(home: Path) -> dict[str, str]:
    env = child_env(ZAPSYNC_HOME=str(home), PREFECT_LOGGING_LEVEL="WARNING")
    for name in (
        "DATABASE_URL",
        "PREFECT_API_URL",
        "EVOLUTION_API_URL",
        "EVOLUTION_API_KEY",
        "MEGA_API_HOST",
        "MEGA_API_TOKEN",
        "ZAPSYNC_ADMIN_TOKEN",
        "ZAPSYNC_GATEWAYS",
        "PREFECT_HOME",
    ):
        env.pop(name, None)
    return env


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_up_demo_runs_the_whole_stack_and_stops_it_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    api_port, prefect_port, sim_port = free_port(), free_port(), free_port()
    env = _up_env(home)
    process = subprocess.Popen(
        [
            *ZAPSYNC,
            "up",
            "--demo",
            "--api-port",
            str(api_port),
            "--prefect-port",
            str(prefect_port),
            "--sim-port",
            str(sim_port),
        ],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    assert process.stdout is not None
    began = time.monotonic()
    try:
        while not any(line.startswith("Press Ctrl-C to stop") for line in lines):  # the end of the announcement
            line = process.stdout.readline()
            if not line:
                raise AssertionError(
                    f"zapsync up exited ({process.wait()}):\n{''.join(lines)}\n"
                    f"{process.stderr.read() if process.stderr else ''}"
                )
            lines.append(line.strip())
            assert time.monotonic() - began < 300, "zapsync up was not ready within 300 s"
        output = "\n".join(lines)
        assert any(line.startswith("ready in ") and line.endswith(" s") for line in lines), output
        api = f"http://127.0.0.1:{api_port}"
        admin_token = (home / "admin_token").read_text().strip()
        demo = json.loads((home / "demo.json").read_text())
        for needle in (
            api,
            f"{api}/docs",
            f"http://127.0.0.1:{prefect_port}",
            f"http://127.0.0.1:{sim_port}",
            admin_token,
            demo["organization_id"],
            demo["webhook_secret"],
            demo["token"],
        ):
            assert needle in output, needle
        assert stat_mode(home / "admin_token") == 0o600 and stat_mode(home / "demo.json") == 0o600

        assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{prefect_port}/api/health").json() is True
        checked = httpx.get(f"{api}/instances/status", headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
        assert checked.status_code == 200, checked.text
        assert checked.json()["checked"] == 20 and checked.json()["unreachable"] == 0

        status = run_cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        instances = json.loads(status.stdout)["instances"]
        assert len(instances) == 20
        assert {i["organization_id"] for i in instances} == {demo["organization_id"]}
        # Webhooks and the first sync move statuses away from the registered 'disconnected'.
        wait_until(lambda: _connected(env) > 0, timeout=60, what="connected demo instances")

        stack = json.loads((home / "stack.json").read_text())
        assert stack["prefect_api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 4
    except BaseException:
        process.kill()
        raise
    out, err = stop(process, timeout=90)
    assert process.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert "stopped." in out
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child
    for port in (api_port, prefect_port, sim_port):
        assert _port_closed(port), port
    assert not (home / "stack.json").exists()
    assert not (home / "pgdata" / "postmaster.pid").exists()  # the embedded PostgreSQL stopped too


def _connected(env: dict[str, str]) -> int:
    done = run_cli("status", "--json", env=env)
    return int(json.loads(done.stdout)["by_status"].get("connected", 0)) if done.returncode == 0 else 0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_api_workers_share_one_port_and_never_log_query_strings() -> None:
    org_id = invoke_json("org", "create", "Acme")["id"]
    port = free_port()
    process = subprocess.Popen(
        [*ZAPSYNC, "api", "--port", str(port), "--workers", "2"],
        env=child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{base}/healthz"), timeout=90, what="the API", alive=process)
        refused = [httpx.post(f"{base}/webhooks/megaapi/{org_id}?secret=query-secret-value", json={}) for _ in range(4)]
        assert [r.status_code for r in refused] == [401] * 4
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2
    finally:
        out, err = stop(process)
    logs = out + err
    assert "died" not in logs  # no worker was killed by uvicorn's health check and restarted
    assert "query-secret-value" not in logs and "secret=" not in logs
    assert "Traceback" not in logs
