"""Provisioning (seed 003): a WhatsApp instance per CRM user (`user_<user_id>`) or by name, created at its gateway
with zapsync's webhook already in place, connected with a live QR code, reconnected, logged out and deleted.

Idempotent: the row is decided by one INSERT … ON CONFLICT (a second request waits for the first's transaction and
finds the row), "create at the gateway" runs under a PostgreSQL advisory lock per instance, and a name the gateway
already has counts as created. Every status these routes observe is written with source `api` (history row and
`instance.status` event); every QR code is announced as `instance.qr`. Another organization's user or instance
answers 404.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Path, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import PrincipalDep, SessionDep, scoped_organization
from core.domain import InstanceStatus, StatusWrite, WorkKind
from core.errors import (
    Conflict,
    GatewayInstanceExists,
    GatewayNotFound,
    GatewayRequestError,
    InvalidInput,
    NotFound,
)
from core.events import qr_event, status_change_events
from core.policies.health import reconnect_method
from core.qr import qr_image_url
from core.settings import get_settings
from db.repositories.instances import apply_status_writes
from db.repositories.live_events import publish
from db.repositories.organizations import Principal, organization_exists, webhook_secret
from db.repositories.provisioning import (
    delete_instance_row,
    ensure_instance,
    find_instance,
    find_user_instance,
    lock_gateway_instance,
    set_pairing_code,
)
from gateways.base import Gateway
from gateways.registry import client_class, open_gateways
from tasks.import_requests import enqueue_connect_imports

router = APIRouter(tags=["provisioning"])


USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""A CRM user id: up to 128 safe characters (the column's size), so `user_<id>` fits an instance name (255)."""
INSTANCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"
USER_PREFIX = "user_"
LOGGED_OUT_BY_API = "logged out through the API"

UserId = Annotated[str, Path(pattern=USER_ID_PATTERN, max_length=128, description="The CRM's user id.")]
OrganizationQuery = Annotated[uuid.UUID | None, Query(description="With an admin token: the organization acted for.")]


class ConnectRequest(BaseModel):
    """Body of `POST /users/{user_id}/whatsapp/connect` (optional)."""

    gateway: str | None = Field(
        default=None, description="A configured gateway; default: the only one, else ZAPSYNC_DEFAULT_GATEWAY."
    )
    organization_id: uuid.UUID | None = Field(default=None, description="With an admin token: the organization.")


class CreateInstanceRequest(ConnectRequest):
    """Body of `POST /instances`: a number that belongs to no user."""

    instance_name: str = Field(pattern=INSTANCE_NAME_PATTERN, max_length=255)


class WhatsAppConnection(BaseModel):
    """An instance's connection as a screen shows it: its status, and its QR code while one waits to be scanned."""

    instance_id: uuid.UUID
    instance_name: str
    gateway: str
    user_id: str | None
    status: InstanceStatus
    status_reason: str | None
    phone_number: str | None
    qr_code: str | None = Field(description="The raw QR string (a gateway that gives only an image: that image).")
    qr_image: str | None = Field(description="The QR code as a PNG data URL.")
    pairing_code: str | None


class Removal(BaseModel):
    """What `DELETE` did."""

    instance_id: uuid.UUID
    instance_name: str
    logged_out: bool
    deleted_at_gateway: bool
    row_deleted: bool
    status: InstanceStatus | None


def connection_view(row: dict[str, Any]) -> WhatsAppConnection:
    """The response for a row: QR code and pairing code only while the status is `qr_pending`."""
    pending = row["status"] == InstanceStatus.QR_PENDING and row["qr_code"]
    return WhatsAppConnection(
        instance_id=row["id"],
        instance_name=row["instance_name"],
        gateway=row["gateway"],
        user_id=row["user_id"],
        status=InstanceStatus(row["status"]),
        status_reason=row["status_reason"],
        phone_number=row["phone_number"],
        qr_code=row["qr_code"] if pending else None,
        qr_image=qr_image_url(row["qr_code"]) if pending else None,
        pairing_code=row["pairing_code"] if pending else None,
    )


def choose_gateway(requested: str | None) -> str:
    """The gateway a new instance goes to: the one named, the only one configured, else ZAPSYNC_DEFAULT_GATEWAY."""
    settings = get_settings()
    configured = sorted(settings.gateways())
    if requested is not None:
        if requested not in configured:
            raise InvalidInput(
                f"no gateway {requested!r} is configured (configured: {', '.join(configured) or 'none'})"
            )
        return requested
    if len(configured) == 1:
        return configured[0]
    if not configured:
        raise InvalidInput("no gateway is configured: set EVOLUTION_API_URL (or MEGA_API_HOST, ZAPSYNC_GATEWAYS)")
    default = settings.default_gateway
    if default in configured:
        return str(default)
    if default:
        raise InvalidInput(f"ZAPSYNC_DEFAULT_GATEWAY names {default!r}, which is not configured")
    raise InvalidInput(
        f"several gateways are configured ({', '.join(configured)}): name one in 'gateway' "
        "or set ZAPSYNC_DEFAULT_GATEWAY"
    )


