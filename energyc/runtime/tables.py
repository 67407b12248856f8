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
