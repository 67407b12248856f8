"""Context sets on dense (T, T) tensors: the cached masks, offsets i - j and token positions
that a generated ``_energy`` reads, and the log-sum-exp over a context set that autograd
differentiates."""

from __future__ import annotations

import math

import torch

from energyc.context import Context
from energyc.runtime.rows import resolve
from energyc.runtime.tables import _cached, table_rows


def context_mask(kind: Context | tuple, T: int, device: torch.device,
                 keys: int | None = None) -> torch.Tensor:
    """Boolean (1, T, keys) mask, or (B, T, keys) where the call's data bounds the set row by
    row (``energyc.runtime.rows``): entry (b, i, j) is True when token j is in the context set
    ``kind`` (a ``Context`` or its spelling, e.g. ``("window", 4)``) of token i. The keys are
    the T tokens themselves, or (``keys``) a memory's tokens, which a layer reads all of."""
    keys = T if keys is None else keys
    ctx = resolve(kind, T, device)
    if not isinstance(ctx, Context):
        return ctx.dense()

    def build() -> torch.Tensor:
        i = torch.arange(T, device=device)
        return ctx.contains(i[:, None], torch.arange(keys, device=device)[None, :])[None]

    return _cached(("mask", ctx.spelling, T, keys, str(device)), build)


def shared_mask(mask: torch.Tensor) -> torch.Tensor:
    """The (T, T) mask of a ``context_mask`` that is the same for every batch row, for a value
    over (i, j) that depends on no row (a function of i - j alone).

    Raises:
        ValueError: the call's data bounds the set row by row (lengths, per-row document ids,
            prefixes), which a value with no batch axis cannot follow.
    """
    if mask.shape[0] != 1:
        raise ValueError(
            "a value over (i, j) that depends on no batch row (a function of i - j alone, say) "
            "is reduced over a context set that the call's data bounds row by row (lengths, "
            "per-row document_ids, prefix): give data shared by the rows (cu_seqlens), or make "
            "the summand depend on the state")
    return mask[0]


def token_offset(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (T, T) matrix of i - j."""

    def build() -> torch.Tensor:
        i = torch.arange(T, device=device, dtype=dtype)
        return i[:, None] - i[None, :]

    return _cached(("offset", T, dtype, str(device)), build)


def token_position(T: int, dtype: torch.dtype, device: torch.device,
                   offset: int = 0) -> torch.Tensor:
    """The (T,) positions offset, offset + 1, ..., offset + T - 1 of T tokens after a prefix of
    ``offset`` (decoding); a slice of one cached table (``table_rows``)."""
    n = table_rows(T, offset)
    table = _cached(("position", n, dtype, str(device)),
                    lambda: torch.arange(n, device=device, dtype=dtype))
    return table[offset:offset + T] if offset else table


def masked_logsumexp(s: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum_{j in C(i)} exp(s) along ``dim``; 0 where the context set is empty (NaN stays NaN:
    a NaN score makes the sum NaN, not empty).

    Written for autograd, which differentiates it (twice, through a generated ``_energy``): one
    ``where`` pass masks the scores (``masked_fill`` copies, then fills: two passes, and as many
    in its backward), and the shift m is taken from the detached scores, since the value does not
    depend on it (d/dm [m + log sum exp(s - m)] = 0): autograd of ``amax`` would compare every
    score with the max and spread the gradient over the ties, twice over (s, T, T) tensors for
    nothing. Both halved the time of autograd through cem_attention's energy at 1024 tokens."""
    s = torch.where(mask, s, -math.inf)
    if s.shape[dim] == 0:  # no keys at all (0 tokens): every context set is empty
        return s.new_zeros(s.shape[:dim % s.dim()] + s.shape[dim % s.dim() + 1:])
    m = s.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(s - m).sum(dim=dim, keepdim=True)
    empty = total == 0  # False for NaN
    out = torch.where(empty, 0.0, m + torch.log(torch.where(empty, 1.0, total)))
    return out.squeeze(dim)
