"""Attention on torch: the kernels of a fused context reduction (``attention_forward``,
``attention_backward``, ``attention_transposed``) on torch's CPU flash kernels where they serve,
the masked blocks of ``energyc.runtime.flash_cpu`` for other context sets and a bias, and
otherwise a fallback that forms the scores ``QUERY_CHUNK`` queries at a time; weights kept
for later calls over the same scores (``keep_probs``, ``probs_fit``).

Every entry resolves its ``kind`` in the current call (``energyc.runtime.rows.resolve``): without
the call's data for it, the ``Context`` and the paths above as they are; with it, the set's
``Rows`` (per-row key intervals: documents, lengths, prefixes), which the masked blocks iterate
by (``flash_cpu.blocks``) and every other path masks with (``Rows.tile``). Decoding after a
cached prefix (``offset``) reads the rows of every token so far at the queries' positions."""

from __future__ import annotations

import math
import sys

import torch

from energyc.context import Context, all_tokens, causal, context
from energyc.runtime import flash_cpu
from energyc.runtime.kernels import implements
from energyc.runtime.pairs import key_start, query_blocks
from energyc.runtime.rows import Rows, resolve

_FLASH_CPU_OPS = all(
    hasattr(torch.ops.aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    )
)


def _flash_cpu(q: torch.Tensor) -> bool:
    """Whether the CPU flash-attention kernels (forward and explicit backward) serve ``q``."""
    return _FLASH_CPU_OPS and q.device.type == "cpu"


def _flash_cpu_serves(
    q: torch.Tensor,
    v: torch.Tensor,
    kind: Context,
    slopes: torch.Tensor | None = None,
    need_dscale: bool = False,
    scale: float | torch.Tensor = 1.0,
) -> bool:
    """Whether the CPU flash kernels compute this call: no bias, no dscale, a context set they
    know (all keys, or causal), values of the query's feature size, and for causal a positive
    scale (the causal kernel scales its -inf mask by the scale: 0 * -inf and -1 * -inf gave NaN
    on every token but the last)."""
    return (_flash_cpu(q) and isinstance(kind, Context) and kind in (causal(), all_tokens())
            and slopes is None
            and not need_dscale and q.shape[-1] == v.shape[-1]
            and (kind.everything or float(scale) > 0))


# The CPU flash backward recomputes the weights as exp(S_ij - lse_i) from its own float32 S and
# takes delta_i = g_i . o_i. Both carry an absolute error of a few ulps of |S| ~ |lse|, so its
# gradients are off by about (0.4 to 1.3) * 6e-8 * max |lse| relative (measured on cem_attention:
# 45% at max |lse| = 1.8e6). That is the conditioning of softmax at such scores (autograd is as far
# off) until the rows saturate (one weight ~ 1, the others ~ 0): there autograd's weights are exact
# to 1e-7 and the flash kernel's are not. Above this |lse| a float32 backward takes the fallback,
# whose error is relative to the scores' spread; at and below it the flash error is <= 2e-5, a
# tenth of float32's rtol in energyc/tolerances.py.
FLASH_BACKWARD_MAX_LSE = 256.0


def _flash_backward_accurate(lse: torch.Tensor) -> bool:
    """Whether the CPU flash backward is accurate for these saved log-sum-exps: float64 always
    (its error bound at FLASH_BACKWARD_MAX_LSE's rule is 1e-16 * |lse|), float32 when max |lse| <=
    FLASH_BACKWARD_MAX_LSE. Under torch.compile no data-dependent test is traced: the flash kernel
    serves as before (a saturated float32 backward there keeps the flash kernel's error)."""
    if lse.dtype == torch.float64 or torch.compiler.is_compiling():
        return True
    return bool(lse.abs().amax() <= FLASH_BACKWARD_MAX_LSE)  # NaN: False, the fallback keeps NaN


