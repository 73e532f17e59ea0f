"""`GET /metrics` of the simulator: Evolution's and WAHA's Prometheus text (gateways.md §8.2, §8.4).

Evolution's (knob ``prometheus_metrics``, its `PROMETHEUS_METRICS=true`): `evolution_environment_info`,
`evolution_instances_total`, then per *loaded* instance one `evolution_instance_up` and one `evolution_instance_state`
line, interleaved as Evolution writes them; the LIVE state (not the lagging column), `refused` shown as `close`
(it never appears there). With ``metrics_user``/``metrics_password`` set it asks for HTTP Basic auth (401 with
`WWW-Authenticate` otherwise). WAHA's (knob ``waha_prometheus_metrics``, `WAHA_PROMETHEUS_ENABLED=true`):
`waha_session_status{session,status,engine} 1` per session, unauthenticated. The simulator serves every provider on
one host, so one route serves whichever are switched on (404, as at a real Evolution, when none is).

The body is written with one join over the instances; at 100k instances that is ~0.1 s of the simulator's CPU.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateways.prometheus import metrics_text_escape as esc
from gateways.simulator.app import _evolution_fail, _gate, _json, _Reply
from gateways.simulator.state import SimInstance, SimulatorState
from gateways.simulator.waha import ENGINE, status_of

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def evolution_metrics(instances: list[SimInstance], *, version: str, server_url: str) -> str:
    """Evolution's `/metrics` body for ``instances`` (the loaded ones are listed)."""
    loaded = [inst for inst in instances if inst.loaded]
    info = f'version="{esc(version)}",clientName="evolution",serverUrl="{esc(server_url)}"'
    head = (
        "# HELP evolution_environment_info Environment information\n"
        "# TYPE evolution_environment_info gauge\n"
        f"evolution_environment_info{{{info}}} 1\n"
        "# HELP evolution_instances_total Total number of instances\n"
        "# TYPE evolution_instances_total gauge\n"
        f"evolution_instances_total {len(loaded)}\n"
        "# HELP evolution_instance_up 1 if instance state is open, else 0\n"
        "# TYPE evolution_instance_up gauge\n"
        "# HELP evolution_instance_state Instance state as a labelled gauge\n"
        "# TYPE evolution_instance_state gauge\n"
    )
    lines = []
    for inst in loaded:
        labels = f'instance="{esc(inst.name)}",integration="{esc(inst.integration)}"'
        state = "close" if inst.live_state == "refused" else inst.live_state
        lines.append(
            f"evolution_instance_up{{{labels}}} {1 if state == 'open' else 0}\n"
            f'evolution_instance_state{{{labels},state="{state}"}} 1\n'
        )
    return head + "".join(lines)


def waha_metrics(instances: list[SimInstance]) -> str:
    """WAHA's `/metrics` body: one `waha_session_status` sample per session."""
    head = "# HELP waha_session_status Session status\n# TYPE waha_session_status gauge\n"
    return head + "".join(
        f'waha_session_status{{session="{esc(inst.name)}",status="{status_of(inst)}",engine="{ENGINE}"}} 1\n'
        for inst in instances
    )


def _authorized(request: Request, user: str, password: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, _, given_password = base64.b64decode(token, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(given_user, user) & secrets.compare_digest(given_password, password)


def metrics_router(state: SimulatorState) -> APIRouter:
    """`GET /metrics`, and `POST /_sim/instances/{name}/loaded` (whether Evolution holds it in memory)."""
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        config = state.config
        if not config.prometheus_metrics and not config.waha_prometheus_metrics:
            raise _evolution_fail(404, "Cannot GET /metrics")
        await _gate(state, "evolution" if config.prometheus_metrics else "waha", "metrics")
        parts = []
        if config.prometheus_metrics:
            user, password = config.metrics_user, config.metrics_password
            if user and password is not None and not _authorized(request, user, password):
                response = _Reply({"message": "Unauthorized"}, 401).response
                response.headers["WWW-Authenticate"] = 'Basic realm="metrics"'
                return response
            base = str(request.base_url).rstrip("/")
            parts.append(evolution_metrics(state.instances_of("evolution"), version=config.version, server_url=base))
        if config.waha_prometheus_metrics:
            parts.append(waha_metrics(state.instances_of("waha")))
        return Response("".join(parts), media_type=CONTENT_TYPE)

    @router.post("/_sim/instances/{name}/loaded")
    async def set_loaded(name: str, request: Request) -> Response:
        inst = state.get(name)
        if inst is None:
            raise _Reply({"detail": f"unknown instance {name!r}"}, 404)
        body = await request.json()
        inst.loaded = bool(body.get("loaded", True)) if isinstance(body, dict) else True
        return _json({"name": name, "loaded": inst.loaded})

    return router