async def acting_organization(session: AsyncSession, principal: Principal, requested: uuid.UUID | None) -> uuid.UUID:
    """The organization a create acts for: the token's own, or the one an admin names (which must exist)."""
    organization_id = scoped_organization(principal, requested)
    if organization_id is None:
        raise InvalidInput("an admin token must name the organization: pass 'organization_id'")
    if principal.is_admin and not await organization_exists(session, organization_id):
        raise NotFound(f"no organization {organization_id}")
    return organization_id


def webhook_base(request: Request | None = None) -> str:
    """Where gateways reach zapsync: WEBHOOK_URL, else this API's own URL (else the configured API address)."""
    settings = get_settings()
    if settings.webhook_url:
        return settings.webhook_url.rstrip("/")
    if request is not None:
        return str(request.base_url).rstrip("/")
    return f"http://{settings.api_host}:{settings.api_port}"


def webhook_target(base: str, gateway: str, organization_id: uuid.UUID) -> str:
    """The organization's receiver for ``gateway``'s provider: `{base}/webhooks/{provider}/{organization_id}`."""
    provider = get_settings().gateways()[gateway].provider
    return f"{base}/webhooks/{provider}/{organization_id}"


async def _record(
    session: AsyncSession,
    row: dict[str, Any],
    status: InstanceStatus,
    *,
    reason: str | None = None,
    qr_code: str | None = None,
    pairing_code: str | None = None,
    logged_out: bool = False,
    phone_number: str | None = None,
) -> int:
    """Write what the gateway just said (source `api`), announce the transition and any QR code, queue the import of
    an instance that became connected — in the request's transaction."""
    write = StatusWrite(
        instance_id=row["id"],
        status=status,
        observed_at=datetime.now(UTC),
        reason=reason,
        qr_code=qr_code,
        logged_out=logged_out,
        phone_number=phone_number,
    )
    changes = await apply_status_writes(session, [write], source="api")
    events = status_change_events(changes, source="api")
    if qr_code is not None:
        await set_pairing_code(session, row["id"], pairing_code)
        events.append(
            qr_event(
                row["organization_id"],
                instance_id=row["id"],
                instance_name=row["instance_name"],
                qr_code=qr_code,
                pairing_code=pairing_code,
            )
        )
    provider = get_settings().gateways()[row["gateway"]].provider
    queued = []
    if client_class(provider).supports_history:
        queued = await enqueue_connect_imports(session, changes, trigger="connect", import_gateways=[row["gateway"]])
    await publish(events, session=session)
    return len(queued)


async def _gateway_of(row: dict[str, Any]) -> str:
    gateway = str(row["gateway"])
    if gateway not in get_settings().gateways():
        raise Conflict(f"instance {row['instance_name']} is at gateway {gateway!r}, which is not configured here")
    return gateway


async def provision(
    session: AsyncSession,
    *,
    webhook_base: str,
    organization_id: uuid.UUID,
    requested_gateway: str | None,
    instance_name: str,
    user_id: str | None,
) -> tuple[dict[str, Any], int]:
    """Ensure the row and the instance at its gateway, connect it, record what the gateway said: (row, imports
    queued)."""
    secret = await webhook_secret(session, organization_id)
    if secret is None:
        raise Conflict(
            f"organization {organization_id} has no webhook secret zapsync can give a gateway (it predates sealed "
            f"secrets): run `zapsync org rotate-secret {organization_id}` and try again"
        )
    existing = (
        await find_user_instance(session, user_id) if user_id is not None else None
    )  # a user keeps the gateway their instance is at
    gateway_name = str(existing["gateway"]) if existing else choose_gateway(requested_gateway)
    row, inserted = await ensure_instance(
        session, organization_id=organization_id, gateway=gateway_name, instance_name=instance_name, user_id=user_id
    )
    if row is None or row["organization_id"] != organization_id:
        what = f"user {user_id}" if user_id is not None else f"instance {instance_name}"
        raise NotFound(f"no WhatsApp instance for {what} in this organization")
    gateway_name = await _gateway_of(row)
    if requested_gateway is not None and requested_gateway != gateway_name:
        raise Conflict(
            f"{row['instance_name']} is at gateway {gateway_name!r}: it cannot move to {requested_gateway!r}"
        )
    async with open_gateways({gateway_name}) as clients:
        gateway = clients[gateway_name]
        result = None
        if not inserted:
            try:
                result = await gateway.connect(row["instance_name"])
            except GatewayNotFound:
                result = None  # tracked here, missing at the gateway: create it
        if result is None:
            await lock_gateway_instance(session, gateway=gateway_name, instance_name=row["instance_name"])
            try:
                result = await gateway.create_instance(
                    row["instance_name"],
                    webhook_url=webhook_target(webhook_base, gateway_name, organization_id),
                    webhook_headers={"X-Webhook-Secret": secret},
                )
            except GatewayInstanceExists:  # another replica created it first
                result = await gateway.connect(row["instance_name"])
    queued = await _record(
        session,
        row,
        result.status,
        reason=result.reason,
        qr_code=result.qr_code,
        pairing_code=result.pairing_code,
    )
    found = await find_instance(session, row["id"])
    assert found is not None
    return found, queued


