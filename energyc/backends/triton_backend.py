"""The Triton backend: the step functions with their element-wise work in generated kernels.

Which node runs where:

* ``pointwise`` (after ``fuse_pointwise``, a whole chain): one element-wise kernel;
* ``reduce`` and ``fused_reduce`` (after ``fuse_reductions``, with their prologue and epilogue):
  one reduction kernel, with the context set tested in the kernel;
* ``attention`` and its backward: the flash kernels of ``triton/attention.py.j2``;
* ``contract`` (dense projections), ``broadcast``, ``mask``, ``rotary``, ``offset``: torch, as on
  the torch backend (extern nodes: cuBLAS does the matmuls).

This module decides everything about a kernel (its parameters, index arithmetic, loads, the
accumulation of its reduction) and stores it as lines of code in a :class:`PointwiseKernel` or
:class:`ReductionKernel`; the templates under ``codegen_templates/triton/`` only loop over them.

Element-wise kernel over an output with axes ``(a_0 .. a_{r-1})`` and ``N`` elements::

    out[c] = body(in_0[c], in_1[c], ...)       c = unravel(offs), offs in one BLOCK per program

Reduction kernel, output axes ``O`` and reduced axes ``R``, over a context set ``C`` when it
reduces over ``j``::

    out[o] = post(acc_{r in R, j in C(i)} pre(in_0[o, r], ...), epi_0[o], ...)

with ``acc`` a sum, or an online log-sum-exp (running max ``m`` and sum ``s``,
``s <- s exp(m - m') + sum exp(v - m')``); an empty context set gives 0. The set's band is
printed into the kernel; its launch names the set (``mask=``), so that where the call has data
for it (documents, lengths, prefixes) the kernel reads the call's per-row key bounds instead
(constexpr ROWS, ``energyc.runtime.triton_layer.in_row_context``). A reduction over the batch
and a context set stays on torch (its rows differ per batch row). Arithmetic is in
``ACC``: fp32 (fp64 for float64 inputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import ClassVar

import sympy

from energyc.backends import torch_attention, torch_backend, triton_pairs  # noqa: F401
from energyc.backends.rules import TORCH, TRITON, Rules
from energyc.backends.torch_backend import Emitter, Node
from energyc.backends.triton_printer import NoTritonSpellingError, TritonPrinter
from energyc.ir import ops
from energyc.ir.describe import formula
from energyc.ir.ops import ARG_SYMBOLS, FusedReduce


@dataclass
class PointwiseKernel:
    """One element-wise kernel: ``out = expr`` over the unravelled output index."""

    family = "pointwise"
    name: str
    doc: str
    params: list[str]
    index_lines: list[str]
    load_lines: list[str]
    expr: str


@dataclass
class ReductionKernel:
    """One reduction kernel: prologue ``pre``, accumulation, epilogue ``post``."""

    family = "reduction"
    name: str
    doc: str
    params: list[str]
    out_index_lines: list[str]
    init_lines: list[str]
    red_index_lines: list[str]
    valid: str
    load_lines: list[str]
    pre: str
    update_lines: list[str]
    final_lines: list[str]
    epi_lines: list[str]
    post: str


@dataclass
class KernelSet:
    """The distinct kernels of one generated module, in the order their first launch was printed.

    A kernel is kept once: a launch whose kernel equals a kept one in everything but its name
    and docstring (the same signature and body; :meth:`add`) launches the kept one. Names are
    ``_<energy>_<function>_<family><n>``, after the function that first launches the kernel
    (``fwd``, ``bwd``, ``precond_dplr_fwd``, ...), ``n`` counting that function's kept kernels of
    the family.
    """

    energy: str
    kernels: list = field(default_factory=list)
    # what stays on torch on this path: {(where or None, what): why}, in the order found
    on_torch: dict = field(default_factory=dict)
    # launches printed per family (a kept kernel may be launched several times)
    launched: dict = field(default_factory=dict)

    def stays_on_torch(self, where: str | None, what: str, error: Exception) -> None:
        """Record that ``what`` (a node's kind) runs torch's code on the Triton path because
        its body has a function Triton cannot spell (``error`` names it)."""
        self.on_torch.setdefault((where, what), str(error))

    def name(self, function: str, family: str, ahead: int = 0) -> str:
        """The name of the next kernel of ``family`` that ``function`` adds (``ahead``: of the
        one after the next ``ahead``, built but not added yet)."""
        stem = f"_{self.energy}_{function}_{family}"
        n = sum(1 for k in self.kernels if re.fullmatch(re.escape(stem) + r"\d+", k.name))
        return f"{stem}{n + ahead}"

    def add(self, kernel) -> str:
        """Keep ``kernel`` unless an equal one is kept; return the name its launch calls.

        Equal: every field but the name and the docstring, with the kernel's own name (which
        a pair kernel's tile function and loop carry) read as one placeholder. A kept kernel's
        one-line docstring (``(axes) = formula``) gains the formula of each further use that
        reads differently (``; also formula``)."""
        self.launched[kernel.family] = self.launched.get(kernel.family, 0) + 1
        key = _body(kernel)
        for kept in self.kernels:
            if kept.family == kernel.family and _body(kept) == key:
                formula = kernel.doc.partition(" = ")[2]
                uses = kept.doc.partition(" = ")[2].split("; also ")
                if "\n" not in kept.doc and formula not in uses:
                    kept.doc = f"{kept.doc}; also {formula}"
                return kept.name
        self.kernels.append(kernel)
        return kernel.name


def _body(kernel) -> str:
    """A kernel's signature and body: its fields but the name and docstring, its name elided."""
    parts = {f.name: getattr(kernel, f.name) for f in fields(kernel)
             if f.name not in ("name", "doc")}
    return repr(parts).replace(kernel.name, "\0")


def _unravel(index: str, coord: str, size: str, rank: int, rest: str) -> list[str]:
    """Lines splitting the flat ``index`` into ``coord0 .. coord{rank-1}`` (row-major)."""
    if rank == 0:
        return []
    if rank == 1:
        return [f"{coord}0 = {index}"]
    lines = [f"{rest} = {index}"]
    for d in range(rank - 1, 0, -1):
        lines.append(f"{coord}{d} = {rest} % {size}{d}")
        if d > 1:
            lines.append(f"{rest} = {rest} // {size}{d}")
    lines.append(f"{coord}0 = {rest} // {size}1")
    return lines


def _offset(coord: str, stride: str, dims: list[int]) -> str:
    return " + ".join(f"{coord}{d} * {stride}{d}" for d in dims)


@dataclass
class TritonEmitter(Emitter):
    """Prints a step function for the Triton path; collects the kernels it launches."""

    rules: ClassVar[Rules] = TRITON
    kernel_set: KernelSet = field(default_factory=lambda: KernelSet("layer"))
    function: str = "fn"  # fwd, bwd: the stem of its kernels' names
    merge_backwards: bool = False  # its element-wise nodes are kernels: no gradient folds to 0
    accumulate_products: bool = False  # a sum is a kernel: its terms are tensors

    def print_pair_call(self, call) -> None:
        """A pass over pairs as the pair kernels of ``triton_pairs`` (torch where they cannot)."""
        triton_pairs.print_call(self, call)


def _dims(*bodies: sympy.Expr) -> list[str]:
    """The dim sizes the bodies use (each becomes a kernel parameter ``dim_<name>``)."""
    used = {s for b in bodies for s in b.free_symbols if s not in ARG_SYMBOLS}
    return sorted(s.name for s in used)


def _print(body: sympy.Expr, names: dict[str, str], dims: list[str]) -> str:
    return TritonPrinter({**names, **{d: f"dim_{d}" for d in dims}}).doprint(body)


def _tuple(items: list[str]) -> str:
    """A tuple literal that the formatter keeps on one line (no trailing comma unless one item)."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


@TRITON(ops.Pointwise)
def _emit_pointwise(em: TritonEmitter, nid: int, node: Node) -> str:
    """``out = body(args)``: one element-wise kernel over the output's axes."""
    body = node.attr("body")
    if not node.axes:
        return torch_backend._emit_pointwise(em, nid, node)  # a scalar: no kernel
    rank = len(node.axes)
    args = list(node.inputs)
    params = ["OUT", *(f"IN{k}" for k in range(len(args))), "N", *(f"n{d}" for d in range(rank))]
    params += [f"s{k}_{d}" for k in range(len(args)) for d in range(rank)]
    names = {ARG_SYMBOLS[k].name: f"a{k}" for k in range(len(args))}
    dims = _dims(body)
    params += [f"dim_{d}" for d in dims]
    try:
        expr = _print(body, names, dims)
    except NoTritonSpellingError as error:
        em.kernel_set.stays_on_torch(node.where, "an element-wise node", error)
        return torch_backend._emit_pointwise(em, nid, node)
    loads = []
    for k, u in enumerate(args):
        own = [d for d, a in enumerate(node.axes) if a in em.graph.node(u).axes]
        if own:
            loads.append(f"a{k} = tl.load(IN{k} + {_offset('c', f's{k}_', own)}, mask=valid, "
                         f"other=0.0).to(ACC)")
        else:
            loads.append(f"a{k} = tl.load(IN{k}).to(ACC)")
    doc = (f"({', '.join(node.axes)}) = "
           f"{formula(body, [em.names[u] for u in args])}")
    name = em.kernel_set.add(PointwiseKernel(
        em.kernel_set.name(em.function, "pointwise"), doc, params,
        _unravel("offs", "c", "n", rank, "rest"), loads, expr))
    shape = _tuple([em.size(a) for a in node.axes])
    inputs = _tuple([em.align(u, node.axes) for u in args])
    return f'_pointwise("{name}", {shape}, {inputs}, {_tuple(dims)})'


@TRITON(ops.Reduce, FusedReduce)
def _emit_reduction(em: TritonEmitter, nid: int, node: Node) -> str:
    """``post(reduce(pre(a...)), e...)``: one reduction kernel (a plain reduce: pre = post = id)."""
    fused = node.op == "fused_reduce"
    g = em.graph
    if fused:
        pre_args, epi_args, in_axes = FusedReduce.parts(g, node)
    else:
        pre_args, epi_args, in_axes = list(node.inputs), [], g.node(node.inputs[0]).axes
    pre_body = node.attr("pre") if fused else ARG_SYMBOLS[0]
    post_body = node.attr("post") if fused else ARG_SYMBOLS[0]
    out_axes = node.axes
    red_axes = tuple(a for a in in_axes if a not in out_axes)
    p, q = len(out_axes), len(red_axes)
    mask = node.attr("mask")
    masked = mask is not None  # every set, all tokens too: the call's lengths bound it
    if masked and "b" not in out_axes:
        # the call's rows differ per batch row: a sum over the batch too stays on torch
        emit = torch_backend._emit_fused_reduce if fused else torch_backend._emit_reduce
        return emit(em, nid, node)

    params = ["OUT", *(f"IN{k}" for k in range(len(pre_args))),
              *(f"EPI{k}" for k in range(len(epi_args))), "N_OUT", "N_RED",
              *(f"on{d}" for d in range(p)), *(f"rn{d}" for d in range(q))]
    params += [f"s{k}_{d}" for k in range(len(pre_args)) for d in range(p + q)]
    params += [f"e{k}_{d}" for k in range(len(epi_args)) for d in range(p)]
    pre_names = {ARG_SYMBOLS[k].name: f"a{k}" for k in range(len(pre_args))}
    post_names = {ARG_SYMBOLS[0].name: "red"}
    post_names.update({ARG_SYMBOLS[k + 1].name: f"e{k}" for k in range(len(epi_args))})
    dims = _dims(pre_body, post_body)
    params += [f"dim_{d}" for d in dims]
    if masked:  # the call's per-row key bounds, read under ROWS (energyc.runtime.triton_layer)
        params += ["ROWS_LO", "ROWS_HI", "s_rows", "ROWS: tl.constexpr"]
    try:
        pre = _print(pre_body, pre_names, dims)
        post = _print(post_body, post_names, dims)
    except NoTritonSpellingError as error:
        em.kernel_set.stays_on_torch(node.where, "a reduction", error)
        emit = torch_backend._emit_fused_reduce if fused else torch_backend._emit_reduce
        return emit(em, nid, node)

    loads = []
    for k, u in enumerate(pre_args):
        axes = g.node(u).axes
        o_dims = [d for d, a in enumerate(out_axes) if a in axes]
        r_dims = [d for d, a in enumerate(red_axes) if a in axes]
        if not o_dims and not r_dims:
            loads.append(f"a{k} = tl.load(IN{k}).to(ACC)")
            continue
        o_part = _offset("o", f"s{k}_", o_dims) if o_dims else "zero_o"
        r_part = " + ".join(f"r{d} * s{k}_{p + d}" for d in r_dims) if r_dims else "zero_r"
        loads.append(f"a{k} = tl.load(IN{k} + ({o_part})[:, None] + ({r_part})[None, :], "
                     f"mask=valid, other=0.0).to(ACC)")
    valid = "valid_o[:, None] & valid_r[None, :]"
    out_index = _unravel("offs_o", "o", "on", p, "rest_o")
    if masked:
        i_pos, j_pos, b_pos = out_axes.index("i"), red_axes.index("j"), out_axes.index("b")
        band = ", ".join(f"{name}={value}" for name, value in mask.kernel_args().items())
        out_index.append(f"lo_o, hi_o = _row_bounds(ROWS_LO + o{b_pos} * s_rows, ROWS_HI + "
                         f"o{b_pos} * s_rows, o{i_pos}, valid_o, ROWS)")
        valid += f" & _in_row_context(o{i_pos}, r{j_pos}, lo_o, hi_o, {band}, ROWS=ROWS)"
    if node.attr("kind") == "sum":
        init = ["acc = tl.zeros((BLOCK_O,), dtype=ACC)"]
        update = ["acc += tl.sum(tl.where(valid, v, 0.0), axis=1)"]
        final = ["red = acc"]
    else:
        init = ["acc = tl.zeros((BLOCK_O,), dtype=ACC)",
                'm = tl.full((BLOCK_O,), float("-inf"), dtype=ACC)']
        update = ['v = tl.where(valid, v, float("-inf"))',
                  "m_new = tl.maximum(m, tl.max(v, axis=1))",
                  'm_safe = tl.where(m_new == float("-inf"), 0.0, m_new)',
                  "acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(v - m_safe[:, None]), axis=1)",
                  "m = m_new"]
        final = ["red = tl.where(acc > 0, m + tl.log(tl.where(acc > 0, acc, 1.0)), 0.0)  # empty set: 0"]
    epi = []
    for k, u in enumerate(epi_args):
        o_dims = [d for d, a in enumerate(out_axes) if a in g.node(u).axes]
        if o_dims:
            epi.append(f"e{k} = tl.load(EPI{k} + {_offset('o', f'e{k}_', o_dims)}, mask=valid_o, "
                       f"other=0.0).to(ACC)")
        else:
            epi.append(f"e{k} = tl.load(EPI{k}).to(ACC)")

    over = ", ".join(red_axes) + (f" in {{{torch_backend.describe_mask(mask)}}}" if masked else "")
    kind = "sum" if node.attr("kind") == "sum" else "logsumexp"
    red_text = f"{kind}_{{{over}}}({formula(pre_body, [em.names[u] for u in pre_args])})"
    doc = f"({', '.join(out_axes)}) = " + formula(
        post_body, [red_text] + [em.names[u] for u in epi_args])
    name = em.kernel_set.add(ReductionKernel(
        em.kernel_set.name(em.function, "reduce"), doc, params, out_index, init,
        _unravel("offs_r", "r", "rn", q, "rest_r"), valid, loads, pre, update, final, epi, post))
    in_shape = _tuple([em.size(a) for a in in_axes])
    out_pos = _tuple([str(in_axes.index(a)) for a in out_axes])
    red_pos = _tuple([str(in_axes.index(a)) for a in red_axes])
    pre_in = _tuple([em.align(u, in_axes) for u in pre_args])
    epi_in = _tuple([em.align(u, out_axes) for u in epi_args])
    context = f", mask={mask.spelling!r}, T={em.size('i')}" if masked else ""
    return (f'_reduction("{name}", {in_shape},'
            f" {out_pos}, {red_pos}, {pre_in}, {epi_in}, {_tuple(dims)}{context})")


# what runs on torch on this path (see the module docstring): leaves, constants, positions, dense products,
# masks, broadcasts, relabels, rotary, and the attention family (whose torch printing calls
# ``kernels``, here the Triton flash kernels)
TRITON.reuse(TORCH, ops.Input, ops.Param, ops.Hyper, ops.Const, ops.Offset, ops.Position,
             ops.Contract, ops.Mask, ops.Broadcast, ops.Relabel, ops.Rotary)
TRITON.reuse(TORCH, ops.Attention, ops.AttentionLse, ops.AttentionTransposed, ops.AttentionGrad)
