"""The streamed decoding of a JSON array (a 100k-instance fetchInstances listing is ~100 MB)."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from gateways.json_stream import ArrayStreamDecoder

pytestmark = pytest.mark.pure


class Row(msgspec.Struct):
    name: str
    code: int | None = None


DECODER = msgspec.json.Decoder(list[Row])
# Nested objects and arrays, and strings holding `},{`: none of them is a place to cut.
ROWS = [
    {"name": f"i-{i}", "code": i, "Setting": {"a": [{"b": "},{"}, {"c": None}]}, "note": '}, {"name": "x"}'}
    for i in range(3000)
]


def _feed(body: bytes, *, batch_bytes: int, seed: int = 0) -> ArrayStreamDecoder[Row]:
    rng = random.Random(seed)
    decoder = ArrayStreamDecoder(DECODER, batch_bytes=batch_bytes)
    at = 0
    while at < len(body):
        size = rng.randint(1, 4000)
        decoder.feed(body[at : at + size])
        at += size
    return decoder


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("batch_bytes", [64, 4096, 1 << 22])
def test_every_element_is_decoded_once_in_order_whatever_the_chunks(indent: int | None, batch_bytes: int) -> None:
    body = json.dumps(ROWS, indent=indent).encode()
    decoder = _feed(body, batch_bytes=batch_bytes)
    assert [(r.name, r.code) for r in decoder.finish()] == [(r["name"], r["code"]) for r in ROWS]


def test_only_the_undecoded_tail_is_held() -> None:
    body = json.dumps(ROWS).encode()
    decoder = _feed(body[: len(body) // 2], batch_bytes=16 << 10)
    assert len(decoder.items) > 0
    assert len(decoder._buffer) < (16 << 10) + 8000  # one batch at most, plus the chunk that crossed it


@pytest.mark.parametrize("body", [b"", b"  ", b"[]", b" [ ] "])
def test_empty_arrays_and_empty_bodies(body: bytes) -> None:
    decoder = _feed(body, batch_bytes=1)
    if body.strip():
        assert decoder.finish() == []
    else:
        with pytest.raises(msgspec.DecodeError):
            decoder.finish()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"error": true}' * 100, msgspec.DecodeError),
        (b'[{"name": "a"},' * 2 + b'{"name": 3}]', msgspec.ValidationError),
        (b"[" + b'{"name": "a"},' * 500, msgspec.DecodeError),
    ],
)
def test_a_body_that_is_not_such_an_array_raises_at_finish_only(body: bytes, error: type[Exception]) -> None:
    decoder = _feed(body, batch_bytes=32)
    assert decoder.head == body[:200]
    with pytest.raises(error):
        decoder.finish()
