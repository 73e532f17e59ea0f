"""Decode a top-level JSON array as its body arrives, a few megabytes of elements at a time.

A 100k-instance `fetchInstances` body is ~100 MB: reading it whole and then decoding holds it twice while httpx joins
its chunks, plus the decoded rows. :class:`ArrayStreamDecoder` keeps only the bytes not yet decoded.

Where to cut: at a ``}`` followed by ``,`` and ``{`` (whitespace allowed). A cut inside a nested value or a string
leaves an unbalanced or unterminated prefix, which msgspec rejects, so a wrong cut is never decoded as something
else: the decoder tries a few earlier cuts, then keeps the bytes and tries again once more have arrived (the whole
body at worst).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

T = TypeVar("T")

_WHITESPACE = b" \t\r\n"
_ATTEMPTS = 4
"""Cuts tried per batch, from the end backwards, before waiting for more bytes (one is enough for Evolution's rows:
their nested objects follow a key, so ``}`` ``,`` ``{`` occurs only between rows or inside a string)."""


class ArrayStreamDecoder(Generic[T]):
    """Feed it the body's chunks, then :meth:`finish`: the array's elements. Nothing raises before :meth:`finish`."""

    def __init__(self, decoder: msgspec.json.Decoder[list[T]], *, batch_bytes: int = 4 << 20) -> None:
        self._decoder = decoder
        self._batch_bytes = batch_bytes
        self._next_try = batch_bytes
        self._buffer = bytearray()
        self._opened = False
        self.items: list[T] = []
        self.head = bytearray()
        """The body's first bytes (up to 200), for error messages."""

    def feed(self, chunk: bytes) -> None:
        """Add the next bytes of the body; decodes the complete elements once enough have arrived."""
        if len(self.head) < 200:
            self.head += chunk[: 200 - len(self.head)]
        self._buffer += chunk
        if len(self._buffer) >= self._next_try:
            self._decode_complete()

    def finish(self) -> list[T]:
        """Decode what is left (the last elements and the closing ``]``) and return every element.

        Raises ``msgspec.DecodeError`` or ``msgspec.ValidationError`` when the body is not such an array.
        """
        if not self._open():
            raise msgspec.DecodeError("expected a JSON array")
        self._buffer[:0] = b"["
        self.items += self._decoder.decode(self._buffer)
        self._buffer = bytearray()
        return self.items

    def _open(self) -> bool:
        if self._opened:
            return True
        start = 0
        while start < len(self._buffer) and self._buffer[start] in _WHITESPACE:
            start += 1
        if start == len(self._buffer):
            return False
        if self._buffer[start] != ord("["):
            raise msgspec.DecodeError("expected a JSON array")
        del self._buffer[: start + 1]
        self._opened = True
        return True

    def _decode_complete(self) -> None:
        try:
            opened = self._open()
        except msgspec.DecodeError:  # not an array: :meth:`finish` says so
            self._next_try = 1 << 62
            return
        if not opened:
            return
        end = len(self._buffer)
        for _ in range(_ATTEMPTS):
            cut = self._boundary_before(end)
            if cut is None:
                break
            close, comma = cut
            try:
                batch = self._decoder.decode(b"[" + self._buffer[: close + 1] + b"]")
            except (msgspec.DecodeError, msgspec.ValidationError):
                end = close  # cut inside a nested value or a string (or a bad element): try an earlier one
                continue
            self.items += batch
            del self._buffer[: comma + 1]
            self._next_try = self._batch_bytes
            return
        self._next_try = len(self._buffer) + self._batch_bytes

    def _boundary_before(self, end: int) -> tuple[int, int] | None:
        """(index of the ``}``, index of the ``,``) of the last ``}``-``,``-``{`` starting before ``end``, or None."""
        buffer = self._buffer
        while (close := buffer.rfind(b"}", 0, end)) >= 0:
            comma = _skip_whitespace(buffer, close + 1)
            if comma < len(buffer) and buffer[comma] == ord(","):
                brace = _skip_whitespace(buffer, comma + 1)
                if brace < len(buffer) and buffer[brace] == ord("{"):
                    return close, comma
            end = close
        return None


def _skip_whitespace(buffer: bytearray, index: int) -> int:
    while index < len(buffer) and buffer[index] in _WHITESPACE:
        index += 1
    return index
