"""Phone numbers as the CRM stores them (digits only) and the forms one WhatsApp number can take.

WhatsApp still addresses many Brazilian mobiles by their pre-2016 eight-digit form (``55 11 8765-4321``) while
the CRM stores the current nine-digit one (``55 11 98765-4321``), or the other way round. A Brazilian mobile is
``55`` + a two-digit area code (no zero) + an optional ``9`` + eight digits starting with 6–9 (mobile ranges);
it matches with or without that ninth digit. Landlines (eight digits starting with 2–5) never gain a ``9``: that
would be a different number. CRMs also store Brazilian numbers without the country code, so those forms match too.
"""

from __future__ import annotations

import re
import unicodedata

_BR_MOBILE = re.compile(r"^55([1-9]{2})(9?)([6-9]\d{7})$")


def digits(value: str | None) -> str | None:
    """Only the digits of ``value``, as ASCII `0-9` (None when there are none). Decimal digits of other scripts
    (full-width `５`, Arabic-Indic `٥`) count as theirs; `²` and other digit-like signs do not."""
    if not value:
        return None
    found = "".join(_ascii_digits(value))
    return found or None


def _ascii_digits(value: str) -> list[str]:
    return [
        ch if "0" <= ch <= "9" else str(unicodedata.decimal(ch))
        for ch in value
        if unicodedata.decimal(ch, None) is not None
    ]


def phone_variants(phone: str | None) -> tuple[str, ...]:
    """Every stored form that denotes the same number as ``phone`` (digits), the given form first.

    >>> phone_variants("5511987654321")
    ('5511987654321', '551187654321', '11987654321', '1187654321')
    """
    number = digits(phone)
    if number is None:
        return ()
    match = _BR_MOBILE.match(number)
    if match is None:
        return (number,)
    area, _, subscriber = match.groups()
    with_nine, without_nine = f"{area}9{subscriber}", f"{area}{subscriber}"
    forms = [number, f"55{with_nine}", f"55{without_nine}", with_nine, without_nine]
    return tuple(dict.fromkeys(forms))


def phone_from_jid(jid: object) -> str | None:
    """Digits of a WhatsApp jid (`5511999990000@s.whatsapp.net`, `...:12@s.whatsapp.net`, `...@c.us`); None for
    anything else a payload may carry in its place (a gateway's null, a number, a list)."""
    if not isinstance(jid, str) or not jid:
        return None
    return digits(jid.split("@", 1)[0].split(":", 1)[0])
