"""What the generated Triton pair kernels share: the row loads and stores, the online
log-sum-exp, and the launch (``energyc::triton_pairs``, registered once here); the context set's
block ranges and test are the flash kernels' (``energyc.runtime.triton_layer``): the band, or
the call's per-row key bounds where it has data for the set (``ROWS``).

A pair kernel is printed per call site from ``codegen_templates/triton/pair.py.j2`` (its loops
over the call's contractions, extras and outputs unrolled there: a Triton kernel takes no
variable-length list of tensors) with the energy's element-wise functions as ``@triton.jit`` tile
functions printed from SymPy. Over the pairs ``(i, j)``, ``j in C(i)``, of one (batch, heads)
slice:

    u^t_ij = q^t_i . k^t_j      d_ij = i - j      e^m: row (i), column (j) or scalar extras

queries-major (one program per block of BLOCK_I queries, looping over the key blocks C reaches):

    o^n_i = sum_{j in C(i)} A^n_ij [v^n_j]

and with SOFTMAX the online log-sum-exp of FlashAttention's forward in the same pass, where the
tile function returns ``(phi, g^0, g^1, ..)`` and ``A^n = g^n exp(phi - R)``:

    R_i = log sum_{j in C(i)} exp(phi_ij)     (m, s rescaled by exp(m_old - m_new) per tile)

keys-major (one program per block of BLOCK_J keys, looping over the query blocks that reach it;
the backward's dk and value terms, and the key role of a joint energy):

    o^n_j = sum_{i : j in C(i)} A^n_ij [v^n_i]

Every sum is written by the one program that owns its token: no atomics. Products of tiles
accumulate in ACC (fp32; fp64 for float64 operands), float32 operands multiply in full precision
(``input_precision="ieee"``), half-precision ones on tensor cores with fp32 accumulation
(``tile_dot`` and ``operand`` of ``energyc.runtime.triton_layer``, which the flash kernels use
too). What does not depend on the energy is here, once: the row loads and stores, and the
online log-sum-exp's step and result.
"""

import math
import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from energyc.context import Context
from energyc.runtime.pairs import _compute_dtype
from energyc.runtime.triton_layer import INTERPRETED, _acc, context_args, row_args

# (BLOCK_I, BLOCK_J) of the one tile the interpreter runs
INTERPRETER_TILE = (16, 16)
# (BLOCK_I, BLOCK_J, num_warps, num_stages) Triton's autotuner tries on a GPU; a pair kernel
# holds a tile per contraction and per accumulator, so the tiles stay at most 64 wide
GPU_TILES = ((64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1))
# what the best tile depends on: tokens and context set; a kernel adds its feature widths (Triton's
# autotuner keys on the names listed and the tensors' dtypes only)
TUNING_KEY = ["T", "LO", "HI", "HOLE", "ROWS"]


