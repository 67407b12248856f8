"""Block-sparse pair reductions in torch: the kernels behind ``pair_lse``, ``pair_sum`` and
``running_sum`` (see ``energyc/ir/pairs.py`` for the maths).

Operands come laid out as ``(B|1, *heads|1, T, F)`` (a size-1 axis broadcasts), extras as
``(B|1, *heads|1, T|1, T|1)`` (row extras vary along the first token axis, column extras along the
second). Queries are taken ``BLOCK_Q`` at a time against only the blocks of ``BLOCK_K`` keys
their context set reaches (``energyc.context``: causal, up to the diagonal; strict, below it; a
window, its w keys; all and j != i, every block); a tile is masked only where it straddles the
context set's edge.
With context data in the call (``energyc.runtime.rows``: packed documents, lengths, prefixes)
every entry resolves its set to the call's ``Rows`` (per-row key intervals lo_b(i) .. hi_b(i)):
a query block visits the key blocks some row's queries reach, a tile is masked where some row's
interval cuts it (the mask per row, broadcast over the heads), and a query whose set is empty
(a document's first token under j < i, padding) gets log-sum-exp 0 and sums 0. Without data the
``Context`` itself is iterated, as before.
The element-wise pair functions are the generated package's (printed from SymPy); here they are called on tiles of
shape ``(B, *heads, I, J)``. Memory is O(tokens x BLOCK_K), never (tokens x tokens); arithmetic is
float32 for half-precision inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from energyc.context import Context
from energyc.runtime.rows import Rows, resolve

__all__ = ["pair_lse", "pair_sums", "pair_softmax_sums", "running_sum", "pair_tiles",
           "key_start", "query_blocks", "mask_tile"]

# Tile sides. Each element-wise op of a pair function streams its tile through memory; 128 x 128
# tiles ran softcap_attention and grouped_query_attention (B=2, 4 heads, 1 thread) 1.3-2.5x faster
# than 256 x 256 at 256 and 1024 tokens (smaller working sets, and causal sets skip more pairs).
BLOCK_Q = 128  # queries per tile
BLOCK_K = 128  # keys per tile


def _rows_tile(rows: Rows, i0: int, i1: int, j0: int, j1: int, heads: int) -> torch.Tensor:
    """The mask tile of ``rows`` (B|1, i1 - i0, j1 - j0) laid out as the pair tiles,
    (B|1, 1 x heads, i1 - i0, j1 - j0)."""
    tile = rows.tile(i0, i1, j0, j1)
    return tile.view(tile.shape[0], *(1,) * heads, i1 - i0, j1 - j0)


def mask_tile(ctx: Context | Rows, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """The additive mask of queries [i0, i1) x keys [j0, j1): 0 inside the context set, -inf
    outside, (i1 - i0, j1 - j0). Each bound of the band is a triangle of the tile and the hole
    one of its diagonals (``Context.mask_diagonals``): built by ``triu``/``tril``/``diagonal``
    without an offsets tensor. For a call's ``Rows``, one mask per row: (B|1, i1 - i0, j1 - j0)."""
    if isinstance(ctx, Rows):
        inside = ctx.tile(i0, i1, j0, j1).to(device)
        return torch.zeros(inside.shape, dtype=dtype, device=device).masked_fill_(~inside,
                                                                                   -math.inf)
    above, below, on = ctx.mask_diagonals(i0, j0)
    shape = (i1 - i0, j1 - j0)
    tile = torch.zeros(shape, dtype=dtype, device=device)
    if above is not None:
        tile += torch.full(shape, -math.inf, dtype=dtype, device=device).triu_(above)
    if below is not None:
        tile += torch.full(shape, -math.inf, dtype=dtype, device=device).tril_(below)
    if on is not None:
        tile.diagonal(on).fill_(-math.inf)
    return tile


