"""In-memory world of the gateway simulator: instances, their connection states, call counters, change events.

Pure Python, no HTTP. States use Evolution's vocabulary (``open | connecting | close | refused``) for every provider;
the MegaAPI routes map them to ``connected | disconnected``. Two views of an instance are kept, as Evolution keeps
them (gateways.md §1.3 "How fresh is connectionStatus?"):

* ``live_state`` — what ``connectionState`` reports (in memory at the gateway);
* ``column_state`` — the persisted ``connectionStatus`` column that ``fetchInstances`` returns. It is written only
  when a QR code is emitted (``connecting``), on ``open``, and on a *non-reconnectable* close (401/402/403/406).
  A reconnectable drop (408/428/440/515…) leaves it saying ``open`` while the live state is ``close``/``connecting``.

Every change is published to the listeners as a :class:`StateChange` or :class:`QrEmitted`. The state is safe to
use from the thread that serves the HTTP routes and from a test thread at the same time (one re-entrant lock);
listeners are called outside the lock and must not block.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import string
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from core.qr import qr_png_data_url
from gateways.simulator.history import History, HistorySpec
from gateways.simulator.sends import (
    SendBook,
    SendDelivery,
    chat_message,
    delivery,
    message_bodies,
    receipt_bodies,
    to_jid,
)

logger = logging.getLogger(__name__)

ProviderName = Literal["evolution", "megaapi", "waha"]
LiveState = Literal["open", "connecting", "close", "refused"]
ColumnState = Literal["open", "connecting", "close"]

PROVIDERS: tuple[str, ...] = get_args(ProviderName)
LIVE_STATES: tuple[str, ...] = get_args(LiveState)
INTEGRATIONS = ("WHATSAPP-BAILEYS", "WHATSAPP-BUSINESS", "EVOLUTION")

NON_RECONNECTABLE_CODES = frozenset({401, 402, 403, 406})
"""Baileys disconnect codes after which Evolution does not reconnect and writes ``close`` to the column."""
RECONNECTABLE_CODES = (408, 428, 440, 515)
"""Typical codes of drops that Evolution reconnects by itself (timed out, closed, replaced, restart required)."""
QR_LIMIT_REASON = 428


@functools.lru_cache(maxsize=1024)
def qr_image(code: str) -> str:
    """The PNG data URL of a QR string, as Evolution's ``base64`` field carries it (a phone can scan it)."""
    return qr_png_data_url(code)


_UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID_V4 = (0x8000 << 48) | (4 << 76)
_PAIRING_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"
_QR_ALPHABET = string.ascii_letters + string.digits + "+/"
_FIRST_NAMES = ("Ana", "Bruno", "Carla", "Diego", "Elisa", "Fábio", "Gabi", "Heitor", "Iara", "João", "Lia", "Marcos")
_BUSINESSES = ("Padaria", "Clínica", "Oficina", "Loja", "Studio", "Mercado", "Pet Shop", "Imobiliária", "Escola")


def is_reconnectable(reason_code: int | None) -> bool:
    """Whether Evolution reconnects by itself after a drop with this code (``None`` counts as reconnectable)."""
    return reason_code is None or reason_code not in NON_RECONNECTABLE_CODES