def _softmax_apply(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(scores) @ v and lse = log sum exp(scores) for a block of whole rows (B, H, C,
    K), -inf outside the context set: o = (exp(S - m) @ v) / l with the row max m and sum l, as
    the flash kernels do, not exp(S - lse) @ v, whose rounding of lse = m + log l (a few ulps of
    |m|) would scale every weight of the row by exp of it. An empty row gives o = 0, lse = 0;
    NaN stays NaN. ``scores`` is a fresh tensor of the caller's: it becomes exp(S - m) in place
    (one pass, no temporary)."""
    e, total, lse = _exp_rows(scores)
    return (e @ v).div_(total), lse


def _exp_rows(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """exp(S - m) in the memory of ``scores`` (a fresh tensor), with m the row max; each row's
    sum l (1 for an empty row, whose weights stay 0; NaN stays NaN) and lse = m + log l (0 for an
    empty row): what ``_softmax_apply`` and ``_attention_whole`` divide by and return."""
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty row: all -inf
    e = scores.sub_(m).exp_()
    total = e.sum(dim=-1, keepdim=True)
    safe = torch.where(total == 0, 1.0, total)  # False for NaN: NaN stays
    lse = torch.where(total == 0, 0.0, m + torch.log(safe))
    return e, safe, lse.squeeze(-1)


def _softmax_rows(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The attention weights P (B, H, C, K) of a block of whole rows, recomputed from the saved
    log-sum-exp ``lse`` (B, H, C) and renormalised to sum to 1.

    exp(S_ij - lse_i) alone is off by a factor exp(-d_i) for the whole row i, where d_i is lse's
    rounding error plus any difference between the scores formed here and in the forward: a few
    ulps of |lse|, so 0.06 at |lse| ~ 1e6 in float32, 6% on every weight. The factor is the same
    for every j of the row, so dividing by the row's sum removes it: what remains is the rounding
    of exp(S_ij - lse_i) itself, relative to the scores' spread S_ij - lse_i rather than their
    magnitude (as softmax's own exp(S_ij - max_j S_ij) / sum). An empty row (all -inf) stays 0.
    ``scores`` is a fresh tensor of the caller's: P is computed in its memory."""
    p = scores.sub_(lse[..., None]).exp_()
    total = p.sum(-1, keepdim=True)
    return p.div_(torch.where(total == 0, 1.0, total))


def _accumulator(q: torch.Tensor) -> torch.dtype:
    """The dtype the materialised path computes in (as the flash kernels accumulate): float64 for
    float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


QUERY_CHUNK = 256  # queries per step of the fallback: its scores are (B, H, 256, <= T), not (T, T)


def _masked_scores(
    qc: torch.Tensor,
    kh: torch.Tensor,
    scale: float | torch.Tensor,
    kind: Context | Rows,
    slopes: torch.Tensor | None,
    r0: int,
    qk: torch.Tensor | None = None,
    c0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, H, C, K) of the C queries from ``r0`` on against the K keys from ``c0`` on:
    scale * (q_i . k_j) + slopes_h * (i - j) (the bias only when slopes is not None), -inf outside
    the context set ``kind`` (with the call's rows, each row's: ``Rows.tile``, broadcast over the
    heads; i - j is the offset within the row as without them); ``qk`` is qc @ kh^T when already formed. Also returns the (C, K)
    offsets i - j. The scores are a fresh tensor (``qk`` is left as it is), changed in place
    after their first pass."""
    if qk is None:
        qk = qc @ kh.transpose(-1, -2)
        scores = qk.mul_(scale)
    else:
        scores = qk * scale
    i = torch.arange(r0, r0 + qc.shape[-2], device=qc.device, dtype=scores.dtype)
    j = torch.arange(c0, c0 + kh.shape[-2], device=qc.device, dtype=scores.dtype)
    offset = i[:, None] - j
    if slopes is not None:
        scores = scores.add_(slopes.to(scores.dtype)[:, None, None] * offset)
    if isinstance(kind, Rows):
        scores = scores.masked_fill_(
            ~kind.tile(r0, r0 + qc.shape[-2], c0, c0 + kh.shape[-2])[:, None], -math.inf)
    elif not kind.everything:
        scores = scores.masked_fill_(~kind.contains(i[:, None], j), -math.inf)
    return scores, offset


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | torch.Tensor,
    kind: Context | tuple,
    slopes: torch.Tensor | None = None,
    offset: int = 0,
    keep_probs: bool = False,
    probs: torch.Tensor | None = None,
) -> tuple:
    """Softmax attention over the context set ``kind`` (an ``energyc.context.Context`` or its
    spelling, such as ("causal",)).

        S_ij = scale * q_i . k_j + slopes_h * (i - j),   lse_i = log sum_{j in C(i)} exp(S_ij),
        o_i = sum_{j in C(i)} exp(S_ij - lse_i) v_j

    Args:
        q, k: (B, T, H, F). v: (B, T, H, G).
        scale: a scalar (a float, or a 0-d tensor: no device sync).
        kind: the context set, e.g. ("causal",) or ("window", 64).
        slopes: None or (H,): the bias term's slopes.
        offset: the queries are the tokens offset .. offset + T - 1 of a sequence whose keys
            k, v (B, offset + T, H, .) are its first offset + T tokens (decoding after a cached
            prefix): the context set and i - j at those positions.

        keep_probs: also return the attention weights P for later calls over the same scores
            (``probs`` there), or None where they are not kept (``probs_fit``).
        probs: the weights of these scores, kept by an earlier call (or None): o = P v, from
            them alone; lse is then None.

    Returns:
        o (B, T, H, G) in q's dtype, and lse (B, T, H) in float32 (float64 for float64 inputs;
        rounding it to half precision would cost the backward accuracy); a token with an empty
        context set gets o = 0 and lse = 0. With ``keep_probs``, P (B, H, T, keys) or None third.

    The CPU flash kernels serve what they can (see ``_flash_cpu_serves``); otherwise the scores
    are formed QUERY_CHUNK queries at a time, so memory grows with tokens x QUERY_CHUNK. Weights
    that are kept are formed whole (``probs_fit``: tokens and keys at most QUERY_CHUNK, and a
    window not much narrower than the keys).
    """
    q, k, v = _operands(q, k, v)
    kind = resolve(kind, q.shape[1], q.device, offset)
    out = _attention_forward(q, k, v, scale, kind, slopes, offset, keep_probs, probs)
    return out if keep_probs else out[:2]


