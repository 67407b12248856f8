"""What every generated Triton path (``generated/<layer>/_triton_layer.py``) shares.

A generated ``_triton_layer.py`` holds its energy's own kernels (one element-wise kernel per
fused pointwise node, one reduction kernel per reduction with its prologue and epilogue) and its
step functions; it launches the kernels through the two launchers made here for it::

    _pointwise, _reduction = launchers(__name__)

Element-wise launch, output of ``shape`` with N elements, args broadcast to it (stride 0 along
the axes they lack)::

    out[c] = kernel(args[0][c], args[1][c], ...)

Reduction launch, the prologue args broadcast to ``shape``, reduced over its ``red_dims``, the
epilogue args broadcast to the output (its ``out_dims``)::

    out[o] = post(acc_{r} pre(pre_0[o, r], ...), epi_0[o], ...)

Both launches are ``torch.library`` custom ops (``energyc::triton_pointwise``,
``energyc::triton_reduction``, registered once here for every package: the kernel is named by
its module and function), so torch.compile(fullgraph=True) keeps them as opaque nodes, with fake
implementations giving their output shapes, instead of tracing Triton. Kernels compute in
``ACC``: fp32, fp64 for float64 inputs; results are stored in the inputs' dtype.

Also here, shared with the flash kernels of ``energyc.runtime.triton_attention`` and the
generated pair kernels: the context set as the kernels read it (``in_context``, ``key_range``,
``query_range``: the band of ``energyc.context.Context`` as the constexprs LO, HI, HOLE; and
``row_bounds``, ``in_row_context``, ``row_key_range``, ``row_query_range``: the same under the
constexpr ROWS from the call's per-row key bounds, ``energyc.runtime.rows``), the tile
product ``tile_dot`` and the rounding of a weight tile to a dot operand (``operand``); and the
interpreter helpers.
"""

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from energyc.context import Context
from energyc.runtime.rows import resolve

# kernels made while TRITON_INTERPRET=1 run on the CPU in Triton's interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK = 1024  # elements per program of an element-wise kernel
BLOCK_O = 32  # outputs per program of a reduction kernel
BLOCK_R = 64  # reduced elements per inner iteration


def storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels store a result of ``dtype`` in. The interpreter converts float32 to
    bfloat16 by truncation where a GPU rounds to nearest even, so there a bfloat16 result is stored
    in float32 and rounded by torch (``.to(dtype)``) afterwards."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


# The context set in a kernel: the band LO <= i - j <= HI, i - j != HOLE of its
# energyc.context.Context (``kernel_args``; None: unbounded, no hole), as constexprs, so that each
# compiled kernel tests its own band alone and a new kind of band needs no kernel change.


@triton.jit
def in_context(offs_i, offs_j, LO: tl.constexpr, HI: tl.constexpr, HOLE: tl.constexpr):
    """(I, J) booleans: key offs_j[c] is in the context set of query offs_i[r]."""
    d = offs_i[:, None] - offs_j[None, :]
    inside = d == d  # every pair
    if LO is not None:
        inside = inside & (d >= LO)
    if HI is not None:
        inside = inside & (d <= HI)
    if HOLE is not None:
        inside = inside & (d != HOLE)
    return inside


@triton.jit
def key_range(pid, T, LO: tl.constexpr, HI: tl.constexpr, BLOCK_I: tl.constexpr,
              BLOCK_J: tl.constexpr, TK=None):
    """[lo, hi): the keys that the queries [pid BLOCK_I, (pid + 1) BLOCK_I) of T reach
    (``Context.key_range``: [i0 - HI, i1 - LO)) among the TK keys (None: T, the queries' own),
    lo rounded down to a multiple of BLOCK_J; the key blocks outside are skipped."""
    if TK is None:
        TK = T
    lo = 0
    hi = TK
    if HI is not None:
        lo = tl.maximum(pid * BLOCK_I - HI, 0) // BLOCK_J * BLOCK_J
    if LO is not None:
        hi = tl.minimum(tl.minimum((pid + 1) * BLOCK_I, T) - LO, TK)
    return lo, hi


