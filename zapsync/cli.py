"""The `zapsync` command: database, organizations and tokens, status and sync, and the processes of the stack.

Readable tables by default, ``--json`` for scripts. Exit codes: 0 ok, 1 the operation failed, 2 bad usage or a bad
environment (unreachable or unmigrated database, busy port); every failure says why in one sentence on stderr.
Secrets are printed only by the commands that create them, once.

Prefect is imported only by the commands that need it, after :func:`zapsync.prefect_env.configure_prefect_env` has
chosen the API (Prefect reads its settings at import).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from core.errors import (
    DatabaseNotMigrated,
    DatabaseUnavailable,
    GatewayError,
    InvalidInput,
    NotFound,
    StackError,
    ZapsyncError,
)
from core.settings import get_settings
from db.engine import current_revision
from zapsync.prefect_env import configure_prefect_env, prefect_healthy
from zapsync.stack import (
    DEFAULT_POLL_FREQUENCY,
    StackOptions,
    adopt_demo_gateway,
    check_ports,
    database_label,
    ensure_migrated,
    run_async,
    run_stack,
    sentence,
    upgrade_database,
)

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

app = typer.Typer(
    name="zapsync",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Keep a CRM's PostgreSQL in step with its WhatsApp gateways.",
)
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
org_app = typer.Typer(no_args_is_help=True, help="Organizations (tenants).")
token_app = typer.Typer(no_args_is_help=True, help="API bearer tokens.")
instance_app = typer.Typer(no_args_is_help=True, help="WhatsApp instances.")
app.add_typer(db_app, name="db")
app.add_typer(org_app, name="org")
app.add_typer(token_app, name="token")
app.add_typer(instance_app, name="instance")
webhooks_app = typer.Typer(no_args_is_help=True, help="Webhook deliveries: replay stored or spooled ones.")
app.add_typer(webhooks_app, name="webhooks")

PRIVACY_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
OrgOpt = Annotated[uuid.UUID | None, typer.Option("--org", help="Organization id.")]


class SimProvider(enum.StrEnum):
    """Providers the simulator speaks."""

    EVOLUTION = "evolution"
    MEGAAPI = "megaapi"


# -- output and errors -------------------------------------------------------------------------------------------


def out() -> Console:
    """A console on the current stdout (wide when it is not a terminal, so tables do not fold)."""
    return Console(highlight=False, soft_wrap=True, width=None if _isatty() else 160)


def err() -> Console:
    """A console on the current stderr."""
    return Console(stderr=True, highlight=False, soft_wrap=True, width=None if _isatty() else 160)


def _isatty() -> bool:
    return sys.stdout.isatty()


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    typer.echo(json.dumps(data, indent=2, default=str))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one sentence on stderr and exit with ``code``."""
    typer.echo(f"zapsync: {sentence(message)}", err=True)
    raise typer.Exit(code)


