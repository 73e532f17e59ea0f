"""Splitting work into batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Split ``items`` into consecutive slices of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]