async def reconnect(session: AsyncSession, row: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Reconnect through the gateway: `connect` a closed session (new QR code when unpaired), `restart` a live one
    (falling back to `connect` when the gateway says the session is closed after all)."""
    gateway_name = await _gateway_of(row)
    async with open_gateways({gateway_name}) as clients:
        gateway: Gateway = clients[gateway_name]
        method = reconnect_method(gateway.provider, str(row["status"]))
        result = None
        if method == "restart":
            try:
                await gateway.restart(row["instance_name"])
            except GatewayNotFound:
                raise
            except GatewayRequestError:
                method = "connect"
        if method == "connect":
            result = await gateway.connect(row["instance_name"])
    queued = 0
    if result is not None:
        queued = await _record(
            session, row, result.status, reason=result.reason, qr_code=result.qr_code, pairing_code=result.pairing_code
        )
    found = await find_instance(session, row["id"])
    assert found is not None
    return found, queued


async def log_out(session: AsyncSession, gateway: Gateway, row: dict[str, Any]) -> bool:
    """Log the instance out at its gateway (already logged out or missing there counts as done); record it."""
    try:
        await gateway.logout(row["instance_name"])
        done = True
    except GatewayNotFound:
        done = False
    except GatewayRequestError as exc:
        if exc.upstream_status != 400:  # 400: the session was not open (Evolution, MegaAPI)
            raise
        done = False
    await _record(session, row, InstanceStatus.DISCONNECTED, reason=LOGGED_OUT_BY_API, logged_out=True)
    return done


async def remove(
    session: AsyncSession, row: dict[str, Any], *, logout: bool, at_gateway: bool, row_too: bool
) -> Removal:
    """Log out and/or delete at the gateway, then delete the row when asked."""
    gateway_name = await _gateway_of(row)
    logged_out = deleted = False
    async with open_gateways({gateway_name}) as clients:
        gateway = clients[gateway_name]
        if at_gateway:
            try:
                await gateway.delete_instance(row["instance_name"])
                deleted = True
            except GatewayNotFound:
                deleted = False
        elif logout:
            logged_out = await log_out(session, gateway, row)
    status: InstanceStatus | None = None
    if row_too:
        await delete_instance_row(session, row["id"])
    else:
        if at_gateway:
            await _record(session, row, InstanceStatus.DISCONNECTED, reason="deleted at the gateway", logged_out=True)
        found = await find_instance(session, row["id"])
        status = InstanceStatus(found["status"]) if found else None
    return Removal(
        instance_id=row["id"],
        instance_name=row["instance_name"],
        logged_out=logged_out or deleted,
        deleted_at_gateway=deleted,
        row_deleted=row_too,
        status=status,
    )


def _wake_imports(request: Request, background: BackgroundTasks, queued: int) -> None:
    """After the response (and the commit): make sure an import queued by a connection gets drained."""
    waker = getattr(request.app.state, "waker", None)
    if waker is None or not queued:
        return

    async def wake() -> None:
        waker.wake(WorkKind.IMPORT)

    background.add_task(wake)


async def _user_row(
    session: AsyncSession, principal: Principal, user_id: str, organization_id: uuid.UUID | None
) -> dict[str, Any]:
    scope = scoped_organization(principal, organization_id)
    row = await find_user_instance(session, user_id, organization_id=scope)
    if row is None:
        raise NotFound(f"no WhatsApp instance for user {user_id}")
    return row


async def _instance_row(session: AsyncSession, principal: Principal, instance_id: uuid.UUID) -> dict[str, Any]:
    row = await find_instance(session, instance_id, organization_id=principal.organization_id)
    if row is None:
        raise NotFound(f"no instance {instance_id}")
    return row


# -- per user ----------------------------------------------------------------------------------------------------


@router.post("/users/{user_id}/whatsapp/connect", response_model=WhatsAppConnection)
async def connect_user(
    user_id: UserId,
    request: Request,
    background: BackgroundTasks,
    session: SessionDep,
    principal: PrincipalDep,
    body: ConnectRequest | None = None,
    organization_id: OrganizationQuery = None,
) -> WhatsAppConnection:
    """Ensure the user's `user_<user_id>` instance (here and at the gateway, with zapsync's webhook), connect it and
    return its status with the QR code to scan. Safe to repeat: one row, one gateway instance."""
    body = body or ConnectRequest()
    org = await acting_organization(session, principal, body.organization_id or organization_id)
    row, queued = await provision(
        session,
        webhook_base=webhook_base(request),
        organization_id=org,
        requested_gateway=body.gateway,
        instance_name=f"{USER_PREFIX}{user_id}",
        user_id=user_id,
    )
    _wake_imports(request, background, queued)
    return connection_view(row)


@router.get("/users/{user_id}/whatsapp", response_model=WhatsAppConnection)
async def read_user_connection(
    user_id: UserId, session: SessionDep, principal: PrincipalDep, organization_id: OrganizationQuery = None
) -> WhatsAppConnection:
    """The user's instance: status, phone number, and the QR code while one waits to be scanned."""
    return connection_view(await _user_row(session, principal, user_id, organization_id))


