"""A generated layer's calls: ``forward`` (``apply_layer``) and ``energy`` (``energy_inputs``)
with their checks and autocast handling, and the running sums of the step loop's backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from energyc.runtime.arguments import check_input
from energyc.runtime.autocast import autocast_dtype


class Sums:
    """Running sums of a backward's gradient parts across the descent steps. The first part is
    kept as it is (it may be another tensor's view, or the caller's upstream gradient), the
    first sum makes a new tensor, and later parts add into that one in place: one pass per step,
    no new tensor per step. A part that would change the sum's shape or dtype (broadcasting,
    type promotion) makes a new tensor instead."""

    def __init__(self) -> None:
        self._owned: list[torch.Tensor] = []

    def add(self, total: torch.Tensor | None, part: torch.Tensor | None,
            like: torch.Tensor | None = None) -> torch.Tensor | None:
        """total + part, where either may be None (no contribution). ``like``: the tensor the
        sum is the gradient of, whose dtype it is summed in (under autocast a part may come in
        bfloat16, and a sum over many steps in bfloat16 loses the low bits of each)."""
        if part is None:
            return total
        if like is not None and part.dtype != like.dtype and like.dtype.is_floating_point:
            part = part.to(like.dtype)
        if total is None:
            return part
        # equal shapes first: torch.broadcast_shapes costs ~17 us of Python per call, which the
        # digits memory's backward (57 sums per training step of ~7 ms) paid in full
        if (any([total is t for t in self._owned]) and part.dtype == total.dtype
                and (part.shape == total.shape
                     or torch.broadcast_shapes(total.shape, part.shape) == total.shape)):
            return total.add_(part)
        out = total + part
        self._owned.append(out)
        return out


def apply_layer(
    function: Any,
    config: Any,
    data: Any,
    name: str,
    x: Any,
    dim: int,
    params: Sequence[torch.Tensor],
    hypers: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    precond: Sequence[torch.Tensor | None],
    memory: torch.Tensor | None = None,
) -> torch.Tensor:
    """A generated layer's forward: check argument ``name`` (``x``) and run ``function`` (its
    ``_LayerFunction``) on the call's context data ``data``, x, the parameters, the hyperparameters (``hypers(x)``, as 0-d tensors
    of x's dtype) and the preconditioner's parameters. Under torch.autocast x is taken in the
    parameters' dtype, the steps run inside the region and the output comes in the autocast dtype
    (see the comment above ``AUTOCAST_DTYPES``). ``memory``: the memory the layer reads (None:
    none), checked by the caller, taken in x's dtype."""
    compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
    check_input(name, x, dim, params, compute=compute)
    if compute is None:
        return function.apply(config, data, x, memory, *params, *hypers(x), *precond)
    x = x.to(params[0].dtype) if params else x
    memory = memory.to(x.dtype) if memory is not None else None
    return function.apply(config, data, x, memory, *params, *hypers(x), *precond).to(compute)


def energy_inputs(
    x: Any, xbar: Any, dim: int, params: Sequence[torch.Tensor],
    memory: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated layer's ``energy`` arguments, checked: (x, xbar), xbar defaulting to
    ``x.detach()`` (the context the step holds fixed: the same values, no gradient through the
    context role). Under torch.autocast the energy, a reduction, is evaluated in the parameters'
    dtype (x and xbar cast to it; the caller runs it with autocast off), as autocast keeps
    reductions in float32. A layer that reads a memory has it as its context (``memory``,
    checked by the caller)."""
    compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
    check_input("x", x, dim, params, compute=compute)
    if memory is not None:
        xbar = memory
    elif xbar is None:
        xbar = x.detach()
    else:
        check_input("xbar", xbar, dim, params, like=x, compute=compute)
    if compute is not None and params:
        x, xbar = x.to(params[0].dtype), xbar.to(params[0].dtype)
    return x, xbar