@contextmanager
def expected_errors() -> Iterator[None]:
    """Turn the errors a user can meet into one sentence and an exit code, without a traceback."""
    import psycopg
    from sqlalchemy import exc as sa_exc

    try:
        yield
    except (DatabaseUnavailable, DatabaseNotMigrated, InvalidInput) as exc:
        fail(exc.message, 2)
    except StackError as exc:
        fail(exc.message, exc.exit_code)
    except ZapsyncError as exc:
        fail(exc.message, 1)
    except GatewayError as exc:
        where = f" {exc.gateway}" if exc.gateway else ""
        fail(f"gateway{where} error: {exc.message}", 1)
    except (psycopg.OperationalError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        fail(f"the database is unreachable ({type(exc).__name__})", 2)
    except subprocess.CalledProcessError as exc:
        fail(
            f"the embedded PostgreSQL could not start ({exc.cmd[0] if exc.cmd else 'pg_ctl'} exited with "
            f"{exc.returncode}); see the log in {get_settings().data_dir / 'log'}",
            2,
        )
    except KeyboardInterrupt:
        fail("interrupted", 130)


def _when(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return "—" if value is None else str(value)


def _note_ephemeral(what: str) -> None:
    """Say so on stderr when no Prefect API is configured and Prefect will start a temporary server."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    err().print(
        f"Note: no PREFECT_API_URL and no `zapsync up` server answering: {what} (slower to start, and "
        "its runs are not kept)."
    )


def _quiet_signals() -> None:
    """Let uvicorn handle Ctrl-C / SIGTERM, and not re-raise them as a traceback once it has shut down."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


class StripQueryFilter(logging.Filter):
    """Drop the query string from uvicorn access-log lines (MegaAPI webhooks may carry ``?secret=``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the request path argument of an access record without its query."""
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def access_log_config() -> dict[str, Any]:
    """uvicorn's logging config with :class:`StripQueryFilter` on the access handler."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["strip_query"] = {"()": StripQueryFilter}
    config["handlers"]["access"]["filters"] = ["strip_query"]
    return config


# -- root --------------------------------------------------------------------------------------------------------


@app.callback()
def main(ctx: typer.Context) -> None:
    """zapsync keeps a CRM's PostgreSQL in step with its WhatsApp gateways (Evolution API v2, MegaAPI)."""
    for name, value in PRIVACY_ENV.items():  # before Prefect is imported: no analytics, no telemetry
        os.environ.setdefault(name, value)
    if ctx.invoked_subcommand != "up":  # `up` decides about Prefect and gateways itself
        configure_prefect_env()
        adopt_demo_gateway()


# -- db ----------------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(as_json: JsonOpt = False) -> None:
    """Apply the database migrations (Alembic) and print the revision."""
    with expected_errors():
        revision = upgrade_database()
        label = database_label()
    if as_json:
        emit_json({"database": label, "revision": revision})
    else:
        out().print(f"Database {label} is at migration [bold]{revision}[/] (latest).")


@db_app.command("status")
def db_status(as_json: JsonOpt = False) -> None:
    """Show the database's migration and whether it is current (exit 2 when it needs `zapsync db upgrade`)."""
    from db.migrate import head_revision

    with expected_errors():
        label = database_label()
        current = run_async(current_revision)
    head = head_revision()
    current_ok = current == head
    if as_json:
        emit_json({"database": label, "current": current, "head": head, "up_to_date": current_ok})
    else:
        out().print(
            f"Database {label}: migration {current or 'none'} (latest {head}), "
            f"{'up to date' if current_ok else 'behind'}."
        )
    if not current_ok:
        fail(f"the database is at migration {current or 'none'}, zapsync needs {head}: run `zapsync db upgrade`", 2)


# -- organizations and tokens ------------------------------------------------------------------------------------


def _require_name(name: str, what: str) -> str:
    name = name.strip()
    if not name:
        fail(f"the {what} name must not be empty", 2)
    return name


async def _check_organization(session: Any, organization_id: uuid.UUID) -> None:
    from db.repositories.organizations import organization_exists

    if not await organization_exists(session, organization_id):
        raise NotFound(f"no organization {organization_id}")


@org_app.command("create")
def org_create(name: Annotated[str, typer.Argument(help="Organization name.")], as_json: JsonOpt = False) -> None:
    """Create an organization with a fresh webhook secret and API token (shown once: store them)."""
    from db.engine import session_scope
    from db.repositories.organizations import create_organization, create_token, new_secret

    name = _require_name(name, "organization")
    secret = new_secret("whsec")

    async def create() -> tuple[uuid.UUID, str]:
        async with session_scope() as session:
            org = await create_organization(session, name=name, webhook_secret=secret)
            token = await create_token(session, name=f"{name} (created by zapsync org create)", organization_id=org.id)
            return org.id, token

    with expected_errors():
        ensure_migrated()
        org_id, token = run_async(create)
    webhooks = {"evolution": f"/webhooks/evolution/{org_id}", "megaapi": f"/webhooks/megaapi/{org_id}"}
    if as_json:
        emit_json({"id": str(org_id), "name": name, "webhooks": webhooks, "webhook_secret": secret, "token": token})
        return
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("Organization", f"{name}  ({org_id})")
    table.add_row("Evolution webhook", webhooks["evolution"])
    table.add_row("MegaAPI webhook", webhooks["megaapi"])
    table.add_row("Webhook secret", secret)
    table.add_row("API token", token)
    console = out()
    console.print(table)
    console.print(
        "\nThe secret and the token are shown only now: store them. Gateways send the secret in the "
        "X-Webhook-Secret header; API calls send 'Authorization: Bearer <token>'."
    )


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name to recognise the token by.")],
    org: OrgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API token for one organization, or an admin token (no --org); shown once."""
    from db.engine import session_scope
    from db.repositories.organizations import create_token

    name = _require_name(name, "token")

    async def create() -> str:
        async with session_scope() as session:
            if org is not None:
                await _check_organization(session, org)
            return await create_token(session, name=name, organization_id=org)

    with expected_errors():
        ensure_migrated()
        token = run_async(create)
    scope = f"organization {org}" if org else "admin (every organization)"
    if as_json:
        emit_json({"name": name, "organization_id": str(org) if org else None, "admin": org is None, "token": token})
    else:
        out().print(f"Token [bold]{name}[/] for {scope}:\n{token}\nIt is shown only now: store it.")


def _token_json(t: Any) -> dict[str, Any]:
    return {
        "id": str(t.id),
        "name": t.name,
        "organization_id": str(t.organization_id) if t.organization_id else None,
        "admin": t.organization_id is None,
        "created_at": t.created_at.isoformat(),
        "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
        "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
    }


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """List the stored API tokens: id, name, organization, last use, revocation (never the tokens themselves)."""
    from db.engine import session_scope
    from db.repositories.organizations import list_tokens

    async def load() -> list[Any]:
        async with session_scope() as session:
            return await list_tokens(session)

    with expected_errors():
        ensure_migrated()
        tokens = run_async(load)
    if as_json:
        emit_json([_token_json(t) for t in tokens])
        return
    if not tokens:
        out().print("No stored tokens (the ZAPSYNC_ADMIN_TOKEN setting is not stored).")
        return
    table = Table(title=None)
    for column in ("id", "name", "organization", "created", "last used", "revoked"):
        table.add_column(column, no_wrap=True)
    for t in tokens:
        table.add_row(
            str(t.id),
            t.name,
            str(t.organization_id) if t.organization_id else "admin",
            _when(t.created_at),
            _when(t.last_used_at),
            _when(t.revoked_at) if t.revoked_at else "",
        )
    out().print(table)


@token_app.command("revoke")
def token_revoke(
    token: Annotated[str, typer.Argument(help="The token's id, or a prefix of its id or name (`zapsync token list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a stored API token: it gets 401 from its next request on, and its dashboard sessions end.

    Exit code 1 when no token matches, 2 when the prefix matches several (nothing is revoked then)."""
    from db.engine import session_scope
    from db.repositories.organizations import find_tokens, revoke_token

    async def revoke() -> tuple[list[Any], Any]:
        async with session_scope() as session:
            found = await find_tokens(session, token)
            if len(found) != 1:
                return found, None
            return found, await revoke_token(session, found[0].id)

    with expected_errors():
        ensure_migrated()
        found, revoked = run_async(revoke)
    if not found:
        fail(f"no token matches {token!r}: see `zapsync token list`", 1)
    if revoked is None:
        names = ", ".join(f"{t.id} ({t.name})" for t in found[:5]) + (" …" if len(found) > 5 else "")
        fail(f"{len(found)} tokens match {token!r}: give more of the id: {names}", 2)
    if as_json:
        emit_json(_token_json(revoked))
    else:
        out().print(f"Token [bold]{revoked.name}[/] ({revoked.id}) revoked at {_when(revoked.revoked_at)}.")


# -- instances and status ----------------------------------------------------------------------------------------


@instance_app.command("add")
def instance_add(
    instance_name: Annotated[str, typer.Argument(help="The instance's name at its gateway.")],
    org: Annotated[uuid.UUID, typer.Option("--org", help="Organization id.")],
    gateway: Annotated[str, typer.Option("--gateway", help="Configured gateway name, e.g. evolution or megaapi.")],
    as_json: JsonOpt = False,
) -> None:
    """Register an instance that already exists at a gateway, so syncs and webhooks keep its status."""
    from db.engine import session_scope
    from db.repositories.instances import register_instances

    instance_name = _require_name(instance_name, "instance")
    gateway = _require_name(gateway, "gateway")

    async def add() -> list[uuid.UUID]:
        async with session_scope() as session:
            await _check_organization(session, org)
            return await register_instances(
                session, organization_id=org, gateway=gateway, instance_names=[instance_name]
            )

    with expected_errors():
        ensure_migrated()
        ids = run_async(add)
    if not ids:
        fail(f"an instance named {instance_name!r} is already registered at gateway {gateway!r}", 1)
    configured = gateway in get_settings().gateways()
    if as_json:
        emit_json(
            {
                "id": str(ids[0]),
                "organization_id": str(org),
                "gateway": gateway,
                "instance_name": instance_name,
                "gateway_configured": configured,
            }
        )
        return
    out().print(f"Instance [bold]{instance_name}[/] registered at gateway {gateway} ({ids[0]}).")
    if not configured:
        err().print(
            f"Note: gateway {gateway!r} is not configured here; syncs report the instance unreachable "
            "until it is (EVOLUTION_API_URL, MEGA_API_HOST or ZAPSYNC_GATEWAYS)."
        )


# -- provisioning (issue 11 §1) ----------------------------------------------------------------------------------


@org_app.command("rotate-secret")
def org_rotate_secret(
    org: Annotated[uuid.UUID, typer.Argument(help="Organization id.")], as_json: JsonOpt = False
) -> None:
    """Give the organization a new webhook secret (shown once). Gateways sending the old one are refused from now on:
    instances zapsync creates get the new one."""
    from db.engine import session_scope
    from db.repositories.organizations import new_secret, set_webhook_secret

    secret = new_secret("whsec")

    async def rotate() -> bool:
        async with session_scope() as session:
            return await set_webhook_secret(session, org, secret)

    with expected_errors():
        ensure_migrated()
        if not run_async(rotate):
            fail(f"no organization {org}", 1)
    if as_json:
        emit_json({"id": str(org), "webhook_secret": secret})
        return
    out().print(
        f"New webhook secret of {org}:\n{secret}\nIt is shown only now. Update the X-Webhook-Secret header of the "
        "webhooks of instances zapsync did not create."
    )


CONNECT_EXIT_FAILED = 1
CONNECT_EXIT_TIMEOUT = 3


@instance_app.command("connect")
def instance_connect(
    org: Annotated[uuid.UUID, typer.Option("--org", help="Organization id.")],
    user: Annotated[str | None, typer.Option("--user", help="The CRM user id (instance user_<id>).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="An instance name (a number of no user).")] = None,
    gateway: Annotated[
        str | None, typer.Option("--gateway", help="Configured gateway (default: the only one).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the scan.")] = 300.0,
) -> None:
    """Create (if needed) and connect an instance, print its QR code here and wait until a phone scans it.

    The status comes back by webhook, so the API must be reachable at WEBHOOK_URL (or ZAPSYNC_API_HOST/PORT).
    Exit 0 once connected, 1 when the gateway gives up (QR limit), 3 on timeout.
    """
    import re

    from api.routes.provisioning import INSTANCE_NAME_PATTERN, USER_ID_PATTERN, USER_PREFIX, provision, webhook_base
    from core.domain import InstanceStatus
    from core.qr import qr_terminal_text
    from db.engine import session_scope
    from db.repositories.provisioning import find_instance

    if (user is None) == (name is None):
        fail("give exactly one of --user or --name", 2)
    if user is not None and not re.match(USER_ID_PATTERN, user):
        fail("--user must be 1 to 128 letters, digits, '.', '_' or '-'", 2)
    if name is not None and not re.match(INSTANCE_NAME_PATTERN, name):
        fail("--name must be 1 to 255 letters, digits, '.', '_' or '-'", 2)
    instance_name = f"{USER_PREFIX}{user}" if user is not None else str(name)
    console = out()

    async def connect() -> tuple[InstanceStatus, str | None]:
        async with session_scope() as session:
            await _check_organization(session, org)
            row, _ = await provision(
                session,
                webhook_base=webhook_base(),
                organization_id=org,
                requested_gateway=gateway,
                instance_name=instance_name,
                user_id=user,
            )
        shown: str | None = None
        deadline = time.monotonic() + timeout
        while True:
            status = InstanceStatus(row["status"])
            if status is InstanceStatus.CONNECTED:
                return status, row["phone_number"]
            if status is InstanceStatus.ERROR:
                return status, row["status_reason"]
            qr = row["qr_code"] if status is InstanceStatus.QR_PENDING else None
            if qr and qr != shown:
                shown = qr
                if qr.startswith("data:image/"):
                    console.print("The gateway gave only an image of the QR code: open it from the dashboard.")
                else:
                    console.print(qr_terminal_text(qr))
                code = f"  (or type the pairing code {row['pairing_code']})" if row["pairing_code"] else ""
                console.print(f"Scan this QR code with WhatsApp on the phone of {instance_name}{code}.")
            if time.monotonic() >= deadline:
                return status, None
            await asyncio.sleep(1.0)  # the status arrives by webhook: read the row every second
            async with session_scope() as session:
                found = await find_instance(session, row["id"])
            if found is None:
                raise NotFound(f"instance {instance_name} was deleted while waiting")
            row = found

    with expected_errors():
        ensure_migrated()
        status, detail = run_async(connect)
    if status is InstanceStatus.CONNECTED:
        console.print(f"Connected: {instance_name} is {detail or 'connected'}.")
        return
    if status is InstanceStatus.ERROR:
        fail(f"{instance_name} did not connect: {detail or 'the gateway reported an error'}", CONNECT_EXIT_FAILED)
    fail(f"{instance_name} was not scanned within {timeout:g} s (status {status}); run the command again", 3)


@instance_app.command("adopt")
def instance_adopt(
    org: OrgOpt = None,
    apply: Annotated[bool, typer.Option("--apply", help="Register them in --org (else only list them).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the instances each configured gateway has that zapsync does not track (`user_<id>` names are matched to
    their user); with --apply, register them in the organization (seed 003's migrate:whatsapp check|update)."""
    import re

    from api.routes.provisioning import USER_ID_PATTERN, USER_PREFIX
    from db.engine import session_scope
    from db.repositories.provisioning import ensure_instance, tracked_names
    from gateways.evolution import EvolutionGateway
    from gateways.registry import open_gateways

    if apply and org is None:
        fail("--apply needs --org: the organization the instances are registered in", 2)

    async def adopt() -> tuple[list[dict[str, Any]], list[str]]:
        found: list[dict[str, Any]] = []
        skipped: list[str] = []
        async with open_gateways() as clients, session_scope() as session:
            if org is not None:
                await _check_organization(session, org)
            for gateway_name, client in sorted(clients.items()):
                if not isinstance(client, EvolutionGateway):
                    skipped.append(gateway_name)
                    continue
                names = await client.list_instance_names()
                known = await tracked_names(session, gateway=gateway_name, instance_names=names)
                for instance_name in sorted(set(names) - known):
                    suffix = instance_name.removeprefix(USER_PREFIX)
                    user_id = suffix if instance_name != suffix and re.match(USER_ID_PATTERN, suffix) else None
                    registered = False
                    if apply and org is not None:
                        _, registered = await ensure_instance(
                            session,
                            organization_id=org,
                            gateway=gateway_name,
                            instance_name=instance_name,
                            user_id=user_id,
                        )
                    found.append(
                        {
                            "gateway": gateway_name,
                            "instance_name": instance_name,
                            "user_id": user_id,
                            "registered": registered,
                        }
                    )
        return found, skipped

    with expected_errors():
        ensure_migrated()
        found, skipped = run_async(adopt)
    if as_json:
        emit_json({"untracked": found, "applied": apply, "gateways_not_listable": skipped})
        return
    console = out()
    if not found:
        console.print("Every instance the gateways have is tracked.")
    else:
        table = Table("gateway", "instance", "user", "registered")
        for item in found:
            table.add_row(
                item["gateway"], item["instance_name"], item["user_id"] or "-", "yes" if item["registered"] else "no"
            )
        console.print(table)
        if not apply:
            console.print(f"{len(found)} untracked: run again with --org ORG --apply to register them.")
    for gateway_name in skipped:
        err().print(f"Note: gateway {gateway_name} cannot list its instances (its provider documents no listing).")


def _instance_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (
            str(value) if isinstance(value, uuid.UUID) else value.isoformat() if isinstance(value, datetime) else value
        )
        for key, value in row.items()
    }


async def _gateway_auth_failures(session: Any) -> dict[str, str]:
    """Gateways that refused zapsync's key in the newest sync or health check (whichever is newer), with the
    sentence naming the setting to check."""
    from core.names import MONITOR_FLOW, SYNC_FLOW
    from db.repositories.metrics import latest_reports

    reports = await latest_reports(session)
    newest = sorted(
        (r for r in (reports.get(SYNC_FLOW), reports.get(MONITOR_FLOW)) if r),
        key=lambda r: str(r.get("finished_at") or ""),
    )
    failures: dict[str, str] = {}
    for report in newest:
        for name, summary in (report.get("by_gateway") or {}).items():
            error = summary.get("auth_error") or (summary.get("error") if summary.get("auth_failed") else None)
            if error:
                failures[name] = str(error)
            else:
                failures.pop(name, None)
    return failures


@app.command("status")
def status(org: OrgOpt = None, as_json: JsonOpt = False) -> None:
    """List the instances and their stored status (the database's view; `zapsync sync --check` asks the gateways)."""
    from db.engine import session_scope
    from db.repositories.instances import list_instances

    async def load() -> tuple[list[dict[str, Any]], dict[str, str]]:
        async with session_scope() as session:
            if org is not None:
                await _check_organization(session, org)
            return await list_instances(session, organization_id=org), await _gateway_auth_failures(session)

    with expected_errors():
        ensure_migrated()
        rows, auth_failures = run_async(load)
    counts = Counter(str(r["status"]) for r in rows)
    if as_json:
        found = {"count": len(rows), "by_status": dict(counts), "instances": [_instance_json(r) for r in rows]}
        emit_json({**found, "gateway_auth_failures": auth_failures} if auth_failures else found)
        return
    console = out()
    for name, error in sorted(auth_failures.items()):
        err().print(f"[red]Authentication failed at gateway {name}:[/] {error}")
    if not rows:
        console.print("No instances registered" + (f" for organization {org}." if org else "."))
        return
    table = Table(title=None)
    for column in ("instance", "gateway", "status", "health", "last check", "observed at", "id"):
        table.add_column(column, no_wrap=True)
    style = {
        "connected": "green",
        "disconnected": "red",
        "error": "red",
        "qr_pending": "yellow",
        "connecting": "yellow",
    }
    for r in rows:
        st = str(r["status"])
        table.add_row(
            str(r["instance_name"]),
            str(r["gateway"]),
            f"[{style.get(st, 'white')}]{st}[/]",
            str(r["health"]),
            _when(r["last_checked_at"]),
            _when(r["status_observed_at"]),
            str(r["id"]),
        )
    console.print(table)
    console.print(f"{len(rows)} instances: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".")


# -- sync --------------------------------------------------------------------------------------------------------


def _print_report(report: Any, state_name: str, ui: str | None) -> None:
    console = out()
    run = f" — flow run {report.flow_run_id}" if report.flow_run_id else ""
    console.print(
        f"[bold]Status sync ({report.mode}, scope {report.scope.key})[/]{run}: {state_name} in {report.seconds:.2f} s"
    )
    if ui:
        console.print(f"Prefect UI: {ui}")
    if report.skipped:
        console.print(f"[yellow]Skipped:[/] {report.skipped}")
    counts = Table(show_header=True)
    for column in ("checked", "in sync", "drifted", "applied", "superseded", "unreachable"):
        counts.add_column(column, justify="right")
    counts.add_row(
        *(
            str(v)
            for v in (
                report.checked,
                report.in_sync,
                report.drifted,
                report.applied,
                report.superseded,
                report.unreachable,
            )
        )
    )
    console.print(counts)
    if report.changes:
        drift = Table(title="Drift", title_justify="left")
        for column in ("instance", "gateway", "database", "gateway says", "applied", "reason"):
            drift.add_column(column, no_wrap=True)
        for d in report.changes:
            drift.add_row(
                d.instance_name, d.gateway, d.db_status, d.gateway_status, "yes" if d.applied else "no", d.reason or ""
            )
        console.print(drift)
    for name, summary in sorted(report.by_gateway.items()):
        if summary.auth_error:
            console.print(f"[red]Authentication failed at gateway {name}:[/] {summary.auth_error}")
    if report.unreachable_instances:
        unreachable = Table(title="Unreachable (status left as stored)", title_justify="left")
        for column in ("instance", "gateway", "error"):
            unreachable.add_column(column)
        for u in report.unreachable_instances:
            unreachable.add_row(u.instance_name, u.gateway, u.error or "")
        console.print(unreachable)


@contextlib.contextmanager
def flow_command() -> Iterator[None]:
    """What a command that runs a flow here does first: expected errors as sentences, a migrated database, and a
    console that shows Prefect's warnings only (set before Prefect's first import; the UI still gets INFO)."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    with expected_errors():
        ensure_migrated()
        _note_ephemeral("this run uses a temporary Prefect server")
        yield


@app.command("sync")
def sync(
    check: Annotated[bool, typer.Option("--check", help="Compare only: write nothing.")] = False,
    org: OrgOpt = None,
    instance: Annotated[uuid.UUID | None, typer.Option("--instance", help="Instance id.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Confirm every connected instance live.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the sync_status flow here (a real Prefect flow run) and print its report; exit 1 if the run failed."""
    with flow_command():
        from core.reports import SyncScope
        from flows.sync_status import sync_status

        scope = SyncScope(organization_id=org, instance_id=instance)
        report = _run_flow_here(
            sync_status,
            "sync",
            as_json,
            render=_print_report,
            scope=scope,
            mode="check" if check else "apply",
            force=force,
        )
    if report.failed_gateways:
        auth = [g.auth_error for _, g in sorted(report.by_gateway.items()) if g.auth_error]
        fail(f"could not read gateway(s) {', '.join(report.failed_gateways)}" + "".join(f"; {a}" for a in auth), 1)


# -- maintenance and import -------------------------------------------------------------------------------------


def _print_markdown(report: Any, _state_name: str, ui: str | None) -> None:
    from rich.markdown import Markdown

    out().print(Markdown(report.to_markdown()))
    if ui:
        out().print(f"Prefect UI: {ui}")


def _run_flow_here(
    flow: Any,
    title: str,
    as_json: bool,
    *,
    render: Callable[[Any, str, str | None], None] = _print_markdown,
    **parameters: Any,
) -> Any:
    """Run a flow in this process (a real Prefect flow run), print its report and return it; fail with a sentence."""
    from flows.runs import ui_url

    async def go() -> tuple[Any, Any]:
        state = await flow(**parameters, return_state=True)
        report = await state.aresult(raise_on_failure=False) if state.is_completed() else None
        return state, report

    state, report = run_async(go)
    run_id = getattr(state, "state_details", None) and state.state_details.flow_run_id
    ui = ui_url(run_id) if run_id else None
    if report is None or not hasattr(report, "to_markdown"):
        fail(f"the {title} flow run {run_id or ''} ended {state.name}: {state.message or 'no message'}", 1)
    if as_json:
        emit_json({"state": state.name, "ui_url": ui, **report.model_dump(mode="json")})
    else:
        render(report, state.name, ui)
    return report


@app.command("import")
def import_(
    instance: Annotated[uuid.UUID, typer.Argument(help="Instance id (see `zapsync status`).")],
    history_days: Annotated[int | None, typer.Option("--history-days", min=1, help="Only this many days.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Start over instead of resuming a checkpoint.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import an instance's chats, contacts and messages from its gateway (idempotent, resumable).

    The import is queued like any other and drained here, in a real flow run (or by a worker that took it first).
    """
    with flow_command():
        from core.reports import ImportReport
        from flows.import_conversations import import_queued_now

        async def go() -> tuple[ImportReport | None, str | None, str]:
            item = await import_queued_now(instance, trigger="cli", history_days=history_days, full=full)
            report = ImportReport.model_validate(item.result) if item.result else None
            return report, item.last_error, {"done": "Completed", "failed": "Failed"}.get(item.state, item.state)

        report, error, state = run_async(go)
    if report is None:
        fail(f"the import ended {state}: {error or 'no report'}", 1)
    if as_json:
        emit_json({"state": state, **report.model_dump(mode="json")})
    else:
        _print_markdown(report, state, None)
    if report.outcome == "failed" or (
        report.outcome == "skipped" and report.skipped and report.skipped.startswith("no instance")
    ):
        fail(f"import {report.outcome}: {report.error or report.skipped}", 1)


@app.command("worker")
def worker() -> None:
    """Drain the work queue (imports on connect) in this process until Ctrl-C: a warm worker, woken by each enqueue.

    Run one per machine next to the Prefect workers; they share the queue (part of `zapsync up`)."""
    with expected_errors():
        ensure_migrated()
    _note_ephemeral("drain runs use a temporary Prefect server")
    from deployments.worker import main as run_worker

    run_worker()


@app.command("cleanup-sessions")
def cleanup_sessions(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    org: OrgOpt = None,
    retention_days: Annotated[
        int | None, typer.Option("--retention-days", min=1, help="Override the organizations' setting.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete ended WhatsApp sessions idle past their retention (and prune old webhook and live events)."""
    with flow_command():
        from flows.cleanup_sessions import cleanup_sessions as flow

        _run_flow_here(flow, "cleanup", as_json, organization_id=org, retention_days=retention_days, dry_run=dry_run)


@app.command("close-inactive")
def close_inactive(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be closed; close nothing.")] = False,
    org: OrgOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close open conversations idle past their organization's `inactivity_hours`."""
    with flow_command():
        from flows.close_inactive import close_inactive_conversations

        _run_flow_here(close_inactive_conversations, "close-inactive", as_json, organization_id=org, dry_run=dry_run)


# -- webhooks replay (issue 13 §5) --------------------------------------------------------------------------------


def parse_since(value: str) -> datetime:
    """``--since``: an ISO 8601 date or time (UTC when it names no zone) or an age such as ``30m``, ``2h``, ``7d``."""
    import re
    from datetime import UTC, timedelta

    text = value.strip()
    age = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[age.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(age.group(1))})
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"--since {value!r} is neither an ISO 8601 time (2026-01-31T12:00Z) nor an age (30m, 2h, 7d)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@webhooks_app.command("replay")
def webhooks_replay(
    since: Annotated[
        str | None,
        typer.Option("--since", help="Deliveries received since then: ISO 8601 (UTC by default) or an age (2h, 7d)."),
    ] = None,
    event: Annotated[str | None, typer.Option("--event", help="Only this event (messages.upsert, message …).")] = None,
    org: OrgOpt = None,
    spool: Annotated[
        str | None,
        typer.Option("--spool", help="Replay a spool journal (folder or segment) copied from another machine."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply stored webhook deliveries again through the normal path (idempotent: what is already applied is a
    duplicate): inbox rows received since --since, or the records of a copied spool journal (--spool)."""
    from pathlib import Path

    from api.replay import OUTCOMES, replay_inbox, replay_journal

    with expected_errors():
        start = parse_since(since) if since is not None else None
        if start is None and spool is None:
            fail("say which deliveries to replay: --since TIME (inbox rows) or --spool PATH (a copied journal)", 2)
        if spool is not None and not Path(spool).exists():
            fail(f"no spool journal at {spool}", 2)
        ensure_migrated()

        async def replay() -> Counter[str]:
            if org is not None:
                from db.engine import session_scope

                async with session_scope() as session:
                    await _check_organization(session, org)
            if spool is not None:
                return await replay_journal(Path(spool), since=start, event=event, organization_id=org)
            assert start is not None
            return await replay_inbox(since=start, event=event, organization_id=org)

        counts = run_async(replay)
    if as_json:
        emit_json(dict(counts))
    else:
        shown = [f"{counts[o]} {o}" for o in OUTCOMES] + [f"{n} {o}" for o, n in counts.items() if o not in OUTCOMES]
        source = f"spool {spool}" if spool else "the inbox"
        out().print(f"Replayed {sum(counts.values())} deliveries from {source}: {', '.join(shown)}.")
    if counts["failed"]:
        raise typer.Exit(1)


# -- processes ---------------------------------------------------------------------------------------------------


@app.command("simulator")
def simulator(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8081,
    instances: Annotated[int, typer.Option(min=0, max=100_000, help="Instances to seed.")] = 20,
    provider: Annotated[SimProvider, typer.Option(help="Provider of the seeded instances.")] = SimProvider.EVOLUTION,
    prefix: Annotated[str, typer.Option(help="Seeded instances are named PREFIX-00001…")] = "sim",
    demo: Annotated[bool, typer.Option("--demo", help="Change instances now and then and send webhooks.")] = False,
    webhook_url: Annotated[str | None, typer.Option(help="Where demo webhooks are POSTed.")] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(
            help="Sent in the X-Webhook-Secret header.",
            envvar="ZAPSYNC_SIM_WEBHOOK_SECRET",
            show_envvar=True,
        ),
    ] = None,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between demo ticks.")] = 5.0,
    flap_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of instances changed per tick.")] = 0.1,
) -> None:
    """Run the gateway simulator (Evolution API v2 and MegaAPI contracts) with seeded instances."""
    import asyncio

    from core.logs import configure_logging
    from gateways.simulator.state import SimulatorConfig
    from zapsync.demo import run_simulator

    with expected_errors():
        check_ports(host, [(port, "simulator", "--port")])
    if demo and not webhook_url:
        err().print("Note: no --webhook-url: the demo changes states but sends no webhooks.")
    configure_logging("WARNING")
    keys = SimulatorConfig()

    def started(url: str) -> None:
        out().print(
            f"Simulator on {url}: {instances} {provider.value} instances ({prefix}-00001…), "
            f"Evolution apikey {keys.evolution_api_key}, MegaAPI token {keys.megaapi_token}"
            + (f"; demo ticks every {interval:g} s" if demo else "")
            + ". Ctrl-C stops it."
        )

    _quiet_signals()
    ticks = asyncio.run(
        run_simulator(
            host=host,
            port=port,
            instances=instances,
            provider=provider.value,
            prefix=prefix,
            demo=demo,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            interval_s=interval,
            flap_rate=flap_rate,
            on_started=started,
        )
    )
    out().print(f"Simulator stopped{f' after {ticks} demo ticks' if demo else ''}.")


@app.command("api")
def api(
    host: Annotated[str | None, typer.Option(help="Interface (default ZAPSYNC_API_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default ZAPSYNC_API_PORT or 8000).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="API processes sharing the port (each with its own pool and webhook group commit).",
        ),
    ] = 1,
) -> None:
    """Run the HTTP API with uvicorn (refuses to start on an unmigrated database)."""
    import uvicorn

    settings = get_settings()
    host = host or settings.api_host
    port = port or settings.api_port
    with expected_errors():
        check_ports(host, [(port, "API", "--port")])
        ensure_migrated()
    from core.logs import configure_logging

    configure_logging("INFO")
    _quiet_signals()
    options: dict[str, Any] = {"host": host, "port": port, **api_server_options()}
    if workers > 1:  # uvicorn's supervisor binds once and starts each worker from an import string
        # A worker importing the app on a busy machine can take longer than uvicorn's 5 s health check.
        uvicorn.run(
            "zapsync.cli:api_worker_app", factory=True, workers=workers, timeout_worker_healthcheck=30, **options
        )
        return
    from api.main import create_app

    uvicorn.run(create_app(), **options)


def api_worker_app() -> Any:
    """The API app of one `zapsync api --workers N` process, logging as the single-process API does."""
    from api.main import create_app
    from core.logs import configure_logging

    configure_logging("INFO")
    return create_app()


API_KEEP_ALIVE_S = 120
"""Seconds the API keeps an idle keep-alive connection open: longer than any gateway's client keeps one idle
(httpx and Node's agent 5 s, Go 90 s). uvicorn's default of 5 s equals those clients' idle expiry, so under a
burst with lulls the server closed connections at the very moment clients reused them: the request sent on a
socket being closed got a TCP reset and no response (issue 13 §7). The client must be the side that closes."""
API_BACKLOG = 2048
"""Pending connections the kernel queues before uvicorn accepts them (a burst opens many at once)."""


def api_server_options() -> dict[str, Any]:
    """The uvicorn options `zapsync api` (and so `zapsync up`) serves the API with, beside host, port and app."""
    return {
        "log_config": access_log_config(),
        "proxy_headers": False,
        "server_header": False,
        "timeout_keep_alive": API_KEEP_ALIVE_S,
        "backlog": API_BACKLOG,
    }


@app.command("serve")
def serve(
    wait: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to wait for the Prefect API to answer before giving up (it may still be starting).",
        ),
    ] = 0,
) -> None:
    """Serve the deployments (schedules and on-demand runs) from this process until Ctrl-C."""
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", DEFAULT_POLL_FREQUENCY)
    with expected_errors():
        ensure_migrated()
    _note_ephemeral("serving against a temporary Prefect server")
    from deployments.serve import serve_deployments

    api_url = os.environ.get("PREFECT_API_URL")
    if api_url and wait:
        deadline = time.monotonic() + wait
        with expected_errors():  # Ctrl-C while waiting
            while not prefect_healthy(api_url, timeout=1.0):
                if time.monotonic() > deadline:
                    fail(f"the Prefect API at {api_url} did not answer within {wait:g} s", 2)
                time.sleep(0.25)
    out().print("Serving the deployments (schedules stay on when this stops); Ctrl-C stops.")
    serve_deployments()


@app.command("up")
def up(
    demo: Annotated[
        bool | None,
        typer.Option(
            "--demo/--no-demo",
            help="Run the simulator with a demo organization (default: when no gateway is set).",
            show_default=False,
        ),
    ] = None,
    api_port: Annotated[int, typer.Option(min=1, max=65535, help="API port.")] = 8000,
    prefect_port: Annotated[int, typer.Option(min=1, max=65535, help="Local Prefect server port.")] = 4200,
    sim_port: Annotated[int, typer.Option(min=1, max=65535, help="Simulator port (demo mode).")] = 8081,
) -> None:
    """Run the whole local stack: PostgreSQL, Prefect server, simulator (demo), API and flow runner."""
    code = run_stack(
        StackOptions(demo=demo, api_port=api_port, prefect_port=prefect_port, sim_port=sim_port), out(), err()
    )
    raise typer.Exit(code)


if __name__ == "__main__":
    app(prog_name="zapsync")
