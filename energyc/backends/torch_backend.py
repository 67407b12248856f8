"""The torch backend: print a graph region as a straight-line torch function.

Each op prints itself here (one ``_emit_<op>`` per op, see :data:`EMITTERS`). Values keep the
graph's canonical axis order, so broadcasting an argument only inserts ``None`` indices; contractions
print as ``torch.einsum``; masks are boolean (T, T) tensors built once per function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy

from energyc.backends.torch_printer import TorchPrinter
from energyc.ir.graph import Graph, Node
from energyc.ir.ops import ARG_SYMBOLS, FusedReduce, describe_mask

SIZE_NAMES = {"b": "B", "i": "T", "j": "T"}


def _broadcast(name: str, axes: tuple[str, ...], to_axes: tuple[str, ...]) -> str:
    """``name`` (with canonical ``axes``) indexed with ``None`` where ``to_axes`` has more axes."""
    index = [":" if a in axes else "None" for a in to_axes]
    while index and index[-1] == ":":
        index.pop()
    return f"{name}[{', '.join(index)}]" if index and axes else name


@dataclass
class Emitter:
    """Prints nodes of ``graph``. ``names`` maps node ids to the expressions that denote them."""

    graph: Graph
    names: dict[int, str]
    letters: dict[str, str]
    lines: list[str] = field(default_factory=list)
    masks: dict[tuple, str] = field(default_factory=dict)
    pending: dict[int, str] = field(default_factory=dict)  # planned variable names
    mask_lines: list[str] = field(default_factory=list)

    def size(self, axis: str) -> str:
        return SIZE_NAMES.get(axis, axis)

    def align(self, nid: int, to_axes: tuple[str, ...]) -> str:
        """The expression of node ``nid`` indexed so that it broadcasts against ``to_axes``."""
        axes = self.graph.node(nid).axes
        assert set(axes) <= set(to_axes), (axes, to_axes)
        return _broadcast(self.names[nid], axes, to_axes)

    def mask(self, mask: tuple, to_axes: tuple[str, ...]) -> str:
        if mask not in self.masks:
            name = "mask_" + "_".join(str(m) for m in mask)
            w = mask[1] if mask[0] == "window" else 0
            self.masks[mask] = name
            self.mask_lines.append(
                f"{name} = _rt.context_mask({mask[0]!r}, T, {w}, x.device)  "
                f"# {{{describe_mask(mask)}}}"
            )
        return _broadcast(self.masks[mask], ("i", "j"), to_axes)

    def print_body(self, body: sympy.Expr, args: list[int], out_axes: tuple[str, ...],
                   first: str | None = None) -> str:
        """``body`` with its arguments broadcast to ``out_axes``; ``first`` (code, already of
        ``out_axes``) when given is ``a0`` and ``args`` are ``a1, a2, ...``."""
        shift = 0 if first is None else 1
        names = {ARG_SYMBOLS[k + shift].name: self.align(a, out_axes) for k, a in enumerate(args)}
        if first is not None:
            names[ARG_SYMBOLS[0].name] = first
        tensor_symbols = set(ARG_SYMBOLS[: len(args) + shift])
        names.update({d: d for d in self.graph.dims})
        names.update({"B": "B", "T": "T"})
        printer = TorchPrinter(names, tensor_symbols)
        return printer.doprint(body)

    def emitters(self) -> dict:
        """The op -> printer table (a subclass overrides some entries)."""
        return EMITTERS

    def emit(self, nid: int, var: str) -> None:
        node = self.graph.node(nid)
        self.pending[nid] = var
        expr = self.emitters()[node.op](self, nid, node)
        if expr is None:
            return
        self.names[nid] = var
        comment = f"# ({', '.join(node.axes)})" if node.axes else "# scalar"
        self.lines.append(f"{var} = {expr}  {comment}")


def _emit_leaf(em: Emitter, nid: int, node: Node) -> None:
    return None  # inputs, params and hypers are arguments; their names are preset


def _emit_const(em: Emitter, nid: int, node: Node) -> None:
    em.names[nid] = f"({em.print_body(node.attr('value'), [], ())})"
    return None


def _emit_offset(em: Emitter, nid: int, node: Node) -> str:
    return "_rt.token_offset(T, x.dtype, x.device)"


def _emit_contract(em: Emitter, nid: int, node: Node) -> str:
    subs = []
    for u in node.inputs:
        subs.append("".join(em.letters[a] for a in em.graph.node(u).axes))
    out = "".join(em.letters[a] for a in node.axes)
    args = ", ".join(em.names[u] for u in node.inputs)
    return f'torch.einsum("{",".join(subs)}->{out}", {args})'


def _emit_pointwise(em: Emitter, nid: int, node: Node) -> str:
    return em.print_body(node.attr("body"), list(node.inputs), node.axes)


def _reduce_code(em: Emitter, src: str, in_axes: tuple[str, ...], node: Node) -> str:
    """``src`` (a value with ``in_axes``) reduced as ``node`` says: sum or logsumexp, masked."""
    dims = tuple(in_axes.index(a) for a in node.attr("axes"))
    dim = dims[0] if len(dims) == 1 else dims
    mask = node.attr("mask")
    if mask is not None and mask != ("all",):
        m = em.mask(mask, in_axes)
        if node.attr("kind") == "lse":
            return f"_rt.masked_logsumexp({src}, {m}, dim={dim})"
        return f"torch.where({m}, {src}, 0).sum(dim={dim})"
    if node.attr("kind") == "lse":
        return f"torch.logsumexp({src}, dim={dim})"
    return f"{src}.sum(dim={dim})"


def _emit_reduce(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    return _reduce_code(em, em.names[u], em.graph.node(u).axes, node)


def _emit_fused_reduce(em: Emitter, nid: int, node: Node) -> str:
    """``post(reduce(pre(a...)), b...)`` as one expression (torch evaluates it in steps)."""
    pre_args, post_args, in_axes = FusedReduce.parts(em.graph, node)
    pre = em.print_body(node.attr("pre"), pre_args, in_axes)
    reduced = _reduce_code(em, pre if _simple(pre) else f"({pre})", in_axes, node)
    return em.print_body(node.attr("post"), post_args, node.axes, first=reduced)


def _simple(code: str) -> bool:
    """A name, or a name with one index (``t3``, ``grad_g[:, :, None]``): needs no parentheses."""
    return re.fullmatch(r"[A-Za-z_]\w*(\[[^\[\]()]*\])?", code) is not None


def _emit_mask(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    return f"torch.where({em.mask(node.attr('mask'), node.axes)}, {em.align(u, node.axes)}, 0)"


def _emit_broadcast(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    sizes = ", ".join(em.size(a) for a in node.axes)
    return f"{em.align(u, node.axes)}.expand({sizes})"


def _emit_relabel(em: Emitter, nid: int, node: Node) -> None:
    em.names[nid] = em.names[node.inputs[0]]  # the same tensor seen in another token role
    return None


def _emit_rotary(em: Emitter, nid: int, node: Node) -> str:
    axes = node.axes
    token = next(a for a in axes if a in ("i", "j"))
    inverse = node.attr("inverse")
    return (f"_rt.rotary({em.names[node.inputs[0]]}, token_dim={axes.index(token)}, "
            f"feature_dim={axes.index(node.attr('feature'))}, base={node.attr('base')!r}, "
            f"inverse={inverse})")


def _siblings(em: Emitter, node: Node, op: str) -> list[int]:
    return [n for n in em.graph.live() if em.graph.node(n).op == op
            and em.graph.node(n).inputs[:4] == node.inputs[:4]
            and em.graph.node(n).attr("mask") == node.attr("mask")]


def _heads(em: Emitter, q: int) -> bool:
    return len(em.graph.node(q).axes) == 4  # (b, i, head, feature); else no head axis


def _attention_args(em: Emitter, node: Node) -> str:
    q, k, v, s = node.inputs[:4]
    wrap = "" if _heads(em, q) else "[:, :, None]"
    args = ", ".join(f"{em.names[u]}{wrap}" for u in (q, k, v))
    return f"{args}, {em.names[s]}, {tuple(node.attr('mask'))!r}"


def _emit_attention(em: Emitter, nid: int, node: Node) -> None:
    """Forward and its saved log-sum-exp in one fused call: ``o, lse = attention_forward(...)``."""
    lse = [n for n in _siblings(em, node, "attention_lse") if em.graph.node(n).inputs == node.inputs]
    squeeze = "" if _heads(em, node.inputs[0]) else "[:, :, 0]"
    names = [em.names.get(nid) or em.pending[nid], em.pending.get(lse[0], "_") if lse else "_"]
    em.lines.append(f"{', '.join(names)} = kernels.attention_forward({_attention_args(em, node)})"
                    f"  # (b, i, ...)")
    if squeeze:
        em.lines.append(f"{names[0]} = {names[0]}{squeeze}")
        if lse:
            em.lines.append(f"{names[1]} = {names[1]}{squeeze}")
    em.names[nid] = names[0]
    if lse:
        em.names[lse[0]] = names[1]
    return None


def _emit_attention_lse(em: Emitter, nid: int, node: Node) -> None:
    squeeze = "" if _heads(em, node.inputs[0]) else "[:, :, 0]"
    var = em.pending[nid]
    em.lines.append(f"_, {var} = kernels.attention_forward({_attention_args(em, node)})")
    if squeeze:
        em.lines.append(f"{var} = {var}{squeeze}")
    em.names[nid] = var
    return None


def _emit_attention_grad(em: Emitter, nid: int, node: Node) -> None:
    """All of dq, dk, dv in one fused backward call."""
    sibs = {em.graph.node(n).attr("wrt"): n for n in _siblings(em, node, "attention_grad")
            if em.graph.node(n).inputs == node.inputs}
    names = [em.pending.get(sibs[w], "_") if w in sibs else "_" for w in ("q", "k", "v")]
    o, lse, g = node.inputs[4:]
    wrap = "" if _heads(em, node.inputs[0]) else "[:, :, None]"
    extra = ", ".join(f"{em.names[u]}{wrap}" for u in (o, lse, g))
    em.lines.append(f"{', '.join(names)} = kernels.attention_backward({_attention_args(em, node)}, "
                    f"{extra})")
    for w, var in zip(("q", "k", "v"), names):
        if w in sibs:
            if not wrap:
                em.names[sibs[w]] = var
            else:
                em.lines.append(f"{var} = {var}[:, :, 0]")
                em.names[sibs[w]] = var
    return None


EMITTERS = {
    "input": _emit_leaf,
    "param": _emit_leaf,
    "hyper": _emit_leaf,
    "const": _emit_const,
    "offset": _emit_offset,
    "contract": _emit_contract,
    "pointwise": _emit_pointwise,
    "reduce": _emit_reduce,
    "fused_reduce": _emit_fused_reduce,
    "mask": _emit_mask,
    "broadcast": _emit_broadcast,
    "relabel": _emit_relabel,
    "rotary": _emit_rotary,
    "attention": _emit_attention,
    "attention_lse": _emit_attention_lse,
    "attention_grad": _emit_attention_grad,
}


def einsum_letters(dims: tuple[str, ...]) -> dict[str, str]:
    """One einsum letter per axis: b, i, j, then each dim's lower-case initial when free."""
    letters = {"b": "b", "i": "i", "j": "j"}
    taken = set(letters.values())
    for d in dims:
        c = d[0].lower()
        if c in taken or not c.isalpha():
            c = next(ch for ch in "abcdefghklmnopqrstuvwxyz" if ch not in taken)
        letters[d] = c
        taken.add(c)
    return letters


def full_output(em: Emitter, nid: int | None, axes: tuple[str, ...], order: tuple[str, ...]) -> str:
    """Expression of ``nid`` expanded to ``axes`` (canonical) and permuted to ``order``."""
    if nid is None:
        return "None"
    node_axes = em.graph.node(nid).axes
    expr = em.names[nid]
    if node_axes != axes:
        if not node_axes:
            expr = f"torch.as_tensor({expr}).expand({', '.join(em.size(a) for a in axes)})"
        else:
            expr = f"{em.align(nid, axes)}.expand({', '.join(em.size(a) for a in axes)})"
    if tuple(order) != tuple(axes):
        perm = ", ".join(str(axes.index(a)) for a in order)
        expr = f"{expr}.permute({perm})"
    return expr
