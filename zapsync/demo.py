"""Demo mode: a simulated gateway whose instances come and go, and a demo organization that receives its webhooks.

`zapsync up` (demo mode) calls :func:`ensure_demo_organization` once per start: the organization, its token and its
webhook secret are created the first time and kept in ``$ZAPSYNC_HOME/demo.json`` (mode 0600), so a restart reuses
them. `zapsync simulator` runs :func:`run_simulator`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateways.simulator.state import ProviderName

DEMO_FILE = "demo.json"
DEMO_ORGANIZATION_NAME = "Demo"
DEMO_GATEWAY = "evolution"
DEMO_PREFIX = "demo"
DEMO_INSTANCES = 20
DEMO_FLAP_RATE = 0.1
"""Share of the instances that change state at each demo tick (2 of 20 every 5 s)."""
WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"

log = logging.getLogger("zapsync.demo")


def instance_names(count: int = DEMO_INSTANCES, prefix: str = DEMO_PREFIX) -> list[str]:
    """The names :meth:`SimulatorState.seed_instances` gives ``count`` instances with ``prefix``."""
    return [f"{prefix}-{i:05d}" for i in range(1, count + 1)]


@dataclass(frozen=True)
class DemoOrganization:
    """The demo organization and the credentials it was created with."""

    organization_id: uuid.UUID
    webhook_secret: str
    token: str
    instance_names: list[str]
    created: bool
    """True when this call created the organization (first start, or its row was gone)."""
    registered: int
    """Instance rows inserted by this call (0 when they were all there already)."""


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _read_demo_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def ensure_demo_organization(
    home: Path, *, count: int = DEMO_INSTANCES, prefix: str = DEMO_PREFIX, gateway: str = DEMO_GATEWAY
) -> DemoOrganization:
    """Create the demo organization, its token and its instances once; later calls reuse ``demo.json``.

    Idempotent: a missing organization (a wiped database) is created again, a missing token is stored again with
    the recorded value, instance rows that exist are left alone.
    """
    from db.engine import session_scope
    from db.repositories.instances import register_instances
    from db.repositories.organizations import (
        create_organization,
        create_token,
        new_secret,
        organization_exists,
        principal_for_token,
    )

    path = home / DEMO_FILE
    recorded = _read_demo_file(path)
    names = instance_names(count, prefix)
    created = False
    async with session_scope() as session:
        org_id: uuid.UUID | None = None
        try:
            org_id = uuid.UUID(str(recorded["organization_id"]))
            secret, token = str(recorded["webhook_secret"]), str(recorded["token"])
        except (KeyError, ValueError):
            secret, token = new_secret("whsec"), new_secret("zs")
        if org_id is None or not await organization_exists(session, org_id):
            org = await create_organization(session, name=DEMO_ORGANIZATION_NAME, webhook_secret=secret)
            org_id, created = org.id, True
        principal = await principal_for_token(session, token)
        if principal is None or principal.organization_id != org_id:
            if principal is not None:  # the recorded token belongs elsewhere: never reuse it
                token = new_secret("zs")
            await create_token(session, name="demo", organization_id=org_id, token=token)
        inserted = await register_instances(session, organization_id=org_id, gateway=gateway, instance_names=names)
    write_private(
        path,
        json.dumps(
            {
                "organization_id": str(org_id),
                "webhook_secret": secret,
                "token": token,
                "gateway": gateway,
                "instances": len(names),
                "prefix": prefix,
            },
            indent=2,
        ),
    )
    return DemoOrganization(org_id, secret, token, names, created, len(inserted))


async def run_simulator(
    *,
    host: str,
    port: int,
    instances: int,
    provider: ProviderName,
    prefix: str = "sim",
    demo: bool = False,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    interval_s: float = 5.0,
    flap_rate: float = DEMO_FLAP_RATE,
    on_started: Callable[[str], None] | None = None,
) -> int:
    """Serve the gateway simulator with ``instances`` seeded instances until uvicorn is told to stop.

    In demo mode the instances change every ``interval_s`` and the changes are POSTed to ``webhook_url`` with the
    secret in the ``X-Webhook-Secret`` header. Returns the number of demo ticks.
    """
    import uvicorn

    from gateways.simulator import SimulatorState, WebhookEmitter, create_app, run_demo
    from gateways.simulator.history import HistorySpec

    state = SimulatorState()
    if instances:
        state.seed_instances(instances, provider=provider, prefix=prefix)
    if demo:
        # Chats with history, so that an import on connect has something to bring in (groups, a broadcast and
        # an empty chat show what it skips).
        state.configure(
            flap_rate=flap_rate,
            history=HistorySpec(
                chats=6,
                messages_per_chat=8,
                group_chats=1,
                broadcast_messages=2,
                empty_chats=1,
                spacing_s=900,
            ),
        )
    base_url = f"http://{host}:{port}"
    config = uvicorn.Config(
        create_app(state), host=host, port=port, log_level="warning", access_log=False, lifespan="off"
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_started is not None:
                on_started(base_url)

    server = Server(config)
    stop = asyncio.Event()
    emitter: WebhookEmitter | None = None
    if demo and webhook_url:
        headers = {WEBHOOK_SECRET_HEADER: webhook_secret} if webhook_secret else {}
        emitter = WebhookEmitter(
            state,
            evolution_url=webhook_url if provider == "evolution" else None,
            megaapi_url=webhook_url if provider == "megaapi" else None,
            headers=headers,
            megaapi_headers=headers,
            server_url=base_url,
        )
    demo_task: asyncio.Task[int] | None = None
    if demo:
        demo_task = asyncio.create_task(run_demo(state, emitter, interval_s=interval_s, stop=stop))

    try:
        await server.serve()
    finally:
        stop.set()
    return await demo_task if demo_task is not None else 0
