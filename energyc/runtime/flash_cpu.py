"""Attention on torch's CPU flash kernels for every context set, with an ``i - j`` bias.

The CPU flash-attention kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its explicit
backward) take an additive mask. Queries go ``BLOCK`` at a time against only the keys their
context set reaches (``energyc.runtime.pairs.query_blocks``), each block with a (BLOCK x keys) mask
tile: ``-inf`` outside the context set, plus ``slopes_h (i - j)`` for a bias. So strict, window
and not-self sets and ALiBi-style biases run on the same fused kernels as plain causal attention,
in memory O(tokens x BLOCK), never (tokens x tokens). With

    S_ij = scale q_i . k_j + m_h (i - j),   P_ij = exp(S_ij - lse_i) over j in C(i),
    dS_ij = P_ij (g_i . v_j - delta_i),     delta_i = g_i . o_i,

the three products are:

* ``forward``: ``o_i = sum_j P_ij v_j`` and ``lse_i``, one kernel call per query block;
* ``backward``: ``dq``, ``dk``, ``dv`` from the kernel's backward per query block (``dk`` and
  ``dv`` summed over the blocks), and when asked:

      dscale    = sum_ij dS_ij q_i . k_j  = sum_i q_i . dq'_i         (a narrow band: below)
      dslopes_h = sum_ij dS_ij (i - j)    = -sum_i dq''_i        per block from r0 on

  (the kernels take the queries scale q and a scale of 1, see below: their dq is
  ``dq'_i = sum_j dS_ij k_j``, and dq_i = scale dq'_i). For dslopes each block pads q with a
  feature 0 and k with the feature j - r0, which leaves S and P as they were, so the padded
  feature of dq' is ``dq''_i = sum_j dS_ij (j - r0)``; since each row of dS sums to 0,
  ``sum_ij dS_ij (i - j) = -sum_ij dS_ij (j - r0)``. Every dS_ij is the kernel's own, weighted by
  offsets no larger than a block and its keys; nothing is divided by the scale. The row sums are 0
  only up to rounding, and the weights j - r0 (up to BLOCK + w) are far larger than i - j where
  the context set is a narrow band of offsets (a window of w < BLOCK: i - j <= w): the rounding
  of the sums was then amplified by up to (BLOCK + w) / w (window_alibi, w = 4: dslopes 33x less
  accurate than autograd's, 7.4e-5 against 2.2e-6 relative at 1024 tokens in float32). For such
  a band dslopes and dscale are summed over its pairs alone (``_band_sums``: P recomputed from
  lse and renormalised over the row, delta_i = sum_j P_ij dP_ij from the same P, each pair
  weighted by its own i - j, or q_i . k_j), a block of queries at a time: O(tokens x w) work.
  Each row's weights are centred on their mean under P, which leaves a row of dS summing to 0
  with the same sum but keeps the rounding of that 0 from being multiplied by the mean:
  sum_i q_i . dq'_i weighs it by each row's mean q_i . k_j, and window_alibi's terms summed to
  2100x dscale, whose float32 error at 1024 tokens was 3.9e-6 relative (1.1e-5 once the kernels
  took scaled queries: its d/dbeta then 4.2x as far off as autograd's worst gradient); centred,
  3.0e-7 (and dslopes 9e-7 instead of 2e-6). Elsewhere dslopes keeps the error of the rows'
  normalisation: P = exp(S_ij - lse_i) with the forward's float32 lse sums to 1 only within
  lse's rounding, and each row of dS carries that factor, which dslopes (row contributions that
  cancel to a far smaller total) does not average out. With |lse| up to 121
  (a head whose bias grows with the distance: lm_attention_alibi_dplr at 1024 tokens with
  energyc bench's perturbed slopes) the rows sum to 1 within 3.8e-6 and dslopes in float32 is
  2.4x as far off as autograd's (9.5e-6 against 3.9e-6; S in float32 and P from that lse with
  everything else in float64: 1.7e-5, 3.6e-7 with the rows renormalised). Renormalising would
  take each row's sum of P, a product of its own (the bound of this error in general:
  FLASH_BACKWARD_MAX_LSE in energyc.runtime);
* ``transposed`` (the key role): ``o_j = sum_i P_ij v_i``. Its weights, over i for a fixed j, are
  a softmax of ``S_ij - lse_i`` up to its normaliser ``Z_j = sum_i P_ij <= T``: the forward
  kernel with the roles of queries and keys swapped, on ``[k_j, 1]`` and ``[scale q_i, -lse_i]``
  (whose product is ``S_ij - lse_i`` without the bias, so the mask stays a context tile), gives
  ``o'_j = sum_i P_ij v_i / Z_j`` and ``log Z_j``, so ``o_j = o'_j Z_j``.

The backward and the key role recompute P as exp(S_ij - lse_i) with the forward's lse_i, which
normalises the forward's own S: where they form S otherwise than the forward, the rows of P sum
to 1 only up to the difference, and nothing renormalises them. Two things keep S the same:

* the kernels take ``scale q`` and a scale of 1 (``kernel_scale``; float32 and float64 only,
  where that product rounds no worse than the kernels' own). Given the scale, the forward kernel
  scales q . k after its product and the backward within it (its P matched a GEMM with alpha =
  scale to 1e-7, not (q . k) scale): the two S differed by up to 1.4e-5 at |S| ~ 16 (the DPLR
  scores of lm_attention_nope_dplr, 160 features), the rows of P summed to 1 within 1.1e-5
  only, and that layer's float32 dq, dk, dv from the plain causal kernels were 3.1x, 2.4x and 3.2x
  less accurate than the materialised attention's under autograd (5.6e-6 against 1.8e-6 for dq,
  relative to float64 from the same inputs); with the scaled queries the rows sum to 1 within
  the rounding of lse (9.5e-7 at |lse| ~ 14) and the three are 1.0x, 1.8x, 1.1x its (1.0x,
  0.8x, 0.5x with the order of the features below too);
* the same order of the features (below), a function of q and k alone.

The kernels sum the features of q_i . k_j in their order. Where the scores are several terms in
one dot product (the generated layers concatenate their features) and one term's products are
much smaller than another's, each small product added after the large ones is rounded to the
precision of their partial sum: lm_attention_nope_dplr's low-rank term (W_q x_i) . (W_k xbar_j),
32 features of products ~1.5 (partial sums up to ~95), before its diagonal x_i diag(d) xbar_j,
128 of ~0.05, made the float32 attention output 1.9e-6 off, against 7.0e-7 for the terms as
separate products (as autograd of the energy forms them). ``feature_order`` puts the features
whose products are under 1 / SMALL_TERMS of the largest feature's first, each group in its own
order (so that the reordering is a few slice copies, and features of one size are left as they
are): 6.1e-7. dq and dk come back in the features' own order.

Without a bias, a block's keys are split where the context set's boundaries cross them
(``key_parts``): the keys every query of the block sees run without a mask, and only the keys
near a boundary (at most a block's width per boundary: the diagonal, a window's far edge) take a
mask tile. The mask costs the kernels about 8% of their time (256 x 4096 tiles, one thread). The
forward merges the parts' results as flash attention merges key blocks,

    lse_i = log sum_r exp(lse_i^r),    o_i = sum_r exp(lse_i^r - lse_i) o_i^r,

with lse_i^r = -inf where part r holds no key of row i (the kernel reports 0 there); the
backward's dq sums over the parts (each with the row's full lse and o), dk and dv are per part's
keys; the key role sums o'_j^r Z_j^r over the parts of its queries.

With the call's data (documents, lengths, prefixes: ``energyc.runtime.rows``) every entry takes
the set's ``Rows``, per-row key intervals lo_b(i) <= j <= hi_b(i), in place of its band. Rows whose
intervals differ run as groups of equal ones (``groups``: a padded row does the work of its real
tokens); a group's queries go in blocks that start where its rows part into independent runs
(``blocks``: a document is blocked as it would be alone, and small documents share a block only
while that adds little work), against the keys some row of the block reaches
(``Rows.key_range``); a part of those keys takes a mask tile only where some row's interval cuts
it (``Rows.needs_mask``, ``key_cuts``; the tile is ``Rows.tile`` (B|1, I, J), broadcast over the
heads), and the key role takes each block of keys against the queries ``Rows.query_range``
gives. A row with an empty set, wherever it sits (a document's first token under j < i, a
padded query), gets lse 0 and o 0 (the kernels give both for a row masked whole, and nothing
flows back from it: its weights are exp(-inf - 0) = 0); the narrow-band sums count a pair where
its key is in its row's interval.

The kernels want the same feature size for q, k and v: the narrower side is padded with zero
features, which changes neither S nor o (the padded features of o and dv are dropped). They want
a mask of the query's dtype, and compute in float32 for float32 and half-precision inputs (inputs
are converted), float64 for float64.
"""

