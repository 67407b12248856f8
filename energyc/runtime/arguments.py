"""A generated layer's arguments, checked once with messages that name the argument: dims,
hyperparameters, dtype and device, and the inputs of ``forward``, ``energy`` and ``decode``
(numbers and counts by the checks of ``energyc.settings``, which also checks the step settings)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from energyc.runtime.autocast import AUTOCAST_DTYPES
from energyc.settings import check_count, check_number


def as_scalar(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A hyperparameter as a 0-dim tensor of x's dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=x.dtype)
    return torch.tensor(value, dtype=x.dtype, device=x.device)


def check_dim(name: str, value: Any, even: bool = False) -> int:
    """The constructor's dim argument ``name``: a positive int (even when ``even``)."""
    check_count(value, name)
    if even and value % 2:
        raise ValueError(
            f"argument {name}: expected an even size (rotary over {name}), got {value}"
        )
    return value


def hyper_value(name: str, value: Any, default: float | None) -> float:
    """The constructor's hyperparameter ``name``: ``value``, else ``default``, as a finite float
    (``energyc.settings.check_number``)."""
    if value is None:
        value = default
    if value is None:
        raise TypeError(f"argument {name}: required (the energy declares no default)")
    return check_number(value, name)


def factory(dtype: Any, device: Any) -> dict[str, Any]:
    """The constructor's ``dtype`` (None or a floating-point torch.dtype) and ``device`` (None or
    anything torch.device takes), as the keyword arguments of the parameters' factories."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"argument dtype: expected None or a floating-point torch.dtype, got {dtype!r}"
        )
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(
                f"argument device: expected None or a torch.device, got {device!r}"
            ) from None
    return {"dtype": dtype, "device": device}


def check_input(
    name: str,
    x: Any,
    dim: int,
    params: Sequence[torch.Tensor],
    like: torch.Tensor | None = None,
    compute: torch.dtype | None = None,
) -> None:
    """Argument ``name``: a floating-point (batch, tokens, dim) tensor on the device of the layer's
    parameters (the first of ``params``) and, when ``like`` is given (the state, for the context
    ``xbar``), of the shape of ``like``. Its dtype must be the parameters' (outside autocast), or,
    when ``compute`` is given (the autocast dtype the layer computes in, ``autocast_dtype``), one
    that autocast casts: float32, bfloat16 or float16."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument {name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(
            f"argument {name}: expected shape (batch, tokens, {dim}), got {tuple(x.shape)}"
        )
    if like is not None and x.shape != like.shape:
        raise ValueError(
            f"argument {name}: expected the shape of x, {tuple(like.shape)}, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"argument {name}: expected a floating-point tensor, got {x.dtype}")
    for p in params:
        if compute is not None and x.dtype not in AUTOCAST_DTYPES:
            raise TypeError(
                f"argument {name}: dtype {x.dtype} under torch.autocast (to {compute}): expected "
                f"one autocast casts ({', '.join(map(str, AUTOCAST_DTYPES))})"
            )
        if compute is None and p.dtype != x.dtype:
            raise TypeError(
                f"argument {name}: dtype {x.dtype} does not match the layer's parameters "
                f"({p.dtype}); convert one with .to()"
            )
        if p.device != x.device:
            raise ValueError(
                f"argument {name}: device {x.device} does not match the layer's parameters "
                f"({p.device})"
            )
        break