def _query_chunks(kind: Context | Rows, T: int, offset: int = 0,
                  keys: int | None = None) -> list[tuple[int, int, int, int]]:
    """The chunked path's blocks of QUERY_CHUNK queries and their keys (``query_blocks``; with
    the call's rows, ``flash_cpu.blocks``)."""
    if isinstance(kind, Rows) and not offset and keys in (None, T) and kind.S is None:
        return flash_cpu.blocks(kind, T, QUERY_CHUNK)
    return query_blocks(kind, T, QUERY_CHUNK, offset, keys)


def _operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An attention call's operands as its kernels take them.

    * Feature rows in contiguous memory: torch's CPU flash kernels read the last axis as if its
      stride were 1 (an operand with another, e.g. einsum's permuted output of a small
      contraction, gave garbage), so such an operand is copied.
    * Under autocast, as autocast gives a matrix product's: each float tensor cast to the autocast
      dtype (an operand made by element-wise work, e.g. a query times a learned per-head scale, is
      float32 there, one made by a contraction is in the autocast dtype already); float64 is left
      alone, as autocast leaves it. Outside autocast the dtypes are as given.
    """
    if not torch.compiler.is_compiling():  # the compiler lays operands out for the kernels
        tensors = tuple(t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
                        for t in tensors)
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype not in (dtype, torch.float64) else t for t in tensors)


def _attention_forward(q, k, v, scale, kind, slopes, offset, keep_probs, probs) -> tuple:
    """``attention_forward``'s (o, lse, P or None)."""
    if probs is not None:
        return _apply_probs(probs, v, q.dtype), None, probs
    if q.numel() == 0 or k.numel() == 0:  # 0 tokens or batch 0: the flash kernel would crash
        o = q.new_zeros((*q.shape[:-1], v.shape[-1]))
        return o, q.new_zeros(q.shape[:-1], dtype=_accumulator(q)), None
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if offset:  # queries after a prefix: the chunked path, at their positions
        return *_attention_chunks(qh, kh, vh, scale, kind, slopes, offset, q.dtype), None
    if keep_probs and probs_fit(q, k, kind):
        return _attention_whole(qh, kh, vh, scale, kind, slopes, q.dtype)
    if _flash_cpu_serves(q, v, kind, slopes, scale=scale):
        order = flash_cpu.feature_order(q, k)  # the scores the backward reads again
        factor, s = flash_cpu.kernel_scale(q, scale)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            flash_cpu.ordered(qh, order, factor), flash_cpu.ordered(kh, order), vh, 0.0,
            kind == causal(), scale=s
        )
    elif flash_cpu.serves(q, v, scale, slopes):  # other context sets, a bias: masked blocks
        return *flash_cpu.forward(q, k, v, scale, kind, slopes), None
    else:  # the scale stays a tensor (no device sync)
        return *_attention_chunks(qh, kh, vh, scale, kind, slopes, 0, q.dtype), None
    return o.transpose(1, 2).to(q.dtype), lse.transpose(1, 2).to(_accumulator(q)), None


