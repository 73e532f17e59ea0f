"""History reads of the gateway clients against the simulator over loopback (gateways.md §1.3 paging rules and
shapes), and the normalization of Baileys records."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from core.domain import ChatKind
from core.errors import GatewayNotSupported, GatewayRequestError
from gateways.base import iter_chats, iter_contacts, iter_messages
from gateways.evolution import EvolutionGateway
from gateways.megaapi import MegaApiGateway
from gateways.messages import MalformedMessage, from_baileys
from gateways.resilience import RetryPolicy

pytestmark = pytest.mark.pure

NEWEST = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def evolution(simulator) -> AsyncIterator[EvolutionGateway]:
    simulator.add_instance("evo-h", "evolution", "open")
    simulator.set_history(
        "evo-h",
        chats=6,
        messages_per_chat=5,
        group_chats=2,
        group_messages=2,
        broadcast_messages=2,
        empty_chats=1,
        extra_contacts=1,
        newest_at=NEWEST,
    )
    async with EvolutionGateway(
        name="evolution",
        base_url=os.environ["EVOLUTION_API_URL"],
        api_key=os.environ["EVOLUTION_API_KEY"],
        timeout=httpx.Timeout(5),
        retry=RetryPolicy(attempts=1),
    ) as client:
        yield client


async def test_find_chats_pages_with_take_and_skip(evolution, simulator) -> None:
    pages = [page async for page in iter_chats(evolution, "evo-h", page_size=4)]

    assert [len(p) for p in pages] == [4, 4, 2]  # 6 people + 2 groups + broadcast + 1 empty chat
    chats = [c for page in pages for c in page]
    assert [c.kind for c in chats].count(ChatKind.GROUP) == 2
    assert [c.jid for c in chats].count("status@broadcast") == 1
    assert chats[-1].last_message_at is None  # the chat without messages
    newest = [c.last_message_at for c in chats if c.last_message_at]
    assert newest == sorted(newest, reverse=True)  # most recently active first
    lid = next(c for c in chats if c.jid.endswith("@lid"))
    assert lid.alt_jid is not None and lid.alt_jid.endswith("@s.whatsapp.net")
    assert simulator.calls["evolution.findChats:evo-h"] == 3


async def test_find_contacts_pages_with_page_and_offset(evolution) -> None:
    pages = [page async for page in iter_contacts(evolution, "evo-h", page_size=3)]

    contacts = [c for page in pages for c in page]
    assert len(contacts) == 6 + 2 + 1 + 1  # people, groups, the empty chat, a contact without chat
    assert {c.kind for c in contacts} == {"contact", "group"}
    assert len({c.jid for c in contacts}) == len(contacts)


async def test_find_messages_pages_newest_first_with_totals_and_windows(evolution, simulator) -> None:
    history = simulator.history("evo-h")
    first = await evolution.fetch_messages("evo-h", page=1, page_size=7)

    assert (first.total, first.pages, first.page) == (history.total_messages, 6, 1)
    everything = [m async for page in iter_messages(evolution, "evo-h", page_size=7) for m in page.messages]
    assert len(everything) == 6 * 5 + 2 * 2 + 2 and len({m.external_id for m in everything}) == len(everything)
    stamps = [m.timestamp for m in everything]
    assert stamps == sorted(stamps, reverse=True)
    assert {m.kind for m in everything} == {ChatKind.CONTACT, ChatKind.GROUP, ChatKind.BROADCAST}
    assert {"image", "audio", "text"} <= {m.type for m in everything}
    media = next(m for m in everything if m.type == "image")
    assert media.media_mime == "image/jpeg" and media.media_url and media.media_size

    since, until = NEWEST - timedelta(hours=2, minutes=30), NEWEST - timedelta(minutes=30)
    window = [
        m
        async for page in iter_messages(evolution, "evo-h", page_size=50, since=since, until=until)
        for m in page.messages
    ]
    assert window and all(since.timestamp() <= m.timestamp <= until.timestamp() for m in window)
    assert len(window) == sum(1 for m in everything if since.timestamp() <= m.timestamp <= until.timestamp())

    lid = history.chat(4)
    one_chat = await evolution.fetch_messages("evo-h", page=1, page_size=50, chat_jid=lid.alt_jid)
    assert one_chat.total == 5 and {m.chat_jid for m in one_chat.messages} == {lid.jid}
    assert {m.alt_jid for m in one_chat.messages} == {lid.alt_jid}


async def test_find_messages_failure_knob_and_unknown_instance(evolution, simulator) -> None:
    simulator.configure(fail_find_messages_after_page=1)
    assert (await evolution.fetch_messages("evo-h", page=1, page_size=5)).messages
    with pytest.raises(GatewayRequestError, match="500"):
        await evolution.fetch_messages("evo-h", page=2, page_size=5)
    with pytest.raises(GatewayRequestError, match="404"):
        await evolution.fetch_messages("ghost", page=1, page_size=5)


async def test_megaapi_has_no_history_api(simulator) -> None:
    async with MegaApiGateway(
        name="megaapi", base_url=os.environ["MEGA_API_HOST"], api_key="t", timeout=httpx.Timeout(1)
    ) as mega:
        assert mega.supports_history is False
        with pytest.raises(GatewayNotSupported, match="no API to read"):
            await mega.fetch_messages("mega-1", page=1, page_size=10)
        with pytest.raises(GatewayNotSupported):
            await mega.fetch_chats("mega-1", skip=0, take=10)


def test_baileys_records_normalize_and_reject_what_is_not_a_message() -> None:
    key = {"remoteJid": "123@lid", "remoteJidAlt": "5511987654321@s.whatsapp.net", "fromMe": True, "id": "A1"}
    document = from_baileys(
        {
            "key": key,
            "messageTimestamp": {"low": 1729425600, "high": 0},
            "message": {
                "documentWithCaptionMessage": {
                    "message": {
                        "documentMessage": {
                            "fileName": "nota.pdf",
                            "mimetype": "application/pdf",
                            "caption": "segue",
                            "fileLength": {"low": 10},
                        }
                    }
                }
            },
            "MessageUpdate": [{"status": "DELIVERY_ACK"}, {"status": "READ"}, {"status": "SERVER_ACK"}],
        }
    )
    assert (document.type, document.content, document.media_name, document.media_size) == (
        "document",
        "segue",
        "nota.pdf",
        10,
    )
    assert (document.status, document.alt_jid, document.timestamp, document.from_me) == (
        "read",
        "5511987654321@s.whatsapp.net",
        1729425600,
        True,
    )
    text = from_baileys(
        {
            "key": {"remoteJid": "x@s.whatsapp.net", "id": "B"},
            "messageTimestamp": "1729425600123",
            "message": {"extendedTextMessage": {"text": "olá"}},
        }
    )
    assert (text.type, text.content, text.timestamp, text.status) == ("text", "olá", 1729425600, None)
    reaction = from_baileys(
        {
            "key": {"remoteJid": "x@s.whatsapp.net", "id": "C"},
            "messageTimestamp": 1,
            "messageType": "reactionMessage",
            "message": {"reactionMessage": {"text": "👍"}},
        }
    )
    assert (reaction.type, reaction.content) == ("reaction", "👍")
    for bad, needle in (
        ({"messageTimestamp": 1}, "key"),
        ({"key": {"remoteJid": "x"}, "messageTimestamp": 1}, "id"),
        ({"key": {"id": "D", "remoteJid": "x"}, "messageTimestamp": True}, "messageTimestamp"),
    ):
        with pytest.raises(MalformedMessage, match=needle):
            from_baileys(bad)
