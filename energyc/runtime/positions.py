"""Positions: rotary embeddings (tables in float64, cached) and ALiBi's slopes."""

from __future__ import annotations

import torch

from energyc.runtime.tables import _cached, table_rows


def _rotary_table(
    T: int, F: int, base: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles p * base^(-2m/F), shape (T, F/2) each, rounded to ``dtype``.

    The angles and their cos and sin are computed in float64 (built once per shape, cached): in
    float32, p * w carries an error of ulp(p) ~ 6e-8 p radians, 3e-5 in cos and sin at p = 1024
    and 6e-4 at 16384, which made float32 rotary layers 10-30x less accurate than autograd's
    float64-angle reference at 1024 tokens. Devices without float64 (MPS) use float32."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.float32 if device.type == "mps" else torch.float64  # angle precision
        pos = torch.arange(T, device=device, dtype=table)
        freq = base ** (-torch.arange(0, F, 2, device=device, dtype=table) / F)
        angle = pos[:, None] * freq[None, :]
        return angle.cos().to(dtype), angle.sin().to(dtype)

    return _cached(("rotary", T, F, base, dtype, str(device)), build)


def rotary(
    t: torch.Tensor, token_dim: int, feature_dim: int, base: float, inverse: bool,
    offset: int = 0,
) -> torch.Tensor:
    """Rotate feature pairs (2m, 2m+1) of ``t`` by angle p * base^(-2m/F) at token position p
    (by the opposite angle when ``inverse``); the tokens of ``t`` are at positions offset,
    offset + 1, ... (decoding after a cached prefix)."""
    T, F = t.shape[token_dim], t.shape[feature_dim]
    if F % 2:
        raise ValueError(f"rotary position embedding needs an even feature size, got {F}")
    cos, sin = _rotary_table(table_rows(T, offset), F, base, t.dtype, t.device)
    if offset:
        cos, sin = cos[offset:offset + T], sin[offset:offset + T]
    if inverse:
        sin = -sin
    u = t.movedim((token_dim, feature_dim), (-2, -1)).unflatten(-1, (F // 2, 2))
    a, b = u[..., 0], u[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return out.movedim((-2, -1), (token_dim, feature_dim))


def alibi_slopes_(param: torch.Tensor) -> torch.Tensor:
    """Fill ``param`` with ALiBi's slopes 2^(-8 (h + 1) / n) over its n entries."""
    n = param.numel()
    values = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype).view_as(param))
    return param
