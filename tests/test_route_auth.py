"""Isolation by construction (issue 13 §1): every route of the application, tried with no token, a malformed
Authorization header, a wrong token, a revoked token, another organization's token, the owner's token and the admin
token, against the outcome its class declares in ONE table (:data:`ROUTES`). A route missing from the table fails the
test, so a new route cannot ship undeclared; another organization's token never sees the owner's rows.

Also here: token revocation (admin route and `zapsync token revoke`), the dashboard's server-side sessions, and
`/metrics` behind a token.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from prefect import flow
from sqlalchemy import text

from db.engine import session_scope
from db.repositories.import_runs import import_request, request_imports
from db.repositories.organizations import create_token
from tests.factories import make_instance, make_organization
from tests.maintenance_rows import add_conversation

ADMIN_TOKEN = "test-admin-token"
log = logging.getLogger("tests.route_auth")

# -- the table -----------------------------------------------------------------------------------------------------
#
# Outcomes, per case:
#   401       status 401
#   403       status 403
#   hidden    403 or 404, and none of the owner's identifiers in the body (beyond those the caller put in the URL)
#   clean     answered (< 500, not 401/403) with none of the owner's identifiers in the body
#   ok        2xx
#   reached   authentication passed: < 500 and not 401/403 (the handler may refuse the bare request, e.g. 422)
#   login     200 with the dashboard's sign-in form
#   redirect  303
#   skip      not sent: the handler would act on a gateway, start a Prefect run or stream for ever (the row says why;
#             those paths are covered by their own test files)
# "anonymous" is the outcome for no token, a malformed Authorization header, a wrong token and a revoked token.


@dataclass(frozen=True)
class Expect:
    """What each kind of caller gets from one route."""

    anonymous: str
    other: str
    owner: str
    admin: str
    why: str = ""


PUBLIC = Expect("reached", "reached", "reached", "reached", "probes and the sign-in/out form: no token needed")
WEBHOOK = Expect("401", "401", "401", "401", "webhooks take the organization's webhook secret, never an API token")
CRON = Expect("401", "401", "401", "401", "takes CRON_SECRET only")
METRICS = Expect("401", "403", "403", "ok", "ZAPSYNC_METRICS_TOKEN or an admin token")
ADMIN_ONLY = Expect("401", "403", "403", "ok", "admin only")
OWNED = Expect("401", "hidden", "ok", "ok", "the owner's row in the path")
OWNED_EXTERNAL = Expect("401", "hidden", "skip", "skip", "the owner's row in the path; then a gateway is called")
SCOPED = Expect("401", "clean", "ok", "ok", "a collection, scoped to the caller's organization")
OWNED_READ = Expect("401", "hidden", "ok", "ok", "the owner's row; asks its gateway (none is configured here)")
SCOPED_READ = Expect("401", "clean", "ok", "ok", "scoped to the caller; asks the gateways (none configured here)")
SCOPED_EXTERNAL = Expect("401", "skip", "skip", "skip", "scoped to the caller; then a gateway/Prefect/stream")
DASHBOARD = Expect("login", "clean", "ok", "ok", "the sign-in page without a session")
DASHBOARD_OWNED = Expect("redirect", "hidden", "ok", "ok", "to the sign-in page without a session")

ROUTES: dict[tuple[str, str], Expect] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("POST", "/dashboard/login"): PUBLIC,
    ("POST", "/dashboard/logout"): PUBLIC,
    ("GET", "/"): DASHBOARD,
    ("GET", "/dashboard/conversations/{conversation_id}"): DASHBOARD_OWNED,
    ("POST", "/webhooks/evolution/{organization_id}"): WEBHOOK,
    ("POST", "/webhooks/evolution/{organization_id}/{event_suffix}"): WEBHOOK,
    ("POST", "/webhooks/megaapi/{organization_id}"): WEBHOOK,
    ("POST", "/webhooks/waha/{organization_id}"): WEBHOOK,
    ("GET", "/cron/sync-status"): CRON,
    ("GET", "/metrics"): METRICS,
    ("GET", "/tokens"): ADMIN_ONLY,
    ("POST", "/tokens/{token_id}/revoke"): ADMIN_ONLY,
    ("GET", "/flow-runs/{flow_run_id}"): OWNED,
    ("GET", "/instances/status"): SCOPED_READ,
    ("POST", "/instances/sync"): SCOPED_EXTERNAL,
    ("GET", "/instances/{instance_id}/status"): OWNED_READ,
    ("POST", "/instances/{instance_id}/sync"): OWNED_EXTERNAL,
    ("GET", "/instances/{instance_id}/health"): OWNED,
    ("POST", "/maintenance/cleanup-sessions"): SCOPED_EXTERNAL,
    ("POST", "/maintenance/close-inactive-conversations"): SCOPED_EXTERNAL,
    ("GET", "/organizations/{organization_id}/settings"): OWNED,
    ("PATCH", "/organizations/{organization_id}/settings"): OWNED,
    ("GET", "/events"): SCOPED_EXTERNAL,
    ("POST", "/instances/{instance_id}/import"): OWNED_EXTERNAL,
    ("GET", "/conversations"): SCOPED,
    ("GET", "/conversations/{conversation_id}/messages"): OWNED,
    ("GET", "/instances/{instance_id}/chats"): OWNED_READ,
    ("GET", "/queue"): SCOPED,
    ("GET", "/queue/items/{item_id}"): OWNED,
    ("POST", "/users/{user_id}/whatsapp/connect"): OWNED_EXTERNAL,
    ("GET", "/users/{user_id}/whatsapp"): OWNED_READ,
    ("POST", "/users/{user_id}/whatsapp/reconnect"): OWNED_EXTERNAL,
    ("DELETE", "/users/{user_id}/whatsapp"): OWNED_EXTERNAL,
    ("POST", "/instances"): SCOPED_EXTERNAL,
    ("GET", "/instances/{instance_id}/qr"): OWNED_READ,
    ("POST", "/instances/{instance_id}/logout"): OWNED_EXTERNAL,
    ("POST", "/instances/{instance_id}/restart"): OWNED_EXTERNAL,
    ("DELETE", "/instances/{instance_id}"): OWNED_EXTERNAL,
    ("POST", "/instances/{instance_id}/messages"): OWNED_EXTERNAL,  # queues a send (and wakes its drain)
    ("POST", "/conversations/{conversation_id}/messages"): OWNED_EXTERNAL,
}
"""Every route × method of the application and what each caller gets. Add a row with every new route."""

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/organizations/{organization_id}/settings"): {},
    ("POST", "/instances/{instance_id}/messages"): {"to": "5511999990000", "text": "hi"},
    ("POST", "/conversations/{conversation_id}/messages"): {"text": "hi"},
}
"""A valid body for the routes that take one (a bare request would be refused before the row is looked up)."""

FRAMEWORK = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
"""FastAPI's own documentation routes (public, no data)."""


