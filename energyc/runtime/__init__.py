"""The runtime every generated package shares (``from energyc import runtime as _rt``).

Generated packages hold only what depends on their energy (the step functions, the ``Layer``,
and the energy's own Triton kernels); everything else they call is here, written once:

* context sets: cached (T, T) masks and offsets i - j, the log-sum-exp over a context set;
* positions: rotary embeddings, ALiBi slopes;
* attention on torch: the CPU flash kernels where they serve, else a fallback that forms the
  scores ``QUERY_CHUNK`` queries at a time (``attention_forward``, ``attention_backward``,
  ``attention_transposed``);
* the layer's plumbing: argument checks, hyperparameter values, the choice of backend
  (``implementation``, ``preload``) and the runtime version check (``require``);
* mixed precision: what a layer computes in under torch.autocast (``apply_layer``,
  ``autocast_dtype``, ``energy_inputs``, ``autocast_off``, ``autocast_state``,
  ``autocast_as``);
* two-operand contractions as one GEMM, on oneDNN where it is the faster CPU GEMM
  (``contract``, ``contract_add``: ``energyc.runtime.gemm``);
* the block-sparse pair reductions of ``energyc.runtime.pairs``, re-exported.

The Triton path's shared pieces are separate modules, imported only when that path is used:
``energyc.runtime.triton_layer`` (the launchers of generated element-wise and reduction kernels,
the kernels' context test, interpreter helpers) and ``energyc.runtime.triton_attention`` (the
flash kernels of fused context reductions). Importing this package needs torch alone: no
triton, and none of the compiler (sympy, networkx, jinja2).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from energyc.runtime import flash_cpu
from energyc.runtime.gemm import contract, contract_add  # noqa: F401 (generated code calls them)
from energyc.runtime.pairs import _in_context, key_start, query_blocks
from energyc.runtime_version import RUNTIME_VERSION

# -- version --------------------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    """"0.10.2" -> (0, 10, 2), so that versions compare numerically."""
    return tuple(int(part) for part in version.split("."))


def require(version: str, package: str) -> None:
    """Check, at the import of a generated package, that this runtime is at least ``version``.

    Args:
        version: the ``RUNTIME_VERSION`` of the energyc that generated ``package``.
        package: the generated package's name, for the message.

    Raises:
        ImportError: the installed runtime is older than ``version``.
    """
    if _version_tuple(RUNTIME_VERSION) < _version_tuple(version):
        import energyc

        raise ImportError(
            f"{package} was generated for energyc.runtime >= {version}, but the installed energyc "
            f"{energyc.__version__} ({energyc.__file__}) has runtime {RUNTIME_VERSION}: upgrade "
            f"energyc, or regenerate the package with this energyc (`energyc compile`)"
        )


# -- constant tables ------------------------------------------------------------------------------

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


# -- context sets ---------------------------------------------------------------------------------


def context_mask(kind: str, T: int, w: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask: entry (i, j) is True when token j is in the context set of token i."""

    def build() -> torch.Tensor:
        i = torch.arange(T, device=device)
        return _in_context(kind, w, i[:, None] - i[None, :])

    return _cached(("mask", kind, T, w, str(device)), build)


