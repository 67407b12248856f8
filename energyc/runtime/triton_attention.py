"""Flash-style Triton kernels of fused context reductions (the attention family), shared by
every generated package whose energy has one.

    S_ij  = s q_i . k_j + slopes_h (i - j),    C(i): the context set of query i
    o_i   = sum_{j in C(i)} P_ij v_j,          P_ij = exp(S_ij - lse_i)
    lse_i = log sum_{j in C(i)} exp(S_ij)

with the scale s; the bias term only when slopes (H,) are given (HAS_BIAS). The T queries and
the TK keys (T, or a memory's M tokens) are counted apart: key loads are masked by TK, and the
keys-major kernel runs over TK's blocks and writes dk, dv and the transposed product over TK rows.
Forward: one program per (batch x head, block of BLOCK_M queries); an online log-sum-exp over
blocks of BLOCK_N keys, accumulated in ACC (fp32; fp64 for float64 operands, as every kernel
of the Triton path); no (tokens x tokens) tensor is formed.
Backward: P is recomputed from the saved lse; with delta_i = sum_g do_ig o_ig,
    dS_ij = P_ij (do_i . v_j - delta_i),  dv_j = sum_i P_ij do_i,
    dk_j = s sum_i dS_ij q_i,             dq_i = s sum_j dS_ij k_j,
    dscale = sum_{b,h,i,j} dS_ij (q_i . k_j),    dslopes_h = sum_{b,i,j} dS_ij (i - j)
in two kernels (keys-major for dk, dv; queries-major for dq and the per-query partial sums of
dscale (NEED_DSCALE) and dslopes (HAS_BIAS), which the host adds up), so no atomics are needed.
Transposed (the key role of the weights): o_t_j = sum_{i : j in C(i)} P_ij v_i, the dv of the
backward with do = v: the keys-major kernel with DV_ONLY.

The context set: the band LO <= i - j <= HI, i - j != HOLE as constexprs, or, where the call has
data for it (``energyc.runtime.rows.resolve`` gives a ``Rows``: packed documents, lengths,
prefixes), per-row key intervals lo_b(i) <= j <= hi_b(i) less the hole, read from the call's
(B or 1, T) rows under the constexpr ROWS (``triton_layer.row_bounds``, ``in_row_context``): a
block of queries [i0, i1) reaches the keys [lo_b(i0), hi_b(i1 - 1)], a block of keys [j0, j1) is
reached by the queries from the first i with hi_b(i) >= j0 to the last with lo_b(i) <= j1 - 1
(binary searches in the kernel, ``row_key_range`` / ``row_query_range``), per program (one
batch row and head); an empty row (a document's first token under j < i, a padded query) gives
lse 0, o 0 and no gradient. Without data the kernels are the band's alone.

The entry points ``attention_forward``, ``attention_backward`` and ``attention_transposed`` have
the interface of ``energyc.runtime.kernels`` (checked at import), as the torch kernels of
``energyc.runtime.attention`` do; the generated step functions call
them on the module their Triton path names (``KERNELS``). Their launches are the custom ops
``energyc::triton_attention_*``, registered once here.
"""

import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from energyc.context import Context
from energyc.runtime.kernels import implements
from energyc.runtime.triton_layer import (
    INTERPRETED,
    _acc,
    context_args,
    in_row_context,
    operand,
    row_args,
    row_bounds,
    row_key_range,
    row_query_range,
    storage,
    tile_dot,
)

# (BLOCK_M queries, BLOCK_N keys) of the one tile the interpreter runs; BLOCK_M is also the
# backward's preprocess block on every device
INTERPRETER_TILE = (32, 32)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) that Triton's autotuner tries on a GPU: the tiles of
# Triton's fused-attention tutorial and smaller ones for wide feature rows
GPU_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2),
             (16, 16, 4, 1))

# what the best tile depends on: sizes, context set, and the constexprs that change the work
# (each backward kernel adds its own)
_TUNING_KEY = ["T", "TK", "F", "G", "LO", "HI", "HOLE", "ROWS", "HAS_BIAS"]


