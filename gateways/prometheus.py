"""Every instance's live state from one Prometheus `GET /metrics` (gateways.md §8.2, §8.4; issue 12 §3).

Evolution (`PROMETHEUS_METRICS=true`) writes one `evolution_instance_state{instance,integration,state} 1` line per
instance loaded in memory, interleaved with `evolution_instance_up`; WAHA (`WAHA_PROMETHEUS_ENABLED=true`) one
`waha_session_status{session,status,engine} 1` per session. :func:`label_states` reads one family's samples of
value 1 into ``{name: state}`` with one regular expression: on a 100k-instance body (17 MB) it takes 0.29 s where
``prometheus_client.parser.text_string_to_metric_families`` takes 5.2 s (bench/README.md, "Parsing /metrics").
:func:`label_states_prometheus_client` keeps that parser as the reference the tests compare against.
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass

from core.errors import GatewayAuthError, GatewayError, GatewayNotFound
from gateways.http import HttpGateway

log = logging.getLogger("zapsync.gateways")

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}
_ONE = frozenset({"1", "1.0"})


@dataclass(frozen=True, slots=True)
class MetricsAccess:
    """How a client reaches its gateway's `/metrics`: the path and optional Basic-auth credentials."""

    user: str | None = None
    password: str | None = None
    path: str = "/metrics"

    @property
    def headers(self) -> dict[str, str]:
        """The `Authorization: Basic` header when a user is configured (else none)."""
        if not self.user:
            return {}
        token = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
        return {"Authorization": f"Basic {token}"}


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), value)


def label_states(text: str, family: str, *, name_label: str, state_label: str) -> dict[str, str]:
    """``{name: state}`` from the samples of ``family`` whose value is 1 (Prometheus text format 0.0.4).

    Lines of other families (interleaved or not), comments and samples of value 0 are skipped; label values are
    unescaped (``\\\\``, ``\\"``, ``\\n``); a later sample for the same name wins.
    """
    states: dict[str, str] = {}
    sample = re.compile(r"^" + re.escape(family) + r"\{(.*)\}[ \t]+([^ \t\n]+)", re.MULTILINE)
    for block, value in sample.findall(text):
        if value not in _ONE and _number(value) != 1:
            continue
        if "\\" in block:  # escapes: a value may hold `",`; read it label by label
            labels = {key: _unescape(raw) for key, raw in _LABEL.findall(block)}
        else:
            labels = dict(part.split('="', 1) for part in block.rstrip(",")[:-1].split('",') if '="' in part)
        name, state = labels.get(name_label), labels.get(state_label)
        if name is not None and state is not None:
            states[name] = state
    return states


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def label_states_prometheus_client(text: str, family: str, *, name_label: str, state_label: str) -> dict[str, str]:
    """:func:`label_states` with ``prometheus_client``'s parser (iterating samples: the families are interleaved, so
    the parser yields one family per sample). The reference implementation, slower."""
    from prometheus_client.parser import text_string_to_metric_families

    states: dict[str, str] = {}
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name != family or sample.value != 1:
                continue
            name, state = sample.labels.get(name_label), sample.labels.get(state_label)
            if name is not None and state is not None:
                states[name] = state
    return states


def metrics_text_escape(value: str) -> str:
    """A label value escaped for the Prometheus text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True, slots=True)
class LiveRead:
    """One read of a gateway's `/metrics`: the states, or why there are none (the caller falls back)."""

    states: dict[str, str] | None
    error: str | None = None


async def read_live_states(
    gateway: HttpGateway,
    access: MetricsAccess,
    *,
    family: str,
    name_label: str,
    state_label: str,
    server_setting: str,
    credentials_setting: str,
) -> LiveRead:
    """GET `/metrics` and read ``family``'s states; a failure is returned (and logged), never raised.

    404 means the gateway does not serve it (``server_setting`` off); 401/403 is an authentication failure naming
    ``credentials_setting``; anything else is the gateway's error after the usual retries.
    """
    try:
        content = await gateway.request_bytes("GET", access.path, what="metrics", headers=access.headers or None)
    except GatewayAuthError as exc:
        error: GatewayError = GatewayAuthError(
            f"{gateway.name}: /metrics refused the credentials (HTTP {exc.upstream_status}): check "
            f"{credentials_setting}",
            upstream_status=exc.upstream_status,
            gateway=gateway.name,
        )
        return _failed(error)
    except GatewayNotFound:
        error = GatewayNotFound(
            f"{gateway.name}: /metrics is not served (HTTP 404): set {server_setting} at the gateway, or turn the "
            "gateway's `metrics` option off",
            upstream_status=404,
            gateway=gateway.name,
        )
        return _failed(error)
    except GatewayError as exc:
        return _failed(exc)
    return LiveRead(
        label_states(content.decode(errors="replace"), family, name_label=name_label, state_label=state_label)
    )


def _failed(error: GatewayError) -> LiveRead:
    log.warning("%s; falling back to per-instance live states", error.message)
    return LiveRead(None, error.message)