def tiles() -> list:
    """The tiles and launch settings of the pair kernels: on a GPU those Triton's autotuner
    times (per T and context set; configurations that do not fit the device are skipped); the
    interpreter runs one small tile."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_I": INTERPRETER_TILE[0], "BLOCK_J": INTERPRETER_TILE[1]})]
    return [triton.Config({"BLOCK_I": i, "BLOCK_J": j}, num_warps=warps, num_stages=stages)
            for i, j, warps, stages in GPU_TILES]


@triton.jit
def load_rows(base, offs, valid, s_t, s_f, BLOCK_F: tl.constexpr, F):
    """The (len(offs), BLOCK_F) tile of the rows ``offs`` of an operand at ``base`` (token
    stride s_t, feature stride s_f): features past F and rows not ``valid`` read 0."""
    feat = tl.arange(0, BLOCK_F)
    return tl.load(base + offs[:, None] * s_t + feat[None, :] * s_f,
                   mask=valid[:, None] & (feat[None, :] < F), other=0.0)


@triton.jit
def store_rows(base, offs, valid, s_t, s_f, x, BLOCK_F: tl.constexpr, F):
    """Store the (len(offs), BLOCK_F) tile ``x`` into the rows ``offs`` (features below F)."""
    feat = tl.arange(0, BLOCK_F)
    tl.store(base + offs[:, None] * s_t + feat[None, :] * s_f, x,
             mask=valid[:, None] & (feat[None, :] < F))


@triton.jit
def online_step(m, s, phi, valid):
    """One key tile of the online log-sum-exp: with ``x = phi`` on the context set and -inf
    off it, the new running max ``m' = max(m, max_j x)``, the weights ``p = exp(x - m')`` (0
    off the set), the factor ``exp(m - m')`` that rescales what was summed so far, and the new
    sum ``s' = s exp(m - m') + sum_j p``: (m', s', p, scale). A row with no key yet keeps
    m' = -inf and p = 0."""
    x = tl.where(valid, phi, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(x - m_safe[:, None])
    scale = tl.exp(m - m_safe)
    return m_new, s * scale + tl.sum(p, axis=1), p, scale


@triton.jit
def online_result(m, s):
    """``R = m + log s`` of the online log-sum-exp, 0 for a row with no key in its context set,
    and the divisor of its sums (1 there): (R, denom)."""
    empty = s == 0.0
    return tl.where(empty, 0.0, m + tl.log(tl.where(empty, 1.0, s))), tl.where(empty, 1.0, s)


def _strides(t: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """The strides of ``t`` broadcast to ``shape`` (0 along the axes it lacks or has once),
    without making the (tokens x tokens) view of an extra that varies with one token only."""
    sizes = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
    strides = (0,) * (len(shape) - t.dim()) + tuple(t.stride())
    return [0 if n == 1 else s for n, s in zip(sizes, strides)]


@torch.library.custom_op("energyc::triton_pairs", mutates_args=())
def _pairs_op(
    module: str,
    kernel: str,
    keys_major: bool,
    softmax: bool,
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    extras: list[torch.Tensor],
    values: list[torch.Tensor | None],
    lo: Optional[int],  # noqa: UP045 (the form of torch.library's docs)
    hi: Optional[int],  # noqa: UP045
    hole: Optional[int],  # noqa: UP045
    T: int,
    shape: list[int],
    dims: list[float],
    dtype: torch.dtype,
    device: torch.device,
    rows_lo: Optional[torch.Tensor] = None,  # noqa: UP045
    rows_hi: Optional[torch.Tensor] = None,  # noqa: UP045
) -> list[torch.Tensor]:
    """Launch pair ``kernel`` of ``module``: operands laid out ``(*shape|1, T, F)`` (q, k; a
    size-1 axis broadcasts), extras ``(*shape|1, T|1, T|1)``, one value ``(*shape|1, T, G)`` or
    None per output, over the context set's band lo, hi, hole (``Context.band``) or, given
    ``rows_lo`` and ``rows_hi`` (``triton_layer.context_args``), the call's rows; returns the
    outputs ``(*shape, T[, G])`` (with ``softmax``, R first) in the operands' promoted dtype
    (``dtype`` without operands)."""
    fn = getattr(sys.modules[module], kernel)
    dtype = _dtype(q, k, values, dtype)
    acc = _compute_dtype(dtype)  # as the torch pair kernels: float32 for half precision
    q = [t.to(dtype).expand(*shape, T, t.shape[-1]) for t in q]
    k = [t.to(dtype).expand(*shape, T, t.shape[-1]) for t in k]
    extras = [t.to(device, acc) for t in extras]
    vals = [v.to(dtype).expand(*shape, T, v.shape[-1]) for v in values if v is not None]
    outs = [torch.empty((*shape, T), dtype=acc, device=device)] if softmax else []
    outs += [torch.empty((*shape, T) if v is None else (*shape, T, v.shape[-1]), dtype=acc,
                         device=device) for v in values]
    tensors = [*q, *k, *extras, *vals, *outs]
    n_q = 2 * len(q)
    strides = [s for n, t in enumerate(tensors)
               for s in (_strides(t, (*shape, T, T)) if n_q <= n < n_q + len(extras)
                         else t.stride())]
    widths = [t.shape[-1] for t in (*q, *vals)]
    blocks = {f"BF{n}": max(16, triton.next_power_of_2(t.shape[-1])) for n, t in enumerate(q)}
    blocks.update({f"BG{n}": max(16, triton.next_power_of_2(t.shape[-1]))
                   for n, t in enumerate(vals)})
    block = "BLOCK_J" if keys_major else "BLOCK_I"
    grid = lambda meta: (triton.cdiv(T, meta[block]), max(math.prod(shape), 1))  # noqa: E731
    fn[grid](
        *tensors, T, *shape[1:], *strides, *widths, *dims,
        **row_args(rows_lo, rows_hi, max(shape[0], 1), T, outs[0]), LO=lo, HI=hi, HOLE=hole,
        ACC=_acc(dtype),
        UPCAST=INTERPRETED and dtype == torch.bfloat16, **blocks,
    )
    return [o.to(dtype) for o in outs]  # the sums are ACC: rounded once, by torch


@_pairs_op.register_fake
def _(module, kernel, keys_major, softmax, q, k, extras, values, lo, hi, hole, T, shape, dims,
      dtype, device, rows_lo=None, rows_hi=None):
    dtype = _dtype(q, k, values, dtype)
    outs = [torch.empty((*shape, T), dtype=dtype, device=device)] if softmax else []
    outs += [torch.empty((*shape, T) if v is None else (*shape, T, v.shape[-1]), dtype=dtype,
                         device=device) for v in values]
    return outs


def _dtype(q, k, values, default: torch.dtype) -> torch.dtype:
    """The operands' promoted dtype: under torch.autocast a layer's operands may mix bfloat16
    contractions with float32 element-wise values, and a tile's dot takes one dtype."""
    operands = [*q, *k, *(v for v in values if v is not None)]
    if not operands:
        return default
    dtype = operands[0].dtype
    for t in operands[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def launcher(module: str):
    """The pair launcher of the kernels defined in ``module`` (its ``__name__``), as its step
    functions call it::

        outs = pairs(kernel, keys_major, softmax, q, k, extras, values, ("causal",), T=T,
                     shape=(B, *heads), dims=(...), dtype=x.dtype, device=x.device)

    with the context set as a ``Context`` or its spelling.
    """

    def pairs(kernel: str, keys_major: bool, softmax: bool, q, k, extras, values,
              mask: Context | tuple, *, T: int, shape, dims=(), dtype: torch.dtype,
              device: torch.device) -> list[torch.Tensor]:
        extras = [torch.as_tensor(x, device=device) for x in extras]
        band, rows_lo, rows_hi = context_args(mask, T, device)
        return _pairs_op(module, kernel, keys_major, softmax, list(q), list(k), extras,
                         list(values), *band, T, [int(s) for s in shape],
                         [float(d) for d in dims], dtype, device, rows_lo, rows_hi)

    return pairs