class SimulatorError(Exception):
    """Base of the errors the state raises; the HTTP layer maps them to each provider's envelope."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.name = name


class InstanceNotFound(SimulatorError):
    """No instance with that name (for that provider)."""


class InstanceExists(SimulatorError):
    """An instance with that name already exists."""


class InstanceNotConnected(SimulatorError):
    """The operation needs a session that is not ``close`` (Evolution's restart/logout refusals)."""


class SimulatorConfig(BaseModel):
    """Knobs of the simulator. Assignments are validated, so ``state.config.outage = True`` is safe."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    evolution_api_key: str = "sim-evolution-key"
    megaapi_token: str = "sim-megaapi-token"
    waha_api_key: str = "sim-waha-key"
    latency_ms: float = Field(default=0, ge=0)
    """Added to every provider route."""
    error_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of provider requests answered 503 with the provider's error envelope (seeded draws)."""
    outage: bool = False
    """Every provider route answers 503."""
    outage_cycle: str = Field(default="", pattern=r"^[01]*$", max_length=1000)
    """A flapping gateway: provider requests follow this cycle, one character each, ``1`` answered 503 and ``0``
    served (``"10"``: every other request fails). Empty: off. Restarts at the first character on each `configure`
    that sets it."""
    hang: bool = False
    """Provider routes wait ``hang_s`` (or until ``hang`` is switched off) before answering."""
    hang_s: float = Field(default=60.0, ge=0)
    lagging_column: bool = True
    """Reconnectable drops leave Evolution's ``connectionStatus`` column at ``open``."""
    flap_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of instances changed by each :meth:`SimulatorState.tick`."""
    seed: int = 0
    qrcode_limit: int = Field(default=30, ge=1)
    """QR codes per session before the state becomes ``refused`` (Evolution's ``QRCODE_LIMIT``)."""
    version: str = "2.3.6"
    """Evolution version reported by ``GET /``."""
    history: HistorySpec | None = None
    """Chat history of every Evolution instance that has none of its own (see :meth:`SimulatorState.set_history`)."""
    fail_find_messages_after_page: int | None = Field(default=None, ge=0)
    """`findMessages` answers 500 for pages after this one (a crash in the middle of an import)."""
    send_timeout_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of sends accepted, recorded and echoed, then answered only after ``send_hang_s`` (seeded draws)."""
    send_hang_s: float = Field(default=30.0, ge=0)
    """How late a timed-out send is answered (longer than the client's send timeout)."""
    send_error_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of sends answered 503 before accepting them (nothing recorded, nothing echoed)."""
    not_on_whatsapp: list[str] = Field(default_factory=list)
    """Numbers (digits) answered with Evolution's 400 ``exists: false`` (MegaAPI: a 400 saying so)."""
    receipts: bool = False
    """Follow each send's echo with its receipts (sent, delivered, read)."""
    send_drop_next: int = Field(default=0, ge=0)
    """The next this many sends are lost inside the gateway: nothing recorded or echoed, answered only after
    ``send_hang_s`` (the client cannot tell them from ``send_timeout_rate``'s; only the gateway's history can)."""
    prometheus_metrics: bool = False
    """Evolution's `PROMETHEUS_METRICS=true`: `GET /metrics` serves every loaded instance's live state."""
    metrics_user: str | None = None
    """Evolution's `METRICS_USER`: with ``metrics_password``, `/metrics` asks for Basic auth (401 otherwise)."""
    metrics_password: str | None = None
    waha_prometheus_metrics: bool = False
    """WAHA's `WAHA_PROMETHEUS_ENABLED=true`: `GET /metrics` serves `waha_session_status` (no auth)."""


@dataclass(slots=True)
class SimInstance:
    """One WhatsApp number at a simulated gateway."""

    name: str
    provider: ProviderName
    instance_id: str
    token: str
    """The instance's own key (Evolution's ``hash``/``token``)."""
    live_state: LiveState = "close"
    column_state: ColumnState = "close"
    owner_jid: str | None = None
    profile_name: str | None = None
    qr_count: int = 0
    disconnection_reason_code: int | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    integration: str = "WHATSAPP-BAILEYS"
    number: str | None = None
    profile_pic_url: str | None = None
    disconnection_at: datetime | None = None
    qr_code: str | None = None
    """The current QR payload (``2@…``) while a QR login is pending."""
    pairing_code: str | None = None
    message_count: int = 0
    contact_count: int = 0
    chat_count: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    webhook: dict[str, Any] | None = None
    """Per-instance webhook (Evolution's ``Webhook`` row fields), set by create or ``/webhook/set``."""
    history: HistorySpec | None = None
    """This instance's generated chat history (else the config's default)."""
    waha_status: str | None = None
    """A WAHA status shown instead of the one mapped from ``live_state`` (e.g. ``PASSKEY_REQUIRED``)."""
    loaded: bool = True
    """Whether the gateway holds the instance in memory: Evolution's `/metrics` lists only loaded instances."""

    def row_key(self) -> tuple[Any, ...]:
        """The persisted row's fields that change over time (Evolution writes ``updatedAt`` when they do)."""
        return (
            self.column_state,
            self.owner_jid,
            self.profile_name,
            self.profile_pic_url,
            self.number,
            self.token,
            self.disconnection_reason_code,
            self.disconnection_at,
        )

    @property
    def paired(self) -> bool:
        """Whether the instance holds a WhatsApp session that can reconnect without a new QR code."""
        return self.owner_jid is not None and self.disconnection_reason_code not in NON_RECONNECTABLE_CODES


@dataclass(frozen=True, slots=True)
class StateChange:
    """A change of an instance's live state (``old == new`` when only the column moved)."""

    name: str
    provider: ProviderName
    old: LiveState
    new: LiveState
    reason_code: int | None
    at: datetime
    column: ColumnState = "close"
    owner_jid: str | None = None
    profile_name: str | None = None
    profile_pic_url: str | None = None
    token: str | None = None
    webhook: Mapping[str, Any] | None = None
    """The instance's own webhook at the time of the change (it may be deleted before delivery)."""


@dataclass(frozen=True, slots=True)
class QrEmitted:
    """A QR code was produced for an instance (or, with ``limit_reached``, refused after ``qrcode_limit``)."""

    name: str
    provider: ProviderName
    code: str | None
    base64: str | None
    pairing_code: str | None
    count: int
    at: datetime
    limit_reached: bool = False
    owner_jid: str | None = None
    token: str | None = None
    webhook: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class QrCode:
    """What Evolution's ``connect`` returns while a session waits for a scan (``code`` None: no QR yet)."""

    pairing_code: str | None
    code: str | None
    base64: str | None
    count: int


@dataclass(frozen=True, slots=True)
class InstanceRemoved:
    """An instance was deleted: Evolution fires ``instance.delete`` and ``remove.instance`` to its webhook."""

    name: str
    provider: ProviderName
    instance_id: str
    at: datetime
    owner_jid: str | None = None
    token: str | None = None
    webhook: Mapping[str, Any] | None = None


SimEvent = StateChange | QrEmitted | InstanceRemoved | SendDelivery
Listener = Callable[[SimEvent], None]


class SimulatorState:
    """Instances, knobs, call counters and change listeners of one simulated gateway host."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or SimulatorConfig()
        self.instances: dict[str, SimInstance] = {}
        self.calls: Counter[str] = Counter()
        self.listeners: list[Listener] = []
        self.sleep = sleep
        """How the provider routes wait out ``latency_ms`` (seconds; awaited on the server's loop)."""
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.RLock()
        self._rng = random.Random(self.config.seed)
        self._fault_rng = random.Random(f"faults:{self.config.seed}")
        self._flap_position = 0
        self._histories: dict[str, tuple[HistorySpec, History]] = {}
        self.sends = SendBook(self.config.seed)
        """Sends the host accepted (``gateways.simulator.sends``)."""

    # -- plumbing -------------------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Register ``listener`` for every :data:`SimEvent`; returns a function that unsubscribes it."""
        self.listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)

        return unsubscribe

    def _notify(self, events: list[SimEvent]) -> None:
        for event in events:
            for listener in list(self.listeners):
                try:
                    listener(event)
                except Exception:
                    logger.exception("simulator listener failed on %s", type(event).__name__)

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Apply a partial update of :class:`SimulatorConfig` (validated); a new ``seed`` re-seeds the draws."""
        with self._lock:
            merged = {**self.config.model_dump(), **changes}
            self.config = SimulatorConfig.model_validate(merged)
            if "outage_cycle" in changes:
                self._flap_position = 0
            if "seed" in changes:
                self._reseed()
            return self.config

    def _reseed(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._fault_rng = random.Random(f"faults:{self.config.seed}")
        self.sends.reseed(self.config.seed)

    def publish_send(self, delivery: SendDelivery) -> None:
        """Hand an accepted send's webhooks (echo, receipts) to the listeners."""
        self._notify([delivery])

    def record_call(self, key: str) -> None:
        """Count one provider request, keyed like ``"evolution.restart:acme-01"``."""
        with self._lock:
            self.calls[key] += 1

    def draw_fault(self) -> bool:
        """Seeded draw: should this provider request fail with 503 (``error_rate``)?"""
        rate = self.config.error_rate
        if rate <= 0:
            return False
        with self._lock:
            return self._fault_rng.random() < rate

    def draw_flap(self) -> bool:
        """Should this provider request fail with 503 (the next character of ``outage_cycle`` is ``1``)?"""
        cycle = self.config.outage_cycle
        if not cycle:
            return False
        with self._lock:
            position, self._flap_position = self._flap_position, self._flap_position + 1
        return cycle[position % len(cycle)] == "1"

    def reset(self, *, keep_config: bool = False) -> None:
        """Drop every instance and counter, restore the default knobs (unless ``keep_config``), re-seed the draws."""
        with self._lock:
            self.instances.clear()
            self.calls.clear()
            self._histories.clear()
            self.sends.clear(self.config.seed)
            if not keep_config:
                self.config = SimulatorConfig()
            self._flap_position = 0
            self._reseed()

    # -- instances ------------------------------------------------------------------------------------------------

    def get(self, name: str, provider: str | None = None) -> SimInstance | None:
        """The instance called ``name`` (restricted to ``provider`` when given), or None."""
        inst = self.instances.get(name)
        if inst is None or (provider is not None and inst.provider != provider):
            return None
        return inst

    def require(self, name: str, provider: str | None = None) -> SimInstance:
        """Like :meth:`get` but raises :class:`InstanceNotFound`."""
        inst = self.get(name, provider)
        if inst is None:
            raise InstanceNotFound(f'The "{name}" instance does not exist', name=name)
        return inst

    def _uuid(self) -> str:
        """A version-4 UUID drawn from the seeded generator (same bits as ``uuid.UUID(int=…, version=4)``)."""
        bits = (self._rng.getrandbits(128) & _UUID_CLEAR) | _UUID_V4
        h = f"{bits:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _phone_jid(self) -> str:
        draw = self._rng.random
        return f"55{11 + int(draw() * 89)}9{int(draw() * 10**8):08d}@s.whatsapp.net"

    def _new_instance(
        self, name: str, provider: ProviderName, *, token: str | None, integration: str, now: datetime
    ) -> SimInstance:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}")
        draw = self._rng.random
        inst = SimInstance(
            name=name,
            provider=provider,
            instance_id=self._uuid(),
            token=token or self._uuid().upper(),
            created_at=now,
            updated_at=now,
            integration=integration,
            profile_name=(
                _BUSINESSES[int(draw() * len(_BUSINESSES))] + " " + _FIRST_NAMES[int(draw() * len(_FIRST_NAMES))]
            ),
            message_count=int(draw() * 5000),
            contact_count=int(draw() * 300),
            chat_count=int(draw() * 120),
        )
        self.instances[name] = inst
        return inst

    def _pair(self, inst: SimInstance) -> None:
        if inst.owner_jid is None:
            inst.owner_jid = self._phone_jid()
            inst.profile_pic_url = f"https://pps.whatsapp.net/v/t61.24694-24/sim-{inst.instance_id[:8]}.jpg"

    def seed_instances(
        self,
        count: int,
        *,
        provider: ProviderName = "evolution",
        prefix: str = "sim",
        connected_ratio: float = 0.7,
        start: int = 1,
    ) -> list[SimInstance]:
        """Create ``prefix-00001``… deterministically; ``round(count * connected_ratio)`` of them are ``open``.

        The others never paired (``close`` in both views). Raises :class:`InstanceExists` on a name clash.
        """
        if not 0 <= connected_ratio <= 1:
            raise ValueError("connected_ratio must be within [0, 1]")
        with self._lock:
            names = [f"{prefix}-{i:05d}" for i in range(start, start + count)]
            clash = next((n for n in names if n in self.instances), None)
            if clash is not None:
                raise InstanceExists(f'This name "{clash}" is already in use.', name=clash)
            connected = set(self._rng.sample(range(count), round(count * connected_ratio)))
            now = self._clock()
            created: list[SimInstance] = []
            for i, name in enumerate(names):
                inst = self._new_instance(name, provider, token=None, integration="WHATSAPP-BAILEYS", now=now)
                if i in connected:
                    self._pair(inst)
                    inst.live_state = inst.column_state = "open"
                created.append(inst)
            return created

    def add_instance(
        self,
        name: str,
        provider: ProviderName = "evolution",
        live_state: LiveState = "close",
        *,
        token: str | None = None,
        integration: str = "WHATSAPP-BAILEYS",
    ) -> SimInstance:
        """Create one instance directly in ``live_state`` (both views agree; ``open`` means paired)."""
        if live_state not in LIVE_STATES:
            raise ValueError(f"unknown state {live_state!r}")
        with self._lock:
            if name in self.instances:
                raise InstanceExists(f'This name "{name}" is already in use.', name=name)
            inst = self._new_instance(name, provider, token=token, integration=integration, now=self._clock())
            inst.live_state = live_state
            inst.column_state = "connecting" if live_state == "refused" else live_state
            if live_state == "open":
                self._pair(inst)
            return inst

    # -- chat history ---------------------------------------------------------------------------------------------

    def set_history(self, name: str, spec: HistorySpec | None = None, **fields: Any) -> History:
        """Give instance ``name`` a generated history (``spec``, or a spec built from ``fields``)."""
        with self._lock:
            inst = self.require(name)
            inst.history = spec or HistorySpec(**fields)
            self._histories.pop(name, None)
            built = self.history(name)
            assert built is not None
            return built

    def add_messages(
        self, name: str, *, chat: int = 0, count: int = 1, at: datetime | None = None
    ) -> list[dict[str, Any]]:
        """New messages at the gateway for instance ``name``'s chat ``chat`` (the newest at ``at``, default now)."""
        with self._lock:
            history = self.history(name)
            if history is None:
                raise KeyError(f"instance {name!r} has no history")
            when = at or self._clock()
            return history.add_messages(chat, count, at=int(when.timestamp()))

    def history(self, name: str) -> History | None:
        """The instance's history (its own spec, else the config's default), built once per spec."""
        with self._lock:
            inst = self.get(name)
            spec = (inst.history or self.config.history) if inst is not None else None
            if inst is None or spec is None:
                return None
            cached = self._histories.get(name)
            if cached is None or cached[0] != spec:
                built = History(
                    spec,
                    instance_id=inst.instance_id,
                    owner_name=inst.profile_name,
                    now=self._clock().replace(microsecond=0),
                )
                cached = self._histories[name] = (spec, built)
            return cached[1]

    # -- messages that reach an instance, and receipts -----------------------------------------------------------

    def receive_message(
        self, name: str, number: str, text: str, *, from_me: bool = False, push_name: str | None = None
    ) -> dict[str, Any]:
        """A text message from ``number`` reaches instance ``name`` (``from_me``: its owner typed it on the phone to
        ``number``); its provider's webhook delivers it. Returns the message as the gateway stores it."""
        with self._lock:
            inst = self.require(name)
            message = chat_message(
                inst,
                jid=to_jid(number),
                external_id=self.sends.external_id(),
                text=text,
                at=self._clock(),
                from_me=from_me,
                push_name=push_name,
            )
            sent = delivery(inst, message_bodies(inst, message), at=self._clock())
        self._notify([sent])
        return message

    def send_receipts(self, name: str, number: str, external_id: str, *statuses: str) -> None:
        """Receipts (``sent``, ``delivered``, ``read``, ``played``) of instance ``name``'s message ``external_id`` to
        ``number``, delivered in the order given (a late one included: deliveries are not ordered, gateways.md §8.3)."""
        with self._lock:
            inst = self.require(name)
            bodies = receipt_bodies(inst, jid=to_jid(number), external_id=external_id, statuses=statuses)
            sent = delivery(inst, bodies, at=self._clock())
        self._notify([sent])

    # -- state transitions ----------------------------------------------------------------------------------------

    @staticmethod
    def _change(inst: SimInstance, old: LiveState, reason_code: int | None, now: datetime) -> StateChange:
        return StateChange(
            name=inst.name,
            provider=inst.provider,
            old=old,
            new=inst.live_state,
            reason_code=reason_code,
            at=now,
            column=inst.column_state,
            owner_jid=inst.owner_jid,
            profile_name=inst.profile_name,
            profile_pic_url=inst.profile_pic_url,
            token=inst.token,
            webhook=inst.webhook,
        )

    def _apply(
        self, inst: SimInstance, state: LiveState, reason_code: int | None, events: list[SimEvent]
    ) -> StateChange:
        """Move ``inst`` to ``state`` with Evolution's column rules; append the event if anything changed."""
        if state not in LIVE_STATES:
            raise ValueError(f"unknown state {state!r}")
        if state == "connecting" and not is_reconnectable(reason_code):
            raise ValueError(f"reason {reason_code} ends the session: use state 'close'")
        old, old_column, old_row = inst.live_state, inst.column_state, inst.row_key()
        now = self._clock()
        inst.live_state = state
        if state == "open":
            self._pair(inst)
            inst.column_state = "open"
            inst.disconnection_reason_code = None
            inst.qr_count = 0
            inst.qr_code = inst.pairing_code = None
        elif state == "refused":
            inst.qr_code = inst.pairing_code = None
            reason_code = QR_LIMIT_REASON if reason_code is None else reason_code
        elif is_reconnectable(reason_code):
            if state == "close":
                inst.qr_code = inst.pairing_code = None
            if not self.config.lagging_column:
                inst.column_state = state
        else:
            inst.column_state = "close"
            inst.disconnection_reason_code = reason_code
            inst.disconnection_at = now
            inst.qr_count = 0
            inst.qr_code = inst.pairing_code = None
        if inst.row_key() != old_row:  # Prisma's @updatedAt moves only when the row is written
            inst.updated_at = now
        change = self._change(inst, old, reason_code, now)
        if old != state or old_column != inst.column_state:
            events.append(change)
        return change

    def set_state(self, name: str, state: LiveState, *, reason_code: int | None = None) -> StateChange:
        """Set an instance's live state with Evolution's semantics and notify listeners.

        ``open`` writes the column (and pairs the instance); a reconnectable drop (``reason_code`` None or not in
        401/402/403/406) to ``close``/``connecting`` writes it only when ``lagging_column`` is off; a
        non-reconnectable ``close`` writes ``close`` and the ``disconnection*`` fields. Listeners are only told when
        something changed; the returned change has ``old == new`` otherwise.
        """
        events: list[SimEvent] = []
        with self._lock:
            change = self._apply(self.require(name), state, reason_code, events)
        self._notify(events)
        return change

    def _emit_qr(self, inst: SimInstance, number: str | None, events: list[SimEvent]) -> QrEmitted:
        rng = self._rng
        now = self._clock()
        inst.qr_count += 1
        if inst.qr_count > self.config.qrcode_limit:
            self._apply(inst, "refused", QR_LIMIT_REASON, events)
            qr = QrEmitted(
                inst.name,
                inst.provider,
                None,
                None,
                None,
                inst.qr_count,
                now,
                limit_reached=True,
                owner_jid=inst.owner_jid,
                token=inst.token,
                webhook=inst.webhook,
            )
            events.append(qr)
            return qr
        old, old_column, old_row = inst.live_state, inst.column_state, inst.row_key()
        inst.live_state = inst.column_state = "connecting"
        inst.qr_code = "2@" + "".join(rng.choices(_QR_ALPHABET, k=88)) + "," + inst.instance_id
        if number:
            inst.number = number
            inst.pairing_code = "".join(rng.choices(_PAIRING_ALPHABET, k=8))
        if inst.row_key() != old_row:
            inst.updated_at = now
        if old != "connecting" or old_column != "connecting":
            events.append(self._change(inst, old, None, now))
        qr = QrEmitted(
            inst.name,
            inst.provider,
            inst.qr_code,
            qr_image(inst.qr_code),
            inst.pairing_code,
            inst.qr_count,
            now,
            owner_jid=inst.owner_jid,
            token=inst.token,
            webhook=inst.webhook,
        )
        events.append(qr)
        return qr

    def emit_qr(self, name: str, *, number: str | None = None) -> QrEmitted:
        """Produce a new QR code: live and column go ``connecting``; past ``qrcode_limit`` the state is ``refused``."""
        events: list[SimEvent] = []
        with self._lock:
            qr = self._emit_qr(self.require(name), number, events)
        self._notify(events)
        return qr

    def tick(self) -> list[StateChange]:
        """Flip ``flap_rate`` of the instances one step and return the changes (listeners are told too).

        ``open`` drops to ``connecting``/``close`` with a reconnectable code (the column lags); ``connecting`` comes
        back ``open``; ``close``/``refused`` starts ``connecting`` again, through a new QR code when unpaired.
        """
        events: list[SimEvent] = []
        with self._lock:
            names = list(self.instances)
            rate = self.config.flap_rate
            k = min(len(names), max(1, round(len(names) * rate))) if rate > 0 and names else 0
            rng = self._rng
            for name in rng.sample(names, k):
                inst = self.instances[name]
                if inst.live_state == "open":
                    self._apply(inst, rng.choice(("connecting", "close")), rng.choice(RECONNECTABLE_CODES), events)
                elif inst.live_state == "connecting":
                    self._apply(inst, "open", None, events)
                elif inst.paired:
                    self._apply(inst, "connecting", None, events)
                else:
                    inst.qr_count = 0
                    self._emit_qr(inst, None, events)
        self._notify(events)
        return [e for e in events if isinstance(e, StateChange)]

    # -- provider operations (what the REST routes do) ------------------------------------------------------------

    def create_instance(
        self,
        name: str,
        *,
        provider: ProviderName = "evolution",
        token: str | None = None,
        integration: str = "WHATSAPP-BAILEYS",
        qrcode: bool = False,
        number: str | None = None,
        settings: Mapping[str, Any] | None = None,
        webhook: Mapping[str, Any] | None = None,
    ) -> tuple[SimInstance, QrEmitted | None]:
        """Evolution's create: a ``close`` instance, ``connecting`` with a first QR code when ``qrcode`` is set."""
        events: list[SimEvent] = []
        with self._lock:
            if name in self.instances:
                raise InstanceExists(f'This name "{name}" is already in use.', name=name)
            inst = self._new_instance(name, provider, token=token, integration=integration, now=self._clock())
            inst.message_count = inst.contact_count = inst.chat_count = 0
            inst.number = number
            inst.settings = dict(settings or {})
            if webhook:
                self._store_webhook(inst, webhook)
            qr = self._emit_qr(inst, number, events) if qrcode else None
        self._notify(events)
        return inst, qr

    def connect(self, name: str, *, number: str | None = None) -> QrCode | None:
        """Evolution's connect: None when ``open``; the current QR when ``connecting``; a new QR when ``close``."""
        events: list[SimEvent] = []
        with self._lock:
            inst = self.require(name)
            if inst.live_state == "open":
                return None
            if inst.live_state == "connecting" and inst.qr_code is not None:
                return QrCode(inst.pairing_code, inst.qr_code, qr_image(inst.qr_code), inst.qr_count)
            if inst.live_state == "connecting":
                return QrCode(None, None, None, 0)
            inst.qr_count = 0
            qr = self._emit_qr(inst, number, events)
        self._notify(events)
        if qr.limit_reached:
            return QrCode(None, None, None, qr.count)
        return QrCode(qr.pairing_code, qr.code, qr.base64, qr.count)

    def restart(self, name: str) -> QrCode | None:
        """Evolution's restart: refused when ``close``; a paired session comes back ``open`` (returns None).

        An ``open`` session goes through ``connecting`` (code 515, restart required) back to ``open``; an unpaired
        ``connecting`` session gets a new QR code, which is returned.
        """
        events: list[SimEvent] = []
        with self._lock:
            inst = self.require(name)
            if inst.live_state in ("close", "refused"):
                raise InstanceNotConnected(f'The "{name}" instance is not connected', name=name)
            result: QrCode | None = None
            if inst.live_state == "open":
                self._apply(inst, "connecting", 515, events)
                self._apply(inst, "open", None, events)
            elif inst.paired:
                self._apply(inst, "open", None, events)
            else:
                qr = self._emit_qr(inst, inst.number, events)
                result = QrCode(qr.pairing_code, qr.code, qr.base64, qr.count)
        self._notify(events)
        return result

    def logout(self, name: str) -> StateChange:
        """Evolution's logout: refused when already ``close``, else a 401 close (column ``close``)."""
        events: list[SimEvent] = []
        with self._lock:
            inst = self.require(name)
            if inst.live_state == "close":
                raise InstanceNotConnected(f'The "{name}" instance is not connected', name=name)
            change = self._apply(inst, "close", 401, events)
        self._notify(events)
        return change

    def delete(self, name: str) -> SimInstance:
        """Evolution's delete: logs out first when ``open``/``connecting``, then forgets the instance."""
        events: list[SimEvent] = []
        with self._lock:
            inst = self.require(name)
            if inst.live_state in ("open", "connecting"):
                self._apply(inst, "close", 401, events)
            inst.column_state = "close"
            del self.instances[name]
            events.append(
                InstanceRemoved(
                    inst.name,
                    inst.provider,
                    inst.instance_id,
                    self._clock(),
                    owner_jid=inst.owner_jid,
                    token=inst.token,
                    webhook=inst.webhook,
                )
            )
        self._notify(events)
        return inst

    def scan(self, name: str) -> StateChange:
        """A phone scans the instance's current QR code: the session pairs and opens (``connection.update`` open).

        Raises :class:`InstanceNotConnected` when no QR code is waiting to be scanned.
        """
        events: list[SimEvent] = []
        with self._lock:
            inst = self.require(name)
            if inst.live_state != "connecting" or inst.qr_code is None:
                raise InstanceNotConnected(f'The "{name}" instance shows no QR code to scan', name=name)
            change = self._apply(inst, "open", None, events)
        self._notify(events)
        return change

    def set_webhook(self, name: str, webhook: Mapping[str, Any]) -> SimInstance:
        """Store an instance's webhook settings (``url``, ``enabled``, ``events``, ``headers``, ``byEvents``…)."""
        with self._lock:
            inst = self.require(name)
            self._store_webhook(inst, webhook)
            return inst

    def _store_webhook(self, inst: SimInstance, webhook: Mapping[str, Any]) -> None:
        now = self._clock()
        previous = inst.webhook or {}
        inst.webhook = {
            "enabled": True,
            **dict(webhook),
            "id": previous.get("id") or "c" + self._uuid().replace("-", "")[:24],
            "createdAt": previous.get("createdAt") or now,
            "updatedAt": now,
        }

    def instances_of(self, provider: str) -> list[SimInstance]:
        """A consistent snapshot of one provider's instances, in creation order."""
        with self._lock:
            return [inst for inst in self.instances.values() if inst.provider == provider]