def query_blocks(kind: Context | Rows | tuple, T: int, block: int, offset: int = 0,
                 keys: int | None = None, device: torch.device | str | None = None
                 ) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1): each block of at most ``block`` queries with the keys [c0, c1) its
    context set reaches (``Context.key_range``: causal, up to the block's last query; a window,
    its w keys before; all, every key), one (masked) key at least.

    Decoding after a cached prefix: the T queries are the tokens at positions offset .. offset +
    T - 1, and the ``keys`` (default offset + T) are the last ones of the sequence up to the last
    query, at positions ``key_start(T, offset, keys)`` on (a window's cache keeps only its last
    tokens). r0, r1 count queries and c0, c1 keys, both from 0. With the call's context data
    (``resolve``) the keys some row's queries of the block reach. A set of every key (no band,
    no hole) reaches all ``keys`` whatever their count: the tokens, or a memory's M."""
    ctx = resolve(kind, T, device, offset)
    keys = offset + T if keys is None else keys
    if isinstance(ctx, Context) and ctx.band == (None, None, None):  # every key: a memory's too
        return [(r0, min(r0 + block, T), 0, keys) for r0 in range(0, max(T, 1), block)]
    k0 = key_start(T, offset, keys)
    blocks = []
    for r0 in range(0, max(T, 1), block):
        r1 = min(r0 + block, T)
        c0, c1 = ctx.key_range(offset + r0, offset + r1, offset + T)
        c0, c1 = max(c0 - k0, 0), max(c1 - k0, 0)
        blocks.append((r0, r1, c0, max(c1, min(c0 + 1, keys))))
    return blocks


def key_start(T: int, offset: int, keys: int) -> int:
    """The position of the first of ``keys`` keys that end with the last of T queries at
    positions offset .. offset + T - 1 (0 when the keys are the whole sequence)."""
    k0 = offset + T - keys
    if k0 < 0 or k0 > offset:
        raise ValueError(f"{keys} keys cannot end at the last of {T} queries after {offset} "
                         f"tokens")
    return k0


def pair_tiles(T: int, kind: Context | Rows | tuple, block_q: int | None = None,
               block_k: int | None = None, offset: int = 0,
               keys: int | None = None, device: torch.device | str | None = None
               ) -> Iterator[tuple[int, int, int, int, bool]]:
    """``(i0, i1, j0, j1, partial)`` for every tile of queries [i0, i1) x keys [j0, j1) that
    the context set reaches; ``partial`` when some of its pairs are outside the set. Tiles are
    ``block_q`` x ``block_k`` (default BLOCK_Q x BLOCK_K). With ``offset`` and ``keys``, as in
    ``query_blocks``: the set is tested at positions offset + i and key_start + j.

    With the call's context data (``resolve``: a ``Rows``), the keys [min_b lo_b(i0), max_b
    hi_b(i1 - 1)] the block's rows reach, less the key blocks whose queries (``Rows.query_range``)
    miss the block; ``partial`` where some row's interval cuts the tile (``Rows.needs_mask``)."""
    ctx = resolve(kind, T, device, offset)
    block_q = block_q or BLOCK_Q
    block_k = block_k or BLOCK_K
    keys = offset + T if keys is None else keys
    everything = isinstance(ctx, Context) and ctx.band == (None, None, None)
    k0 = 0 if everything else key_start(T, offset, keys)  # every key: a memory's M too
    if isinstance(ctx, Rows):
        yield from _rows_tiles(ctx, T, block_q, block_k, offset, k0)
        return
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        a0, a1 = offset + i0, offset + i1
        lo, hi = (0, keys) if everything else ctx.key_range(a0, a1, offset + T)
        lo, hi = max(lo - k0, 0), hi - k0
        for j0 in range(lo, hi, block_k):
            j1 = min(j0 + block_k, hi)
            yield i0, i1, j0, j1, ctx.needs_mask(a0, a1, k0 + j0, k0 + j1)


