"""`zapsync up`: the whole local stack in one command.

Starts, in this order: the embedded PostgreSQL (unless ``DATABASE_URL`` is set) and its migrations, in this process;
a local Prefect server (unless ``PREFECT_API_URL`` is set); in demo mode the gateway simulator with webhooks flowing
into the API for a demo organization; the API; `zapsync serve`. Each child runs in its own session with its output
in ``$ZAPSYNC_HOME/logs/<name>.log``; Ctrl-C or SIGTERM stops them in reverse order (SIGINT, then SIGTERM and
SIGKILL after timeouts) and releases the database. Everything it needs again is kept in ``$ZAPSYNC_HOME``: the data,
the admin token, the demo organization.

This module never imports Prefect: it talks to the Prefect server over HTTP, so it starts fast and stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import httpx
from rich.console import Console
from rich.table import Table

from core.errors import DatabaseNotMigrated, DatabaseUnavailable, PortInUse, StackError
from core.settings import get_settings
from zapsync.demo import (
    DEMO_GATEWAY,
    DEMO_INSTANCES,
    DEMO_PREFIX,
    DemoOrganization,
    ensure_demo_organization,
    write_private,
)
from zapsync.prefect_env import STACK_FILE, prefect_healthy, read_stack, stack_file

HOST = "127.0.0.1"
ADMIN_TOKEN_FILE = "admin_token"
SIM_EVOLUTION_KEY = "sim-evolution-key"
"""The simulator's Evolution API key (its default config)."""
SYNC_DEPLOYMENT = ("sync-status", "on-demand")
DEFAULT_POLL_FREQUENCY = "2"
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
EXTERNAL_PREFECT_TIMEOUT_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PREFECT_SERVER_ENV = {
    "PREFECT_SERVER_UI_V2_ENABLED": "false",  # the classic UI: the newer one calls an analytics host regardless
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}
T = TypeVar("T")


class AlreadyRunning(StackError):
    """Another `zapsync up` runs on the same ``ZAPSYNC_HOME``."""

    exit_code = 2


class _StopRequested(BaseException):
    """Raised by the signal handler to leave whatever the launcher is doing (like KeyboardInterrupt)."""


def sentence(message: str) -> str:
    """``message`` as one sentence: a final period added when it has no closing punctuation."""
    message = message.strip()
    return message if message.endswith((".", "!", "?")) else message + "."


# -- database ----------------------------------------------------------------------------------------------------


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh loop and close that loop's connection pool before returning."""
    from db.engine import dispose_engine

    async def main() -> T:
        try:
            return await factory()
        finally:
            await dispose_engine()

    return asyncio.run(main())


def _database_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    from sqlalchemy import exc as sa_exc

    return (OSError, psycopg.OperationalError, sa_exc.OperationalError, sa_exc.InterfaceError)


def database_label() -> str:
    """The database URL with its password masked (starts the embedded server when none is configured)."""
    from db.engine import database_url, safe_url

    return safe_url(database_url())


def upgrade_database() -> str:
    """Apply every migration (starting the embedded server if needed) and return the revision now in force."""
    from db.engine import database_url, safe_url
    from db.migrate import head_revision, upgrade

    try:
        url = database_url()
    except _database_errors() as exc:
        raise DatabaseUnavailable(f"the embedded PostgreSQL could not start: {type(exc).__name__}: {exc}") from exc
    try:
        upgrade()
    except _database_errors() as exc:
        raise DatabaseUnavailable(f"cannot reach the database at {safe_url(url)}: {type(exc).__name__}") from exc
    return head_revision()


def ensure_migrated() -> None:
    """Raise DatabaseUnavailable / DatabaseNotMigrated (with the command that fixes it) unless the DB is current."""
    from db.engine import check_migrated

    run_async(check_migrated)


def adopt_demo_gateway(home: Path | None = None) -> str | None:
    """Use the simulator of a running `zapsync up --demo` as this process's Evolution gateway, when none is set.

    So that `zapsync sync` in another terminal checks the demo instances against the same simulator. Returns the
    simulator URL when adopted.
    """
    record = read_stack(home)
    pid, url = record.get("pid"), record.get("simulator_url")
    if not (record.get("demo") and isinstance(pid, int) and isinstance(url, str) and _pid_alive(pid)):
        return None
    if get_settings().gateways():
        return None
    os.environ["EVOLUTION_API_URL"] = url
    os.environ["EVOLUTION_API_KEY"] = SIM_EVOLUTION_KEY
    get_settings.cache_clear()
    return url