def token_offset(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (T, T) matrix of i - j."""

    def build() -> torch.Tensor:
        i = torch.arange(T, device=device, dtype=dtype)
        return i[:, None] - i[None, :]

    return _cached(("offset", T, dtype, str(device)), build)


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


# -- positions ------------------------------------------------------------------------------------


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
    if offset:  # a table of a power-of-two length serves every offset below it: few tables
        n = 1 << (offset + T - 1).bit_length()
        cos, sin = _rotary_table(n, F, base, t.dtype, t.device)
        cos, sin = cos[offset:offset + T], sin[offset:offset + T]
    else:
        cos, sin = _rotary_table(T, F, base, t.dtype, t.device)
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


# -- attention on torch ---------------------------------------------------------------------------

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
    kind: tuple,
    slopes: torch.Tensor | None = None,
    need_dscale: bool = False,
    scale: float | torch.Tensor = 1.0,
) -> bool:
    """Whether the CPU flash kernels compute this call: no bias, no dscale, a context set they
    know (all keys, or causal), values of the query's feature size, and for causal a positive
    scale (the causal kernel scales its -inf mask by the scale: 0 * -inf and -1 * -inf gave NaN
    on every token but the last)."""
    return (_flash_cpu(q) and kind[0] in ("causal", "all") and slopes is None
            and not need_dscale and q.shape[-1] == v.shape[-1]
            and (kind[0] == "all" or float(scale) > 0))


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
    kind: tuple,
    slopes: torch.Tensor | None,
    r0: int,
    qk: torch.Tensor | None = None,
    c0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, H, C, K) of the C queries from ``r0`` on against the K keys from ``c0`` on:
    scale * (q_i . k_j) + slopes_h * (i - j) (the bias only when slopes is not None), -inf outside
    the context set ``kind``; ``qk`` is qc @ kh^T when already formed. Also returns the (C, K)
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
    if kind[0] != "all":
        w = kind[1] if kind[0] == "window" else 0
        scores = scores.masked_fill_(~_in_context(kind[0], w, offset), -math.inf)
    return scores, offset


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | torch.Tensor,
    kind: tuple,
    slopes: torch.Tensor | None = None,
    offset: int = 0,
    keep_probs: bool = False,
    probs: torch.Tensor | None = None,
) -> tuple:
    """Softmax attention over the context set ``kind`` (a mask tuple such as ("causal",)).

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
    out = _attention_forward(q, k, v, scale, kind, slopes, offset, keep_probs, probs)
    return out if keep_probs else out[:2]


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
            kind[0] == "causal", scale=s
        )
    elif flash_cpu.serves(q, v, scale, slopes):  # other context sets, a bias: masked blocks
        return *flash_cpu.forward(q, k, v, scale, kind, slopes), None
    else:  # the scale stays a tensor (no device sync)
        return *_attention_chunks(qh, kh, vh, scale, kind, slopes, 0, q.dtype), None
    return o.transpose(1, 2).to(q.dtype), lse.transpose(1, 2).to(_accumulator(q)), None


# A forward asked to keep its attention weights (``keep_probs``: the compiler asks where three
# or more calls read the same scores, see energyc.backends.torch_backend.keeps_probs) keeps them
# where queries and keys both fit one query block of the chunked path (QUERY_CHUNK): P is then
# formed whole, once, in the memory of one such block, (B, H, T, keys) <= (B, H, T, QUERY_CHUNK),
# kept from the forward to the backward; the later calls over the same scores (the key role, the
# backward's products with other values, the backward) multiply by it instead of forming the
# scores and their exponentials again. Measured on the 2-core machine of benchmarks/RESULTS.md
# (float32), the Energy Transformer's four calls over 12 heads took 0.55-0.7x the flash kernels'
# time at 64-256 tokens. Longer sequences keep none: the kernels' recomputation serves; so do
# narrow windows over more than half a block of keys (``probs_fit``), where most of P is 0.


def probs_fit(q: torch.Tensor, k: torch.Tensor, kind: tuple) -> bool:
    """Whether ``attention_forward(..., keep_probs=True)`` keeps the weights of (q, k) over the
    context set ``kind``: queries and keys fit one query block, and a window reaches at least
    half the keys or they fit half a block. (P is formed dense: a narrow window at 256 tokens
    made the joint window energy's step 0.9x as fast with P kept, at 128 tokens 1.2x faster.)"""
    queries, keys = q.shape[1], k.shape[1]
    if not (q.numel() > 0 and k.numel() > 0 and queries <= QUERY_CHUNK and keys <= QUERY_CHUNK):
        return False
    return kind[0] != "window" or 2 * (kind[1] + 1) >= keys or 2 * keys <= QUERY_CHUNK


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
    for r0, r1, c0, c1 in query_blocks(kind, T, QUERY_CHUNK, offset, keys):
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
    kind: tuple,
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
            kind[0] == "causal", scale=s
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
        for r0, r1, c0, c1 in query_blocks(kind, q.shape[1], QUERY_CHUNK):
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
    kind: tuple,
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
    if probs is not None:
        return _apply_probs(probs.transpose(-1, -2), v, v.dtype)
    if q.numel() == 0 or k.numel() == 0:  # 0 tokens or batch 0
        return torch.zeros_like(v)
    if flash_cpu.serves(q, v, scale, slopes) and _flash_backward_accurate(lse):
        return flash_cpu.transposed(q, k, v, scale, kind, lse, slopes)
    acc = _accumulator(q)
    qh, kh, vh, lseh = (t.transpose(1, 2).to(acc) for t in (q, k, v, lse))
    o_t = torch.zeros_like(vh)
    for r0, r1, c0, c1 in query_blocks(kind, q.shape[1], QUERY_CHUNK):
        scores, _ = _masked_scores(qh[..., r0:r1, :], kh[..., c0:c1, :], scale, kind, slopes, r0,
                                   c0=c0)
        p = _softmax_rows(scores, lseh[..., r0:r1])
        o_t[..., c0:c1, :] += p.transpose(-1, -2) @ vh[..., r0:r1, :]
    return o_t.transpose(1, 2).to(q.dtype)


