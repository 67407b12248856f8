"""Constant tables (masks, offsets, rotations) built once per size, dtype and device."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

INVERSE_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(p) = 1

_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Constant tables (masks, offsets, rotations) built once per size, dtype and device."""
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        value = _CACHE[key] = build()
    return value