def _rows_tiles(rows: Rows, T: int, block_q: int, block_k: int, offset: int = 0, k0: int = 0
                ) -> Iterator[tuple[int, int, int, int, bool]]:
    """``pair_tiles`` on rows: the queries at positions offset + i, the keys at k0 + j."""
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        a0, a1 = offset + i0, offset + i1
        lo, hi = rows.key_range(a0, a1)
        lo, hi = max(lo - k0, 0), hi - k0
        for j0 in range(lo, hi, block_k):
            j1 = min(j0 + block_k, hi)
            r0, r1 = rows.query_range(k0 + j0, k0 + j1)
            if min(r1, a1) <= max(r0, a0):
                continue  # no row's query of the block reaches these keys
            yield i0, i1, j0, j1, rows.needs_mask(a0, a1, k0 + j0, k0 + j1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _prepare(q, k, extras, dtype):
    q = [t.to(dtype) for t in q]
    kt = [t.to(dtype).transpose(-1, -2) for t in k]
    extras = [torch.as_tensor(x).to(dtype) for x in extras]
    return q, kt, extras


def _tile_args(q, kt, extras, i0, i1, j0, j1, uses_offset, dtype, device, offset=0, k0=0):
    u = [a[..., i0:i1, :] @ b[..., :, j0:j1] for a, b in zip(q, kt)]
    e = [x[..., i0:i1, :] if x.dim() >= 2 and x.shape[-2] > 1 else x for x in extras]
    e = [x[..., :, j0:j1] if x.dim() >= 1 and x.shape[-1] > 1 else x for x in e]
    d = None
    if uses_offset:
        d = (torch.arange(offset + i0, offset + i1, device=device, dtype=dtype)[:, None]
             - torch.arange(k0 + j0, k0 + j1, device=device, dtype=dtype)[None, :])
    return u, d, e


def _context_tile(ctx, i0, i1, j0, j1, device, offset=0, k0=0, heads=0):
    """The bool mask of the tile: (I, J) for a ``Context``, (B|1, 1 x heads, I, J) for
    ``Rows``."""
    if isinstance(ctx, Rows):
        return _rows_tile(ctx, offset + i0, offset + i1, k0 + j0, k0 + j1, heads)
    return ctx.contains(torch.arange(offset + i0, offset + i1, device=device)[:, None],
                        torch.arange(k0 + j0, k0 + j1, device=device)[None, :])


def _keys(T, offset, kt, values):
    """How many keys the operands hold (the k operands' or the values' token extent), and the
    position of the first (``key_start``)."""
    if kt:
        keys = kt[0].shape[-1]
    elif values:
        keys = values[0].shape[-2]
    else:
        keys = offset + T
    return keys, key_start(T, offset, keys)


def pair_lse(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor],
             extras: Sequence[torch.Tensor], phi: Callable, mask: Context | tuple, *, T: int,
             shape: Sequence[int], uses_offset: bool, dtype: torch.dtype,
             device: torch.device, offset: int = 0) -> torch.Tensor:
    """``R_i = log sum_{j in C(i)} exp(phi_ij)``, shape ``(*shape, T)``; 0 for an empty set.

    The online log-sum-exp of ``pair_softmax_sums`` (a running max and a rescaled sum over each
    query block's key tiles), with no sums."""
    return pair_softmax_sums(q, k, extras, lambda u, d, e: (phi(u, d, e),), [], mask, T=T,
                             shape=shape, uses_offset=uses_offset, dtype=dtype, device=device,
                             offset=offset)[0]