def application_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route the application serves, however FastAPI nests included routers."""
    found: list[tuple[str, str]] = []

    def visit(route: Any) -> None:
        if hasattr(route, "effective_route_contexts"):  # an included router (FastAPI ≥ 0.150)
            for context in route.effective_route_contexts():
                found.extend((m, context.path) for m in sorted(context.methods))
        elif isinstance(route, APIRoute):
            found.extend((m, route.path) for m in sorted(route.methods))
        elif getattr(route, "path", None) in FRAMEWORK:
            return
        else:
            raise AssertionError(f"unexpected route object {route!r}: teach application_routes about it")

    for route in app.routes:
        visit(route)
    return found


# -- the owner's rows ----------------------------------------------------------------------------------------------


@flow(name="route-auth-probe")
def _probe() -> None:
    """Never run: gives the stored reports a real flow run for `GET /flow-runs/{id}` to read."""


async def _real_flow_run(parameters: dict[str, Any] | None = None) -> uuid.UUID:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.create_flow_run(_probe, parameters=parameters)).id


async def _store_report(
    flow_run_id: uuid.UUID, organization_id: uuid.UUID | None, report: dict[str, Any], *, flow_name: str = "sync-status"
) -> None:
    async with session_scope() as session:
        await session.execute(
            text(
                "INSERT INTO flow_reports (flow_run_id, flow_name, organization_id, started_at, report) "
                "VALUES (:run, :flow, :org, now(), CAST(:report AS jsonb))"
            ),
            {"run": flow_run_id, "flow": flow_name, "org": organization_id, "report": json.dumps(report)},
        )


def _sync_report(scope: dict[str, Any], *drifts: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": "apply",
        "scope": scope,
        "started_at": datetime.now(UTC).isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "checked": 7,
        "in_sync": 7 - len(drifts),
        "drifted": len(drifts),
        "applied": len(drifts),
        "unreachable": 0,
        "by_gateway": {"evolution": {"checked": 7, "auth_error": None}},
        "changes": list(drifts),
        "unreachable_instances": [],
    }


def _drift(organization_id: uuid.UUID, instance_id: uuid.UUID, name: str) -> dict[str, Any]:
    return {
        "instance_id": str(instance_id),
        "organization_id": str(organization_id),
        "instance_name": name,
        "gateway": "evolution",
        "db_status": "connected",
        "gateway_status": "disconnected",
        "applied": True,
    }


@dataclass
class World:
    """Two organizations' rows; A is the owner whose identifiers B must never see."""

    org_a: uuid.UUID
    org_b: uuid.UUID
    instance_a: uuid.UUID
    instance_name_a: str
    user_a: str
    conversation_a: int
    phone_a: str
    item_a: int
    run_a: uuid.UUID
    run_all: uuid.UUID
    spare_token_a: uuid.UUID
    tokens: dict[str, str]

    def params(self) -> dict[str, str]:
        """A value for every path parameter: the owner's rows."""
        return {
            "organization_id": str(self.org_a),
            "instance_id": str(self.instance_a),
            "conversation_id": str(self.conversation_a),
            "item_id": str(self.item_a),
            "user_id": self.user_a,
            "flow_run_id": str(self.run_a),
            "token_id": str(self.spare_token_a),
            "event_suffix": "messages-upsert",
        }

    def identifiers(self) -> list[str]:
        """Strings that identify A's rows (none may appear in an answer to B, unless B put it in the URL)."""
        return [str(self.org_a), str(self.instance_a), self.instance_name_a, self.user_a, self.phone_a, str(self.run_a)]


