"""Hypothesis properties of the pure parts the API trusts with outside input: the webhook parsers (any JSON value is
an event or a :class:`MalformedPayload`, never another exception), the status mappings, phone normalisation and
the page-cursor codec. No database: every test here is ``pure``."""

from __future__ import annotations

import json
import math
import re
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.domain import InstanceStatus, Provider
from core.phones import digits, phone_from_jid, phone_variants
from db.repositories.conversations import decode_cursor, encode_cursor
from gateways.status import from_evolution, from_megaapi, from_waha, waha_reason
from gateways.webhook_payloads import (
    EventKind,
    MalformedPayload,
    WebhookEvent,
    decode_json,
    parse_evolution,
    parse_megaapi,
    parse_waha,
)

pytestmark = [
    pytest.mark.pure,
    # Schemathesis, run earlier in the same session, leaves `random` in use inside strategies, which Hypothesis
    # reports as a deprecation; the suite turns warnings into errors.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

PROPERTY = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# -- JSON values, plain and shaped like deliveries ----------------------------------------------------------------

# Any number: times of 1e20 or 1e300 and integers past 64 bits are refused where the body is parsed.
NUMBERS = st.integers() | st.floats()
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=20)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
)


def shaped(
    fields: dict[str, st.SearchStrategy[Any]], *, narrow: frozenset[str] = frozenset()
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with some of ``fields`` (each a plausible value or any JSON, but only plausible for ``narrow``) and a
    few unknown keys."""
    optional = {k: v if k in narrow else v | JSON for k, v in fields.items()}
    return st.fixed_dictionaries({}, optional=optional).flatmap(
        lambda known: st.dictionaries(st.text(max_size=8), JSON, max_size=2).map(lambda extra: {**extra, **known})
    )


JIDS = st.sampled_from(["5511999990000@s.whatsapp.net", "5511999990000:12@s.whatsapp.net", "120363@g.us", "x@lid"])
TIMES = NUMBERS | st.sampled_from(["2026-01-01T12:00:00.000Z", "2026-01-01T12:00:00", "yesterday", ""])
KEY = shaped({"id": st.text(max_size=12), "remoteJid": JIDS, "fromMe": st.booleans(), "remoteJidAlt": JIDS})
BAILEYS = shaped(
    {
        "key": KEY,
        "message": shaped({"conversation": st.text(max_size=20), "extendedTextMessage": shaped({"text": st.text()})}),
        "messageTimestamp": NUMBERS | shaped({"low": st.integers(0, 2**31), "high": st.integers(0, 2)}),
        "pushName": st.text(max_size=10),
        "messageType": st.sampled_from(["conversation", "imageMessage", "reactionMessage"]),
        "status": st.sampled_from(["PENDING", "SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED", 2, 3]),
    }
)
EVOLUTION_EVENTS = st.sampled_from(
    [
        "connection.update",
        "qrcode.updated",
        "messages.upsert",
        "messages.set",
        "send.message",
        "messages.update",
        "messages.delete",
        "contacts.upsert",
        "chats.upsert",
        "chats.delete",
        "presence.update",
        "logout.instance",
        "instance.delete",
        "MESSAGES_UPSERT",
    ]
)
EVOLUTION_DATA = (
    shaped(
        {
            "state": st.sampled_from(["open", "connecting", "close", "refused", "OPEN"]),
            "statusReason": st.sampled_from([200, 401, 408, 515]),
            "wuid": JIDS,
            "profileName": st.text(max_size=10),
            "qrcode": shaped({"code": st.text(max_size=10), "pairingCode": st.text(max_size=8)}),
            "message": st.text(max_size=10),
            "instanceName": st.text(max_size=10),
            "keyId": st.text(max_size=10),
            "remoteJid": JIDS,
        },
    )
    | BAILEYS
    | st.lists(BAILEYS, max_size=3)
)
EVOLUTION = shaped(
    {
        "event": EVOLUTION_EVENTS,
        "instance": st.text(max_size=10) | shaped({"instanceName": st.text(max_size=10)}),
        "data": EVOLUTION_DATA,
        "date_time": TIMES,
    }
)
MEGAAPI = shaped(
    {
        "messageType": st.sampled_from(["connection_update", "message.ack", "conversation", "imageMessage"]),
        "instance_key": st.text(max_size=10),
        "connection_state": st.sampled_from(["open", "close", "connected"]),
        "message": st.sampled_from(["phone_connected", "phone_disconnected"]),
        "jid": JIDS,
        "key": KEY,
        "update": shaped({"status": st.sampled_from(["READ", "DELIVERY_ACK", 3, "bogus"])}),
        "messageTimestamp": NUMBERS,
        "timestamp": TIMES,
        "pushName": st.text(max_size=10),
    },
)
WAHA = shaped(
    {
        "id": st.text(max_size=10),
        "event": st.sampled_from(["session.status", "message", "message.any", "message.ack", "message.revoked"]),
        "session": st.text(max_size=10),
        "timestamp": TIMES,
        "me": shaped({"id": JIDS, "pushName": st.text(max_size=10)}),
        "payload": shaped(
            {
                "status": st.sampled_from(["WORKING", "SCAN_QR_CODE", "STOPPED", "FAILED", "nope"]),
                "id": st.text(max_size=20) | shaped({"_serialized": st.text(max_size=20)}),
                "from": JIDS,
                "fromMe": st.booleans(),
                "body": st.text(max_size=20),
                "timestamp": NUMBERS,
                "ack": st.integers(-2, 5),
                "ackName": st.sampled_from(["READ", "DEVICE", "SERVER"]),
                "revokedMessageId": st.text(max_size=10),
            }
        ),
    }
)


# Deliveries with what each parser requires present and valid, the rest plausible or any JSON: they reach the
# deepest branches (a status with its phone and profile, a message with its key) far more often.
NAME = st.text(min_size=1, max_size=10)
ID = st.text(min_size=1, max_size=12)
KEY_OK = st.fixed_dictionaries(
    {"id": ID, "remoteJid": JIDS}, optional={"fromMe": st.booleans() | JSON, "remoteJidAlt": JIDS | JSON}
)
BAILEYS_OK = st.fixed_dictionaries(
    {"key": KEY_OK, "messageTimestamp": st.integers(1, 2**31)},
    optional={
        "message": shaped({"conversation": st.text(max_size=20)}) | JSON,
        "pushName": st.text(max_size=10) | JSON,
        "messageType": st.sampled_from(["conversation", "imageMessage"]) | JSON,
        "status": st.sampled_from(["DELIVERY_ACK", "READ"]) | JSON,
    },
)
EVOLUTION_OK = st.fixed_dictionaries(
    {
        "event": EVOLUTION_EVENTS,
        "instance": NAME,
        "data": st.fixed_dictionaries(
            {"state": st.sampled_from(["open", "connecting", "close", "refused"])},
            optional={
                "statusReason": st.sampled_from([200, 401, 515]) | JSON,
                "wuid": JIDS | JSON,
                "profileName": st.none() | st.text(max_size=10) | JSON,
                "qrcode": st.fixed_dictionaries({"code": NAME}, optional={"pairingCode": st.text() | JSON}) | JSON,
                "message": st.text(max_size=10) | JSON,
                "keyId": ID | JSON,
                "status": st.sampled_from(["READ", "DELIVERY_ACK"]) | JSON,
                "remoteJid": JIDS | JSON,
                "pushName": st.text(max_size=10) | JSON,
            },
        )
        | BAILEYS_OK
        | st.lists(BAILEYS_OK, min_size=1, max_size=3),
    },
    optional={"date_time": TIMES},
)
MEGAAPI_OK = st.fixed_dictionaries(
    {"messageType": st.sampled_from(["connection_update", "message.ack", "conversation"]), "instance_key": NAME},
    optional={
        "connection_state": st.sampled_from(["open", "close"]) | JSON,
        "message": st.sampled_from(["phone_connected", "phone_disconnected"]) | JSON,
        "jid": JIDS | JSON,
        "pushName": st.none() | st.text(max_size=10) | JSON,
        "closeReason": st.text(max_size=10) | JSON,
        "key": KEY_OK,
        "update": st.fixed_dictionaries({"status": st.sampled_from(["READ", "DELIVERY_ACK"])}) | JSON,
        "messageTimestamp": st.integers(1, 2**31),
        "timestamp": TIMES,
    },
)
WAHA_OK = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["session.status", "message", "message.any", "message.ack", "message.revoked"]),
        "session": NAME,
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "status": st.sampled_from(["WORKING", "SCAN_QR_CODE", "STOPPED", "FAILED"]) | JSON,
                "id": ID | JSON,
                "from": JIDS | JSON,
                "to": JIDS | JSON,
                "fromMe": st.booleans() | JSON,
                "body": st.text(max_size=20) | JSON,
                "timestamp": st.integers(1, 2**31) | JSON,
                "ack": st.integers(-1, 4) | JSON,
                "ackName": st.sampled_from(["READ", "DEVICE"]) | JSON,
                "revokedMessageId": ID | JSON,
            },
        ),
    },
    optional={
        "id": ID | JSON,
        "timestamp": TIMES,
        "me": st.fixed_dictionaries({}, optional={"id": JIDS | JSON, "pushName": st.text(max_size=10) | JSON}),
    },
)

PARSERS = {
    Provider.EVOLUTION: (parse_evolution, EVOLUTION),
    Provider.MEGAAPI: (parse_megaapi, MEGAAPI),
    Provider.WAHA: (parse_waha, WAHA),
}
VALID_SHAPES = {Provider.EVOLUTION: EVOLUTION_OK, Provider.MEGAAPI: MEGAAPI_OK, Provider.WAHA: WAHA_OK}


def parsed_or_rejected(provider: Provider, value: Any) -> WebhookEvent | str:
    """What the webhook route does with a body holding ``value``: an event, or the reason it was rejected."""
    parse = PARSERS[provider][0]
    try:
        return parse(decode_json(json.dumps(value).encode()))  # the stdlib writes integers of any size
    except MalformedPayload as exc:
        return str(exc)


def assert_event(provider: Provider, event: WebhookEvent | str) -> None:
    """An event fit to store, or a rejection that says why."""
    if isinstance(event, str):
        assert event, "a rejection says why"
        return
    assert isinstance(event, WebhookEvent) and event.provider is provider
    assert isinstance(event.event, str) and event.event
    assert isinstance(event.kind, EventKind)
    assert event.instance_name is None or isinstance(event.instance_name, str)
    assert event.status is None or isinstance(event.status, InstanceStatus)
    assert event.phone_number is None or event.phone_number.isascii() and event.phone_number.isdigit()
    assert all(isinstance(k, str) and isinstance(s, str) for k, s in event.receipts)
    for text in (event.reason, event.profile_name, event.qr_code, event.pairing_code, event.event_id):
        assert text is None or isinstance(text, str), "a text column gets text"


@PROPERTY
@given(provider=st.sampled_from(list(Provider)), value=JSON)
def test_any_json_value_is_an_event_or_a_clear_rejection(provider: Provider, value: Any) -> None:
    assert_event(provider, parsed_or_rejected(provider, value))


@PROPERTY
@given(data=st.data())
def test_delivery_shaped_payloads_are_events_or_clear_rejections(data: st.DataObject) -> None:
    provider = data.draw(st.sampled_from(list(Provider)))
    value = data.draw(PARSERS[provider][1])
    assert_event(provider, parsed_or_rejected(provider, value))


@pytest.mark.parametrize("provider", list(Provider))
@PROPERTY
@given(data=st.data())
def test_deliveries_valid_where_required_are_events_or_clear_rejections(
    provider: Provider, data: st.DataObject
) -> None:
    assert_event(provider, parsed_or_rejected(provider, data.draw(VALID_SHAPES[provider])))


@PROPERTY
@given(body=st.binary(max_size=64))
def test_any_bytes_decode_to_an_object_or_a_clear_rejection(body: bytes) -> None:
    try:
        decoded: object = decode_json(body)
    except MalformedPayload as exc:
        decoded = str(exc)
        assert decoded, "a rejection says why"
    assert isinstance(decoded, dict | str)


@PROPERTY
@given(suffix=st.text(max_size=20), value=EVOLUTION)
def test_evolution_by_event_urls_parse_or_reject_clearly(suffix: str, value: dict[str, Any]) -> None:
    try:
        event: WebhookEvent | str = parse_evolution(decode_json(json.dumps(value).encode()), path_event=suffix)
    except MalformedPayload as exc:
        event = str(exc)
    assert_event(Provider.EVOLUTION, event)


# -- status mapping -----------------------------------------------------------------------------------------------

EVOLUTION_STATES = ["open", "connecting", "close", "closed", "refused"]
WAHA_STATES = ["WORKING", "STARTING", "SCAN_QR_CODE", "STOPPED", "FAILED", "PASSKEY_REQUIRED"]
ANY_CASE = st.sampled_from([str.lower, str.upper, str.title])


@PROPERTY
@given(state=st.none() | st.text(max_size=30), qr=st.booleans())
def test_every_status_maps_to_a_status_or_to_unknown(state: str | None, qr: bool) -> None:
    for status in (from_evolution(state, qr_emitted=qr), from_waha(state)):
        assert status is None or isinstance(status, InstanceStatus)
    assert isinstance(from_megaapi(state), InstanceStatus)
    assert waha_reason(state) is None or isinstance(waha_reason(state), str)


@PROPERTY
@given(evolution=st.sampled_from(EVOLUTION_STATES), waha=st.sampled_from(WAHA_STATES), case=ANY_CASE)
def test_known_statuses_map_in_any_letter_case(evolution: str, waha: str, case: Any) -> None:
    assert isinstance(from_evolution(case(evolution)), InstanceStatus)
    assert from_evolution(case(evolution)) == from_evolution(evolution)
    assert isinstance(from_waha(case(waha)), InstanceStatus)
    assert from_waha(case(waha)) == from_waha(waha)


# -- phones -------------------------------------------------------------------------------------------------------

PHONE_TEXT = st.text(alphabet=st.sampled_from(string.digits + " +-().٣５²abc@:"), max_size=20) | st.text(max_size=20)
BR_MOBILES = st.builds(
    lambda area, nine, first, rest: f"55{area}{nine}{first}{rest}",
    st.integers(11, 99).filter(lambda n: "0" not in str(n)),
    st.sampled_from(["", "9"]),
    st.sampled_from("6789"),
    st.text(alphabet=string.digits, min_size=7, max_size=7),
)


@PROPERTY
@given(value=st.none() | PHONE_TEXT)
def test_digits_are_ascii_digits_only_and_idempotent(value: str | None) -> None:
    found = digits(value)
    assert found is None or re.fullmatch(r"[0-9]+", found)
    assert digits(found) == found
    if found is not None:
        assert value is not None and len(found) <= len(value)


@PROPERTY
@given(value=PHONE_TEXT | JSON)
def test_phone_from_jid_is_digits_or_none_for_anything(value: object) -> None:
    found = phone_from_jid(value)
    assert found is None or re.fullmatch(r"[0-9]+", found)


@PROPERTY
@given(number=st.text(alphabet=string.digits, min_size=1, max_size=15), device=st.integers(0, 99))
def test_a_number_round_trips_through_its_jids(number: str, device: int) -> None:
    for jid in (f"{number}@s.whatsapp.net", f"{number}:{device}@s.whatsapp.net", f"{number}@c.us"):
        assert phone_from_jid(jid) == number
    assert phone_variants(number)[0] == number


@PROPERTY
@given(number=BR_MOBILES)
def test_the_ninth_digit_forms_of_a_brazilian_mobile_find_each_other(number: str) -> None:
    variants = phone_variants(number)
    assert len(variants) == len(set(variants)) and all(re.fullmatch(r"[0-9]+", v) for v in variants)
    for other in (v for v in variants if v.startswith("55") and len(v) in (12, 13)):  # the forms with the country
        assert set(phone_variants(other)) == set(variants)


@PROPERTY
@given(value=st.none() | PHONE_TEXT)
def test_variants_are_digits_and_start_with_the_number(value: str | None) -> None:
    variants = phone_variants(value)
    assert variants == () if digits(value) is None else variants[0] == digits(value)
    assert phone_variants(variants[0]) == variants if variants else True


# -- the page cursor ----------------------------------------------------------------------------------------------

CURSOR_VALUES = st.lists(
    st.text(max_size=30) | st.integers() | st.floats(allow_nan=False).filter(math.isfinite) | st.datetimes(),
    min_size=1,
    max_size=4,
)


@PROPERTY
@given(values=CURSOR_VALUES)
def test_a_cursor_round_trips(values: list[object]) -> None:
    cursor = encode_cursor(values)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", cursor), "URL-safe without escaping"
    assert decode_cursor(cursor, len(values)) == [str(v) for v in values]


@PROPERTY
@given(cursor=st.text(max_size=60) | st.text(alphabet=string.ascii_letters + string.digits + "-_=", max_size=60))
def test_any_string_decodes_or_raises_the_clear_error(cursor: str) -> None:
    try:
        values: list[str] | str = decode_cursor(cursor, 3)
    except ValueError as exc:
        values = str(exc)
    assert values == "invalid cursor" or (len(values) == 3 and all(isinstance(v, str) for v in values))