def pair_sums(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor],
              extras: Sequence[torch.Tensor], weights: Callable,
              outputs: Sequence[tuple[str, torch.Tensor | None]], mask: Context | tuple, *,
              T: int, shape: Sequence[int], uses_offset: bool, dtype: torch.dtype,
              device: torch.device, offset: int = 0) -> list[torch.Tensor]:
    """Several sums over the same pairs in one pass over the tiles.

    ``weights(u, d, e)`` returns weight tiles ``A_ij``; output ``(token, v, n)`` is, with the
    n-th of them, ``sum_{j in C(i)} A_ij v_j`` (``token="i"``, v of shape ``(.., T, G)`` indexed
    by j), ``sum_{i : j in C(i)} A_ij v_i`` (``token="j"``), or without v the sums of A alone.
    With ``offset`` the T queries follow a prefix of ``offset`` tokens (``pair_tiles``); the keys,
    k and v indexed by j, are the offset + T tokens, and the sums are the queries' (token "i")."""
    if offset and any(token == "j" for token, _, _ in outputs):
        raise ValueError("pair_sums: a sum over queries (token 'j') needs every query, not a "
                         "query offset")
    ctx = resolve(mask, T, device, offset)
    cdt = _compute_dtype(dtype)
    q, kt, extras = _prepare(q, k, extras, cdt)
    values = [None if v is None else v.to(cdt) for _, v, _ in outputs]
    results = []
    for _, v in zip(outputs, values):
        tail = () if v is None else (v.shape[-1],)
        results.append(torch.zeros((*shape, T, *tail), dtype=cdt, device=device))
    keys, k0 = _keys(T, offset, kt, [v for (token, _, _), v in zip(outputs, values)
                                     if v is not None and token == "i"])
    for i0, i1, j0, j1, partial in pair_tiles(T, ctx, offset=offset, keys=keys):
        u, d, e = _tile_args(q, kt, extras, i0, i1, j0, j1, uses_offset, cdt, device, offset, k0)
        inside = (_context_tile(ctx, i0, i1, j0, j1, device, offset, k0, len(shape) - 1)
                  if partial else None)
        tiles = []
        for a in weights(u, d, e):
            a = torch.broadcast_to(torch.as_tensor(a, dtype=cdt, device=device),
                                   (*shape, i1 - i0, j1 - j0))
            tiles.append(a if inside is None else torch.where(inside, a, 0.0))
        for (token, _, n), v, r in zip(outputs, values, results):
            a = tiles[n]
            if token == "i" and v is None:
                r[..., i0:i1] += a.sum(-1)
            elif token == "i":
                r[..., i0:i1, :] += a @ v[..., j0:j1, :]
            elif v is None:
                r[..., j0:j1] += a.sum(-2)
            else:
                r[..., j0:j1, :] += a.transpose(-1, -2) @ v[..., i0:i1, :]
    return [r.to(dtype) for r in results]


def pair_softmax_sums(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor],
                      extras: Sequence[torch.Tensor], phi_g: Callable,
                      outputs: Sequence[tuple[str, torch.Tensor | None, int]],
                      mask: Context | tuple, *,
                      T: int, shape: Sequence[int], uses_offset: bool, dtype: torch.dtype,
                      device: torch.device, offset: int = 0) -> list[torch.Tensor]:
    """``R_i = log sum_{j in C(i)} exp(phi_ij)`` and, in the same pass over the tiles, sums with
    the softmax weights ``A_ij = g_ij exp(phi_ij - R_i)``: ``[R, *sums]``.

    ``phi_g(u, d, e)`` returns the tiles ``(phi_ij, g^0_ij, g^1_ij, ...)`` (the g free of R);
    output ``("i", v, n)`` is ``sum_{j in C(i)} A_ij v_j`` with ``g^n``, or without v the sum of
    A. As in FlashAttention, each query block keeps a running max ``m_i``, the sum ``s_i`` of
    ``exp(phi_ij - m_i)`` and accumulators of ``g_ij exp(phi_ij - m_i) v_j``, all rescaled by
    ``exp(m_old - m_new)`` when the max grows; at the end ``R_i = m_i + log s_i`` and each sum
    is its accumulator over ``s_i``. An empty set gives R = 0 and sums 0. ``offset``: the T
    queries follow a prefix of that many tokens (``pair_tiles``)."""
    ctx = resolve(mask, T, device, offset)
    cdt = _compute_dtype(dtype)
    q, kt, extras = _prepare(q, k, extras, cdt)
    values = [None if v is None else v.to(cdt) for _, v, _ in outputs]
    R = torch.zeros((*shape, T), dtype=cdt, device=device)
    results = []
    for v in values:
        tail = () if v is None else (v.shape[-1],)
        results.append(torch.zeros((*shape, T, *tail), dtype=cdt, device=device))
    state: dict[int, list] = {}
    keys, k0 = _keys(T, offset, kt, [v for v in values if v is not None])
    for i0, i1, j0, j1, partial in pair_tiles(T, ctx, offset=offset, keys=keys):
        u, d, e = _tile_args(q, kt, extras, i0, i1, j0, j1, uses_offset, cdt, device, offset, k0)
        full = (*shape, i1 - i0, j1 - j0)
        phi, *factors = phi_g(u, d, e)
        x = torch.broadcast_to(torch.as_tensor(phi, dtype=cdt, device=device), full)
        inside = (_context_tile(ctx, i0, i1, j0, j1, device, offset, k0, len(shape) - 1)
                  if partial else None)
        if inside is not None:
            x = torch.where(inside, x, -math.inf)
        m_tile = x.amax(-1)
        if i0 in state:
            m, s, accs = state[i0]
            m_new = torch.maximum(m, m_tile)
        else:
            m, s, accs, m_new = None, None, None, m_tile
        safe = torch.where(torch.isneginf(m_new), 0.0, m_new)
        p = torch.exp(x - safe[..., None])  # 0 outside the set
        scale = None if m is None else torch.exp(m - safe)
        s = p.sum(-1) if s is None else s.mul_(scale).add_(p.sum(-1))
        new_accs = []
        for n, ((_, _, f), v) in enumerate(zip(outputs, values)):
            g = torch.broadcast_to(torch.as_tensor(factors[f], dtype=cdt, device=device), full)
            a = g * p if inside is None else torch.where(inside, g * p, 0.0)
            part = a.sum(-1) if v is None else a @ v[..., j0:j1, :]
            if accs is None:
                new_accs.append(part)
            else:
                acc = accs[n]
                acc.mul_(scale if v is None else scale[..., None]).add_(part)
                new_accs.append(acc)
        state[i0] = [m_new, s, new_accs]
    for i0, (m, s, accs) in state.items():
        i1 = i0 + m.shape[-1]
        safe = torch.where(torch.isneginf(m), 0.0, m)
        empty = s == 0
        R[..., i0:i1] = torch.where(empty, 0.0, safe + torch.log(s))
        denom = torch.where(empty, 1.0, s)
        for (_, v, _), acc, r in zip(outputs, accs, results):
            if v is None:
                r[..., i0:i1] = acc / denom
            else:
                r[..., i0:i1, :] = acc / denom[..., None]
    return [R.to(dtype), *(r.to(dtype) for r in results)]