@triton.jit
def query_range(pid, T, LO: tl.constexpr, HI: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_J: tl.constexpr, TK=None):
    """[lo, hi): the queries of T whose context sets reach a key of [pid BLOCK_J, (pid + 1)
    BLOCK_J) among the TK keys (None: T) (``Context.query_range``: [j0 + LO, j1 + HI)), lo
    rounded down to a multiple of BLOCK_I."""
    if TK is None:
        TK = T
    lo = 0
    hi = T
    if LO is not None:
        lo = tl.maximum(pid * BLOCK_J + LO, 0) // BLOCK_I * BLOCK_I
    if HI is not None:
        hi = tl.minimum(tl.minimum((pid + 1) * BLOCK_J, TK) + HI, T)
    return lo, hi


# The context set from the call's data (``energyc.runtime.rows.Rows``): query i of batch row b
# reads the keys lo_b(i) <= j <= hi_b(i), less the hole i - HOLE; lo_b and hi_b are (B or 1, T)
# int64 rows, non-decreasing in i, which a kernel given them (the constexpr ROWS) reads from
# LO_ROW, HI_ROW: its batch row's start (row stride 0 when one row serves the batch). Without
# ROWS each helper below is the band's, above, and compiles to exactly its code.


@triton.jit
def row_bounds(LO_ROW, HI_ROW, offs_i, valid_i, ROWS: tl.constexpr):
    """(lo_b(i), hi_b(i)) of the queries offs_i under ROWS (queries not ``valid_i`` read an empty
    interval); without ROWS nothing is read (zeros)."""
    if ROWS:
        lo = tl.load(LO_ROW + offs_i, mask=valid_i, other=1)
        hi = tl.load(HI_ROW + offs_i, mask=valid_i, other=0)
    else:
        lo = offs_i * 0
        hi = lo
    return lo, hi


@triton.jit
def in_row_context(offs_i, offs_j, lo_i, hi_i, LO: tl.constexpr, HI: tl.constexpr,
                   HOLE: tl.constexpr, ROWS: tl.constexpr):
    """(I, J) booleans: key offs_j[c] is in the context set of query offs_i[r]: under ROWS
    lo_i[r] <= offs_j[c] <= hi_i[r] (``row_bounds``) and offs_i[r] - offs_j[c] != HOLE, else
    ``in_context`` of the band."""
    if ROWS:
        j = offs_j[None, :]
        inside = (j >= lo_i[:, None]) & (j <= hi_i[:, None])
        if HOLE is not None:
            inside = inside & (offs_i[:, None] - j != HOLE)
    else:
        inside = in_context(offs_i, offs_j, LO, HI, HOLE)
    return inside


@triton.jit
def first_at_least(ROW, n, x):
    """The first k in [0, n) with ROW[k] >= x (n when there is none), for a non-decreasing
    ROW: a binary search, about log2(n) + 1 scalar loads."""
    lo = tl.full([], 0, tl.int64)
    hi = lo + n
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(ROW + mid) < x
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def row_key_range(pid, T, LO_ROW, HI_ROW, LO: tl.constexpr, HI: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, ROWS: tl.constexpr, TK=None):
    """[lo, hi): the keys that the queries [i0, i1) = [pid BLOCK_I, (pid + 1) BLOCK_I) of one
    batch row of T queries reach, among TK keys (None: T; a memory's M): under ROWS
    [lo_b(i0), hi_b(i1 - 1) + 1) (key coordinates, hi_b <= TK - 1; lo_b and hi_b never
    decrease; empty, hi <= lo, when no query of the block has a key), lo rounded down to a
    multiple of BLOCK_J; else ``key_range`` of the band."""
    if ROWS:
        i0 = pid * BLOCK_I
        i1 = tl.minimum(i0 + BLOCK_I, T)
        lo = tl.load(LO_ROW + i0) // BLOCK_J * BLOCK_J
        hi = tl.load(HI_ROW + i1 - 1) + 1
    else:
        lo, hi = key_range(pid, T, LO, HI, BLOCK_I, BLOCK_J, TK)
    return lo, hi