from __future__ import annotations

import math
import weakref

import torch

from energyc.context import Context, context
from energyc.runtime.pairs import _compute_dtype, mask_tile, query_blocks
from energyc.runtime.rows import Rows, resolve

BLOCK = 256  # queries per kernel call: a mask tile is (H|1, BLOCK, keys)
# the narrowest run of keys worth a call of its own without a mask: narrower ones stay in the
# masked call of their neighbours (on one core, energy_transformer's step at 300 tokens took 1.2x
# as long with every part its own call; at 1024 tokens the two were even, at 4096 the split
# was 1.17x faster)
MIN_UNMASKED = 1024
# a feature of the scores whose products are under 1 / SMALL_TERMS of the largest feature's is
# summed before the others (``feature_order``): added after them, each of its products is rounded
# to the precision of their partial sum (the DPLR scores' diagonal features, 1/100 to 1/14 of the
# low-rank ones', made the float32 attention output 2.7x less accurate, see the module); features
# within a factor of 8 of each other are left in their own order (the reordering copies q, k, dk)
SMALL_TERMS = 8
# blocks of queries with the call's rows (``blocks``): consecutive documents share a block only
# while that adds fewer than MERGE_WORK pairs x rows x heads to their own work (a kernel call and
# its block's Python cost ~30 us, the work of ~4000 pairs x heads at 32 features on one core: two
# causal documents of 16 tokens ran faster as one call of 32 x 32, two of 32 as two calls)
MERGE_WORK = 4096

