"""Mixed precision: what a layer computes in under torch.autocast.

Inside a torch.autocast region a layer computes as the same steps written in torch would under
autocast: its input is taken in the parameters' dtype (float32: a bfloat16 input from an
earlier autocast layer converts exactly), and the descent steps and their derived backward run
inside the autocast region, so that autocast casts the operands of every contraction (einsum,
bmm) to the autocast dtype, while the element-wise work between them, the runtime's reductions
(pair log-sum-exps and sums, returned in the dtype the layer computes in) and the statistics
saved for the backward (the attention log-sum-exp) stay float32 where their inputs are. The
backward re-enters the forward's autocast state (backward() may run outside the region). The
output is in the autocast dtype, as nn.Linear's is. float64 tensors are not cast (autocast
leaves them alone too): a float64 layer under autocast runs in float64, with the strict dtype
check of outside autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autocast_dtype(x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The dtype a layer with parameters ``params`` computes in for the input ``x``: the autocast
    dtype of x's device type inside an autocast region enabled for it, when the parameters are of a
    dtype autocast casts; None otherwise (the layer computes in its parameters' dtype)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    if (params[0] if params else x).dtype not in AUTOCAST_DTYPES:
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_state(x: torch.Tensor) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for x's device type, and its dtype: what a layer's forward ran
    under, for its backward to run under the same (``autocast_as``)."""
    device_type = x.device.type
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def autocast_as(state: tuple[bool, torch.dtype], x: torch.Tensor) -> torch.autocast:
    """A context with the autocast ``state`` of a layer's forward, for x's device type: its
    backward's contractions are cast as the forward's were, also when backward() is called
    outside (or inside another) autocast region."""
    enabled, dtype = state
    return torch.autocast(x.device.type, dtype=dtype, enabled=enabled)


def autocast_off(x: torch.Tensor) -> torch.autocast:
    """A context with autocast off for x's device type (a layer's ``energy``, a reduction,
    evaluates in the parameters' dtype)."""
    return torch.autocast(x.device.type, enabled=False)
