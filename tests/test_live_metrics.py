"""One call for every instance's live state (issue 12 §3): Evolution's and WAHA's Prometheus `/metrics`.

The parser (interleaved families, `unknown`, escapes), the clients against the simulator (Basic auth, fallbacks),
and the status sync and health monitor using one `/metrics` call instead of N `connectionState` calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from core.domain import InstanceStatus
from core.settings import GatewayConfig, Settings, get_settings
from flows.monitor_health import monitor_health
from flows.sync_status import sync_status
from gateways.evolution import EvolutionGateway
from gateways.prometheus import MetricsAccess, label_states, label_states_prometheus_client
from gateways.resilience import RetryPolicy
from gateways.simulator import SimulatorServer, SimulatorState
from gateways.simulator.metrics import evolution_metrics, waha_metrics
from gateways.waha import WahaGateway
from tests.factories import instance_row, make_instance, make_organization

EVOLUTION_KEY = "sim-evolution-key"
STATE = {"name_label": "instance", "state_label": "state"}

INTERLEAVED = """# HELP evolution_instances_total Total number of instances
# TYPE evolution_instances_total gauge
evolution_instances_total 4
# HELP evolution_instance_up 1 if instance state is open, else 0
# TYPE evolution_instance_up gauge
# HELP evolution_instance_state Instance state as a labelled gauge
# TYPE evolution_instance_state gauge
evolution_instance_up{instance="acme-01",integration="WHATSAPP-BAILEYS"} 1
evolution_instance_state{instance="acme-01",integration="WHATSAPP-BAILEYS",state="open"} 1
evolution_instance_up{instance="acme-02",integration="WHATSAPP-BAILEYS"} 0
evolution_instance_state{instance="acme-02",integration="WHATSAPP-BAILEYS",state="connecting"} 1
evolution_instance_up{instance="acme-03",integration="WHATSAPP-BAILEYS"} 0
evolution_instance_state{instance="acme-03",integration="WHATSAPP-BAILEYS",state="unknown"} 1
evolution_instance_up{instance="acme-04",integration="WHATSAPP-BAILEYS"} 0
evolution_instance_state{instance="acme-04",integration="WHATSAPP-BAILEYS",state="open"} 0
evolution_instance_state{state="close",integration="WHATSAPP-BAILEYS",instance="acme-04"} 1.0
"""


# -- parsing ----------------------------------------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize("parse", [label_states, label_states_prometheus_client])
def test_interleaved_families_give_each_instance_its_state_of_value_one(parse) -> None:
    states = parse(INTERLEAVED, "evolution_instance_state", **STATE)

    # `unknown` is reported as such (the client treats it as not listed); a 0 sample is not the state.
    assert states == {"acme-01": "open", "acme-02": "connecting", "acme-03": "unknown", "acme-04": "close"}
    assert parse(INTERLEAVED, "waha_session_status", name_label="session", state_label="status") == {}


@pytest.mark.pure
def test_names_with_quotes_backslashes_commas_and_newlines_round_trip(simulator_state_free) -> None:
    names = ['say "hi"', "back\\slash", 'comma",state="open', "new\nline", "plain-01", "ünïcode"]
    for i, name in enumerate(names):
        simulator_state_free.add_instance(name, "evolution", "open" if i % 2 else "close")
    text = evolution_metrics(simulator_state_free.instances_of("evolution"), version="2.3.6", server_url="http://x")

    ours = label_states(text, "evolution_instance_state", **STATE)
    reference = label_states_prometheus_client(text, "evolution_instance_state", **STATE)

    expected = {name: "open" if i % 2 else "close" for i, name in enumerate(names)}
    assert ours == expected
    assert reference == expected


@pytest.mark.pure
def test_the_simulators_waha_body_parses_with_both_parsers(simulator_state_free) -> None:
    simulator_state_free.add_instance("w-1", "waha", "open")
    simulator_state_free.add_instance("w-2", "waha", "close")
    text = waha_metrics(simulator_state_free.instances_of("waha"))
    args = {"name_label": "session", "state_label": "status"}
    expected = {"w-1": "WORKING", "w-2": "STOPPED"}
    assert label_states(text, "waha_session_status", **args) == expected
    assert label_states_prometheus_client(text, "waha_session_status", **args) == expected


@pytest.fixture
def simulator_state_free() -> SimulatorState:
    """A simulator world that no server serves (for rendering only)."""
    return SimulatorState()


# -- settings ---------------------------------------------------------------------------------------------------------


@pytest.mark.pure
def test_seed_variables_switch_metrics_on_and_megaapi_cannot(monkeypatch) -> None:
    monkeypatch.setenv("EVOLUTION_API_URL", "http://evo.local")
    monkeypatch.setenv("EVOLUTION_METRICS", "true")
    monkeypatch.setenv("EVOLUTION_METRICS_USER", "prom")
    monkeypatch.setenv("EVOLUTION_METRICS_PASSWORD", "s3cret")
    monkeypatch.setenv("WAHA_API_URL", "http://waha.local")
    monkeypatch.setenv("WAHA_PROMETHEUS_ENABLED", "true")
    configs = Settings().gateways()
    evolution = configs["evolution"]
    assert evolution.metrics and evolution.metrics_user == "prom"
    assert evolution.metrics_password is not None and evolution.metrics_password.get_secret_value() == "s3cret"
    assert configs["waha"].metrics and configs["waha"].metrics_user is None
    with pytest.raises(ValueError, match="no per-instance metrics"):
        GatewayConfig(provider="megaapi", url="http://mega", metrics=True)


# -- the clients against the simulator ------------------------------------------------------------------------------


def evolution_client(server: SimulatorServer, metrics: MetricsAccess | None) -> EvolutionGateway:
    return EvolutionGateway(
        name="evolution",
        base_url=server.url,
        api_key=EVOLUTION_KEY,
        timeout=httpx.Timeout(5),
        retry=RetryPolicy(attempts=1),
        metrics=metrics,
    )


def _connection_state_calls(simulator: SimulatorState) -> int:
    return sum(n for key, n in simulator.calls.items() if key.startswith("evolution.connectionState:"))


def _drops(simulator: SimulatorState) -> None:
    """Two open instances, one silently dropped (its column still says open), one closed, one waiting for a QR."""
    simulator.add_instance("evo-up", "evolution", "open")
    simulator.add_instance("evo-drop", "evolution", "open")
    simulator.set_state("evo-drop", "close", reason_code=428)  # reconnectable: the column lags at `open`
    simulator.add_instance("evo-down", "evolution", "close")
    simulator.add_instance("evo-qr", "evolution", "close")
    simulator.connect("evo-qr")
    assert simulator.require("evo-drop").column_state == "open"


NAMES = ["evo-up", "evo-drop", "evo-down", "evo-qr"]
CONNECTED_IN_DB = dict.fromkeys(NAMES, InstanceStatus.CONNECTED)


@pytest.mark.pure
@pytest.mark.parametrize("auth", [False, True])
async def test_the_evolution_client_reads_live_states_in_one_call(simulator, simulator_server, auth: bool) -> None:
    simulator.configure(prometheus_metrics=True)
    access = MetricsAccess()
    if auth:
        simulator.configure(metrics_user="prom", metrics_password="s3cret")
        access = MetricsAccess(user="prom", password="s3cret")
    _drops(simulator)

    async with evolution_client(simulator_server, access) as client:
        seen = await client.fetch_states(NAMES, db_statuses=CONNECTED_IN_DB, confirm=set(NAMES))

    assert {name: obs.status for name, obs in seen.items()} == {
        "evo-up": InstanceStatus.CONNECTED,
        "evo-drop": InstanceStatus.DISCONNECTED,  # the live state, not the lagging column
        "evo-down": InstanceStatus.DISCONNECTED,
        "evo-qr": InstanceStatus.QR_PENDING,
    }
    assert all(obs.live for obs in seen.values())
    assert seen["evo-drop"].reason == "live state close"
    assert seen["evo-up"].phone_number  # the fetchInstances row still gives the number
    assert simulator.calls["evolution.metrics"] == 1 and simulator.calls["evolution.fetchInstances"] == 1
    assert _connection_state_calls(simulator) == 0
    assert client.live_state_error is None


@pytest.mark.pure
async def test_basic_auth_is_asked_for_and_wrong_credentials_fall_back_naming_the_setting(
    simulator, simulator_server
) -> None:
    simulator.configure(prometheus_metrics=True, metrics_user="prom", metrics_password="s3cret")
    _drops(simulator)
    async with httpx.AsyncClient(base_url=simulator_server.url) as raw:
        refused = await raw.get("/metrics")
        wrong = await raw.get("/metrics", auth=("prom", "nope"))
        right = await raw.get("/metrics", auth=("prom", "s3cret"))
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert wrong.status_code == 401
    assert right.status_code == 200 and right.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "evolution_instances_total 4" in right.text

    async with evolution_client(simulator_server, MetricsAccess(user="prom", password="nope")) as client:
        seen = await client.fetch_states(NAMES, db_statuses=CONNECTED_IN_DB, confirm=set(NAMES))

    # Today's behaviour: the column, with `connectionState` confirmations of the lagging `open`s.
    assert seen["evo-drop"].status is InstanceStatus.DISCONNECTED and not seen["evo-drop"].live
    assert _connection_state_calls(simulator) == 2  # evo-up and evo-drop: their column says open
    assert client.live_state_error is not None
    assert "HTTP 401" in client.live_state_error and "EVOLUTION_METRICS_PASSWORD" in client.live_state_error


@pytest.mark.pure
async def test_metrics_not_served_falls_back_and_says_which_server_setting(simulator, simulator_server) -> None:
    _drops(simulator)  # prometheus_metrics off: the route answers 404, as at an Evolution without the setting
    async with evolution_client(simulator_server, MetricsAccess()) as client:
        seen = await client.fetch_states(NAMES, db_statuses=CONNECTED_IN_DB, confirm=set(NAMES))
    assert seen["evo-drop"].status is InstanceStatus.DISCONNECTED and seen["evo-up"].status is InstanceStatus.CONNECTED
    assert not any(obs.live for obs in seen.values())
    assert _connection_state_calls(simulator) == 2
    assert client.live_state_error is not None and "PROMETHEUS_METRICS=true" in client.live_state_error


@pytest.mark.pure
async def test_an_instance_not_loaded_in_memory_keeps_its_column_and_is_confirmed(simulator, simulator_server) -> None:
    simulator.configure(prometheus_metrics=True)
    _drops(simulator)
    simulator.require("evo-drop").loaded = False  # absent from /metrics

    async with evolution_client(simulator_server, MetricsAccess()) as client:
        seen = await client.fetch_states(NAMES, db_statuses=CONNECTED_IN_DB, confirm=set(NAMES))

    assert not seen["evo-drop"].live and seen["evo-drop"].status is InstanceStatus.DISCONNECTED
    assert simulator.calls["evolution.connectionState:evo-drop"] == 1
    assert _connection_state_calls(simulator) == 1
    assert all(seen[name].live for name in NAMES if name != "evo-drop")


@pytest.mark.pure
async def test_metrics_still_answer_when_fetch_instances_fails(simulator, simulator_server) -> None:
    simulator.configure(prometheus_metrics=True)
    _drops(simulator)
    async with evolution_client(simulator_server, MetricsAccess()) as client:
        simulator.configure(evolution_api_key="rotated")  # fetchInstances → 401; /metrics does not check apikey
        seen = await client.fetch_states([*NAMES, "evo-unknown"], db_statuses=CONNECTED_IN_DB)
    assert seen["evo-up"].status is InstanceStatus.CONNECTED and seen["evo-up"].live
    assert seen["evo-drop"].status is InstanceStatus.DISCONNECTED
    assert seen["evo-unknown"].status is None and seen["evo-unknown"].error


@pytest.mark.pure
async def test_the_waha_client_reads_statuses_from_metrics_and_falls_back_to_the_listing(
    simulator, simulator_server
) -> None:
    simulator.add_instance("w-up", "waha", "open")
    simulator.add_instance("w-down", "waha", "close")
    names = ["w-up", "w-down", "w-gone"]
    simulator.configure(waha_prometheus_metrics=True)
    client = WahaGateway(
        name="waha",
        base_url=simulator_server.url,
        api_key="sim-waha-key",
        timeout=httpx.Timeout(5),
        retry=RetryPolicy(attempts=1),
        metrics=MetricsAccess(),
    )
    async with client:
        seen = await client.fetch_states(names[:2])
        assert simulator.calls["waha.metrics"] == 1 and simulator.calls["waha.sessions"] == 0
        assert seen["w-up"].status is InstanceStatus.CONNECTED and seen["w-up"].live
        assert seen["w-down"].status is InstanceStatus.DISCONNECTED and seen["w-down"].reason == "session stopped"

        # A session /metrics does not list is read from the listing (where it is missing too).
        seen = await client.fetch_states(names)
        assert simulator.calls["waha.sessions"] == 1
        assert seen["w-gone"].status is InstanceStatus.DISCONNECTED and not seen["w-gone"].live

        simulator.configure(waha_prometheus_metrics=False)  # 404: the listing for all
        seen = await client.fetch_states(names[:2])
        assert simulator.calls["waha.sessions"] == 2
        assert seen["w-up"].status is InstanceStatus.CONNECTED and not seen["w-up"].live
        assert client.live_state_error is not None and "WAHA_PROMETHEUS_ENABLED" in client.live_state_error


# -- the flows ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def evolution_metrics_on(monkeypatch, simulator) -> Iterator[None]:
    """The `evolution` gateway configured with `EVOLUTION_METRICS=true`, and the simulator serving /metrics."""
    monkeypatch.setenv("EVOLUTION_METRICS", "true")
    get_settings.cache_clear()
    simulator.configure(prometheus_metrics=True)
    yield
    monkeypatch.delenv("EVOLUTION_METRICS")
    get_settings.cache_clear()


async def _sync_world(simulator: SimulatorState, count: int = 12) -> dict[str, object]:
    """``count`` open instances the database knows as connected, a third of them silently dropped, plus one up
    that the database has as disconnected."""
    org = await make_organization()
    ids = {}
    for i in range(count):
        name = f"evo-{i:02d}"
        simulator.add_instance(name, "evolution", "open")
        if i % 3 == 0:
            simulator.set_state(name, "close", reason_code=428)
        ids[name] = await make_instance(org, name, status="connected")
    simulator.add_instance("evo-new", "evolution", "open")
    ids["evo-new"] = await make_instance(org, "evo-new", status="disconnected")
    return ids


@pytest.mark.usefixtures("prefect_server", "evolution_metrics_on")
async def test_sync_uses_one_metrics_call_instead_of_connection_state_calls(simulator) -> None:
    ids = await _sync_world(simulator)

    report = await sync_status(mode="apply", force=True)  # force: every connected one would be confirmed live

    assert report.drifted == 5 and report.applied == 5 and report.unreachable == 0
    assert simulator.calls["evolution.metrics"] == 1 and simulator.calls["evolution.fetchInstances"] == 1
    assert _connection_state_calls(simulator) == 0
    summary = report.by_gateway["evolution"]
    assert summary.live_in_bulk == 13 and summary.live_state_error is None
    assert (await instance_row(ids["evo-00"]))["status"] == "disconnected"
    new = await instance_row(ids["evo-new"])
    assert new["status"] == "connected" and new["phone_number"] and new["live_confirmed_at"] is not None


@pytest.mark.usefixtures("prefect_server", "evolution_metrics_on")
async def test_sync_falls_back_to_confirmations_when_metrics_are_refused(simulator) -> None:
    ids = await _sync_world(simulator)
    simulator.configure(metrics_user="prom", metrics_password="s3cret")  # zapsync has no credentials

    report = await sync_status(mode="apply", force=True)

    assert report.drifted == 5 and report.applied == 5
    assert _connection_state_calls(simulator) == 13  # today's behaviour: each lagging `open` confirmed live
    error = report.by_gateway["evolution"].live_state_error
    assert error is not None and "HTTP 401" in error and "EVOLUTION_METRICS_USER" in error
    assert report.by_gateway["evolution"].live_in_bulk == 0
    assert (await instance_row(ids["evo-03"]))["status"] == "disconnected"


@pytest.mark.usefixtures("prefect_server")
async def test_without_metrics_the_sync_confirms_each_lagging_open(simulator) -> None:
    await _sync_world(simulator)

    report = await sync_status(mode="apply", force=True)

    assert report.applied == 5 and simulator.calls["evolution.metrics"] == 0
    assert _connection_state_calls(simulator) == 13


@pytest.mark.usefixtures("prefect_server", "evolution_metrics_on")
async def test_the_monitor_sees_a_silent_drop_through_metrics(simulator) -> None:
    org = await make_organization()
    simulator.add_instance("evo-h1", "evolution", "open")
    instance_id = await make_instance(org, "evo-h1", status="connected")
    assert (await monitor_health()).healthy == 1

    simulator.set_state("evo-h1", "close", reason_code=428)  # the column still says open
    calls_before = _connection_state_calls(simulator)
    report = await monitor_health()

    row = await instance_row(instance_id)
    assert (row["consecutive_failures"], row["status"]) == (1, "disconnected")
    assert report.failing == 1
    assert _connection_state_calls(simulator) == calls_before == 0
    assert simulator.calls["evolution.metrics"] == 2