def _tiles():
    """The (BLOCK_M queries, BLOCK_N keys) tiles and launch settings of the flash kernels. On a
    GPU Triton's autotuner times these per (T, F, G) and keeps the fastest (configurations that do
    not fit the device are skipped); the interpreter runs the first, small one."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": INTERPRETER_TILE[0], "BLOCK_N": INTERPRETER_TILE[1]})]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in GPU_TILES
    ]


@triton.jit
def _dot(a, b, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in ACC (``tile_dot`` of the generated kernels)."""
    return tile_dot(a, b, ACC, UPCAST)


@triton.jit
def _slope(SLOPES, h, ACC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The bias slope of head h (0 without a bias)."""
    slope = tl.zeros([], dtype=ACC)
    if HAS_BIAS:
        slope = tl.load(SLOPES + h).to(ACC)
    return slope


@triton.jit
def _scale(scale, scale_lo, ACC: tl.constexpr):
    """The scale in ACC: a Python float reaches a kernel in fp32, so in fp64 it comes as its fp32
    rounding plus the rest (``_scale_args``; 48 bits of mantissa)."""
    value = tl.cast(scale, ACC)
    if ACC == tl.float64:
        value = value + tl.cast(scale_lo, ACC)
    return value


@triton.jit
def _scores(qk, scale, slope, offs_m, offs_n, HAS_BIAS: tl.constexpr):
    """(M, N) scores from the unscaled dots qk: scale * qk, plus slope * (i - j) with HAS_BIAS."""
    if HAS_BIAS:
        return qk * scale + slope * (offs_m[:, None] - offs_n[None, :]).to(qk.dtype)
    return qk * scale


@triton.autotune(configs=_tiles(), key=_TUNING_KEY)
@triton.jit
def _attention_fwd(
    Q, K, V,  # (B, T, H, F), (B, TK, H, F), (B, TK, H, G): any strides
    SLOPES,  # (H,) ACC: the bias slopes (read when HAS_BIAS)
    OUT,  # (B, T, H, G) output: o
    LSE,  # (B, H, T) ACC output: log-sum-exp of the scores
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
    T, TK, H, F, G,  # T queries, TK keys (a memory's M tokens, or T)
    scale, scale_lo,  # the scale: its fp32 rounding, and the rest (read in fp64)
    ROWS_LO, ROWS_HI, s_rows,  # the call's key bounds lo_b(i), hi_b(i) (read under ROWS)
    LO: tl.constexpr, HI: tl.constexpr, HOLE: tl.constexpr,  # the context set's band
    ROWS: tl.constexpr,  # the set's keys are the call's rows (LO, HI None), not the band
    ACC: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, BLOCK_F)
    offs_g = tl.arange(0, BLOCK_G)
    mask_m = offs_m < T
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_f[None, :],
                mask=mask_m[:, None] & (offs_f[None, :] < F), other=0.0)
    slope = _slope(SLOPES, h, ACC, HAS_BIAS)
    scale = _scale(scale, scale_lo, ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=ACC)
    LO_ROW = ROWS_LO + b * s_rows
    HI_ROW = ROWS_HI + b * s_rows
    lo_m, hi_m = row_bounds(LO_ROW, HI_ROW, offs_m, mask_m, ROWS)
    lo, hi = row_key_range(pid_m, T, LO_ROW, HI_ROW, LO, HI, BLOCK_M, BLOCK_N, ROWS, TK)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < TK
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_f[None, :],
                    mask=mask_n[:, None] & (offs_f[None, :] < F), other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_g[None, :],
                    mask=mask_n[:, None] & (offs_g[None, :] < G), other=0.0)
        s = _scores(_dot(q, tl.trans(k), ACC, UPCAST), scale, slope, offs_m, offs_n, HAS_BIAS)
        valid = mask_n[None, :] & mask_m[:, None] & in_row_context(offs_m, offs_n, lo_m, hi_m, LO,
                                                                   HI, HOLE, ROWS)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see no key
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(operand(p, v, UPCAST), v, ACC, UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), 0.0)
    tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_g[None, :],
             o.to(OUT.dtype.element_ty), mask=mask_m[:, None] & (offs_g[None, :] < G))
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=mask_m)


@triton.jit
def _attention_bwd_preprocess(
    OUT, DO,  # (B, T, H, G) contiguous: o and its upstream gradient
    DELTA,  # (B, H, T) ACC output: sum_g do * o
    T, H, G,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, BLOCK_G)
    mask = (offs_m[:, None] < T) & (offs_g[None, :] < G)
    ptr = (b * T * H + offs_m[:, None] * H + h) * G + offs_g[None, :]
    o = tl.load(OUT + ptr, mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + ptr, mask=mask, other=0.0).to(ACC)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.autotune(configs=_tiles(), key=_TUNING_KEY + ["DV_ONLY"])
@triton.jit
def _attention_bwd_dkdv(
    Q, K, V, DO,  # contiguous: Q, DO (B, T, H, F|G) by query (DO: v itself with DV_ONLY, V
    #               then unread), K, V (B, TK, H, F|G) by key
    SLOPES,  # (H,) ACC: the bias slopes (read when HAS_BIAS)
    LSE, DELTA,  # (B, H, T) ACC (DELTA unread with DV_ONLY)
    DK, DV,  # (B, TK, H, F|G) outputs, by key (DK unwritten with DV_ONLY)
    T, TK, H, F, G,  # T queries, TK keys (a memory's M tokens, or T)
    scale, scale_lo,  # the scale: its fp32 rounding, and the rest (read in fp64)
    ROWS_LO, ROWS_HI, s_rows,  # the call's key bounds lo_b(i), hi_b(i) (read under ROWS)
    LO: tl.constexpr, HI: tl.constexpr, HOLE: tl.constexpr,  # the context set's band
    ROWS: tl.constexpr,  # the set's keys are the call's rows (LO, HI None), not the band
    ACC: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    DV_ONLY: tl.constexpr,  # the transposed product sum_i P_ij do_i alone: no dp, dS, dk
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, BLOCK_F)
    offs_g = tl.arange(0, BLOCK_G)
    mask_n = offs_n < TK
    row_n = (b * TK * H + offs_n[:, None] * H + h)
    k = tl.load(K + row_n * F + offs_f[None, :], mask=mask_n[:, None] & (offs_f[None, :] < F),
                other=0.0)
    if not DV_ONLY:
        v = tl.load(V + row_n * G + offs_g[None, :], mask=mask_n[:, None] & (offs_g[None, :] < G),
                    other=0.0)
    slope = _slope(SLOPES, h, ACC, HAS_BIAS)
    scale = _scale(scale, scale_lo, ACC)
    dk = tl.zeros((BLOCK_N, BLOCK_F), dtype=ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_G), dtype=ACC)
    LO_ROW = ROWS_LO + b * s_rows
    HI_ROW = ROWS_HI + b * s_rows
    # the queries that see a key here
    lo, hi = row_query_range(pid_n, T, LO_ROW, HI_ROW, LO, HI, BLOCK_M, BLOCK_N, ROWS, TK)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        row_m = (b * T * H + offs_m[:, None] * H + h)
        q = tl.load(Q + row_m * F + offs_f[None, :], mask=mask_m[:, None] & (offs_f[None, :] < F),
                    other=0.0)
        do = tl.load(DO + row_m * G + offs_g[None, :],
                     mask=mask_m[:, None] & (offs_g[None, :] < G), other=0.0)
        lse = tl.load(LSE + pid_bh * T + offs_m, mask=mask_m, other=0.0)
        s = _scores(_dot(q, tl.trans(k), ACC, UPCAST), scale, slope, offs_m, offs_n,
                    HAS_BIAS)  # (M, N)
        lo_m, hi_m = row_bounds(LO_ROW, HI_ROW, offs_m, mask_m, ROWS)
        valid = mask_m[:, None] & mask_n[None, :] & in_row_context(offs_m, offs_n, lo_m, hi_m, LO,
                                                                   HI, HOLE, ROWS)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += _dot(operand(tl.trans(p), do, UPCAST), do, ACC, UPCAST)
        if not DV_ONLY:
            delta = tl.load(DELTA + pid_bh * T + offs_m, mask=mask_m, other=0.0)
            dp = _dot(do, tl.trans(v), ACC, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(operand(tl.trans(ds), q, UPCAST), q, ACC, UPCAST)
    if not DV_ONLY:
        tl.store(DK + row_n * F + offs_f[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_f[None, :] < F))
    tl.store(DV + row_n * G + offs_g[None, :], dv.to(DV.dtype.element_ty),
             mask=mask_n[:, None] & (offs_g[None, :] < G))


@triton.autotune(configs=_tiles(), key=_TUNING_KEY + ["NEED_DSCALE"])
@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO,  # contiguous: Q, DO (B, T, H, F|G) by query, K, V (B, TK, H, F|G) by key
    SLOPES,  # (H,) ACC: the bias slopes (read when HAS_BIAS)
    LSE, DELTA,  # (B, H, T) ACC
    DQ,  # (B, T, H, F) output
    DSCALE,  # (B, H, T) ACC output with NEED_DSCALE: sum_j dS_ij (q_i . k_j)
    DSLOPES,  # (B, H, T) ACC output with HAS_BIAS: sum_j dS_ij (i - j)
    T, TK, H, F, G,  # T queries, TK keys (a memory's M tokens, or T)
    scale, scale_lo,  # the scale: its fp32 rounding, and the rest (read in fp64)
    ROWS_LO, ROWS_HI, s_rows,  # the call's key bounds lo_b(i), hi_b(i) (read under ROWS)
    LO: tl.constexpr, HI: tl.constexpr, HOLE: tl.constexpr,  # the context set's band
    ROWS: tl.constexpr,  # the set's keys are the call's rows (LO, HI None), not the band
    ACC: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, BLOCK_F)
    offs_g = tl.arange(0, BLOCK_G)
    mask_m = offs_m < T
    row_m = (b * T * H + offs_m[:, None] * H + h)
    q = tl.load(Q + row_m * F + offs_f[None, :], mask=mask_m[:, None] & (offs_f[None, :] < F),
                other=0.0)
    do = tl.load(DO + row_m * G + offs_g[None, :], mask=mask_m[:, None] & (offs_g[None, :] < G),
                 other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=mask_m, other=0.0)
    slope = _slope(SLOPES, h, ACC, HAS_BIAS)
    scale = _scale(scale, scale_lo, ACC)
    dq = tl.zeros((BLOCK_M, BLOCK_F), dtype=ACC)
    dscale = tl.zeros((BLOCK_M,), dtype=ACC)
    dslope = tl.zeros((BLOCK_M,), dtype=ACC)
    LO_ROW = ROWS_LO + b * s_rows
    HI_ROW = ROWS_HI + b * s_rows
    lo_m, hi_m = row_bounds(LO_ROW, HI_ROW, offs_m, mask_m, ROWS)
    lo, hi = row_key_range(pid_m, T, LO_ROW, HI_ROW, LO, HI, BLOCK_M, BLOCK_N, ROWS, TK)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < TK
        row_n = (b * TK * H + offs_n[:, None] * H + h)
        k = tl.load(K + row_n * F + offs_f[None, :], mask=mask_n[:, None] & (offs_f[None, :] < F),
                    other=0.0)
        v = tl.load(V + row_n * G + offs_g[None, :], mask=mask_n[:, None] & (offs_g[None, :] < G),
                    other=0.0)
        qk = _dot(q, tl.trans(k), ACC, UPCAST)
        s = _scores(qk, scale, slope, offs_m, offs_n, HAS_BIAS)
        valid = mask_m[:, None] & mask_n[None, :] & in_row_context(offs_m, offs_n, lo_m, hi_m, LO,
                                                                   HI, HOLE, ROWS)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), ACC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(operand(ds, k, UPCAST), k, ACC, UPCAST)
        if NEED_DSCALE:
            dscale += tl.sum(ds * qk, 1)
        if HAS_BIAS:
            dslope += tl.sum(ds * (offs_m[:, None] - offs_n[None, :]).to(ACC), 1)
    tl.store(DQ + row_m * F + offs_f[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & (offs_f[None, :] < F))
    if NEED_DSCALE:
        tl.store(DSCALE + pid_bh * T + offs_m, dscale, mask=mask_m)
    if HAS_BIAS:
        tl.store(DSLOPES + pid_bh * T + offs_m, dslope, mask=mask_m)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernels' arithmetic and saved statistics (lse, delta, dscale, dslopes)
    for operands of ``dtype``: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(F: int, G: int, dtype: torch.dtype) -> dict:
    """The constexprs of a launch besides the tiles: whole feature rows per tile, ACC, and UPCAST.
    Triton's CPU interpreter multiplies the raw bits of bfloat16 operands in tl.dot; bf16 x bf16
    products are exact in fp32, so upcasting the operands there computes what a bf16 dot with
    fp32 accumulation computes on a GPU."""
    return {
        "ACC": _acc(dtype),
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
        "BLOCK_F": max(16, triton.next_power_of_2(F)),
        "BLOCK_G": max(16, triton.next_power_of_2(G)),
    }


def _grid(T: int, B: int, H: int, block: str):
    """One program per (tile of ``block`` tokens, batch x head): T the queries (queries-major
    kernels) or the keys (keys-major)."""
    return lambda meta: (triton.cdiv(T, meta[block]), B * H)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | torch.Tensor, kind: Context | tuple,
                      slopes: torch.Tensor | None = None, offset: int = 0,
                      keep_probs: bool = False, probs: None = None) -> tuple:
    """o (B, T, H, G) and lse (B, T, H) of softmax attention of the T queries q (B, T, H, F)
    over the keys k (B, TK, H, F) and values v (B, TK, H, G) (TK: T, or a memory's M tokens) in
    the context set ``kind`` (a ``Context`` or its spelling, such as ("causal",) or
    ("window", 64)), with the bias
    slopes_h * (i - j) when slopes (H,) is given; an empty set gives o = 0, lse = 0. These
    kernels keep no attention weights: with ``keep_probs`` the third result is None (as the torch
    runtime's where it keeps none), and ``probs`` is always None. ``offset`` (queries after a
    cached prefix) is 0 here: decoding runs on the torch kernels (``energyc.runtime.decode``)."""
    if offset:
        raise NotImplementedError("the Triton attention kernels take no offset: decoding runs on "
                                  "energyc.runtime.attention")
    band, rows_lo, rows_hi = context_args(kind, q.shape[1], q.device)
    o, lse = _attention_forward_op(q, k, v, torch.as_tensor(scale, dtype=torch.float64), *band,
                                   slopes, rows_lo, rows_hi)
    return (o, lse, None) if keep_probs else (o, lse)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | torch.Tensor, kind: Context | tuple, o: torch.Tensor,
                       lse: torch.Tensor, g: torch.Tensor, slopes: torch.Tensor | None = None,
                       need_dscale: bool = False, probs: None = None) -> tuple:
    """dq, dk, dv, dscale, dslopes of ``attention_forward`` for the upstream gradient g
    (B, T, H, G) (dk, dv over the TK keys); dscale (0-d) only when ``need_dscale``, dslopes (H,) only when
    ``slopes`` is given, else None. ``probs`` is None here (``attention_forward`` keeps none)."""
    band, rows_lo, rows_hi = context_args(kind, q.shape[1], q.device)
    dq, dk, dv, dscale, dslopes = _attention_backward_op(
        q, k, v, torch.as_tensor(scale, dtype=torch.float64), *band, o, lse, g, slopes, need_dscale, rows_lo, rows_hi
    )
    return (dq, dk, dv, dscale if need_dscale else None,
            dslopes if slopes is not None else None)


def attention_transposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | torch.Tensor, kind: Context | tuple, lse: torch.Tensor,
                         slopes: torch.Tensor | None = None, probs: None = None) -> torch.Tensor:
    """The weights of ``attention_forward`` applied keys-major (the key role): o_t
    (B, TK, H, G) over the keys with o_t[b, j, h] = sum_{i : j in C(i)} P_ij v[b, i, h], v
    (B, T, H, G) indexed by the query token; lse is
    the saved log-sum-exp of ``attention_forward``; ``probs`` is None here (as there)."""
    band, rows_lo, rows_hi = context_args(kind, q.shape[1], q.device)
    return _attention_transposed_op(
        q, k, v, torch.as_tensor(scale, dtype=torch.float64), *band, lse, slopes, rows_lo, rows_hi
    )


def _scale_args(scale: torch.Tensor) -> tuple[float, float]:
    """(scale, scale_lo): the scale's float32 rounding and the rest, which the kernels add in
    fp64 for float64 operands (a Python float is an fp32 argument of a Triton kernel)."""
    value = float(scale)
    high = torch.tensor(value, dtype=torch.float32).item()
    return high, value - high


def _band_args(lo: int | None, hi: int | None, hole: int | None) -> dict:
    """The kernels' context-set constexprs LO, HI, HOLE (``Context.kernel_args``)."""
    return {"LO": lo, "HI": hi, "HOLE": hole}


def _slopes_arg(slopes: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The slopes as the kernels' (H,) pointer in ``like``'s dtype (the statistics'), and
    HAS_BIAS; ``like`` stands in unread without slopes."""
    if slopes is None:
        return like, False
    return slopes.to(like.dtype).contiguous(), True


def _alike(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The operands in one dtype (their promoted one), contiguous: under torch.autocast a layer's
    operands may mix bfloat16 contractions with float32 element-wise values, and a tile's dot
    takes one dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype).contiguous() for t in tensors]


# The launches are torch.library custom ops, so torch.compile(fullgraph=True) keeps them as opaque
# nodes (the fake implementations give their output shapes) instead of tracing Triton. Custom ops
# return no None: an output not asked for is an empty tensor, which the wrappers above map to None.
@torch.library.custom_op("energyc::triton_attention_forward", mutates_args=())
def _attention_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    lo: Optional[int],  # noqa: UP045 (the form of torch.library's docs)
    hi: Optional[int],  # noqa: UP045
    hole: Optional[int],  # noqa: UP045
    slopes: Optional[torch.Tensor],  # noqa: UP045 (the form of torch.library's docs)
    rows_lo: Optional[torch.Tensor] = None,  # noqa: UP045
    rows_hi: Optional[torch.Tensor] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    scale, scale_lo = _scale_args(scale)
    B, T, H, F = q.shape
    TK, G = k.shape[1], v.shape[-1]
    out_dtype = v.dtype
    q, k, v = _alike(q, k, v)
    o = torch.empty(B, T, H, G, dtype=storage(q.dtype), device=q.device)
    lse = torch.empty(B, H, T, dtype=_stat_dtype(q.dtype), device=q.device)
    slopes, has_bias = _slopes_arg(slopes, lse)
    blocks = _blocks(F, G, q.dtype)
    _attention_fwd[_grid(T, B, H, "BLOCK_M")](
        q, k, v, slopes, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, TK, H, F, G, scale, scale_lo, **row_args(rows_lo, rows_hi, B, T, lse),
        **_band_args(lo, hi, hole),
        HAS_BIAS=has_bias, **blocks,
    )
    # lse stays fp32 (fp64): rounding it to half precision would cost the backward accuracy
    return o.to(out_dtype), lse.transpose(1, 2).contiguous()


@_attention_forward_op.register_fake
def _(q, k, v, scale, lo, hi, hole, slopes, rows_lo=None, rows_hi=None):
    B, T, H, _ = q.shape
    stat = _stat_dtype(torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    return v.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H, dtype=stat)


@torch.library.custom_op("energyc::triton_attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    lo: Optional[int],  # noqa: UP045 (the form of torch.library's docs)
    hi: Optional[int],  # noqa: UP045
    hole: Optional[int],  # noqa: UP045
    o: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    slopes: Optional[torch.Tensor],  # noqa: UP045 (the form of torch.library's docs)
    need_dscale: bool,
    rows_lo: Optional[torch.Tensor] = None,  # noqa: UP045
    rows_hi: Optional[torch.Tensor] = None,  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, scale_lo = _scale_args(scale)
    B, T, H, F = q.shape
    TK, G = k.shape[1], v.shape[-1]
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, o, g = _alike(q, k, v, o, g)
    lse = lse.transpose(1, 2).to(_stat_dtype(q.dtype)).contiguous()
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty_like(t, dtype=storage(t.dtype)) for t in (q, k, v))
    slopes, has_bias = _slopes_arg(slopes, delta)
    # per-query partial sums of dscale and dslopes, added up below (no atomics)
    dscale_rows = torch.empty_like(delta) if need_dscale else delta
    dslopes_rows = torch.empty_like(delta) if has_bias else delta
    blocks = _blocks(F, G, q.dtype)
    masks = {**_band_args(lo, hi, hole), **row_args(rows_lo, rows_hi, B, T, delta)}
    _attention_bwd_preprocess[(triton.cdiv(T, INTERPRETER_TILE[0]), B * H)](
        o, g, delta, T, H, G, ACC=blocks["ACC"], BLOCK_M=INTERPRETER_TILE[0],
        BLOCK_G=blocks["BLOCK_G"],
    )
    _attention_bwd_dkdv[_grid(TK, B, H, "BLOCK_N")](
        q, k, v, g, slopes, lse, delta, dk, dv, T, TK, H, F, G, scale, scale_lo, **masks,
        HAS_BIAS=has_bias, DV_ONLY=False, **blocks,
    )
    _attention_bwd_dq[_grid(T, B, H, "BLOCK_M")](
        q, k, v, g, slopes, lse, delta, dq, dscale_rows, dslopes_rows, T, TK, H, F, G, scale,
        scale_lo, **masks,
        HAS_BIAS=has_bias, NEED_DSCALE=need_dscale, **blocks,
    )
    dscale = dscale_rows.sum() if need_dscale else delta.new_empty(0)
    dslopes = dslopes_rows.sum((0, 2)) if has_bias else delta.new_empty(0)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dscale, dslopes


@_attention_backward_op.register_fake
def _(q, k, v, scale, lo, hi, hole, o, lse, g, slopes, need_dscale, rows_lo=None, rows_hi=None):
    H = q.shape[2]
    stat = _stat_dtype(torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    dscale = q.new_empty(() if need_dscale else (0,), dtype=stat)
    dslopes = q.new_empty((H,) if slopes is not None else (0,), dtype=stat)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dscale, dslopes


@torch.library.custom_op("energyc::triton_attention_transposed", mutates_args=())
def _attention_transposed_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    lo: Optional[int],  # noqa: UP045 (the form of torch.library's docs)
    hi: Optional[int],  # noqa: UP045
    hole: Optional[int],  # noqa: UP045
    lse: torch.Tensor,
    slopes: Optional[torch.Tensor],  # noqa: UP045 (the form of torch.library's docs)
    rows_lo: Optional[torch.Tensor] = None,  # noqa: UP045
    rows_hi: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    scale, scale_lo = _scale_args(scale)
    B, T, H, F = q.shape
    TK, G = k.shape[1], v.shape[-1]
    out_dtype = v.dtype
    q, k, v = _alike(q, k, v)
    lse = lse.transpose(1, 2).to(_stat_dtype(q.dtype)).contiguous()
    o_t = torch.empty(B, TK, H, G, dtype=storage(v.dtype), device=v.device)  # over the keys
    slopes, has_bias = _slopes_arg(slopes, lse)
    blocks = _blocks(F, G, q.dtype)
    # the keys-major backward kernel with do = v: its dv is the transposed product
    _attention_bwd_dkdv[_grid(TK, B, H, "BLOCK_N")](
        q, k, v, v, slopes, lse, lse, q, o_t, T, TK, H, F, G, scale, scale_lo,
        **_band_args(lo, hi, hole),
        **row_args(rows_lo, rows_hi, B, T, lse), HAS_BIAS=has_bias, DV_ONLY=True, **blocks,
    )
    return o_t.to(out_dtype)


@_attention_transposed_op.register_fake
def _(q, k, v, scale, lo, hi, hole, lse, slopes, rows_lo=None, rows_hi=None):
    return v.new_empty(k.shape[0], k.shape[1], v.shape[2], v.shape[3])


implements(sys.modules[__name__])  # the kernels interface, shared with the other backend