_OPS = all(hasattr(torch.ops.aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward"))


def serves(q: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor,
           slopes: torch.Tensor | None = None, need_dscale: bool = False) -> bool:
    """Whether these kernels compute the call: CPU tensors (any scale: dscale and dslopes come
    from the kernels' dq for the scaled queries, nothing is divided by the scale). The kernels
    take the scale as a number: under torch.compile a tensor scale (a learned one) would be a
    data-dependent read, so the caller's fallback, which keeps it a tensor, serves there."""
    if not (_OPS and q.device.type == "cpu"):
        return False
    return not (isinstance(scale, torch.Tensor) and torch.compiler.is_compiling())


def feature_order(q: torch.Tensor, k: torch.Tensor) -> list[tuple[int, int]] | None:
    """The order in which the kernels are to sum the features of the scores' dot products
    q_i . k_j (q, k (B, T, H, F)), as runs [a, b) of them: the features whose products are small,
    sum |q_f| times sum |k_f| under 1 / SMALL_TERMS of the largest feature's, first, then the
    others, each in their own order (see the module); None where that is the order they are in
    (and under torch.compile, which would trace the test). The sums are over every
    ceil(T / 256)-th token (an estimate of the sizes is all the order needs) and every head."""
    F = q.shape[-1]
    if torch.compiler.is_compiling() or F < 2 or q.numel() == 0 or k.numel() == 0:
        return None
    dt = _compute_dtype(q.dtype)
    step = -(-q.shape[1] // 256)
    size = (q[:, ::step].abs().sum((0, 1, 2), dtype=dt)
            * k[:, ::step].abs().sum((0, 1, 2), dtype=dt))
    small = (size * SMALL_TERMS < size.amax()).tolist()
    cuts = [f for f in range(1, F) if small[f] != small[f - 1]]
    runs = list(zip([0, *cuts], [*cuts, F]))
    runs = [r for r in runs if small[r[0]]] + [r for r in runs if not small[r[0]]]
    return None if runs == sorted(runs) else runs


def ordered(t: torch.Tensor, runs: list[tuple[int, int]] | None, factor: float = 1.0
            ) -> torch.Tensor:
    """factor * t with its features (the last axis; any beyond the runs' stay last) in the order
    of ``feature_order``'s ``runs``: one pass, in t's memory layout (t itself for no runs and a
    factor of 1)."""
    if runs is None:
        return t if factor == 1.0 else t * factor
    return _moved(t, runs, [b - a for a, b in runs], factor)


def unordered(t: torch.Tensor, runs: list[tuple[int, int]] | None, factor: float = 1.0,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """factor * t with its features, in the order of ``runs``, back in their own order; written
    into ``out`` (of t's shape, no longer needed: e.g. the ordered operand, whose memory is in
    use already, where a fresh tensor's first touch costs more than the copy) when given."""
    if runs is None:
        return t if factor == 1.0 else t * factor
    at, moved = 0, {}
    for a, b in runs:
        moved[a] = (at, at + b - a)
        at += b - a
    return _moved(t, [moved[a] for a, _ in sorted(runs)], [b - a for a, b in sorted(runs)],
                  factor, out)


def _moved(t: torch.Tensor, runs: list[tuple[int, int]], widths: list[int], factor: float,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The features [a, b) of t for each of ``runs`` one after the other, times factor, then the
    features after the runs' as they are (into ``out``, else a new tensor)."""
    out = torch.empty_like(t) if out is None else out
    at = 0
    for (a, b), n in zip(runs, widths):
        torch.mul(t[..., a:b], factor, out=out[..., at:at + n])
        at += n
    if at < t.shape[-1]:
        out[..., at:] = t[..., at:]
    return out


def kernel_scale(q: torch.Tensor, scale: float | torch.Tensor) -> tuple[float, float]:
    """(the factor of q, the scale) to pass the kernels: (scale, 1) where q is in float32 or
    float64, so that the forward and the backward kernels read the same scores (see the module:
    each applies a scale its own way); else (half precision, where ``scale q`` would be rounded
    to the input's precision again) (1, scale)."""
    s = float(scale)
    return (s, 1.0) if q.dtype in (torch.float32, torch.float64) else (1.0, s)


def _set(kind: Context | tuple | Rows) -> Context | Rows:
    """The context set as the blocks read it: the call's ``Rows`` as they are, else the
    ``Context`` of a spelling."""
    return kind if isinstance(kind, Rows) else context(kind)


def _band(ctx: Context | Rows) -> Context:
    """The band of offsets a set is drawn from (a ``Rows``' set: its ``Context``)."""
    return ctx.ctx if isinstance(ctx, Rows) else ctx


_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def blocks(kind: Context | tuple | Rows, T: int, block: int,
           weight: int = 1, keys: int | None = None) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1): blocks of at most ``block`` queries [r0, r1) with the keys [c0, c1)
    they reach, one (masked) key at least: for a ``Context``, ``pairs.query_blocks``' blocks;
    for the call's rows, blocks that start where the rows part into independent runs.

    A point p parts the rows when no row's query before p reaches a key from p on and no query
    from p on a key before it: max_b hi_b(p - 1) < p <= min_b lo_b(p) (a document boundary
    shared by the rows; the end of the real tokens of a batch of one row). The runs between
    such points are cut into blocks of ``block`` queries from their first token, so that a
    document is blocked as it would be alone and a block's key range (``Rows.key_range``) holds
    no other document's keys; consecutive blocks shorter than ``block`` together (small
    documents) are then joined while the joined block does fewer than MERGE_WORK more pairs
    (times ``weight``, the rows x heads of a pair) than the two apart, and blocks whose queries
    have no key in any row (padding) into one. Made once per ``Rows``."""
    ctx = _set(kind)
    if not isinstance(ctx, Rows):
        return query_blocks(ctx, T, block, keys=keys)  # keys: T, or a memory's M
    cache = _BLOCKS.setdefault(ctx, {})
    found = cache.get((T, block, weight))
    if found is not None:
        return found
    lo_min, _, _, hi_max = ctx._extremes()
    starts = [0] + [p for p in range(1, T) if hi_max[p - 1] < p <= lo_min[p]] + [T]
    chunks = [(a, min(a + block, b)) for s, b in zip(starts, starts[1:])
              for a in range(s, b, block)]

    def work(a: int, b: int) -> int:
        c0, c1 = ctx.key_range(a, b)
        return (b - a) * (c1 - c0)

    joined: list[tuple[int, int]] = []
    for a, b in chunks:
        if joined:
            a0, _ = joined[-1]
            if ((b - a0 <= block and weight * (work(a0, b) - work(a0, a) - work(a, b)) < MERGE_WORK)
                    or work(a0, b) == 0):  # queries without keys in every row (padding): one block
                joined[-1] = (a0, b)
                continue
        joined.append((a, b))
    out = []
    keys = ctx.keys  # T, or a memory's M
    for r0, r1 in joined:
        c0, c1 = ctx.key_range(r0, r1)
        c0 = min(c0, keys - 1)  # one (masked) key at least, inside the keys
        out.append((r0, r1, c0, max(c1, c0 + 1)))
    cache[(T, block, weight)] = out
    return out


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

Selection = slice | torch.Tensor | None


def groups(ctx: Context | Rows) -> list[tuple[Selection, Context | Rows]]:
    """The batch rows run together, each group with the set they share: (None, ctx) for a set
    the same on every row (a ``Context``, or ``Rows`` of one row or shared by all); otherwise
    one group per distinct row interval (rows of equal lengths together), with its ``Rows`` of
    one row and the rows as a slice where they are consecutive (a view of the operands), else an
    index tensor. A group's blocks are then its own: a row of 512 real tokens among rows of
    4096 does the work of 512 tokens, as alone. Made once per ``Rows``."""
    if not isinstance(ctx, Rows) or ctx.lo.shape[0] == 1:
        return [(None, ctx)]
    found = _GROUPS.get(ctx)
    if found is None:
        _, which = torch.unique(torch.cat([ctx.lo, ctx.hi], 1), dim=0, return_inverse=True)
        found = []
        for u in torch.unique(which).tolist():
            index = torch.nonzero(which == u).flatten()
            first, last = int(index[0]), int(index[-1])
            sel = slice(first, last + 1) if last - first + 1 == len(index) else index
            found.append((sel, Rows(ctx.ctx, ctx.lo[first:first + 1], ctx.hi[first:first + 1],
                                    ctx.hole, ctx.T, S=ctx.S)))
        if len(found) == 1:
            found = [(None, found[0][1])]
        _GROUPS[ctx] = found
    return found


def _grouped(ctx: Context | Rows, run, *tensors: torch.Tensor) -> tuple:
    """``run(rows, *tensors)`` once per group of ``groups(ctx)`` on its batch rows (dim 0) of
    ``tensors``; the results (tensors over the batch, or None) joined into the batch's (a sum
    for 0-d and 1-d results, which are sums over the batch)."""
    found = groups(ctx)
    if len(found) == 1:
        return run(found[0][1], *tensors)
    results = [(sel, run(rows, *(t[sel] for t in tensors))) for sel, rows in found]
    B = tensors[0].shape[0]
    # groups of consecutive rows that tile the batch join by one cat (no zero-filled total)
    spans = all(isinstance(sel, slice) for sel, _ in results)
    if spans:
        results.sort(key=lambda item: item[0].start)
    joined = []
    for n, first in enumerate(results[0][1]):
        if first is None:
            joined.append(None)
        elif first.dim() <= 1:
            joined.append(sum(r[n] for _, r in results))
        elif spans:
            joined.append(torch.cat([r[n] for _, r in results], dim=0))
        else:
            total = first.new_zeros((B, *first.shape[1:]))
            for sel, r in results:
                total[sel] = r[n]
            joined.append(total)
    return tuple(joined)


def _zero_empty(ctx: Context | Rows, o: torch.Tensor, lse: torch.Tensor) -> None:
    """o (B, H, T, G) and lse (B, H, T) set to 0, in place, at the rows with an empty context
    set (the project's convention)."""
    T = o.shape[2]
    if isinstance(ctx, Rows):
        empty = ctx.empty
        if bool(empty.any()):
            o.masked_fill_(empty[:, None, :, None], 0.0)
            lse.masked_fill_(empty[:, None, :], 0.0)
        return
    head, tail = ctx.empty_rows(T)
    for a, b in ((0, head), (T - tail, T)):
        if b > a:
            o[:, :, a:b] = 0.0
            lse[:, :, a:b] = 0.0


def _offsets(r0: int, r1: int, c0: int, c1: int, device: torch.device) -> torch.Tensor:
    return torch.arange(r0, r1, device=device)[:, None] - torch.arange(c0, c1, device=device)


def _mask(ctx: Context | Rows, slopes: torch.Tensor | None,
          block: tuple[int, int, int, int], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor | None:
    """The additive mask tile of a block: (I, J), or (1, H, I, J) with a bias; with the call's
    rows (B|1, 1, I, J), or (B|1, H, I, J) with a bias; None when the block is wholly inside the
    context set (of every row) and has no bias."""
    r0, r1, c0, c1 = block
    if slopes is None and not ctx.needs_mask(r0, r1, c0, c1):
        return None
    if isinstance(ctx, Rows):
        mask = torch.zeros((), dtype=dtype, device=device).masked_fill(
            ~ctx.tile(r0, r1, c0, c1)[:, None], -math.inf)
    else:
        mask = mask_tile(ctx, r0, r1, c0, c1, dtype, device)
    if slopes is not None:
        d = _offsets(r0, r1, c0, c1, device)
        mask = mask + slopes.to(dtype)[None, :, None, None] * d.to(dtype)
    return mask


def key_parts(kind: Context | tuple | Rows, r0: int, r1: int, c0: int,
              c1: int) -> list[tuple[int, int, bool]]:
    """Keys [c0, c1) of queries [r0, r1) as consecutive parts (a, b, masked): a part is masked
    when some of its pairs are outside the context set (``Context.needs_mask``), else every
    query of the block sees every key of it. The parts are cut where that can change
    (``Context.key_cuts``) and adjacent parts of the same kind joined; a part without a mask
    narrower than MIN_UNMASKED joins the masked calls (a call costs more than its mask there).
    With the call's rows (``Rows``), over every row: unmasked where every row's queries see the
    part's every key."""
    ctx = _set(kind)
    return _parts(c0, c1, lambda a, b: ctx.needs_mask(r0, r1, a, b), ctx.key_cuts(r0, r1))


def query_parts(kind: Context | tuple | Rows, j0: int, j1: int, i0: int,
                i1: int) -> list[tuple[int, int, bool]]:
    """Queries [i0, i1) of keys [j0, j1) (the key role) as consecutive parts (a, b, masked), as
    ``key_parts`` with the roles swapped (``Context.query_cuts``)."""
    ctx = _set(kind)
    return _parts(i0, i1, lambda a, b: ctx.needs_mask(a, b, j0, j1), ctx.query_cuts(j0, j1))


def _parts(a0: int, a1: int, masked, cuts: list[int]) -> list[tuple[int, int, bool]]:
    points = {a0, a1} | {c for c in cuts if a0 < c < a1}
    points = sorted(points)
    parts: list[tuple[int, int, bool]] = []
    for a, b in zip(points, points[1:]):
        m = masked(a, b) or b - a < MIN_UNMASKED
        if parts and parts[-1][2] == m:
            parts[-1] = (parts[-1][0], b, m)
        else:
            parts.append((a, b, m))
    return parts


def _no_keys(ctx: Context | Rows, r0: int, r1: int, a: int, b: int,
             device: torch.device) -> torch.Tensor:
    """(r1 - r0,) bool, or (B|1, 1, r1 - r0) with the call's rows: the queries of [r0, r1) none
    of whose context keys lies in [a, b). Row i meets offsets i - b + 1 .. i - a there; it has a
    key when that range meets the band other than at its hole alone (with rows: when
    [max(lo_b(i), a), min(hi_b(i), b - 1)] is not empty nor the hole alone)."""
    i = torch.arange(r0, r1, device=device)
    if isinstance(ctx, Rows):
        first = ctx.lo[:, r0:r1].clamp(min=a)
        last = ctx.hi[:, r0:r1].clamp(max=b - 1)
        empty = first > last
        if ctx.hole is not None:
            empty |= (first == last) & (first == i - ctx.hole)
        return empty[:, None]
    lo, hi, hole = ctx.band
    dl, dh = i - b + 1, i - a
    if lo is not None:
        dl = dl.clamp(min=lo)
    if hi is not None:
        dh = dh.clamp(max=hi)
    empty = dl > dh
    if hole is not None:
        empty |= (dl == dh) & (dl == hole)
    return empty


def _heads_first(*tensors: torch.Tensor, dtype: torch.dtype, width: int) -> list[torch.Tensor]:
    """(B, T, H, F) -> (B, H, T, width) in ``dtype``, padded with zero features (a view when
    nothing changes: the kernels take strided inputs)."""
    out = []
    for t in tensors:
        t = t.transpose(1, 2).to(dtype)
        out.append(t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])))
    return out


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-block results of consecutive query blocks, joined along the token axis (dim 2)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class _Keys:
    """A sum over query blocks of per-key results for keys [c0, c1) of each block: the first
    block's result as it is when it covers every key, else a zero-filled (.., T, ..) total."""

    def __init__(self, T: int) -> None:
        self.T = T
        self.total: torch.Tensor | None = None

    def add(self, part: torch.Tensor, c0: int, c1: int) -> None:
        if self.total is None and (c0, c1) == (0, self.T):
            self.total = part
            return
        if self.total is None:
            shape = list(part.shape)
            shape[2] = self.T
            self.total = part.new_zeros(shape)
        self.total[:, :, c0:c1] += part


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor,
            kind: Context | tuple, slopes: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, T, H, G) in q's dtype and lse (B, T, H) in float32 (float64 for float64 inputs) of
    softmax attention over the context set ``kind`` (its rows in the current call, ``Rows``, where
    the call's data bounds it); q, k (B, T, H, F), v (B, T, H, G)."""
    ctx = resolve(kind, q.shape[1], q.device)
    dt = _compute_dtype(q.dtype)
    order = feature_order(q, k)
    qh, kh, vh = _heads_first(q, k, v, dtype=dt, width=max(q.shape[-1], v.shape[-1]))
    qh, kh, s = ordered(qh, order, float(scale)), ordered(kh, order), 1.0  # the scaled queries
    o, lse = _grouped(ctx, lambda rows, *t: _forward_blocks(*t, s, rows, slopes), qh, kh, vh)
    return o[..., :v.shape[-1]].transpose(1, 2).to(q.dtype), lse.transpose(1, 2)


def _forward_blocks(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, s: float,
                    ctx: Context | Rows, slopes: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward``'s o (B, H, T, N) and lse (B, H, T) of the operands (B, H, T, N) in the
    kernels' dtype and feature order, a block of queries at a time."""
    B, H, T, _ = qh.shape
    outs, lses = [], []
    for block in blocks(ctx, T, BLOCK, B * H, keys=kh.shape[2]):
        r0, r1, c0, c1 = block
        parts = [(c0, c1, True)] if slopes is not None else key_parts(ctx, r0, r1, c0, c1)
        if len(parts) == 1:
            ob, lb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qh[:, :, r0:r1], kh[:, :, c0:c1], vh[:, :, c0:c1], 0.0, False,
                attn_mask=_mask(ctx, slopes, block, qh.dtype, qh.device), scale=s)
        else:
            ob, lb = _merged_forward(qh, kh, vh, s, ctx, r0, r1, parts)
        outs.append(ob)
        lses.append(lb)
    o, lse = _rows(outs), _rows(lses)
    _zero_empty(ctx, o, lse)  # rows with an empty context set: o 0, lse 0
    return o, lse


def _merged_forward(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, s: float,
                    ctx: Context | Rows,
                    r0: int, r1: int, parts: list[tuple[int, int, bool]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """o and lse of queries [r0, r1) over the keys of ``parts``, one kernel call per part, merged
    (see the module): (B, H, r1 - r0, G) and (B, H, r1 - r0)."""
    obs, lbs = [], []
    for a, b, masked in parts:
        ob, lb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh[:, :, r0:r1], kh[:, :, a:b], vh[:, :, a:b], 0.0, False,
            attn_mask=_mask(ctx, None, (r0, r1, a, b), qh.dtype, qh.device), scale=s)
        if masked:  # a row with no key in this part: the kernel says lse 0, o 0
            lb = lb.masked_fill(_no_keys(ctx, r0, r1, a, b, qh.device), -math.inf)
        obs.append(ob)
        lbs.append(lb.to(ob.dtype))
    lse = torch.logsumexp(torch.stack(lbs), dim=0)
    finite = torch.where(torch.isneginf(lse), 0.0, lse)  # no key at all: 0, as the kernel
    o = sum(ob * torch.exp(lb - finite)[..., None] for ob, lb in zip(obs, lbs))
    return o, finite


def _narrow_band(ctx: Context) -> tuple[int, int] | None:
    """(lo, hi) of a context set that is the offsets lo <= i - j <= hi with hi - lo < BLOCK and no
    hole (a window narrower than a block), else None: where ``_band_sums`` sums dscale and
    dslopes."""
    lo, hi, hole = ctx.band
    if lo is None or hi is None or hole is not None or hi - lo >= BLOCK:
        return None
    return lo, hi


def _bands(t: torch.Tensor, a: int, b: int, n: int) -> torch.Tensor:
    """Keys a .. b - 1 of t (B, H, T, F) as the bands of n consecutive keys of b - a - n + 1
    queries, (B, H, queries, F, n): an unfolded view of those keys, zero where a key is outside
    [0, T)."""
    T = t.shape[2]
    t = torch.nn.functional.pad(t[:, :, max(a, 0):min(b, T)], (0, 0, max(0, -a), max(0, b - T)))
    return t.unfold(2, n, 1)


def _band_sums(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, gh: torch.Tensor,
               lseh: torch.Tensor, scale: float, slopes: torch.Tensor | None, lo: int, hi: int,
               need_dscale: bool, rows: Rows | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dscale = sum_{b,h,i,j} dS_ij q_i . k_j (when ``need_dscale``) and dslopes_h =
    sum_{b,i,j} dS_ij (i - j) (when slopes are given) over the pairs lo <= d = i - j <= hi alone,
    BLOCK queries at a time; q, k (B, H, T, F), v, g (B, H, T, G) and lse (B, H, T) in the
    compute dtype. The weights P_ij = exp(S_ij - lse_i) of a row are renormalised to sum to 1 and
    delta_i = sum_j P_ij dP_ij taken from them, so that each row of dS sums to 0 up to rounding
    of its own size (``attention_backward``'s fallback does the same); each pair's weight,
    q_i . k_j or its own offset, is centred on its row's mean under P (which changes no sum of a
    row of dS summing to 0, and keeps that rounding from being multiplied by the weights' size:
    see the module). With the call's ``rows`` (a set within the band: documents, lengths), a
    pair counts where its key is also in its row's interval lo_b(i) <= j <= hi_b(i)."""
    B, H, T, _ = qh.shape
    n = hi - lo + 1
    # band position e = 0 .. n - 1 holds key j = i - hi + e, offset d = hi - e
    d = torch.arange(hi, lo - 1, -1, device=qh.device, dtype=qh.dtype)
    m = 0.0 if slopes is None else slopes.to(qh.dtype)[None, :, None, None] * d
    dscale = qh.new_zeros(()) if need_dscale else None
    dslopes = qh.new_zeros(H) if slopes is not None else None
    for r0 in range(0, T, BLOCK):
        r1 = min(T, r0 + BLOCK)
        j = torch.arange(r0, r1, device=qh.device)[:, None] - d.long()[None, :]
        inside = (j >= 0) & (j < T)
        if rows is not None:  # (B|1, 1, queries, n)
            inside = ((j >= rows.lo[:, r0:r1, None]) & (j <= rows.hi[:, r0:r1, None]))[:, None]
        qk = torch.einsum("bhif,bhife->bhie", qh[:, :, r0:r1], _bands(kh, r0 - hi, r1 - lo, n))
        P = torch.where(inside, torch.exp(scale * qk + m - lseh[:, :, r0:r1, None]), 0.0)
        total_p = P.sum(-1, keepdim=True)
        P = P / torch.where(total_p > 0, total_p, 1.0)
        dP = torch.einsum("bhig,bhige->bhie", gh[:, :, r0:r1], _bands(vh, r0 - hi, r1 - lo, n))
        dS = P * (dP - (P * dP).sum(-1, keepdim=True))
        if need_dscale:
            dscale += (dS * (qk - (P * qk).sum(-1, keepdim=True))).sum()
        if slopes is not None:
            dslopes += (dS * (d - (P * d).sum(-1, keepdim=True))).sum((0, 2, 3))
    return dscale, dslopes


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor,
             kind: Context | tuple, o: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
             slopes: torch.Tensor | None = None, need_dscale: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                        torch.Tensor | None]:
    """dq, dk, dv (in q's dtype), dscale (0-d, when ``need_dscale``) and dslopes ((H,), when
    ``slopes`` is given), both in the compute dtype, of ``forward`` for the upstream gradient g."""
    ctx = resolve(kind, q.shape[1], q.device)
    dt = _compute_dtype(q.dtype)
    F, G = q.shape[-1], v.shape[-1]
    narrow = _narrow_band(_band(ctx)) if slopes is not None or need_dscale else None
    padded = slopes is not None and narrow is None  # dslopes from a padded feature of k
    N = max(F, G) + padded  # the padded width; with the feature k's last is j - r0
    order = feature_order(q, k)  # as the forward: the same scores
    q0, vh, oh, gh = _heads_first(q, v, o, g, dtype=dt, width=N)
    (k0,) = _heads_first(k, dtype=dt, width=max(F, G))
    qh, kh, s = ordered(q0, order, float(scale)), ordered(k0, order), 1.0  # the scaled queries
    lseh = lse.transpose(1, 2).to(dt)
    dq, dk, dv, dslopes = _grouped(
        ctx, lambda rows, *t: _backward_blocks(*t, s, rows, slopes, padded),
        gh, qh, kh, vh, oh, lseh)
    dscale = None
    if narrow is not None:
        dscale, dslopes = _band_sums(q0[..., :F], k0[..., :F], vh[..., :G], gh[..., :G], lseh,
                                     float(scale), slopes, *narrow, need_dscale,
                                     ctx if isinstance(ctx, Rows) else None)
    # dq, dk in the features' own order, into the ordered operands' memory (no longer read)
    dq, dk, dv = dq[..., :F], unordered(dk[..., :F], order, out=kh[..., :F]), dv[..., :G]
    if need_dscale and narrow is None:  # the kernels' dq is dq' = sum_j dS_ij k_j
        dq = unordered(dq, order, out=qh[..., :F])
        dscale = (q0[..., :F] * dq).sum()
        dq = dq * float(scale)
    else:
        dq = unordered(dq, order, float(scale), out=qh[..., :F])
    return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(q.dtype),
            dv.transpose(1, 2).to(q.dtype), dscale, dslopes)


def _backward_blocks(gh: torch.Tensor, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor,
                     oh: torch.Tensor, lseh: torch.Tensor, s: float, ctx: Context | Rows,
                     slopes: torch.Tensor | None, padded: bool) -> tuple:
    """``backward``'s kernel products, a block of queries at a time: the kernels' dq' (B, H, T,
    N), dk, dv (B, H, T, .) and, where ``padded`` (dslopes from the keys' padded feature j - r0),
    dslopes (H,), else None."""
    B, H, T, _ = qh.shape
    keys = kh.shape[2]  # T, or a memory's tokens
    dqs, dk, dv = [], _Keys(keys), _Keys(keys)
    dslopes = qh.new_zeros(H) if padded else None
    for block in blocks(ctx, T, BLOCK, B * H, keys=keys):
        r0, r1, c0, c1 = block
        parts = [(c0, c1, True)] if slopes is not None else key_parts(ctx, r0, r1, c0, c1)
        dqb = None
        for a, b, _ in parts:  # each with the rows' full lse and o
            kb = kh[:, :, a:b]
            if padded:
                j = torch.arange(a - r0, b - r0, device=qh.device, dtype=qh.dtype)
                kb = torch.cat([kb, j[:, None].expand(B, H, b - a, 1)], -1)
            dqp, dkb, dvb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                gh[:, :, r0:r1], qh[:, :, r0:r1], kb, vh[:, :, a:b], oh[:, :, r0:r1],
                lseh[:, :, r0:r1], 0.0, False,
                attn_mask=_mask(ctx, slopes, (r0, r1, a, b), qh.dtype, qh.device), scale=s)
            dqb = dqp if dqb is None else dqb.add_(dqp)
            dk.add(dkb, a, b)
            dv.add(dvb, a, b)
        dqs.append(dqb)
        if padded:
            dslopes -= dqb[..., -1].sum((0, 2))  # the kernel scale is 1: dq'' itself
    return _rows(dqs), dk.total, dv.total, dslopes


def transposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor,
               kind: Context | tuple, lse: torch.Tensor, slopes: torch.Tensor | None = None
               ) -> torch.Tensor:
    """o_j = sum_{i : j in C(i)} P_ij v_i (B, T, H, G) with the weights of ``forward`` and its
    saved ``lse``; v (B, T, H, G) is indexed by the query token. With the call's rows, keys go in
    the blocks queries go in (``blocks``), each against the queries some row's set reaches it from
    (``Rows.query_range``)."""
    ctx = resolve(kind, q.shape[1], q.device)
    dt = _compute_dtype(q.dtype)
    F, G = q.shape[-1], v.shape[-1]
    N = max(F + 1, G)  # one more feature carries -lse_i (see below)
    (vh,) = _heads_first(v, dtype=dt, width=N)
    order = feature_order(q, k)  # the forward's scores: its features and scaled queries
    qh, kh = _heads_first(q, k, dtype=dt, width=F)
    qh, kh = ordered(qh, order, float(scale)), ordered(kh, order)
    B, H, T, _ = qh.shape
    lseh = lse.transpose(1, 2).to(dt)[..., None]
    # keys as queries, queries as keys: [k_j, 1] . [s q_i, -lse_i] = S_ij - lse_i (kernel scale 1)
    kq = torch.nn.functional.pad(torch.cat([kh, torch.ones_like(lseh)], -1), (0, N - F - 1))
    qk = torch.nn.functional.pad(torch.cat([qh, -lseh], -1), (0, N - F - 1))
    (out,) = _grouped(ctx, lambda rows, *t: _transposed_blocks(*t, rows, slopes), kq, qk, vh)
    return out[..., :G].transpose(1, 2).to(q.dtype)