# -- the layer's plumbing -------------------------------------------------------------------------


def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b where either may be None (no contribution)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def mul_affine_(a: torch.Tensor, y: torch.Tensor, c: float, s: float) -> torch.Tensor:
    """``a *= c + s y`` in one pass over ``a`` and no temporary, for a factor such as a sigmoid's
    derivative ``1 - sigmoid``:  a (c + s y) = c (a + (s / c) a y)  (``addcmul_`` reads each
    element of ``a`` before writing it). ``a`` has the broadcast shape of both; c != 0."""
    a.addcmul_(a, y, value=s / c)
    return a if c == 1 else a.mul_(c)


class Sums:
    """Running sums of a backward's gradient parts across the descent steps. The first part is
    kept as it is (it may be another tensor's view, or the caller's upstream gradient), the
    first sum makes a new tensor, and later parts add into that one in place: one pass per step,
    no new tensor per step. A part that would change the sum's shape or dtype (broadcasting,
    type promotion) makes a new tensor instead."""

    def __init__(self) -> None:
        self._owned: list[torch.Tensor] = []

    def add(self, total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
        """total + part, where either may be None (no contribution)."""
        if part is None:
            return total
        if total is None:
            return part
        if (any([total is t for t in self._owned]) and part.dtype == total.dtype
                and torch.broadcast_shapes(total.shape, part.shape) == total.shape):
            return total.add_(part)
        out = total + part
        self._owned.append(out)
        return out


def as_scalar(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A hyperparameter as a 0-dim tensor of x's dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=x.dtype)
    return torch.tensor(value, dtype=x.dtype, device=x.device)


def check_dim(name: str, value: Any, even: bool = False) -> int:
    """The constructor's dim argument ``name``: a positive int (even when ``even``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"argument {name}: expected a positive int, got {value!r}")
    if even and value % 2:
        raise ValueError(
            f"argument {name}: expected an even size (rotary over {name}), got {value}"
        )
    return value


def hyper_value(name: str, value: Any, default: float | None) -> float:
    """The constructor's hyperparameter ``name``: ``value``, else ``default``, as a finite float."""
    if value is None:
        value = default
    if value is None:
        raise TypeError(f"argument {name}: required (the energy declares no default)")
    return finite_number(name, value)


def finite_number(name: str, value: Any) -> float:
    """Argument ``name`` as a finite float: TypeError for what is not a number (a str, a bool,
    None), ValueError for NaN and +-inf."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"argument {name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one value
        raise TypeError(f"argument {name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"argument {name}: expected a finite number, got {value!r}")
    return number


BACKENDS = ("auto", "torch", "triton")


def implementation(backend: str, x: torch.Tensor, package: str) -> tuple[ModuleType, ModuleType]:
    """(module with the step functions, module with the attention_* functions).

    torch: the package's layer.py and this runtime. triton: its _triton_layer.py and the kernels
    that module names (``energyc.runtime.triton_attention``, or this runtime when the layer has
    no fused context reduction). Modules are looked up, not imported, so that torch.compile can
    trace this: ``preload`` imports them when the layer is built.
    """
    torch_path = sys.modules[f"{package}.layer"], sys.modules[__name__]
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return torch_path
    path = sys.modules.get(f"{package}._triton_layer")
    if path is None:
        if backend == "auto":
            return torch_path
        raise RuntimeError(
            f"backend='triton' needs the triton package (import {package}._triton_layer)"
        )
    if not x.is_cuda and not sys.modules[f"{__name__}.triton_layer"].INTERPRETED:
        raise RuntimeError(
            "backend='triton' on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is imported"
        )
    return path, path.KERNELS


def preload(backend: str, package: str) -> None:
    """Import the Triton path when ``backend`` may use it (``triton``, or ``auto`` with CUDA)."""
    import importlib

    if backend == "torch" or (backend == "auto" and not torch.cuda.is_available()):
        return
    try:
        importlib.import_module(f"{package}._triton_layer")
    except ImportError as exc:
        if backend == "triton":
            raise RuntimeError(f"backend='triton' needs the triton package: {exc}") from None


def check_config(
    eta: Any,
    steps: Any,
    precond: Any,
    precond_rank: Any,
    context: Any,
    preconditioners: Sequence[str],
    backend: Any = "auto",
) -> tuple[float, int, str, str, str]:
    """The constructor's settings, checked: (eta, steps, precond, context, backend).

    eta is any finite number (0 is the identity map; a negative step climbs the energy)."""
    eta = finite_number("eta", eta)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"argument steps: expected a positive int, got {steps!r}")
    if precond not in preconditioners:
        raise ValueError(f"argument precond: expected one of {preconditioners}, got {precond!r}")
    if isinstance(precond_rank, bool) or not isinstance(precond_rank, int) or precond_rank < 1:
        raise ValueError(f"argument precond_rank: expected a positive int, got {precond_rank!r}")
    if context not in ("current", "input"):
        raise ValueError(f"argument context: expected 'current' or 'input', got {context!r}")
    if backend not in BACKENDS:
        raise ValueError(f"argument backend: expected one of {BACKENDS}, got {backend!r}")
    return (eta, steps, precond, context, backend)


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


# -- mixed precision ------------------------------------------------------------------------------
#
# Inside a torch.autocast region a layer computes as the same steps written in torch would under
# autocast: its input is taken in the parameters' dtype (float32: a bfloat16 input from an
# earlier autocast layer converts exactly), and the descent steps and their derived backward run
# inside the autocast region, so that autocast casts the operands of every contraction (einsum,
# bmm) to the autocast dtype, while the element-wise work between them, the runtime's reductions
# (pair log-sum-exps and sums, returned in the dtype the layer computes in) and the statistics
# saved for the backward (the attention log-sum-exp) stay float32 where their inputs are. The
# backward re-enters the forward's autocast state (backward() may run outside the region). The
# output is in the autocast dtype, as nn.Linear's is. float64 tensors are not cast (autocast
# leaves them alone too): a float64 layer under autocast runs in float64, with the strict dtype
# check of outside autocast.

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


def apply_layer(
    function: Any,
    config: Any,
    name: str,
    x: Any,
    dim: int,
    params: Sequence[torch.Tensor],
    hypers: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    precond: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """A generated layer's forward: check argument ``name`` (``x``) and run ``function`` (its
    ``_LayerFunction``) on x, the parameters, the hyperparameters (``hypers(x)``, as 0-d tensors
    of x's dtype) and the preconditioner's parameters. Under torch.autocast x is taken in the
    parameters' dtype, the steps run inside the region and the output comes in the autocast dtype
    (see the comment above ``AUTOCAST_DTYPES``)."""
    compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
    check_input(name, x, dim, params, compute=compute)
    if compute is None:
        return function.apply(config, x, *params, *hypers(x), *precond)
    x = x.to(params[0].dtype) if params else x
    return function.apply(config, x, *params, *hypers(x), *precond).to(compute)


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


def energy_inputs(
    x: Any, xbar: Any, dim: int, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated layer's ``energy`` arguments, checked: (x, xbar), xbar defaulting to x. Under
    torch.autocast the energy, a reduction, is evaluated in the parameters' dtype (x and xbar cast
    to it; the caller runs it with autocast off), as autocast keeps reductions in float32."""
    compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
    check_input("x", x, dim, params, compute=compute)
    if xbar is None:
        xbar = x
    else:
        check_input("xbar", xbar, dim, params, like=x, compute=compute)
    if compute is not None and params:
        x, xbar = x.to(params[0].dtype), xbar.to(params[0].dtype)
    return x, xbar


# -- block-sparse pair reductions (last: pairs.py may use the helpers above) ---------------------

# -- decoding -------------------------------------------------------------------------------------
#
# A causal layer's output at token i depends on tokens <= i alone, and the context enters each
# step only through per-token values on the j side of its reductions (keys such as W_k xbar_j).
# ``Layer.decode`` maps the states of t new tokens that follow a prefix of P tokens to their
# outputs with a cache of those values: each step's ``_grad_decode`` computes the new tokens'
# values, joins them to the cached ones (``extend``) and runs the reductions with the new tokens as
# queries at positions P .. P + t - 1 (the ``offset`` of the pair kernels, attention and rotary).


class DecodeCache:
    """What ``Layer.decode`` keeps between calls: the number of tokens seen (``position``) and,
    per descent step, the j-side values over those tokens by name (``steps``; with context
    "input" and values of the context alone, one dictionary serves every step). Opaque to users:
    pass back what ``decode`` returned; ``None`` starts a sequence. ``values(step)`` shows what a
    step holds."""

    def __init__(self, package: str, batch: int, steps: list[dict[str, Any]],
                 position: int = 0) -> None:
        self.package, self.batch, self.steps, self.position = package, batch, steps, position

    def values(self, step: int = 0) -> dict[str, torch.Tensor]:
        """The cached values of descent step ``step`` by name: over the ``position`` tokens, or
        a window's last ones."""
        return {name: entry.view() for name, entry in self.steps[step].items()}

    def __repr__(self) -> str:
        names = sorted({name for step in self.steps for name in step})
        return (f"DecodeCache({self.package}, batch={self.batch}, position={self.position}, "
                f"steps={len(self.steps)}, values={names})")


class _Tokens:
    """A value over the first ``n`` tokens, kept in a buffer along the token axis ``dim`` with
    room to grow: appending t tokens writes t rows (amortised by doubling the room), not the
    whole prefix again. Caches branch: each keeps its own ``n``, and a buffer that another branch
    has already written past ``n`` is copied before this one writes."""

    def __init__(self, buffer: torch.Tensor, dim: int, n: int, owner: list[int]) -> None:
        self.buffer, self.dim, self.n, self.owner = buffer, dim, n, owner  # owner[0]: rows written

    def view(self) -> torch.Tensor:
        return self.buffer.narrow(self.dim, 0, self.n)

    def append(self, new: torch.Tensor) -> _Tokens:
        t = new.shape[self.dim]
        buffer, owner = self.buffer, self.owner
        if owner[0] != self.n or buffer.shape[self.dim] < self.n + t:
            shape = list(new.shape)
            shape[self.dim] = max(2 * (self.n + t), 16)
            buffer = new.new_empty(shape)
            buffer.narrow(self.dim, 0, self.n).copy_(self.view())
            owner = [self.n]
        buffer.narrow(self.dim, self.n, t).copy_(new)
        owner[0] = self.n + t
        return _Tokens(buffer, self.dim, self.n + t, owner)


class _Last:
    """A value over ``n`` tokens of which only the last ones are kept: those a window of
    ``keep`` tokens before the latest call's queries reaches, and that call's (at most
    keep + t)."""

    def __init__(self, tokens: torch.Tensor, dim: int, n: int, keep: int) -> None:
        self.tokens, self.dim, self.n, self.keep = tokens, dim, n, keep

    def view(self) -> torch.Tensor:
        return self.tokens

    def append(self, new: torch.Tensor) -> _Last:
        size = self.tokens.shape[self.dim]
        old = self.tokens.narrow(self.dim, max(size - self.keep, 0), min(size, self.keep))
        joined = torch.cat([old, new], dim=self.dim)
        return _Last(joined, self.dim, self.n + new.shape[self.dim], self.keep)


def extend(cache: dict[str, _Tokens | _Last], name: str, new: torch.Tensor, dim: int,
           position: int, keep: int | None = None) -> torch.Tensor:
    """The j-side value ``name`` over the tokens so far: the cached ``position`` tokens' and the
    new tokens' (``new``), joined along the token axis ``dim`` and kept in ``cache``. With
    ``keep`` (a value that only windows of at most ``keep`` tokens read) only the last ``keep``
    cached tokens are kept and joined: memory O(keep), not O(tokens). A step that shares its
    cache with an earlier one of the same call (context "input") finds it extended already
    (position + t tokens) and takes it as it is."""
    entry = cache.get(name)
    t = new.shape[dim]
    have = 0 if entry is None else entry.n
    if entry is not None and have == position + t:
        return entry.view()
    if have != position:
        raise RuntimeError(f"decode cache: {name} holds {have} tokens, expected {position}")
    if entry is None and keep is not None:
        entry = _Last(new.narrow(dim, 0, 0), dim, 0, keep)
    elif entry is None:  # an empty buffer: the first append makes room to grow
        entry = _Tokens(new.narrow(dim, 0, 0), dim, 0, [0])
    cache[name] = entry.append(new)
    return cache[name].view()


def decode_layer(package: str, config: Any, x: Any, cache: DecodeCache | None, dim: int,
                 params: Sequence[torch.Tensor],
                 hypers: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                 precond: Sequence[torch.Tensor | None], grad_decode: Callable | None,
                 precond_forward: dict[str, Callable], unsupported: str | None,
                 keys_from_context: bool) -> tuple[torch.Tensor, DecodeCache]:
    """A generated layer's ``decode``: the outputs of the ``steps`` descent steps at the t new
    tokens of ``x`` (batch, t, dim) that follow the ``cache.position`` tokens of ``cache``, and
    the cache extended by them. Without autograd (inference). Under torch.autocast, as
    ``apply_layer``: x in the parameters' dtype, steps inside the region, output in the autocast
    dtype.

    Raises:
        ValueError: the layer cannot decode (``unsupported`` says why), or the cache is not one
            of this layer's for this batch.
    """
    if unsupported is not None:
        raise ValueError(f"{package}: decode needs every token's update to depend on earlier "
                         f"tokens alone: {unsupported}")
    compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
    check_input("x", x, dim, params, compute=compute)
    eta, steps, precond_kind, context, _ = config
    if cache is None:
        shared = context == "input" and keys_from_context
        first: dict[str, torch.Tensor] = {}
        cache = DecodeCache(package, x.shape[0],
                            [first] * steps if shared else [{} for _ in range(steps)])
    elif not isinstance(cache, DecodeCache) or cache.package != package:
        raise ValueError(f"argument cache: expected None or a DecodeCache from {package}.decode, "
                         f"got {cache!r}")
    elif cache.batch != x.shape[0]:
        raise ValueError(f"argument x: batch {x.shape[0]} does not match the cache's "
                         f"({cache.batch})")
    # a new cache: the dictionaries copied (shared ones stay shared), the tensors joined anew
    copies = {id(d): dict(d) for d in cache.steps}
    new = DecodeCache(package, cache.batch, [copies[id(d)] for d in cache.steps], cache.position)
    if compute is not None:
        x = x.to(params[0].dtype) if params else x
    forward = precond_forward[precond_kind]
    with torch.no_grad():
        x0 = x
        for step in new.steps:
            xbar = x if context == "current" else x0
            g = grad_decode(sys.modules[__name__], step, new.position, x, xbar, *params,
                            *hypers(x))
            u, _ = forward(g, *precond)
            x = torch.add(x, u, alpha=-eta)
    new.position += x.shape[1]
    return (x if compute is None else x.to(compute)), new


from energyc.runtime.layer import EnergyLayer, LayerFunction  # noqa: E402,F401 (generated Layers)
from energyc.runtime.pairs import *  # noqa: E402,F401,F403