async def _token_id(token: str) -> uuid.UUID:
    from db.repositories.organizations import digest

    async with session_scope() as session:
        found = await session.execute(text("SELECT id FROM api_tokens WHERE token_hash = :h"), {"h": digest(token)})
        return uuid.UUID(str(found.scalar_one()))


async def _world(client: httpx.AsyncClient) -> World:
    suffix = uuid.uuid4().hex[:8]
    org_a, org_b = await make_organization(f"Alpha {suffix}"), await make_organization(f"Beta {suffix}")
    name_a, user_a = f"alpha-{suffix}", f"alpha-user-{suffix}"
    instance_a = await make_instance(org_a, name_a, status="connected", user_id=user_a)
    instance_b = await make_instance(org_b, f"beta-{suffix}", status="connected")
    conversation_a = await add_conversation(org_a, instance_a, last_message_at=datetime.now(UTC))
    await add_conversation(org_b, instance_b, last_message_at=datetime.now(UTC))
    async with session_scope() as session:
        phone_a = str(
            (
                await session.execute(
                    text(
                        "SELECT ct.phone FROM conversations c JOIN contacts ct ON ct.id = c.contact_id WHERE c.id = :c"
                    ),
                    {"c": conversation_a},
                )
            ).scalar_one()
        )
        (item,) = await request_imports(session, [import_request(instance_a, org_a, trigger="api")])
        tokens = {
            "owner": await create_token(session, name=f"alpha-crm-{suffix}", organization_id=org_a),
            "other": await create_token(session, name=f"beta-crm-{suffix}", organization_id=org_b),
            "revoked": await create_token(session, name=f"alpha-old-{suffix}", organization_id=org_a),
            "spare": await create_token(session, name=f"alpha-spare-{suffix}", organization_id=org_a),
        }
    # An instance-scoped sync of A's instance (stored without an organization, as the flow stores it) and a sync
    # over every organization: the two reports that leaked A's instance names to B before issue 13.
    run_a, run_all = await _real_flow_run(), await _real_flow_run()
    await _store_report(run_a, None, _sync_report({"instance_id": str(instance_a)}, _drift(org_a, instance_a, name_a)))
    await _store_report(run_all, None, _sync_report({}, _drift(org_a, instance_a, name_a)))

    # The revoked token works, then the admin route revokes it: from the next request on it is refused.
    revoked_headers = {"authorization": f"Bearer {tokens['revoked']}"}
    assert (await client.get("/queue", headers=revoked_headers)).status_code == 200
    revoked_id = await _token_id(tokens["revoked"])
    answer = await client.post(f"/tokens/{revoked_id}/revoke", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code == 200 and answer.json()["revoked_at"] is not None
    assert (await client.get("/queue", headers=revoked_headers)).status_code == 401
    return World(
        org_a=org_a,
        org_b=org_b,
        instance_a=instance_a,
        instance_name_a=name_a,
        user_a=user_a,
        conversation_a=conversation_a,
        phone_a=phone_a,
        item_a=int(item.id),
        run_a=run_a,
        run_all=run_all,
        spare_token_a=await _token_id(tokens["spare"]),
        tokens=tokens,
    )


# -- the matrix ------------------------------------------------------------------------------------------------------

CASES: dict[str, tuple[str, dict[str, str] | None]] = {
    "none": ("anonymous", None),
    "malformed": ("anonymous", {"authorization": "Basic YWxwaGE6YmV0YQ=="}),
    "wrong": ("anonymous", {"authorization": "Bearer zs_not-a-token"}),
    "revoked": ("anonymous", None),  # filled in with the revoked token
    "other": ("other", None),
    "owner": ("owner", None),
    "admin": ("admin", {"authorization": f"Bearer {ADMIN_TOKEN}"}),
}


def _headers(case: str, world: World) -> dict[str, str]:
    _, fixed = CASES[case]
    if fixed is not None:
        return fixed
    token = {"revoked": "revoked", "other": "other", "owner": "owner"}.get(case)
    return {"authorization": f"Bearer {world.tokens[token]}"} if token else {}


def _check(outcome: str, response: httpx.Response, world: World, url: str) -> str | None:
    """Why ``response`` is not ``outcome``, or None when it is."""
    status, body = response.status_code, response.text
    leaked = [s for s in world.identifiers() if s in body and s not in url]
    checks = {
        "401": status == 401,
        "403": status == 403,
        "hidden": status in (403, 404) and not leaked,
        "clean": status < 500 and status not in (401, 403) and not leaked,
        "ok": 200 <= status < 300,
        "reached": status < 500 and status not in (401, 403),
        "login": status == 200 and 'name="token"' in body,
        "redirect": status == 303,
    }
    if checks[outcome]:
        return None
    return f"expected {outcome}, got {status}{f' leaking {leaked}' if leaked else ''}: {body[:200]!r}"


@pytest.mark.usefixtures("prefect_server")
async def test_every_route_answers_each_caller_as_its_class_declares(client: httpx.AsyncClient) -> None:
    from api.main import create_app

    routes = application_routes(create_app(check_database=False))
    undeclared = sorted(set(routes) - set(ROUTES))
    assert not undeclared, f"routes missing from ROUTES in tests/test_route_auth.py: {undeclared}"
    assert not sorted(set(ROUTES) - set(routes)), "ROUTES names routes the application no longer serves"

    world = await _world(client)
    params = world.params()
    failures: list[str] = []
    matrix: dict[str, dict[str, int | str]] = {}
    for method, path in sorted(routes, key=lambda r: (r[1], r[0])):
        expect = ROUTES[(method, path)]
        url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], path)
        row = matrix.setdefault(f"{method} {path}", {})
        for case in CASES:  # admin last: its call may change rows (it revokes the spare token)
            outcome = getattr(expect, CASES[case][0])
            if outcome == "skip":
                row[case] = "-"
                continue
            client.cookies.clear()
            body = BODIES.get((method, path))
            response = await client.request(method, url, headers=_headers(case, world), json=body)
            row[case] = response.status_code
            if (why := _check(outcome, response, world, url)) is not None:
                failures.append(f"{method} {path} [{case}]: {why}")
    log.info("auth matrix:\n%s", "\n".join(f"{route:55} {cells}" for route, cells in matrix.items()))
    assert not failures, "\n".join(failures)


