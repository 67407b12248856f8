"""Element-wise helpers that generated bodies call."""

from __future__ import annotations

import torch


def mul_affine_(a: torch.Tensor, y: torch.Tensor, c: float, s: float) -> torch.Tensor:
    """``a *= c + s y`` in one pass over ``a`` and no temporary, for a factor such as a sigmoid's
    derivative ``1 - sigmoid``:  a (c + s y) = c (a + (s / c) a y)  (``addcmul_`` reads each
    element of ``a`` before writing it). ``a`` has the broadcast shape of both; c != 0."""
    a.addcmul_(a, y, value=s / c)
    return a if c == 1 else a.mul_(c)