# A forward asked to keep its attention weights (``keep_probs``: the compiler asks where three
# or more calls read the same scores, see energyc.backends.kept_weights.keeps_probs) keeps them
# where queries and keys both fit one query block of the chunked path (QUERY_CHUNK): P is then
# formed whole, once, in the memory of one such block, (B, H, T, keys) <= (B, H, T, QUERY_CHUNK),
# kept from the forward to the backward; the later calls over the same scores (the key role, the
# backward's products with other values, the backward) multiply by it instead of forming the
# scores and their exponentials again. Measured on the 2-core machine of benchmarks/RESULTS.md
# (float32), the Energy Transformer's four calls over 12 heads took 0.55-0.7x the flash kernels'
# time at 64-256 tokens. Longer sequences keep none: the kernels' recomputation serves; so do
# narrow windows over more than half a block of keys (``probs_fit``), where most of P is 0.


def probs_fit(q: torch.Tensor, k: torch.Tensor, kind: Context | tuple | Rows) -> bool:
    """Whether ``attention_forward(..., keep_probs=True)`` keeps the weights of (q, k) over the
    context set ``kind``: queries and keys fit one query block, and a window reaches at least
    half the keys or they fit half a block. (P is formed dense: a narrow window at 256 tokens
    made the joint window energy's step 0.9x as fast with P kept, at 128 tokens 1.2x faster.)"""
    queries, keys = q.shape[1], k.shape[1]
    if not (q.numel() > 0 and k.numel() > 0 and queries <= QUERY_CHUNK and keys <= QUERY_CHUNK):
        return False
    band = kind.ctx if isinstance(kind, Rows) else context(kind)
    width = band.width  # the most keys a row holds: a window's w + 1 (the call's rows: at most)
    return width is None or 2 * width >= keys or 2 * keys <= QUERY_CHUNK


def _attention_whole(qh, kh, vh, scale, kind, slopes, dtype):
    """(o, lse, P) with every query's weights formed at once: P normalised row by row (an empty
    row stays 0), o = P v, as ``_softmax_apply`` in the order P first."""
    acc = _accumulator(qh)
    scores, _ = _masked_scores(qh.to(acc), kh.to(acc), scale, kind, slopes, 0)
    e, total, lse = _exp_rows(scores)
    p = e.div_(total)
    o = p @ vh.to(acc)
    return o.transpose(1, 2).to(dtype), lse.transpose(1, 2), p