@pytest.mark.usefixtures("prefect_server")
async def test_flow_run_reports_are_scoped_by_organization_in_the_query(client: httpx.AsyncClient) -> None:
    world = await _world(client)
    owner = {"authorization": f"Bearer {world.tokens['owner']}"}
    other = {"authorization": f"Bearer {world.tokens['other']}"}
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    mine = await client.get(f"/flow-runs/{world.run_a}", headers=owner)
    theirs = await client.get(f"/flow-runs/{world.run_a}", headers=other)
    everyone_as_owner = await client.get(f"/flow-runs/{world.run_all}", headers=owner)
    everyone_as_admin = await client.get(f"/flow-runs/{world.run_all}", headers=admin)
    unknown = await client.get(f"/flow-runs/{uuid.uuid4()}", headers=owner)

    assert mine.status_code == 200 and mine.json()["report"]["changes"][0]["instance_name"] == world.instance_name_a
    assert theirs.status_code == 404 and world.instance_name_a not in theirs.text
    # A run over every organization is 404 for an organization's token (the dashboard shows it its own slice).
    assert everyone_as_owner.status_code == 404
    assert everyone_as_admin.status_code == 200 and everyone_as_admin.json()["report"]["checked"] == 7
    assert unknown.status_code == 404


@pytest.mark.usefixtures("prefect_server")
async def test_a_run_still_going_is_shown_to_the_organization_it_was_started_for(client: httpx.AsyncClient) -> None:
    world = await _world(client)
    owner = {"authorization": f"Bearer {world.tokens['owner']}"}
    other = {"authorization": f"Bearer {world.tokens['other']}"}
    for_instance = await _real_flow_run({"instance_id": str(world.instance_a)})
    for_organization = await _real_flow_run({"organization_id": str(world.org_a)})
    for_everyone = await _real_flow_run({})

    for run in (for_instance, for_organization):
        mine = await client.get(f"/flow-runs/{run}", headers=owner)
        theirs = await client.get(f"/flow-runs/{run}", headers=other)
        assert mine.status_code == 200 and mine.json()["report"] is None, mine.text
        assert theirs.status_code == 404, theirs.text
    assert (await client.get(f"/flow-runs/{for_everyone}", headers=owner)).status_code == 404