def _transposed_blocks(kq: torch.Tensor, qk: torch.Tensor, vh: torch.Tensor,
                       ctx: Context | Rows, slopes: torch.Tensor | None) -> tuple[torch.Tensor]:
    """``transposed``'s sums (B, H, keys, N) over the operands [k_j, 1] (B, H, keys, N) and
    [s q_i, -lse_i] (B, H, T, N), a block of keys at a time against the queries that reach it
    (keys: T, or a memory's M)."""
    B, H, keys, _ = kq.shape
    T = qk.shape[2]
    out = vh.new_zeros((B, H, keys, vh.shape[-1]))
    # keys j take the queries' place: their blocks, and the queries i that reach them
    if isinstance(ctx, Rows) and keys == T:  # empty rows are masked out of every tile
        key_blocks, head, tail = [b[:2] for b in blocks(ctx, T, BLOCK, B * H)], 0, 0
    else:
        key_blocks = [(j0, min(j0 + BLOCK, keys)) for j0 in range(0, keys, BLOCK)]
        head, tail = (0, 0) if isinstance(ctx, Rows) else ctx.empty_rows(T)
    for j0, j1 in key_blocks:
        i0, i1 = ctx.query_range(j0, j1, T)
        i0, i1 = max(i0, head), min(i1, T - tail)  # rows with an empty context set: no weights
        if i1 <= i0:
            continue
        parts = [(i0, i1, True)] if slopes is not None else query_parts(ctx, j0, j1, i0, i1)
        total = None
        for a, b, _ in parts:
            mask = _mask(ctx, slopes, (a, b, j0, j1), kq.dtype, kq.device)
            if mask is not None:  # queries x keys ...
                mask = mask.transpose(-1, -2).contiguous()  # ... as keys x queries here
            ob, lb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                kq[:, :, j0:j1], qk[:, :, a:b], vh[:, :, a:b], 0.0, False, attn_mask=mask,
                scale=1.0)
            # o'_j Z_j = sum_i P_ij v_i over this part's queries (0 where none reaches j)
            part = torch.where(torch.isneginf(lb)[..., None], 0.0, ob * torch.exp(lb)[..., None])
            total = part if total is None else total.add_(part)
        out[:, :, j0:j1] = total
    return (out,)

