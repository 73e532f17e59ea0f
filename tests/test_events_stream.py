"""`GET /events` over real HTTP (uvicorn on loopback): each organization sees its own events only, resumable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from api.main import create_app
from core.events import event
from db.engine import dispose_engine
from db.repositories.live_events import publish
from gateways.simulator.server import SimulatorServer
from tests.factories import make_instance, make_organization
from tests.maintenance_rows import org_token


@pytest.fixture(scope="module")
def api_server() -> Iterator[SimulatorServer]:
    """The zapsync API served by uvicorn in a thread, on a loopback port."""
    with SimulatorServer(create_app(check_database=False), on_stop=dispose_engine) as server:
        yield server


class Stream:
    """One SSE connection, read in the background into a list of parsed events."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, str] = {}
        async for line in self.response.aiter_lines():
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.lstrip(" ")
                continue
            if "data" in fields:
                self.events.append(
                    {"event": fields.get("event"), "id": int(fields["id"]), **json.loads(fields["data"])}
                )
                self.changed.set()
            fields = {}

    async def wait_for(self, predicate: Any, seconds: float = 10) -> None:
        """Until ``predicate(events)`` holds (or fail after ``seconds``)."""
        async with asyncio.timeout(seconds):
            while not predicate(self.events):
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        self._task.cancel()
        await self.response.aclose()


@pytest.fixture
async def streams(api_server: SimulatorServer) -> AsyncIterator[Any]:
    """``await open_stream(headers)`` opens a stream; all are closed after the test."""
    opened: list[Stream] = []
    async with httpx.AsyncClient(base_url=api_server.url, timeout=httpx.Timeout(10, read=30)) as client:

        async def open_stream(headers: dict[str, str], **params: str) -> Stream:
            request = client.build_request("GET", "/events", headers=headers, params=params)
            response = await client.send(request, stream=True)
            assert response.status_code == 200, await response.aread()
            stream = Stream(response)
            opened.append(stream)
            return stream

        yield open_stream
        for stream in opened:
            await stream.close()


async def test_each_organization_receives_its_own_events_and_none_of_the_others(streams, api_server) -> None:
    org_a, org_b = await make_organization("A", secret="secret-a"), await make_organization("B")
    await make_instance(org_a, "a-01", status="disconnected")
    stream_a = await streams(await org_token(org_a))
    stream_b = await streams(await org_token(org_b))
    admin_for_b = await streams({"authorization": "Bearer test-admin-token"}, organization_id=str(org_b))

    await publish([event(org_a, "flow.result", n=1)])
    await publish([event(org_b, "flow.result", n=2)])
    async with httpx.AsyncClient(base_url=api_server.url) as client:  # the API process publishes too
        hook = await client.post(
            f"/webhooks/evolution/{org_a}",
            headers={"x-webhook-secret": "secret-a"},
            json={
                "event": "connection.update",
                "instance": "a-01",
                "data": {"instance": "a-01", "state": "open", "statusReason": 200},
            },
        )
        assert hook.status_code == 200 and hook.json()["outcome"] == "applied"
    await publish([event(org_a, "flow.result", n=3), event(org_b, "flow.result", n=4)])
    # A stream delivers events in commit order: once an event published after all of the above has arrived,
    # anything else bound for that stream (e.g. another organization's event leaking in) has arrived before it.
    await publish([event(org_a, "flow.result", marker=True), event(org_b, "flow.result", marker=True)])
    for stream in (stream_a, stream_b, admin_for_b):
        await stream.wait_for(lambda evs: any(e["payload"].get("marker") for e in evs))
        assert stream.events[-1]["payload"] == {"marker": True}
    events_a, events_b, admin_events = stream_a.events[:-1], stream_b.events[:-1], admin_for_b.events[:-1]

    assert [(e["event"], e["payload"].get("n")) for e in events_a] == [
        ("flow.result", 1),
        ("instance.status", None),
        ("flow.result", 3),
    ]
    assert events_a[1]["payload"]["to_status"] == "connected"
    assert {e["organization_id"] for e in stream_a.events} == {str(org_a)}
    assert [e["payload"]["n"] for e in events_b] == [2, 4]
    assert [e["payload"]["n"] for e in admin_events] == [2, 4]


async def test_last_event_id_resumes_after_the_last_event_seen(streams) -> None:
    org_a, org_b = await make_organization("A"), await make_organization("B")
    ids = await publish([event(org_a, "flow.result", n=i) for i in range(3)] + [event(org_b, "flow.result", n=9)])

    resumed = await streams({**await org_token(org_a), "Last-Event-ID": str(ids[0])})
    await resumed.wait_for(lambda evs: len(evs) == 2)
    await publish([event(org_a, "flow.result", n=3)])
    await resumed.wait_for(lambda evs: len(evs) == 3)

    assert [e["payload"]["n"] for e in resumed.events] == [1, 2, 3]
    assert [e["id"] for e in resumed.events][:2] == ids[1:3]


async def test_the_stream_needs_a_token_of_that_organization(api_server) -> None:
    org_a, org_b = await make_organization("A"), await make_organization("B")
    async with httpx.AsyncClient(base_url=api_server.url) as client:
        anonymous = await client.get("/events")
        elsewhere = await client.get("/events", params={"organization_id": str(org_b)}, headers=await org_token(org_a))
    assert anonymous.status_code == 401
    assert elsewhere.status_code == 403
