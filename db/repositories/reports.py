"""Flow reports: written by flows, read by the API and dashboard."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import FlowReport


async def save_report(
    session: AsyncSession,
    *,
    flow_name: str,
    flow_run_id: uuid.UUID | None,
    organization_id: uuid.UUID | None,
    started_at: datetime,
    report: dict[str, Any],
) -> None:
    """Store (or replace, on a retried run) the report of one flow run."""
    statement = insert(FlowReport).values(
        flow_name=flow_name,
        flow_run_id=flow_run_id,
        organization_id=organization_id,
        started_at=started_at,
        report=report,
    )
    if flow_run_id is not None:
        statement = statement.on_conflict_do_update(
            index_elements=["flow_run_id"], set_={"report": statement.excluded.report, "finished_at": text("now()")}
        )
    await session.execute(statement)


async def report_for_run(session: AsyncSession, flow_run_id: uuid.UUID) -> dict[str, Any] | None:
    """The report a flow run stored, if it finished."""
    row = await session.execute(text("SELECT report FROM flow_reports WHERE flow_run_id = :id"), {"id": flow_run_id})
    return row.scalar_one_or_none()


async def latest_report(
    session: AsyncSession, flow_name: str, organization_id: uuid.UUID | None = None
) -> dict[str, Any] | None:
    """The newest report of a flow (for an organization, or global runs when None)."""
    row = await session.execute(
        text(
            "SELECT report FROM flow_reports WHERE flow_name = :flow "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org OR organization_id IS NULL) "
            "ORDER BY finished_at DESC LIMIT 1"
        ),
        {"flow": flow_name, "org": organization_id},
    )
    return row.scalar_one_or_none()


# -- organization-scoped reads (issue 13 §1): ownership is decided in the query, never by filtering afterwards ------

_OWNED_BY = """(
    r.organization_id = CAST(:org AS uuid)
    OR (r.organization_id IS NULL AND EXISTS (
        SELECT 1 FROM whatsapp_instances i
        WHERE i.organization_id = CAST(:org AS uuid)
          AND i.id::text = COALESCE(r.report->'scope'->>'instance_id', r.report->>'instance_id')
    ))
)"""
"""A stored report belongs to an organization when it was stored under it, or when it covers one instance (an
instance-scoped sync, an import) of that organization. Runs over every organization belong to none of them."""


async def report_visible_to(
    session: AsyncSession, flow_run_id: uuid.UUID, organization_id: uuid.UUID
) -> dict[str, Any] | None:
    """The report a flow run stored, only when it belongs to ``organization_id`` (else None, as for an unknown run)."""
    row = await session.execute(
        text(f"SELECT r.report FROM flow_reports r WHERE r.flow_run_id = :id AND {_OWNED_BY}"),
        {"id": flow_run_id, "org": organization_id},
    )
    return row.scalar_one_or_none()


async def parameters_owned_by(session: AsyncSession, parameters: dict[str, Any], organization_id: uuid.UUID) -> bool:
    """Whether a flow run started with ``parameters`` acts for ``organization_id`` alone: its ``organization_id``
    parameter is that organization, or its ``instance_id`` parameter is one of that organization's instances
    (decided in the query). A run over every organization (neither parameter) belongs to none of them."""
    org = _as_uuid(parameters.get("organization_id"))
    if org is not None:
        return org == organization_id
    instance = _as_uuid(parameters.get("instance_id"))
    if instance is None:
        return False
    row = await session.execute(
        text("SELECT 1 FROM whatsapp_instances WHERE id = :id AND organization_id = :org"),
        {"id": instance, "org": organization_id},
    )
    return row.first() is not None


def _as_uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value is not None else None
    except ValueError:
        return None


async def latest_sync_slice(session: AsyncSession, flow_name: str, organization_id: uuid.UUID) -> dict[str, Any] | None:
    """The newest sync report an organization may see, cut to its own instances in the query.

    A report stored under the organization is returned whole. A run over every organization (or one stored without an
    organization) gives only this organization's slice: its drifted and unreachable instances and their counts; the
    totals over other organizations (`checked`, `in_sync`, per-gateway counts: only each gateway's `auth_error` is kept)
    and the run's id are left out."""
    row = await session.execute(
        text(f"""
            WITH mine AS (SELECT id::text AS id FROM whatsapp_instances WHERE organization_id = CAST(:org AS uuid)),
            newest AS (
                SELECT r.organization_id, r.report FROM flow_reports r
                WHERE r.flow_name = :flow
                  AND ({_OWNED_BY} OR (r.organization_id IS NULL AND r.report->'scope'->>'instance_id' IS NULL
                                       AND r.report->'scope'->>'organization_id' IS NULL))
                ORDER BY r.finished_at DESC LIMIT 1
            ),
            sliced AS (
                SELECT n.*,
                    COALESCE((SELECT jsonb_agg(c) FROM jsonb_array_elements(n.report->'changes') c
                              WHERE c->>'instance_id' IN (SELECT id FROM mine)), '[]'::jsonb) AS changes,
                    COALESCE((SELECT jsonb_agg(u) FROM jsonb_array_elements(n.report->'unreachable_instances') u
                              WHERE u->>'instance_id' IN (SELECT id FROM mine)), '[]'::jsonb) AS unreachable
                FROM newest n
            )
            SELECT CASE WHEN s.organization_id IS NOT NULL THEN s.report ELSE jsonb_build_object(
                'mode', s.report->'mode', 'scope', s.report->'scope', 'started_at', s.report->'started_at',
                'finished_at', s.report->'finished_at', 'skipped', s.report->'skipped',
                'failed_gateways', s.report->'failed_gateways',
                'by_gateway', COALESCE((
                    SELECT jsonb_object_agg(g.key, jsonb_build_object('auth_error', g.value->'auth_error'))
                    FROM jsonb_each(COALESCE(s.report->'by_gateway', '{{}}'::jsonb)) g), '{{}}'::jsonb),
                'changes', s.changes, 'unreachable_instances', s.unreachable,
                'drifted', jsonb_array_length(s.changes), 'unreachable', jsonb_array_length(s.unreachable),
                'applied', (SELECT count(*) FROM jsonb_array_elements(s.changes) c WHERE (c->>'applied')::boolean),
                'sliced', true
            ) END
            FROM sliced s
        """),
        {"flow": flow_name, "org": organization_id},
    )
    return row.scalar_one_or_none()
