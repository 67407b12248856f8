"""Constant tables (masks, offsets, rotations) built once per size, dtype and device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Constant tables (masks, offsets, rotations) built once per size, dtype and device."""
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        value = _CACHE[key] = build()
    return value


def table_rows(T: int, offset: int) -> int:
    """Rows of a per-position table (positions, rotations) that serves T tokens at positions
    offset .. offset + T - 1: T itself without a prefix; after one (decoding), the next power of
    two above the last position, so that one table serves every call below it: few tables."""
    return 1 << (offset + T - 1).bit_length() if offset else T
