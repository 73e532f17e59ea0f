"""Generated chat history of a simulated Evolution instance: chats, contacts and messages, derived, never stored.

A :class:`HistorySpec` describes the shape (how many one-to-one chats and messages per chat, groups, a
`status@broadcast` chat, chats without messages, contacts without chats); :class:`History` answers Evolution's
`findChats`, `findContacts` and `findMessages` from it. Message *k* (0 = newest) of chat *c* is computed from
``(c, k)`` when a page asks for it, so a million-message instance costs a few lists of chat indices.

Ordering. Messages are laid out in "layers": layer *k* holds the *k*-th newest message of every chat that has more
than *k* messages, in chat order. Timestamps fall strictly along that order (``newest - k * layer_seconds -
position``), so the instance-wide newest-first listing, a time window and one chat's messages are all index
arithmetic plus a binary search.

Variety, all deterministic: every ``lid_every``-th chat is keyed by ``@lid`` with ``remoteJidAlt``; every
``no_ninth_digit_every``-th Brazilian mobile lacks its ninth digit in the jid; every ``media_every``-th message is
media (image, audio, document, video, sticker in turn); directions alternate by ``(c + k) % 3``.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

AREA_CODES = (11, 21, 31, 41, 51, 61, 71, 81, 91, 19, 27, 48, 62, 85, 98)
FIRST_NAMES = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Fábio", "Gabi", "Heitor", "Iara", "João", "Lia", "Marcos")
SURNAMES = ("Silva", "Souza", "Costa", "Lima", "Rocha", "Alves", "Dias", "Melo", "Pires", "Reis", "Ramos")
PHRASES = (
    "oi, tudo bem?",
    "bom dia!",
    "qual o valor?",
    "pode me mandar o orçamento?",
    "obrigado 🙏",
    "vou verificar e te retorno",
    "chegou o pedido",
    "amanhã às 10h?",
    "pode ser",
    "perfeito, combinado",
)
MEDIA_TYPES = ("imageMessage", "audioMessage", "documentMessage", "videoMessage", "stickerMessage")
_MIMES = {
    "imageMessage": "image/jpeg",
    "audioMessage": "audio/ogg; codecs=opus",
    "documentMessage": "application/pdf",
    "videoMessage": "video/mp4",
    "stickerMessage": "image/webp",
}
BROADCAST_JID = "status@broadcast"


class HistorySpec(BaseModel):
    """The shape of one instance's stored history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chats: int = Field(default=0, ge=0)
    """One-to-one chats with messages."""
    messages_per_chat: int = Field(default=0, ge=0)
    group_chats: int = Field(default=0, ge=0)
    group_messages: int = Field(default=3, ge=1)
    """Messages in each group chat."""
    broadcast_messages: int = Field(default=0, ge=0)
    """Messages in `status@broadcast` (0: no such chat)."""
    empty_chats: int = Field(default=0, ge=0)
    """One-to-one chats without messages (listed with `lastMessage: null`)."""
    extra_contacts: int = Field(default=0, ge=0)
    """Contacts without any chat (findContacts only)."""
    lid_every: int = Field(default=5, ge=0)
    no_ninth_digit_every: int = Field(default=3, ge=0)
    media_every: int = Field(default=4, ge=0)
    spacing_s: int = Field(default=3600, ge=1)
    """Seconds between a chat's consecutive messages (at least the number of chats with messages)."""
    newest_at: datetime | None = None
    """Time of the newest message; None: when the history is first built."""
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ChatInfo:
    """One generated chat: its jid, its other address (LID chats), phone digits, name and message count."""

    index: int
    jid: str
    alt_jid: str | None
    phone: str | None
    """Digits of the phone-number jid, as WhatsApp addresses it (maybe without the ninth digit)."""
    full_phone: str | None
    """The same number with its ninth digit (what a CRM stores)."""
    name: str
    messages: int
    kind: str
    """`contact`, `group` or `broadcast`."""