def running_sum(v: torch.Tensor, dim: int, mask: Context | tuple, keys_major: bool,
                offset: int = 0, T: int | None = None) -> torch.Tensor:
    """``o_i = sum_{j in C(i)} v_j`` along ``dim`` (the token axis), or with ``keys_major`` the
    transposed ``o_j = sum_{i : j in C(i)} v_i``: prefix sums, O(tokens). With ``offset``, the
    sums of the T queries at positions offset .. offset + T - 1, v holding the tokens up to the
    last of them (all of them, or for a window at least its w before the first query)."""
    if offset:
        if keys_major:
            raise ValueError("running_sum: a sum over queries needs every query, not an offset")
        T = v.shape[dim] - offset if T is None else T
        k0 = key_start(T, offset, v.shape[dim])
        ctx = resolve(mask, T, v.device, offset)
        if isinstance(ctx, Rows):  # the rows of the tokens v holds, from position k0 on
            out = _rows_sums(v, dim, ctx.keys_from(k0), keys_major)
        else:
            out = running_sum(v, dim, mask, keys_major)
        return out.narrow(dim, v.shape[dim] - T, T)
    ctx = resolve(mask, v.shape[dim], v.device)
    if isinstance(ctx, Rows):
        return _rows_sums(v, dim, ctx, keys_major)
    src = v.flip(dim) if keys_major else v  # the sums over queries: the same band, reversed
    out = _band_sums(src, dim, ctx)
    return out.flip(dim) if keys_major else out


