"""Queries on whatsapp_instances, their status history and sessions. Functions flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import orjson
from psycopg.types.json import Json
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import AppliedChange, InstanceRef, InstanceStatus, StatusWrite


async def load_instances(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
    gateways: Sequence[str] | None = None,
) -> list[InstanceRef]:
    """Instances in a scope (all, one organization, or one instance), ordered for stable batching."""
    clauses = ["TRUE"]
    params: dict[str, object] = {}
    if organization_id is not None:
        clauses.append("organization_id = :org")
        params["org"] = organization_id
    if instance_id is not None:
        clauses.append("id = :iid")
        params["iid"] = instance_id
    if gateways is not None:
        clauses.append("gateway = ANY(:gateways)")
        params["gateways"] = list(gateways)
    rows = await session.execute(
        text(
            "SELECT id, organization_id, gateway, instance_name, status, status_observed_at, live_confirmed_at "
            f"FROM whatsapp_instances WHERE {' AND '.join(clauses)} ORDER BY gateway, instance_name"
        ),
        params,
    )
    return [InstanceRef(r[0], r[1], r[2], r[3], InstanceStatus(r[4]), r[5], r[6]) for r in rows.all()]


_OBS_COLUMNS = """
    SELECT instance_id AS id, status, observed_at, reason, phone_number AS phone, profile_name AS profile,
           qr_code AS qr, live_confirmed AS confirmed, logged_out
    FROM json_to_recordset(CAST(:rows AS json)) AS r(
        instance_id uuid, status text, observed_at timestamptz, reason text, phone_number text, profile_name text,
        qr_code text, live_confirmed boolean, logged_out boolean)