@triton.jit
def row_query_range(pid, T, LO_ROW, HI_ROW, LO: tl.constexpr, HI: tl.constexpr,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, ROWS: tl.constexpr, TK=None):
    """[lo, hi): the queries of one batch row of T queries whose sets reach a key of [j0, j1) =
    [pid BLOCK_J, (pid + 1) BLOCK_J) among TK keys (None: T; a memory's M): under ROWS from
    the first i with hi_b(i) >= j0 to the last with lo_b(i) <= j1 - 1 (two binary searches
    over the T queries' monotone rows), lo rounded down to a multiple of BLOCK_I; else
    ``query_range`` of the band."""
    if TK is None:
        TK = T
    if ROWS:
        j0 = pid * BLOCK_J
        j1 = tl.minimum(j0 + BLOCK_J, TK)
        lo = first_at_least(HI_ROW, T, j0) // BLOCK_I * BLOCK_I
        hi = first_at_least(LO_ROW, T, j1)
    else:
        lo, hi = query_range(pid, T, LO, HI, BLOCK_I, BLOCK_J, TK)
    return lo, hi


@triton.jit
def tile_dot(a, b, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in ACC. float32 operands multiply in full precision ("ieee", as torch's
    matmul by default), not TF32; under UPCAST (the interpreter, bfloat16) the operands are
    widened first, since the interpreter multiplies bfloat16 bits wrongly (bf16 x bf16 products
    are exact in fp32, so this is what a GPU's bf16 dot with fp32 accumulation computes)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(ACC)
    return tl.dot(a, b, input_precision="ieee").to(ACC)


@triton.jit
def operand(x, like, UPCAST: tl.constexpr):
    """The ACC tile ``x`` (a weight tile) as a dot operand against ``like`` (a value tile): in
    ``like``'s dtype, rounded to nearest even (done on the bits under UPCAST, where the
    interpreter's conversion truncates; the result then stays fp32 for ``tile_dot``)."""
    if UPCAST:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(like.dtype)


def context_args(kind, T: int, device) -> tuple[tuple, torch.Tensor | None, torch.Tensor | None]:
    """What a launch passes for the context set ``kind`` (a ``Context`` or its spelling) on T
    tokens in the current call (``energyc.runtime.rows.resolve``): ``((LO, HI, HOLE), None,
    None)``, the band, when the call has no data for it; else ``((None, None, HOLE), lo, hi)``
    with the call's per-row key intervals (``Rows``: int64, (B or 1, T)), which bound the keys
    in place of the band."""
    found = resolve(kind, T, device)
    if isinstance(found, Context):
        return found.band, None, None
    return (None, None, found.hole), found.lo, found.hi


def row_args(lo: torch.Tensor | None, hi: torch.Tensor | None, B: int, T: int,
             like: torch.Tensor) -> dict:
    """The kernels' ``ROWS_LO``, ``ROWS_HI`` (``like`` stands in, unread, without rows),
    ``s_rows`` (the row stride: 0 where one row serves the B rows of the batch) and ``ROWS``;
    lo and hi are given as one row each or one per batch row, made alike here."""
    if lo is None:
        return {"ROWS_LO": like, "ROWS_HI": like, "s_rows": 0, "ROWS": False}
    n = max(lo.shape[0], hi.shape[0])  # lo may be shared where hi is per row (a prefix)
    if n not in (1, B) or lo.shape[-1] != T or hi.shape[-1] != T:
        raise ValueError(f"the context set's rows have shapes {tuple(lo.shape)}, "
                         f"{tuple(hi.shape)}; the launch {B} rows of {T} tokens")
    lo, hi = (t.to(torch.int64).expand(n, T).contiguous() for t in (lo, hi))
    return {"ROWS_LO": lo, "ROWS_HI": hi, "s_rows": T if n > 1 else 0, "ROWS": True}


def _acc(dtype: torch.dtype):
    """The kernels' arithmetic type for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@torch.library.custom_op("energyc::triton_pointwise", mutates_args=())
def _pointwise_op(
    module: str, kernel: str, shape: list[int], args: list[torch.Tensor], dims: list[int]
) -> torch.Tensor:
    """Launch element-wise ``kernel`` of ``module``: an output of ``shape``, the args broadcast to
    it (stride 0 along the axes they lack); ``dims`` are the dim sizes its body uses."""
    fn = getattr(sys.modules[module], kernel)
    dtype = args[0].dtype
    out = torch.empty(shape, dtype=storage(dtype), device=args[0].device)
    views = [a.expand(shape) for a in args]
    n = out.numel()
    fn[(triton.cdiv(n, BLOCK),)](
        out, *views, n, *shape, *[s for v in views for s in v.stride()], *map(float, dims),
        ACC=_acc(dtype), BLOCK=BLOCK,
    )
    return out.to(dtype)


@_pointwise_op.register_fake
def _(module, kernel, shape, args, dims):
    return args[0].new_empty(shape)


@torch.library.custom_op("energyc::triton_reduction", mutates_args=())
def _reduction_op(
    module: str,
    kernel: str,
    shape: list[int],
    out_dims: list[int],
    red_dims: list[int],
    pre: list[torch.Tensor],
    epi: list[torch.Tensor],
    dims: list[int],
    masked: bool = False,
    rows_lo: Optional[torch.Tensor] = None,  # noqa: UP045 (the form of torch.library's docs)
    rows_hi: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    """Launch reduction ``kernel`` of ``module``: the prologue args ``pre`` broadcast to ``shape``,
    reduced over ``red_dims``; the epilogue args ``epi`` broadcast to the output (``out_dims`` of
    ``shape``). A context set's band is printed into the kernel; a ``masked`` kernel also takes
    the call's rows of key bounds (``rows_lo``, ``rows_hi``; None: the call has no data for it)."""
    fn = getattr(sys.modules[module], kernel)
    out_shape = tuple(shape[d] for d in out_dims)
    red_shape = tuple(shape[d] for d in red_dims)
    dtype = pre[0].dtype
    out = torch.empty(out_shape, dtype=storage(dtype), device=pre[0].device)
    pre_views = [a.expand(shape).permute(*out_dims, *red_dims) for a in pre]
    epi_views = [a.expand(out_shape) for a in epi]
    strides = [s for v in pre_views + epi_views for s in v.stride()]
    n_out, n_red = math.prod(out_shape), math.prod(red_shape)
    rows = {}
    if masked:  # the batch rows: any count the rows serve (one, or the batch's)
        n = 1 if rows_lo is None else max(rows_lo.shape[0], rows_hi.shape[0])
        rows = row_args(rows_lo, rows_hi, n, 0 if rows_lo is None else rows_lo.shape[-1], out)
    fn[(triton.cdiv(n_out, BLOCK_O),)](
        out, *pre_views, *epi_views, n_out, n_red, *out_shape, *red_shape, *strides,
        *map(float, dims), **rows, ACC=_acc(dtype), BLOCK_O=BLOCK_O, BLOCK_R=BLOCK_R,
    )
    return out.to(dtype)


@_reduction_op.register_fake
def _(module, kernel, shape, out_dims, red_dims, pre, epi, dims, masked=False, rows_lo=None,
      rows_hi=None):
    return pre[0].new_empty([shape[d] for d in out_dims])


def launchers(module: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """The element-wise and reduction launchers of the kernels defined in ``module``.

    Args:
        module: the generated module's ``__name__`` (its kernels are looked up by name there).

    Returns:
        ``pointwise(kernel, shape, args, dims)`` and ``reduction(kernel, shape, out_dims,
        red_dims, pre, epi, dims[, mask=, T=])``, as the module's step functions call them (a
        reduction over a context set names it, and its T tokens, to read the call's rows).
    """

    def pointwise(
        kernel: str, shape: Sequence[int], args: Sequence[torch.Tensor], dims: Sequence[int]
    ) -> torch.Tensor:
        return _pointwise_op(module, kernel, list(shape), list(args), list(dims))

    def reduction(
        kernel: str,
        shape: Sequence[int],
        out_dims: Sequence[int],
        red_dims: Sequence[int],
        pre: Sequence[torch.Tensor],
        epi: Sequence[torch.Tensor],
        dims: Sequence[int],
        mask: Context | tuple | None = None,
        T: int | None = None,
    ) -> torch.Tensor:
        rows_lo = rows_hi = None
        if mask is not None:
            _, rows_lo, rows_hi = context_args(mask, T, pre[0].device)
        return _reduction_op(module, kernel, list(shape), list(out_dims), list(red_dims),
                             list(pre), list(epi), list(dims), mask is not None, rows_lo, rows_hi)

    return pointwise, reduction