def _rows_sums(v: torch.Tensor, dim: int, rows: Rows, keys_major: bool) -> torch.Tensor:
    """``running_sum`` on the call's rows: with C_b the inclusive prefix sum of row b along the
    token axis (C_b(-1) = 0),

        o_b(i) = C_b(hi_b(i)) - C_b(lo_b(i) - 1) - [lo_b(i) <= i - HOLE <= hi_b(i)] v_b(i - HOLE)

    (a document restarts the sum: lo_b(i) >= its first token), 0 for an empty set; and the
    transposed ``o_b(j) = sum_{i : j in C_b(i)} v_b(i)`` by the same trick on the query side:
    as lo_b and hi_b never decrease, the queries holding key j are the interval a_b(j) .. z_b(j)
    (a_b(j) the first i with hi_b(i) >= j, z_b(j) the last with lo_b(i) <= j; ``searchsorted``
    per row), less the query j + HOLE. O(tokens): one cumsum and gathers, never (T x T); in
    float64, as ``_band_sums`` takes its differences. The batch axis is dim 0 when the token
    axis is not (a value of one row broadcasts over the rows); a value without one (dim 0)
    takes rows shared by the batch."""
    lo, hi, hole = rows.lo, rows.hi, rows.hole
    T = v.shape[dim]
    if dim == 0:
        if max(lo.shape[0], hi.shape[0]) != 1:
            raise ValueError("running_sum: a value without a batch axis cannot take the call's "
                             "per-row context data (lengths, per-row documents or prefixes)")
        return _rows_sums(v[None], 1, rows, keys_major)[0]
    x = v.movedim(dim, 1)
    rest = x.shape[2:]
    B = max(x.shape[0], lo.shape[0], hi.shape[0])
    x = x.reshape(x.shape[0], T, -1).to(torch.float64)
    lo, hi = lo.to(x.device).expand(B, T), hi.to(x.device).expand(B, T)
    C = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x.cumsum(1)], 1)  # C[k] = C(k - 1)
    t = torch.arange(T, device=x.device).expand(B, T)
    if keys_major:
        a = torch.searchsorted(hi.contiguous(), t.contiguous())  # first query i with hi >= j
        z = torch.searchsorted(lo.contiguous(), t.contiguous(), right=True)  # past the last
        first, past = a, torch.maximum(z, a)
        hole_at = None if hole is None else t + hole
    else:
        first, past = lo, torch.maximum(hi + 1, lo)
        hole_at = None if hole is None else t - hole
    count = past - first
    out = _rows_at(C, past).sub_(_rows_at(C, first))
    if hole_at is not None:
        inside = (first <= hole_at) & (hole_at < past)
        out.sub_(_rows_at(x, hole_at.clamp(0, T - 1)).mul_(inside[..., None]))
        count = count - inside.to(count.dtype)
    out.masked_fill_((count <= 0)[..., None], 0.0)  # an empty set: exactly 0
    return out.reshape(B, T, *rest).movedim(1, dim).to(v.dtype)


def _rows_at(c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``c[b, index[b, i], :]`` (B, T, R) for c (B|1, N, R) and index (B, T)."""
    if c.shape[0] == 1:
        return c[0][index]
    return c[torch.arange(c.shape[0], device=c.device)[:, None], index]


def _band_sums(v: torch.Tensor, dim: int, ctx: Context) -> torch.Tensor:
    """``o_i = sum_{lo <= i - j <= hi, i - j != hole} v_j`` along ``dim`` from the prefix sums
    ``c_k = v_0 + .. + v_k``: ``c_{i - lo} - c_{i - hi - 1}`` (an unbounded side: ``c_{T - 1}``
    and 0), less ``v_{i - hole}``. A difference of two prefix sums is taken in float64 (the
    cancellation of their common part would cost a float32 sum its precision)."""
    T = v.shape[dim]
    lo, hi, hole = ctx.band
    acc = v.to(torch.float64) if lo is not None and hi is not None else v
    if lo is None and hi is None:
        out = acc.sum(dim, keepdim=True).expand_as(acc)
    else:
        c = acc.cumsum(dim)
        out = _shifted(c, dim, 0 if lo is None else lo, c.narrow(dim, T - 1, 1) if T else c)
        if hi is not None:
            out = out - _shifted(c, dim, hi + 1, c.narrow(dim, T - 1, 1) if T else c)
    if hole is not None and (lo is None or lo <= hole) and (hi is None or hole <= hi):
        out = out - _shifted(acc, dim, hole, torch.zeros_like(acc.narrow(dim, 0, min(T, 1))))
    return out.to(v.dtype)


def _shifted(c: torch.Tensor, dim: int, s: int, last: torch.Tensor) -> torch.Tensor:
    """``out_i = c_{i - s}`` along ``dim``: 0 where i - s < 0, ``last`` (one slice) where
    i - s > T - 1."""
    T = c.shape[dim]
    if s == 0:
        return c
    if s > 0:
        n = min(s, T)
        zeros = torch.zeros_like(c.narrow(dim, 0, n))
        return torch.cat([zeros, c.narrow(dim, 0, T - n)], dim)
    n = min(-s, T)
    return torch.cat([c.narrow(dim, n, T - n), last.expand_as(c.narrow(dim, 0, n))], dim)