async def _sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    client.cookies.clear()
    return await client.post("/dashboard/login", data={"token": token})


async def test_the_dashboard_shows_an_organization_only_its_slice_of_a_sync_over_everyone(
    client: httpx.AsyncClient,
) -> None:
    a, b = await make_organization("Alpha"), await make_organization("Beta")
    inst_a, inst_b = await make_instance(a, "alpha-01"), await make_instance(b, "beta-01")
    report = _sync_report({}, _drift(a, inst_a, "alpha-01"), _drift(b, inst_b, "beta-01"))
    report["unreachable_instances"] = [{"instance_id": str(inst_b), "instance_name": "beta-01", "gateway": "evolution"}]
    report["unreachable"] = 1
    await _store_report(uuid.uuid4(), None, report)
    async with session_scope() as session:
        token_a = await create_token(session, name="alpha", organization_id=a)

    page_a = await client.get("/", headers={"authorization": f"Bearer {token_a}"})
    page_admin = await client.get("/", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    assert page_a.status_code == 200 and "alpha-01" in page_a.text
    assert "beta-01" not in page_a.text and "7 checked" not in page_a.text
    assert "1 drifted, 0 unreachable" in " ".join(page_a.text.split())
    assert "7 checked, 2 drifted, 1 unreachable" in " ".join(page_admin.text.split())


# -- dashboard sessions ----------------------------------------------------------------------------------------------


async def _sessions() -> list[dict[str, Any]]:
    async with session_scope() as session:
        rows = await session.execute(text("SELECT * FROM dashboard_sessions ORDER BY created_at"))
        return [dict(r) for r in rows.mappings().all()]


async def test_the_dashboard_cookie_holds_a_server_side_session_not_the_token(client: httpx.AsyncClient) -> None:
    org = await make_organization("Alpha")
    await make_instance(org, "alpha-01")
    async with session_scope() as session:
        token = await create_token(session, name="alpha", organization_id=org)

    signed_in = await _sign_in(client, token)
    cookie = signed_in.headers["set-cookie"]
    session_id = client.cookies.get("zapsync_session")
    page = await client.get("/")
    [row] = [r for r in await _sessions() if r["principal"] == "alpha"]

    assert signed_in.status_code == 303 and token not in cookie and session_id
    assert "alpha-01" in page.text
    assert session_id not in json.dumps(row, default=str) and row["expires_at"] > datetime.now(UTC)

    # The raw token in the cookie is no sign-in any more.
    client.cookies.clear()
    client.cookies.set("zapsync_session", token)
    assert 'name="token"' in (await client.get("/")).text

    # Logout deletes the session server-side: replaying the old cookie finds nothing.
    client.cookies.clear()
    client.cookies.set("zapsync_session", session_id)
    assert (await client.post("/dashboard/logout")).status_code == 303
    assert not [r for r in await _sessions() if r["principal"] == "alpha"]
    client.cookies.set("zapsync_session", session_id)
    assert 'name="token"' in (await client.get("/")).text
    assert (await client.get("/queue")).status_code == 401


async def _queue_with_session(client: httpx.AsyncClient, session_id: str | None) -> httpx.Response:
    client.cookies.clear()
    client.cookies.set("zapsync_session", session_id or "")
    try:
        return await client.get("/queue")
    finally:
        client.cookies.clear()


async def test_a_dashboard_session_ends_when_it_expires_or_its_token_is_revoked(client: httpx.AsyncClient) -> None:
    org = await make_organization("Alpha")
    async with session_scope() as session:
        expiring = await create_token(session, name="expiring", organization_id=org)
        revoked = await create_token(session, name="revoked", organization_id=org)

    await _sign_in(client, expiring)
    expiring_session = client.cookies.get("zapsync_session")
    await _sign_in(client, revoked)
    revoked_session = client.cookies.get("zapsync_session")
    for session_id in (expiring_session, revoked_session):
        assert (await _queue_with_session(client, session_id)).status_code == 200

    async with session_scope() as session:
        await session.execute(text("UPDATE dashboard_sessions SET expires_at = now() WHERE principal = 'expiring'"))
    revoked_id = await _token_id(revoked)
    answer = await client.post(f"/tokens/{revoked_id}/revoke", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    assert answer.status_code == 200
    for session_id in (expiring_session, revoked_session):
        assert (await _queue_with_session(client, session_id)).status_code == 401
    [row] = [r for r in await _sessions() if r["principal"] == "revoked"]
    assert row["revoked_at"] is not None


async def test_a_sign_in_deletes_sessions_expired_for_over_a_day(client: httpx.AsyncClient) -> None:
    org = await make_organization("Alpha")
    async with session_scope() as session:
        old = await create_token(session, name="old", organization_id=org)
        fresh = await create_token(session, name="fresh", organization_id=org)
    await _sign_in(client, old)
    async with session_scope() as session:
        await session.execute(
            text("UPDATE dashboard_sessions SET expires_at = now() - interval '2 days' WHERE principal = 'old'")
        )

    await _sign_in(client, fresh)

    assert sorted(r["principal"] for r in await _sessions()) == ["fresh"]


# -- token revocation --------------------------------------------------------------------------------------------


async def test_the_revoke_route_is_admin_only_and_answers_404_for_an_unknown_token(client: httpx.AsyncClient) -> None:
    org = await make_organization("Alpha")
    async with session_scope() as session:
        token = await create_token(session, name="alpha", organization_id=org)
    own = {"authorization": f"Bearer {token}"}
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    token_id = await _token_id(token)

    by_itself = await client.post(f"/tokens/{token_id}/revoke", headers=own)
    unknown = await client.post(f"/tokens/{uuid.uuid4()}/revoke", headers=admin)
    listed = await client.get("/tokens", headers=admin)

    assert by_itself.status_code == 403 and (await client.get("/queue", headers=own)).status_code == 200
    assert unknown.status_code == 404
    assert [t["name"] for t in listed.json()] == ["alpha"] and token not in listed.text


def test_token_revoke_from_the_cli_by_name_prefix_or_id() -> None:
    from tests.test_cli import invoke, invoke_json, run_async

    org = invoke_json("org", "create", "Acme")["id"]
    crm = invoke_json("token", "create", "--org", org, "crm-main")
    invoke_json("token", "create", "--org", org, "crm-backup")

    ambiguous, _, ambiguous_err = invoke("token", "revoke", "crm")
    unknown, _, unknown_err = invoke("token", "revoke", "nothing-like-this")
    revoked = invoke_json("token", "revoke", "crm-m")
    listed = invoke_json("token", "list")

    assert ambiguous == 2 and "2 tokens match" in ambiguous_err
    assert unknown == 1 and "no token matches" in unknown_err
    assert revoked["name"] == "crm-main" and revoked["revoked_at"] is not None
    assert {t["name"]: t["revoked_at"] is not None for t in listed if t["organization_id"] == org} == {
        "crm-main": True,
        "crm-backup": False,
        "Acme (created by zapsync org create)": False,
    }

    async def principal() -> Any:
        from db.repositories.organizations import principal_for_token

        async with session_scope() as session:
            return await principal_for_token(session, crm["token"])

    assert run_async(principal) is None
    again, out, _ = invoke("token", "revoke", revoked["id"])
    assert again == 0 and "revoked" in out


# -- /metrics --------------------------------------------------------------------------------------------------------


async def test_metrics_need_the_metrics_token_or_an_admin_token(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("ZAPSYNC_METRICS_TOKEN", "prom-scrape-token")
    get_settings.cache_clear()
    try:
        org = await make_organization("Alpha")
        async with session_scope() as session:
            token = await create_token(session, name="alpha", organization_id=org)
        anonymous = await client.get("/metrics")
        organization = await client.get("/metrics", headers={"authorization": f"Bearer {token}"})
        scraper = await client.get("/metrics", headers={"authorization": "Bearer prom-scrape-token"})
        admin = await client.get("/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        scraper_elsewhere = await client.get("/queue", headers={"authorization": "Bearer prom-scrape-token"})
    finally:
        monkeypatch.delenv("ZAPSYNC_METRICS_TOKEN")
        get_settings.cache_clear()

    assert anonymous.status_code == 401 and organization.status_code == 403
    assert scraper.status_code == 200 and "zapsync_instances" in scraper.text
    assert admin.status_code == 200 and scraper_elsewhere.status_code == 401


def test_the_dashboard_sessions_model_matches_migration_0010(database: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    from db.engine import database_url
    from db.models import Base

    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert [d for d in diffs if "dashboard_sessions" in repr(d)] == []