def iso(dt: datetime) -> str:
    """Prisma/JavaScript ISO form (as ``shapes.iso``; this module sits below ``state``, which ``shapes`` imports)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _bsearch(lo: int, hi: int, predicate: Callable[[int], bool]) -> int:
    """The first index in [lo, hi) where ``predicate`` turns true (it is false then true), else ``hi``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class History:
    """Evolution's view of one instance's history, computed on demand from a :class:`HistorySpec`."""

    def __init__(self, spec: HistorySpec, *, instance_id: str, owner_name: str | None, now: datetime) -> None:
        self.spec = spec
        self.instance_id = instance_id
        self.owner_name = owner_name or "Você"
        newest = spec.newest_at or now
        self.newest_ts = int(newest.timestamp())
        sizes = [spec.messages_per_chat] * (spec.chats if spec.messages_per_chat else 0)
        sizes += [spec.group_messages] * spec.group_chats
        sizes += [spec.broadcast_messages] if spec.broadcast_messages else []
        self.sizes = sizes
        self.message_chats = len(sizes)
        self.individual = len(sizes) - spec.group_chats - (1 if spec.broadcast_messages else 0)
        self.layer_seconds = max(spec.spacing_s, self.message_chats, 1)
        # Bands of layers with the same active chats: layers [start, end) are shared by chats with size >= end.
        self._band_end: list[int] = []
        self._band_first: list[int] = []  # global index of the band's first message
        self._band_active: list[list[int]] = []
        self._band_position: list[dict[int, int]] = []
        first, start = 0, 0
        for end in sorted({s for s in sizes if s > 0}):
            active = [c for c, size in enumerate(sizes) if size >= end]
            self._band_end.append(end)
            self._band_first.append(first)
            self._band_active.append(active)
            self._band_position.append({c: p for p, c in enumerate(active)})
            first += (end - start) * len(active)
            start = end
        self.total_messages = first
        self._chats: dict[int, ChatInfo] = {}
        self.extra: list[tuple[int, dict[str, Any]]] = []
        """Messages added after the history was generated (newest first), with their chat: what arrived at the
        gateway later, e.g. while zapsync was not connected."""
        self._members = [self._person(self.chat_total + spec.extra_contacts + i, 0).jid for i in range(50)]

    # -- chats and contacts ---------------------------------------------------------------------------------

    def chat(self, index: int) -> ChatInfo:
        """Chat ``index``: message chats first (one-to-one, groups, broadcast), then the empty ones."""
        info = self._chats.get(index)
        if info is None:
            info = self._chats[index] = self._make_chat(index)
        return info

    def _make_chat(self, index: int) -> ChatInfo:
        spec = self.spec
        if index < self.individual or index >= self.message_chats:
            messages = self.sizes[index] if index < self.message_chats else 0
            return self._person(index, messages)
        if index < self.individual + spec.group_chats:
            g = index - self.individual
            return ChatInfo(
                index,
                f"120363{spec.seed % 1000:03d}{g:09d}@g.us",
                None,
                None,
                None,
                f"Grupo {g + 1}",
                self.sizes[index],
                "group",
            )
        return ChatInfo(index, BROADCAST_JID, None, None, None, "Status", self.sizes[index], "broadcast")

    def _person(self, index: int, messages: int) -> ChatInfo:
        spec = self.spec
        area = AREA_CODES[index % len(AREA_CODES)]
        subscriber = f"{9 - index % 3}{(index * 7919 + 1_234_567 + spec.seed) % 10**7:07d}"
        full = f"55{area}9{subscriber}"
        short = spec.no_ninth_digit_every and index % spec.no_ninth_digit_every == spec.no_ninth_digit_every - 1
        phone = f"55{area}{subscriber}" if short else full
        pn_jid = f"{phone}@s.whatsapp.net"
        name = f"{FIRST_NAMES[index % len(FIRST_NAMES)]} {SURNAMES[(index // len(FIRST_NAMES)) % len(SURNAMES)]}"
        if spec.lid_every and index % spec.lid_every == spec.lid_every - 1 and index < self.message_chats:
            lid = f"{180_000_000_000_000 + index * 7 + spec.seed}@lid"
            return ChatInfo(index, lid, pn_jid, phone, full, name, messages, "contact")
        return ChatInfo(index, pn_jid, None, phone, full, name, messages, "contact")

    @property
    def chat_total(self) -> int:
        """Chats `findChats` lists: message chats then empty ones."""
        return self.message_chats + self.spec.empty_chats

    def chats(self) -> Iterator[ChatInfo]:
        """Every chat in `findChats` order."""
        return (self.chat(i) for i in range(self.chat_total))

    def contacts(self) -> Iterator[ChatInfo]:
        """Every contact in `findContacts` order: people with chats, groups, then contacts without chats."""
        for i in range(self.chat_total):
            info = self.chat(i)
            if info.kind != "broadcast":
                yield info
        for j in range(self.spec.extra_contacts):
            yield self._person(self.chat_total + j, 0)

    def add_messages(self, chat: int, count: int, *, at: int) -> list[dict[str, Any]]:
        """Add ``count`` messages from the contact of chat ``chat``, the newest at epoch ``at``, one second apart:
        newer than anything generated. Returns their records, newest first."""
        if not 0 <= chat < self.message_chats:
            raise ValueError(f"no chat {chat} with messages")
        base = len(self.extra)
        added = []
        for i in range(count):
            record = copy.deepcopy(self.record(chat, 0))
            record["key"]["id"] = f"3EB1{chat:05X}{base + count - 1 - i:07X}{self.spec.seed % 256:02X}"
            record["key"]["fromMe"] = False
            record["messageTimestamp"] = at - i
            record["messageType"] = "conversation"
            record["message"] = {"conversation": f"mensagem nova {base + count - i}"}
            record.pop("participant", None)
            added.append(record)
        self.extra = [(chat, r) for r in added] + self.extra
        return added

    def extra_window(self, gte: int | None, lte: int | None, chat: int | None) -> list[dict[str, Any]]:
        """The added messages within the bounds (of one chat when given), newest first."""
        return [
            r
            for c, r in self.extra
            if (chat is None or c == chat)
            and (gte is None or r["messageTimestamp"] >= gte)
            and (lte is None or r["messageTimestamp"] <= lte)
        ]

    def _chat_order(self, skip: int, end: int) -> list[int]:
        """Chat indices at listing positions [skip, end): chats with added messages first (newest first)."""
        if not self.extra:
            return list(range(skip, end))
        moved = list(dict.fromkeys(c for c, _ in self.extra))
        skipped = set(moved)
        rest = (i for i in range(self.chat_total) if i not in skipped)
        return list(itertools.islice(itertools.chain(moved, rest), skip, end))

    def chat_rows(self, skip: int, take: int | None) -> list[dict[str, Any]]:
        """`findChats` rows (most recently active first), with each chat's last message."""
        end = self.chat_total if take is None else min(self.chat_total, skip + take)
        newest_added = {}
        for c, record in reversed(self.extra):
            newest_added[c] = record
        rows = []
        for i in self._chat_order(max(skip, 0), end):
            info = self.chat(i)
            last = newest_added.get(i) or (self.record(i, 0) if info.messages else None)
            if i in newest_added:
                at = int(newest_added[i]["messageTimestamp"])
            else:
                at = self.timestamp(i, 0) if info.messages else self.newest_ts - 400 * 86_400 - i
            rows.append(
                {
                    "id": f"cm{self.instance_id[:8]}c{i:08x}",
                    "remoteJid": info.jid,
                    "pushName": info.name if info.kind == "contact" else None,
                    "name": info.name,
                    "profilePicUrl": None,
                    "updatedAt": iso(datetime.fromtimestamp(at, UTC)),
                    "lastMessage": last,
                    "unreadCount": 1 if last and not last["key"]["fromMe"] else 0,
                    "isSaved": True,
                }
            )
        return rows

    def contact_rows(self, page: int, offset: int | None) -> list[dict[str, Any]]:
        """`findContacts` rows for a 1-based page of ``offset`` rows (all of them when ``offset`` is None)."""
        if offset is None:
            everything = list(self.contacts())
        else:
            start = (max(page, 1) - 1) * offset
            everything = list(itertools.islice(self.contacts(), start, start + offset))
        created = iso(datetime.fromtimestamp(self.newest_ts - 30 * 86_400, UTC))
        return [
            {
                "id": f"cm{self.instance_id[:8]}k{info.index:08x}",
                "remoteJid": info.jid,
                "pushName": info.name,
                "profilePicUrl": None,
                "createdAt": created,
                "updatedAt": created,
                "instanceId": self.instance_id,
                "isGroup": info.kind == "group",
                "isSaved": True,
                "type": "group" if info.kind == "group" else "contact",
            }
            for info in everything
        ]

    # -- messages -------------------------------------------------------------------------------------------

    def _band_of_layer(self, k: int) -> int:
        return bisect.bisect_right(self._band_end, k)

    def timestamp(self, c: int, k: int) -> int:
        """Epoch seconds of message ``k`` (0 = newest) of chat ``c``."""
        position = self._band_position[self._band_of_layer(k)][c]
        return self.newest_ts - k * self.layer_seconds - position

    def _locate(self, g: int) -> tuple[int, int, int]:
        """(chat, layer, position in layer) of the ``g``-th newest message of the instance."""
        band = bisect.bisect_right(self._band_first, g) - 1
        active = self._band_active[band]
        offset = g - self._band_first[band]
        start = self._band_end[band - 1] if band else 0
        k, position = start + offset // len(active), offset % len(active)
        return active[position], k, position

    def _global_ts(self, g: int) -> int:
        _, k, position = self._locate(g)
        return self.newest_ts - k * self.layer_seconds - position

    def message_window(self, gte: int | None, lte: int | None, chat: int | None) -> tuple[int, int]:
        """[first, end) of the messages within the time bounds, as instance-wide or in-chat indices."""
        ts: Callable[[int], int]
        if chat is None:
            ts, size = self._global_ts, self.total_messages
        else:
            size = self.sizes[chat] if 0 <= chat < self.message_chats else 0

            def ts(k: int) -> int:
                return self.timestamp(chat, k)

        first = 0 if lte is None else _bsearch(0, size, lambda i: ts(i) <= lte)
        end = size if gte is None else _bsearch(first, size, lambda i: ts(i) < gte)
        return first, end

    def chat_index(self, jid: str) -> int | None:
        """The index of the chat with this jid (or LID alternate), if it has messages."""
        if jid == BROADCAST_JID:
            return self.message_chats - 1 if self.spec.broadcast_messages else None
        for i in range(self.message_chats):
            info = self.chat(i)
            if jid in (info.jid, info.alt_jid):
                return i
        return None

    def records(self, indices: range, chat: int | None) -> list[dict[str, Any]]:
        """findMessages records for instance-wide (``chat`` None) or in-chat message indices."""
        if chat is not None:
            return [self.record(chat, k) for k in indices]
        out = []
        for g in indices:
            c, k, _ = self._locate(g)
            out.append(self.record(c, k))
        return out

    def record(self, c: int, k: int) -> dict[str, Any]:
        """Message ``k`` (0 = newest) of chat ``c``, in findMessages' record shape."""
        info = self.chat(c)
        spec = self.spec
        from_me = (c + k) % 3 == 1 if info.kind != "broadcast" else False
        key: dict[str, Any] = {
            "id": f"3EB0{c:05X}{k:07X}{spec.seed % 256:02X}",
            "fromMe": from_me,
            "remoteJid": info.jid,
        }
        if info.alt_jid:
            key["remoteJidAlt"], key["addressingMode"] = info.alt_jid, "lid"
        if info.kind != "contact":
            key["participant"] = self._members[(c * 31 + k) % len(self._members)]
        if spec.media_every and k % spec.media_every == spec.media_every - 1:
            wire_type = MEDIA_TYPES[(c + k) % len(MEDIA_TYPES)]
            media: dict[str, Any] = {
                "url": f"https://mmg.whatsapp.net/v/t62.7118-24/{c}_{k}.enc",
                "mimetype": _MIMES[wire_type],
                "fileLength": str(1024 + (c * 131 + k) % 500_000),
                "mediaKey": "k" * 44,
            }
            if wire_type in ("imageMessage", "videoMessage"):
                media["caption"] = PHRASES[(c + k) % len(PHRASES)]
            if wire_type == "documentMessage":
                media["fileName"] = f"orcamento-{c}-{k}.pdf"
            body: dict[str, Any] = {wire_type: media}
        else:
            wire_type = "conversation"
            body = {"conversation": PHRASES[(c * 7 + k) % len(PHRASES)]}
        if from_me:
            updates = [{"status": "DELIVERY_ACK"}] if k == 0 else [{"status": "DELIVERY_ACK"}, {"status": "READ"}]
        else:
            updates = [] if k == 0 else [{"status": "READ"}]
        return {
            "id": f"cm{c:06x}{k:08x}",
            "key": key,
            "pushName": self.owner_name if from_me else info.name,
            "messageType": wire_type,
            "message": body,
            "messageTimestamp": self.timestamp(c, k),
            "instanceId": self.instance_id,
            "source": ("android", "ios", "web")[(c + k) % 3],
            "contextInfo": None,
            "MessageUpdate": updates,
        }