@router.post("/users/{user_id}/whatsapp/reconnect", response_model=WhatsAppConnection)
async def reconnect_user(
    user_id: UserId,
    request: Request,
    background: BackgroundTasks,
    session: SessionDep,
    principal: PrincipalDep,
    organization_id: OrganizationQuery = None,
) -> WhatsAppConnection:
    """Reconnect the user's instance (a new QR code when the session needs one)."""
    row, queued = await reconnect(session, await _user_row(session, principal, user_id, organization_id))
    _wake_imports(request, background, queued)
    return connection_view(row)


@router.delete("/users/{user_id}/whatsapp", response_model=Removal)
async def disconnect_user(
    user_id: UserId,
    session: SessionDep,
    principal: PrincipalDep,
    delete: bool = Query(default=False, description="Also delete the instance at the gateway and its row here."),
    organization_id: OrganizationQuery = None,
) -> Removal:
    """Log the user's number out; with `delete=true` also delete the instance at the gateway and here."""
    row = await _user_row(session, principal, user_id, organization_id)
    return await remove(session, row, logout=True, at_gateway=delete, row_too=delete)


# -- numbers that belong to no user ------------------------------------------------------------------------------


@router.post("/instances", response_model=WhatsAppConnection)
async def create_instance(
    body: CreateInstanceRequest,
    request: Request,
    background: BackgroundTasks,
    session: SessionDep,
    principal: PrincipalDep,
) -> WhatsAppConnection:
    """Ensure an instance by name (here and at the gateway, with zapsync's webhook) and connect it. Idempotent."""
    org = await acting_organization(session, principal, body.organization_id)
    row, queued = await provision(
        session,
        webhook_base=webhook_base(request),
        organization_id=org,
        requested_gateway=body.gateway,
        instance_name=body.instance_name,
        user_id=None,
    )
    _wake_imports(request, background, queued)
    return connection_view(row)


@router.get("/instances/{instance_id}/qr", response_model=WhatsAppConnection)
async def read_qr(instance_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> WhatsAppConnection:
    """The instance's status and its QR code while one waits to be scanned."""
    return connection_view(await _instance_row(session, principal, instance_id))


@router.post("/instances/{instance_id}/logout", response_model=WhatsAppConnection)
async def logout_instance(instance_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> WhatsAppConnection:
    """Log the number out of WhatsApp (a new QR scan connects it again)."""
    row = await _instance_row(session, principal, instance_id)
    await remove(session, row, logout=True, at_gateway=False, row_too=False)
    found = await find_instance(session, instance_id)
    assert found is not None
    return connection_view(found)


@router.post("/instances/{instance_id}/restart", response_model=WhatsAppConnection)
async def restart_instance(
    instance_id: uuid.UUID,
    request: Request,
    background: BackgroundTasks,
    session: SessionDep,
    principal: PrincipalDep,
) -> WhatsAppConnection:
    """Reconnect now: restart a live session, connect a closed one (a new QR code when it needs one)."""
    row, queued = await reconnect(session, await _instance_row(session, principal, instance_id))
    _wake_imports(request, background, queued)
    return connection_view(row)


@router.delete("/instances/{instance_id}", response_model=Removal)
async def delete_instance(
    instance_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    delete_at_gateway: bool = Query(default=False, description="Also delete the instance at its gateway."),
) -> Removal:
    """Stop tracking the instance (its row and everything imported for it); `delete_at_gateway=true` deletes it
    there too."""
    row = await _instance_row(session, principal, instance_id)
    return await remove(session, row, logout=False, at_gateway=delete_at_gateway, row_too=True)