# -- ports, tokens, files ----------------------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails (someone listens there), with the same options uvicorn binds with."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(host: str, wanted: list[tuple[int, str, str]]) -> None:
    """Fail with one sentence naming the port and the option to change it, for the first busy (or repeated) port.

    ``wanted`` holds (port, what, option) triples.
    """
    seen: dict[int, str] = {}
    for port, what, option in wanted:
        if port in seen:
            raise PortInUse(
                f"port {port} is asked for both the {seen[port]} and the {what}: pass {option} "
                "to give one of them another port"
            )
        seen[port] = option
        if port_in_use(host, port):
            raise PortInUse(
                f"port {port} ({what}) is already in use on {host}: stop what uses it or pass "
                f"{option} to choose another port"
            )


def ensure_admin_token(home: Path) -> tuple[str, bool]:
    """``ZAPSYNC_ADMIN_TOKEN`` if set, else the token kept in ``$ZAPSYNC_HOME/admin_token`` (made once).

    Returns (token, created).
    """
    configured = get_settings().admin_token
    if configured is not None:
        return configured.get_secret_value(), False
    path = home / ADMIN_TOKEN_FILE
    with contextlib.suppress(OSError):
        token = path.read_text().strip()
        if token:
            return token, False
    token = f"zsadm_{secrets.token_urlsafe(32)}"
    write_private(path, token + "\n")
    return token, True