def _apply_probs(p: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_j P_ij v_j (B, T, H, G) from kept weights P (B, H, T, keys); with P^T, the key
    role's sum over queries."""
    return (p @ v.transpose(1, 2).to(p.dtype)).transpose(1, 2).to(dtype)


def _attention_chunks(qh, kh, vh, scale, kind, slopes, offset: int, dtype: torch.dtype):
    """``attention_forward`` QUERY_CHUNK queries at a time on (B, H, T, F) operands, each chunk
    against the keys its context set reaches, the queries at positions offset + r, the keys the
    last ones up to the last query (``query_blocks``)."""
    acc = _accumulator(qh)
    qh, kh, vh = qh.to(acc), kh.to(acc), vh.to(acc)
    outs, lses = [], []
    T, keys = qh.shape[-2], kh.shape[-2]
    k0 = key_start(T, offset, keys)  # a window's cache holds its last keys alone
    for r0, r1, c0, c1 in _query_chunks(kind, T, offset, keys):
        scores, _ = _masked_scores(qh[..., r0:r1, :], kh[..., c0:c1, :], scale, kind, slopes,
                                   offset + r0, c0=k0 + c0)
        o_block, lse_block = _softmax_apply(scores, vh[..., c0:c1, :])
        outs.append(o_block)
        lses.append(lse_block)
    o, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
    return o.transpose(1, 2).to(dtype), lse.transpose(1, 2).to(acc)


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | torch.Tensor,
    kind: Context | tuple,
    o: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    slopes: torch.Tensor | None = None,
    need_dscale: bool = False,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dq, dk, dv, dscale, dslopes of ``attention_forward`` for the upstream gradient g
    (B, T, H, G).

    With dS_ij = P_ij (g_i . v_j - g_i . o_i): dq_i = scale sum_j dS_ij k_j, dk_j = scale
    sum_i dS_ij q_i, dv_j = sum_i P_ij g_i; dscale = sum dS_ij (q_i . k_j), a 0-d tensor, only
    when ``need_dscale`` (else None); dslopes_h = sum_{b,i,j} dS_ij (i - j), an (H,) tensor, only
    when ``slopes`` is given (else None); both in float32 (float64 for float64 inputs). Without
    the CPU flash kernels, P is recomputed from lse QUERY_CHUNK queries at a time.

    Saturated rows (scores of large magnitude, one weight near 1): the fallback renormalises each
    recomputed row of P (``_softmax_rows``) and takes delta_i = sum_j P_ij (g_i . v_j) from the same
    P and the same products g_i . v_j as dS, not g_i . o_i: in a saturated row g_i . v_j - delta_i is
    then exactly 0 where it must be, whereas g_i . o_i and g_i . v_j, rounded differently, differ by
    ~ 6e-8 |g_i| |v_j|, which dq and dk multiply by scale |k| ~ |S| (40-130% of the gradient at
    |S| ~ 1e6 in float32). Its error is then that of autograd's softmax backward. The CPU flash
    kernel (which takes delta = g . o and exp(S - lse) unnormalised) serves a float32 call only while
    max |lse| <= FLASH_BACKWARD_MAX_LSE (see there).

    With ``probs``, the weights P (B, H, T, keys) the forward kept (``keep_probs``), the products
    take them as they are: no scores are formed, except q . k for dscale.
    """
    q, k, v, o, g = _operands(q, k, v, o, g)
    kind = resolve(kind, q.shape[1], q.device)
    if probs is not None:
        return _backward_probs(q, k, v, scale, kind, g, slopes, need_dscale, probs)
    if q.numel() == 0 or k.numel() == 0:  # 0 tokens or batch 0: nothing flows back
        acc = _accumulator(q)
        dscale = q.new_zeros((), dtype=acc) if need_dscale else None
        dslopes = q.new_zeros(q.shape[2], dtype=acc) if slopes is not None else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dscale, dslopes
    qh, kh, vh, oh, gh = (t.transpose(1, 2) for t in (q, k, v, o, g))
    lseh = lse.transpose(1, 2)
    dscale = dslopes = None
    if _flash_cpu_serves(q, v, kind, slopes, need_dscale, scale) and _flash_backward_accurate(lse):
        order = flash_cpu.feature_order(q, k)  # as the forward: the same scores
        factor, s = flash_cpu.kernel_scale(q, scale)
        qs, ks = flash_cpu.ordered(qh, order, factor), flash_cpu.ordered(kh, order)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gh, qs, ks, vh, oh,
            lseh.float() if q.dtype in (torch.float16, torch.bfloat16) else lseh, 0.0,
            kind == causal(), scale=s
        )
        # the features back in their own order (into the ordered operands' memory, no longer
        # read); the kernel's dq is to the queries factor q
        dq = flash_cpu.unordered(dq, order, factor, out=qs)
        dk = flash_cpu.unordered(dk, order, out=ks)
    elif flash_cpu.serves(q, v, scale, slopes, need_dscale) and _flash_backward_accurate(lse):
        return flash_cpu.backward(q, k, v, scale, kind, o, lse, g, slopes, need_dscale)
    else:
        acc = _accumulator(q)
        qh, kh, vh, gh, lseh = (t.to(acc) for t in (qh, kh, vh, gh, lseh))  # o: flash only
        dqs, dk, dv = [], torch.zeros_like(kh), torch.zeros_like(vh)
        dscale = qh.new_zeros(()) if need_dscale else None
        dslopes = qh.new_zeros(q.shape[2]) if slopes is not None else None
        for r0, r1, c0, c1 in _query_chunks(kind, q.shape[1], keys=k.shape[1]):
            qc, gc = qh[..., r0:r1, :], gh[..., r0:r1, :]
            kc, vc = kh[..., c0:c1, :], vh[..., c0:c1, :]
            qk = qc @ kc.transpose(-1, -2)
            scores, offset = _masked_scores(qc, kc, scale, kind, slopes, r0, qk, c0)
            p = _softmax_rows(scores, lseh[..., r0:r1])
            dq_c, dk_c, dv_c, ds_c, dm_c = _weights_backward(
                p, qc, kc, vc, gc, scale, qk if need_dscale else None,
                offset if slopes is not None else None)
            dqs.append(dq_c)
            dk[..., c0:c1, :] += dk_c
            dv[..., c0:c1, :] += dv_c
            if need_dscale:
                dscale = dscale + ds_c
            if slopes is not None:
                dslopes = dslopes + dm_c
        dq = torch.cat(dqs, dim=-2)
    return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(q.dtype),
            dv.transpose(1, 2).to(q.dtype), dscale, dslopes)


def _weights_backward(p, qc, kc, vc, gc, scale, qk=None, offset=None) -> tuple:
    """The backward products of one block from its weights P (B, H, C, K): dv = P^T g,
    dS = P (g v^T - rowsum(P g v^T)) (delta from P and the same products, not g . o: see
    ``attention_backward``), dq = scale dS k, dk = scale dS^T q; dscale's part sum dS (q . k) when
    the unscaled products ``qk`` are given, dslopes' part sum_{b,i,j} dS (i - j) when the
    ``offset`` i - j is (else None)."""
    dv = p.transpose(-1, -2) @ gc
    dp = gc @ vc.transpose(-1, -2)
    ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p)
    dq = (ds @ kc).mul_(scale)
    dk = (ds.transpose(-1, -2) @ qc).mul_(scale)
    dscale = (ds * qk).sum() if qk is not None else None
    dslopes = (ds * offset).sum((0, 2, 3)) if offset is not None else None
    return dq, dk, dv, dscale, dslopes


def _backward_probs(q, k, v, scale, kind, g, slopes, need_dscale, p) -> tuple:
    """``attention_backward`` from kept weights P (the whole of every row): the fallback's block
    products (``_weights_backward``) once, over all queries and keys."""
    acc = p.dtype
    qh, kh, vh, gh = (t.transpose(1, 2).to(acc) for t in (q, k, v, g))
    offset = None
    if slopes is not None:
        i = torch.arange(q.shape[1], device=q.device, dtype=acc)
        offset = i[:, None] - torch.arange(k.shape[1], device=q.device, dtype=acc)
    dq, dk, dv, dscale, dslopes = _weights_backward(
        p, qh, kh, vh, gh, scale, qh @ kh.transpose(-1, -2) if need_dscale else None, offset)
    return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype),
            dv.transpose(1, 2).to(v.dtype), dscale, dslopes)


def attention_transposed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | torch.Tensor,
    kind: Context | tuple,
    lse: torch.Tensor,
    slopes: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights of ``attention_forward`` applied keys-major (the key role): o_t
    (B, T, H, G) with o_t[b, j, h] = sum_{i : j in C(i)} P_ij v[b, i, h], v indexed by the query
    token; ``lse`` is the saved log-sum-exp of ``attention_forward``. P is recomputed
    QUERY_CHUNK queries at a time, each row renormalised (``_softmax_rows``), or by the CPU
    flash kernels (``flash_cpu.transposed``) where they serve and are accurate; with ``probs``,
    the weights the forward kept, o_t = P^T v."""
    q, k, v = _operands(q, k, v)
    kind = resolve(kind, q.shape[1], q.device)
    if probs is not None:
        return _apply_probs(probs.transpose(-1, -2), v, v.dtype)
    if q.numel() == 0 or k.numel() == 0:  # 0 tokens or batch 0
        return torch.zeros_like(v)
    if flash_cpu.serves(q, v, scale, slopes) and _flash_backward_accurate(lse):
        return flash_cpu.transposed(q, k, v, scale, kind, lse, slopes)
    acc = _accumulator(q)
    qh, kh, vh, lseh = (t.transpose(1, 2).to(acc) for t in (q, k, v, lse))
    o_t = vh.new_zeros((*vh.shape[:2], k.shape[1], vh.shape[-1]))  # over the keys
    for r0, r1, c0, c1 in _query_chunks(kind, q.shape[1], keys=k.shape[1]):
        scores, _ = _masked_scores(qh[..., r0:r1, :], kh[..., c0:c1, :], scale, kind, slopes, r0,
                                   c0=c0)
        p = _softmax_rows(scores, lseh[..., r0:r1])
        o_t[..., c0:c1, :] += p.transpose(-1, -2) @ vh[..., r0:r1, :]
    return o_t.transpose(1, 2).to(q.dtype)


implements(sys.modules[__name__])  # the kernels interface, shared with the other backend