"""

_APPLY_SQL = text(f"""
WITH obs AS MATERIALIZED ({_OBS_COLUMNS}),
prev AS MATERIALIZED (
    SELECT i.id, i.status AS from_status
    FROM whatsapp_instances i JOIN obs ON obs.id = i.id
),
upd AS (
    UPDATE whatsapp_instances i SET
        status = obs.status,
        status_reason = obs.reason,
        status_observed_at = obs.observed_at,
        logged_out = obs.logged_out,
        phone_number = COALESCE(obs.phone, i.phone_number),
        profile_name = COALESCE(obs.profile, i.profile_name),
        qr_code = CASE WHEN obs.status = 'qr_pending' THEN COALESCE(obs.qr, i.qr_code) ELSE NULL END,
        live_confirmed_at = CASE WHEN obs.confirmed THEN obs.observed_at ELSE i.live_confirmed_at END,
        last_checked_at = GREATEST(i.last_checked_at, obs.observed_at),
        updated_at = now()
    FROM obs
    WHERE i.id = obs.id
      AND i.status IS DISTINCT FROM obs.status
      AND (i.status_observed_at IS NULL OR i.status_observed_at < obs.observed_at)
    RETURNING i.id, i.organization_id, i.instance_name, i.status, obs.observed_at, obs.reason, i.gateway
),
touched AS (
    -- rows whose status the observation confirms (disjoint from `upd`: both read the statement's snapshot)
    UPDATE whatsapp_instances i SET
        last_checked_at = GREATEST(i.last_checked_at, o.observed_at),
        status_observed_at = GREATEST(i.status_observed_at, o.observed_at),
        phone_number = COALESCE(o.phone, i.phone_number),
        profile_name = COALESCE(o.profile, i.profile_name),
        qr_code = CASE WHEN i.status = 'qr_pending' THEN COALESCE(o.qr, i.qr_code) ELSE i.qr_code END,
        live_confirmed_at = CASE WHEN o.confirmed THEN o.observed_at ELSE i.live_confirmed_at END,
        status_reason = CASE WHEN o.reason IS NOT NULL
            AND (i.status_observed_at IS NULL OR i.status_observed_at <= o.observed_at) THEN o.reason
            ELSE i.status_reason END
    FROM obs o
    WHERE i.id = o.id AND i.status = o.status
      AND (i.last_checked_at IS NULL OR i.last_checked_at < o.observed_at
           OR o.confirmed OR i.phone_number IS DISTINCT FROM COALESCE(o.phone, i.phone_number)
           OR i.profile_name IS DISTINCT FROM COALESCE(o.profile, i.profile_name)
           OR (o.reason IS NOT NULL AND i.status_reason IS DISTINCT FROM o.reason))
),
changes AS MATERIALIZED (
    SELECT upd.id, upd.organization_id, upd.instance_name, prev.from_status, upd.status, upd.observed_at,
           upd.reason, upd.gateway
    FROM upd JOIN prev ON prev.id = upd.id
),
history AS (
    INSERT INTO instance_status_changes
        (instance_id, organization_id, from_status, to_status, source, reason, observed_at, flow_run_id)
    SELECT id, organization_id, from_status, status, :source, reason, observed_at, CAST(:run AS uuid) FROM changes
),
closed AS (
    UPDATE whatsapp_sessions s SET status = 'ended', disconnected_at = c.observed_at,
        last_activity_at = GREATEST(s.last_activity_at, c.observed_at)
    FROM changes c
    WHERE c.from_status = 'connected' AND s.instance_id = c.id AND s.disconnected_at IS NULL
),
opened AS (
    INSERT INTO whatsapp_sessions (instance_id, status, connected_at, last_activity_at)
    SELECT id, 'active', observed_at, observed_at FROM changes WHERE status = 'connected'
    ON CONFLICT (instance_id) WHERE disconnected_at IS NULL DO NOTHING
)
SELECT id, organization_id, instance_name, from_status, status, observed_at, reason, gateway FROM changes
""")


async def apply_status_writes(
    session: AsyncSession,
    writes: Sequence[StatusWrite],
    *,
    source: str,
    flow_run_id: uuid.UUID | None = None,
) -> list[AppliedChange]:
    """Apply many observations in one set-based statement.

    Newest observation wins: a write older than the row's `status_observed_at` changes nothing. Every applied
    transition gets a history row; becoming connected opens a session, leaving connected closes it. Writes that
    confirm the current status only refresh `last_checked_at`, profile fields and, when they give one that is not
    older than the stored observation, the reason (an instance gone from its gateway says so even if it was
    already disconnected).
    """
    if not writes:
        return []
    result = await session.execute(
        _APPLY_SQL,
        # one C-speed document, sent as orjson's bytes (no str copy); psycopg would adapt lists item by item
        {"rows": Json(writes, dumps=orjson.dumps), "source": source, "run": flow_run_id},
    )
    return [AppliedChange(*row) for row in result.all()]


async def get_instance(
    session: AsyncSession, instance_id: uuid.UUID, *, organization_id: uuid.UUID | None = None
) -> dict[str, object] | None:
    """One instance as a dict, only if it belongs to ``organization_id`` (when given)."""
    row = await session.execute(
        text(
            "SELECT id, organization_id, user_id, gateway, instance_name, status, is_connected, phone_number, "
            "profile_name, status_reason, status_observed_at, last_checked_at, consecutive_failures, health, "
            "qr_code, created_at, updated_at FROM whatsapp_instances "
            "WHERE id = :id AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)"
        ),
        {"id": instance_id, "org": organization_id},
    )
    found = row.mappings().one_or_none()
    return dict(found) if found else None


async def register_instances(
    session: AsyncSession, *, organization_id: uuid.UUID, gateway: str, instance_names: Sequence[str]
) -> list[uuid.UUID]:
    """Insert instance rows (status ``disconnected``) in one statement; names already taken at ``gateway`` are
    skipped. Returns the ids of the rows actually inserted."""
    if not instance_names:
        return []
    rows = await session.execute(
        text(
            "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name) "
            "SELECT :org, :gateway, name FROM unnest(CAST(:names AS text[])) AS n(name) "
            "ON CONFLICT (gateway, instance_name) DO NOTHING RETURNING id"
        ),
        {"org": organization_id, "gateway": gateway, "names": list(instance_names)},
    )
    return [r[0] for r in rows.all()]


async def list_instances(session: AsyncSession, *, organization_id: uuid.UUID | None = None) -> list[dict[str, object]]:
    """Every instance (of one organization, when given) with its stored status, ordered by gateway and name."""
    rows = await session.execute(
        text(
            "SELECT id, organization_id, gateway, instance_name, status, health, phone_number, profile_name, "
            "status_reason, status_observed_at, last_checked_at, consecutive_failures FROM whatsapp_instances "
            "WHERE CAST(:org AS uuid) IS NULL OR organization_id = :org ORDER BY gateway, instance_name"
        ),
        {"org": organization_id},
    )
    return [dict(r) for r in rows.mappings().all()]