# -- children ----------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies without stopping us (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One child process of the stack, in its own session (so only the launcher decides when it stops)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_timeout_s: float = STOP_TIMEOUT_S
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)
    _offset: int = 0

    def start(self) -> None:
        """Start the process with its output appended to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- {datetime.now(UTC).isoformat()} zapsync up starts {self.name}\n".encode())
        self._log.flush()
        self._offset = self._log.tell()
        self.started_at = time.time()
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id)."""
        return self.process.pid if self.process else None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.process.poll() if self.process else 0

    def _signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _group_alive(self) -> bool:
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _wait(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None and not self._group_alive():
                return True
            time.sleep(0.05)
        return self.process.poll() is not None and not self._group_alive()

    def stop(self, *, hurry: Callable[[], bool] = lambda: False) -> str:
        """SIGINT to the child's process group; SIGTERM, then SIGKILL, when it does not end in time.

        Returns how it ended ("stopped", "terminated", "killed"), or "exited" if it was gone already.
        """
        how = "exited"
        if self.process is not None and (self.process.poll() is None or self._group_alive()):
            how = "stopped"
            steps = ((signal.SIGINT, self.stop_timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
            for (sig, timeout), label in zip(steps, ("stopped", "terminated", "killed"), strict=True):
                how = label
                self._signal_group(sig)
                if self._wait(1.0 if hurry() and sig != signal.SIGKILL else timeout):
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)
        if self._log is not None:
            self._log.close()
            self._log = None
        return how

    def log_tail(self, lines: int = 15) -> str:
        """The last lines this run of the child wrote to its log (to show why it died)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


# -- readiness ---------------------------------------------------------------------------------------------------


def _get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 2.0) -> httpx.Response | None:
    try:
        return httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return None


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def deployment_served_since(prefect_api: str, since: float) -> dict[str, Any] | None:
    """The on-demand sync deployment, once a runner has polled it after ``since`` (epoch seconds)."""
    flow, name = SYNC_DEPLOYMENT
    response = _get(f"{prefect_api}/deployments/name/{flow}/{name}")
    if response is None or response.status_code != 200:
        return None
    deployment: dict[str, Any] = response.json()
    polled = _parse_time(deployment.get("last_polled"))
    return deployment if polled is not None and polled >= since - 1 else None


def start_sync_run(prefect_api: str, deployment_id: str) -> str | None:
    """Create a run of the on-demand sync (all instances, apply); returns its id, or None if Prefect refused."""
    try:
        response = httpx.post(
            f"{prefect_api}/deployments/{deployment_id}/create_flow_run",
            json={"parameters": {"mode": "apply"}, "tags": ["zapsync-up"]},
            timeout=10,
        )
    except httpx.HTTPError:
        return None
    return str(response.json().get("id")) if response.status_code in (200, 201) else None


# -- the stack ---------------------------------------------------------------------------------------------------


@dataclass
class StackOptions:
    """What `zapsync up` was asked for."""

    demo: bool | None = None
    api_port: int = 8000
    prefect_port: int = 4200
    sim_port: int = 8081
    host: str = HOST
    startup_timeout_s: float = STARTUP_TIMEOUT_S


@dataclass
class StackInfo:
    """Everything the user needs once the stack is ready."""

    home: Path
    demo: bool
    database: str
    revision: str
    api_url: str
    prefect_api_url: str
    prefect_ui_url: str | None
    admin_token: str
    simulator_url: str | None = None
    demo_org: DemoOrganization | None = None
    initial_sync_run: str | None = None
    children: dict[str, int] = field(default_factory=dict)


class Stack:
    """The launcher: start everything, report, wait, and stop everything in reverse order."""

    def __init__(self, options: StackOptions, console: Console, err: Console) -> None:
        self.options = options
        self.console = console
        self.err = err
        self.settings = get_settings()
        self.home = self.settings.home
        self.children: list[Child] = []
        self.stopping = False
        self.hurry = False
        self.began = time.monotonic()
        self._database_started = False

    # signals -----------------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.hurry = True  # a second Ctrl-C: shorter timeouts
            return
        self.stopping = True
        raise _StopRequested(signal.Signals(signum).name)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # steps -------------------------------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.began:5.1f}s[/] {message}", highlight=False)

    def _child(self, name: str, argv: list[str], env: dict[str, str], stop_timeout_s: float = STOP_TIMEOUT_S) -> Child:
        child = Child(name, argv, env, self.home / "logs" / f"{name}.log", stop_timeout_s)
        child.start()
        self.children.append(child)
        return child

    def _check_alive(self) -> None:
        for child in self.children:
            code = child.exited()
            if code is not None:
                raise StackError(
                    f"the {child.name} process exited with code {code}; its log is {child.log_path}",
                    detail=child.log_tail(),
                )

    def _wait_for(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        delay = 0.1
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise StackError(
                    f"the {what} was not ready after {self.options.startup_timeout_s:.0f} s; "
                    f"see the logs in {self.home / 'logs'}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _wait_for_external_prefect(self, prefect_api: str) -> None:
        deadline = time.monotonic() + EXTERNAL_PREFECT_TIMEOUT_S
        while not prefect_healthy(prefect_api, timeout=1.0):
            self._check_alive()
            if time.monotonic() > deadline:
                raise StackError(
                    f"the Prefect API at {prefect_api} (PREFECT_API_URL) does not answer: start it, "
                    "or unset PREFECT_API_URL to let zapsync up run a local server",
                    exit_code=2,
                )
            time.sleep(0.25)

    def _zapsync(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "zapsync.cli", *args]

    def run(self) -> int:
        """Start the stack, wait for Ctrl-C / SIGTERM or a child's death, stop it; returns the exit code."""
        with self._signals():
            code = 0
            try:
                code = self._run_until_stopped()
            except _StopRequested as stop:
                self.console.print(f"\n{stop.args[0]} received: stopping…", highlight=False)
            finally:
                self.stopping = True
                self._shutdown()
            return code

    def _run_until_stopped(self) -> int:
        try:
            info = self._start()
            self._announce(info)
            while True:
                self._check_alive()
                time.sleep(0.5)
        except StackError as exc:
            self._error(exc.message, exc.detail)
            return exc.exit_code
        except (DatabaseUnavailable, DatabaseNotMigrated) as exc:
            self._error(exc.message)
            return 2

    def _error(self, message: str, detail: str = "") -> None:
        self.err.print(f"zapsync: {sentence(message)}", highlight=False, markup=False)
        if detail:
            self.err.print(detail, highlight=False, markup=False)

    def _start(self) -> StackInfo:
        opts = self.options
        host = opts.host
        self.home.mkdir(parents=True, exist_ok=True)
        running = read_stack(self.home)
        pid = running.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            raise AlreadyRunning(
                f"zapsync up is already running (pid {pid}) with ZAPSYNC_HOME={self.home}: stop it "
                "first, or set ZAPSYNC_HOME to another folder"
            )
        demo = opts.demo if opts.demo is not None else not self.settings.gateways()
        external_prefect = os.environ.get("PREFECT_API_URL")
        wanted = [(opts.api_port, "API", "--api-port")]
        if not external_prefect:
            wanted.append((opts.prefect_port, "Prefect server", "--prefect-port"))
        if demo:
            wanted.append((opts.sim_port, "simulator", "--sim-port"))
        check_ports(host, wanted)

        gateways = ", ".join(sorted(self.settings.gateways()))
        mode = (
            "demo mode"
            if demo
            else f"gateways: {gateways}"
            if gateways
            else ("no gateway configured: instances will be unreachable; --demo runs the simulator")
        )
        self.console.print(f"[bold]zapsync up[/] — ZAPSYNC_HOME={self.home} ({mode})", highlight=False)
        env = {
            **os.environ,
            "ZAPSYNC_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
        env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", DEFAULT_POLL_FREQUENCY)

        # (b) Prefect first: it is the slowest to boot, and boots while the database starts here.
        if external_prefect:
            prefect_api = external_prefect.rstrip("/")
            prefect_ui: str | None = None
            self._say(f"Prefect: using PREFECT_API_URL={prefect_api}")
        else:
            prefect_api = f"http://{host}:{opts.prefect_port}/api"
            prefect_ui = f"http://{host}:{opts.prefect_port}"
            env.update({"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(self.home / "prefect")})
            server_env = {**env, **PREFECT_SERVER_ENV}
            self._child(
                "prefect-server",
                [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(opts.prefect_port)],
                server_env,
            )
            self._say(f"Prefect server starting on {prefect_ui}")

        # (a) the database, in this process: it lives as long as the launcher.
        self._database_started = True
        revision = upgrade_database()
        database = database_label()
        if "DATABASE_URL" in os.environ:  # the embedded server's socket URL, exported by database_url()
            env["DATABASE_URL"] = os.environ["DATABASE_URL"]
        embedded = self.settings.database_url is None
        self._say(f"PostgreSQL {'(embedded) ' if embedded else ''}at migration {revision}")
        admin_token, made = ensure_admin_token(self.home)
        env["ZAPSYNC_ADMIN_TOKEN"] = admin_token
        if made:
            self._say(f"admin token created in {self.home / ADMIN_TOKEN_FILE}")

        api_url = f"http://{host}:{opts.api_port}"
        info = StackInfo(
            home=self.home,
            demo=demo,
            database=database,
            revision=revision,
            api_url=api_url,
            prefect_api_url=prefect_api,
            prefect_ui_url=prefect_ui,
            admin_token=admin_token,
        )

        # (c) the simulator and the demo organization.
        if demo:
            org = run_async(lambda: ensure_demo_organization(self.home))
            info.demo_org = org
            sim_url = f"http://{host}:{opts.sim_port}"
            info.simulator_url = sim_url
            if self.settings.gateways():
                self._say("demo mode: the children use the simulator as their Evolution gateway")
            env.update({"EVOLUTION_API_URL": sim_url, "EVOLUTION_API_KEY": SIM_EVOLUTION_KEY})
            self._say(
                f"demo organization {org.organization_id} "
                f"({'created' if org.created else 'reused'}, {org.registered} instances registered)"
            )
            sim_env = {**env, "ZAPSYNC_SIM_WEBHOOK_SECRET": org.webhook_secret}
            self._child(
                "simulator",
                self._zapsync(
                    "simulator",
                    "--host",
                    host,
                    "--port",
                    str(opts.sim_port),
                    "--instances",
                    str(DEMO_INSTANCES),
                    "--provider",
                    DEMO_GATEWAY,
                    "--prefix",
                    DEMO_PREFIX,
                    "--demo",
                    "--webhook-url",
                    f"{api_url}/webhooks/{DEMO_GATEWAY}/{org.organization_id}",
                ),
                sim_env,
            )
            self._say(f"simulator starting on {sim_url}")

        # (d) the API.
        self._child("api", self._zapsync("api", "--host", host, "--port", str(opts.api_port)), env)
        self._say(f"API starting on {api_url}")

        # (e) serve the deployments: it imports the flows while the Prefect server boots, then waits for it.
        serve = self._child(
            "serve", self._zapsync("serve", "--wait", f"{opts.startup_timeout_s:.0f}"), env, stop_timeout_s=15.0
        )
        self._say("flow runner (zapsync serve) starting")
        # (f) the warm queue worker: drains queued work (imports on connect) in-process, woken by NOTIFY.
        self._child("worker", self._zapsync("worker"), env, stop_timeout_s=30.0)
        self._say("queue worker (zapsync worker) starting")

        deadline = time.monotonic() + opts.startup_timeout_s
        if external_prefect:
            self._wait_for_external_prefect(prefect_api)
        else:
            self._wait_for("Prefect server", lambda: prefect_healthy(prefect_api, timeout=1.0), deadline)
            self._say("Prefect server ready")
        if info.simulator_url:
            sim_url = info.simulator_url
            self._wait_for("simulator", lambda: _ok(_get(f"{sim_url}/")), deadline)
        self._wait_for("API", lambda: _ok(_get(f"{api_url}/readyz")), deadline)
        served: dict[str, Any] = {}

        def deployments_served() -> bool:
            found = deployment_served_since(prefect_api, serve.started_at)
            if found:
                served.update(found)
            return found is not None

        self._wait_for("flow runner (zapsync serve)", deployments_served, deadline)
        self._say("deployments served")
        if demo and served.get("id"):
            info.initial_sync_run = start_sync_run(prefect_api, str(served["id"]))
        info.children = {c.name: c.pid for c in self.children if c.pid}
        self._record(info)
        return info

    def _record(self, info: StackInfo) -> None:
        record = {
            "pid": os.getpid(),
            "started_at": datetime.now(UTC).isoformat(),
            "api_url": info.api_url,
            "prefect_api_url": info.prefect_api_url,
            "prefect_ui_url": info.prefect_ui_url,
            "simulator_url": info.simulator_url,
            "demo": info.demo,
            "children": info.children,
            "demo_organization_id": str(info.demo_org.organization_id) if info.demo_org else None,
        }
        write_private(stack_file(self.home), json.dumps(record, indent=2))

    def _announce(self, info: StackInfo) -> None:
        took = time.monotonic() - self.began
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        table.add_row("API", info.api_url)
        table.add_row("API docs", f"{info.api_url}/docs")
        table.add_row("Dashboard", f"{info.api_url}/  (sign in with a token below)")
        if info.prefect_ui_url:
            table.add_row("Prefect UI", f"{info.prefect_ui_url}  (classic UI, analytics off)")
        table.add_row("Prefect API", info.prefect_api_url)
        if info.simulator_url:
            table.add_row(
                "Simulator",
                f"{info.simulator_url}  (Evolution API key {SIM_EVOLUTION_KEY}, docs {info.simulator_url}/_sim/docs)",
            )
        table.add_row("Admin token", info.admin_token)
        if info.demo_org:
            org = info.demo_org
            table.add_row("Demo organization", str(org.organization_id))
            table.add_row("Demo org token", org.token)
            table.add_row("Webhook secret", org.webhook_secret)
            table.add_row("Webhook URL", f"{info.api_url}/webhooks/{DEMO_GATEWAY}/{org.organization_id}")
            table.add_row(
                "Connect a number",
                "dashboard → Connect a number (sign in with the demo org token), then play the phone: "
                f"curl -X POST {info.simulator_url}/_sim/instances/user_<user id>/scan",
            )
        table.add_row("Database", info.database)
        table.add_row("Logs", str(self.home / "logs"))
        self.console.print(f"\n[bold green]ready in {took:.1f} s[/]", highlight=False)
        self.console.print(table)
        if info.initial_sync_run:
            self.console.print(f"A first status sync is running (flow run {info.initial_sync_run}).", highlight=False)
        self.console.print(
            f"\nTry: curl -H 'Authorization: Bearer {info.admin_token}' {info.api_url}/instances/status\n"
            "Press Ctrl-C to stop.",
            highlight=False,
            soft_wrap=True,
        )

    def _shutdown(self) -> None:
        for child in reversed(self.children):
            begun = time.monotonic()
            how = child.stop(hurry=lambda: self.hurry)
            if how != "exited":
                self._say(f"{child.name} {how} in {time.monotonic() - begun:.1f} s")
            if how in ("terminated", "killed"):
                self.err.print(f"zapsync: {child.name} did not stop on SIGINT and was {how}.", highlight=False)
        self.children.clear()
        if self._database_started:
            from db.engine import stop_embedded_postgres

            stop_embedded_postgres()  # the embedded server stops unless another process still holds it
        record = read_stack(self.home)
        if record.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                (self.home / STACK_FILE).unlink()
        self.console.print("stopped.")


def _ok(response: httpx.Response | None) -> bool:
    return response is not None and response.status_code == 200


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_stack(options: StackOptions, console: Console, err: Console) -> int:
    """`zapsync up`: run the stack until stopped; returns the process exit code."""
    return Stack(options, console, err).run()
