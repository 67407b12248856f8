"""The torch backend: print a graph region as a straight-line torch function.

Each op has one printing rule, registered against its class in the backend's table
(``@TORCH(ops.Contract)``, :mod:`energyc.backends.rules`): the element-wise, dense and reduction ops
here, the attention family in :mod:`energyc.backends.torch_attention`, the pair ops in
:mod:`energyc.backends.torch_pairs`. Values keep the graph's canonical axis order, so broadcasting
an argument only inserts ``None`` indices; contractions print as ``torch.einsum`` (``_rt.contract``
for two operands); masks are boolean (T, T) tensors built once per function.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass, field
from typing import ClassVar

import sympy

from energyc.backends.rules import TORCH, Rules
from energyc.backends.torch_pairs import print_call
from energyc.backends.torch_printer import TorchPrinter
from energyc.context import Context
from energyc.errors import CompileError
from energyc.ir import ops
from energyc.ir.graph import UNIT, Graph, Node
from energyc.ir.ops import ARG_SYMBOLS, OPS, FusedReduce, describe_mask

SIZE_NAMES = {"b": "B", "i": "T", "j": "T", UNIT: "1"}


def _broadcast(name: str, axes: tuple[str, ...], to_axes: tuple[str, ...]) -> str:
    """``name`` (with canonical ``axes``) indexed with ``None`` where ``to_axes`` has more axes."""
    index = [":" if a in axes else "None" for a in to_axes]
    while index and index[-1] == ":":
        index.pop()
    return f"{name}[{', '.join(index)}]" if index and axes else name


@dataclass
class Emitter:
    """Prints nodes of ``graph``. ``names`` maps node ids to the expressions that denote them."""

    rules: ClassVar[Rules] = TORCH  # op class -> printing rule (a subclass: its backend's table)
    graph: Graph
    names: dict[int, str]
    letters: dict[str, str]
    lines: list[str] = field(default_factory=list)
    masks: dict[tuple, str] = field(default_factory=dict)
    pending: dict[int, str] = field(default_factory=dict)  # planned variable names
    mask_lines: list[str] = field(default_factory=list)
    bound: dict[tuple, tuple[str, str]] = field(default_factory=dict)  # attention operands
    region: set[int] = field(default_factory=set)  # the nodes of the function being printed
    # gradients folded into another's backward call (_merge_backwards): 0 in their one consumer
    zeros: set[int] = field(default_factory=set)
    merge_backwards: bool = True  # an emitter whose element-wise nodes are kernels sets False
    # decoding: the variable holding the position of the first token (the queries' offset); ops
    # that depend on token positions pass it on as ``offset=`` (rotary, the context reductions)
    position: str = ""
    # a sum whose term is a matrix product used nowhere else takes that product inside one GEMM
    # (_rt.contract_add); an emitter whose element-wise nodes are kernels sets False
    accumulate_products: bool = True
    deferred: set[int] = field(default_factory=set)  # such products
    # returned values wanted in an axis order other than the canonical one (a parameter's
    # gradient in the parameter's layout); a contraction (or a sum of them) read by nothing
    # else prints its einsum's output in that order, recorded in ``printed_order``
    wanted_order: dict[int, tuple[str, ...]] = field(default_factory=dict)
    printed_order: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # a function that autograd may record (the energy): no in-place step on a tensor an
    # operation's backward saves (TorchPrinter's ``recorded``)
    recorded: bool = False
    _users: dict[int, list[int]] | None = None

    def users(self, nid: int) -> list[int]:
        """The nodes of the graph that read node ``nid`` (each once)."""
        if self._users is None:
            self._users = {}
            for n in self.graph.live():
                for u in dict.fromkeys(self.graph.node(n).inputs):
                    self._users.setdefault(u, []).append(n)
        return self._users.get(nid, [])

    @functools.cached_property
    def keys(self) -> str:
        """The size of the context token axis j: ``T`` (the state's tokens), or ``Tm`` where the
        graph reads a memory (a second sequence, in the context role)."""
        memory = any(self.graph.node(n).op == "input" and self.graph.node(n).attr("memory")
                     for n in self.graph.ids())
        return "Tm" if memory else "T"

    def offset_arg(self) -> str:
        return f", offset={self.position}" if self.position else ""

    def size(self, axis: str) -> str:
        return self.keys if axis == "j" else SIZE_NAMES.get(axis, axis)

    def align(self, nid: int, to_axes: tuple[str, ...]) -> str:
        """The expression of node ``nid`` indexed so that it broadcasts against ``to_axes``."""
        axes = self.graph.node(nid).axes
        assert set(axes) <= set(to_axes), (axes, to_axes)
        return _broadcast(self.names[nid], axes, to_axes)

    def mask(self, mask: Context, to_axes: tuple[str, ...]) -> str:
        if mask not in self.masks:
            name = "mask_" + "_".join(str(m) for m in mask.spelling)
            self.masks[mask] = name
            keys = "" if self.keys == "T" else f", keys={self.keys}"  # a memory's tokens
            self.mask_lines.append(
                f"{name} = _rt.context_mask({mask.spelling!r}, T, x.device{keys})  "
                f"# {{{describe_mask(mask)}}}"
            )
        if "b" not in to_axes:  # a value over (i, j) alone: one mask for every row
            return _broadcast(f"_rt.shared_mask({self.masks[mask]})", ("i", "j"), to_axes)
        return _broadcast(self.masks[mask], ("b", "i", "j"), to_axes)

    def print_body(self, body: sympy.Expr, args: list[int], out_axes: tuple[str, ...],
                   first: str | None = None) -> str:
        """``body`` with its arguments broadcast to ``out_axes``; ``first`` (code, already of
        ``out_axes``) when given is ``a0`` and ``args`` are ``a1, a2, ...``."""
        shift = 0 if first is None else 1
        folded = {ARG_SYMBOLS[k + shift]: 0 for k, a in enumerate(args) if a in self.zeros}
        if folded:
            body = body.xreplace(folded)
        names = {ARG_SYMBOLS[k + shift].name: self.align(a, out_axes) for k, a in enumerate(args)
                 if a not in self.zeros}
        if first is not None:
            names[ARG_SYMBOLS[0].name] = first
        tensor_symbols = set(ARG_SYMBOLS[: len(args) + shift])
        full = {ARG_SYMBOLS[k + shift] for k, a in enumerate(args)
                if a not in self.zeros and set(self.graph.node(a).axes) == set(out_axes)}
        if first is not None:
            full.add(ARG_SYMBOLS[0])
        names.update({d: d for d in self.graph.dims})
        names.update({"B": "B", "T": "T"})
        printer = TorchPrinter(names, tensor_symbols, full, recorded=self.recorded)
        return printer.doprint(body)

    def print_pair_call(self, call) -> None:
        """Print one pass over pairs (a ``torch_pairs.PairCall``): one runtime call here."""
        print_call(self, call)

    def emit(self, nid: int, var: str) -> None:
        node = self.graph.node(nid)
        self.pending[nid] = var
        expr = self.rules[OPS[node.op]](self, nid, node)
        if expr is None:
            return
        self.names[nid] = var
        axes = self.printed_order.get(nid, node.axes)
        comment = f"# ({', '.join(axes)})" if axes else "# scalar"
        self.lines.append(f"{var} = {expr}  {comment}")


@TORCH(ops.Input, ops.Param, ops.Hyper)
def _emit_leaf(em: Emitter, nid: int, node: Node) -> None:
    return None  # inputs, params and hypers are arguments; their names are preset


@TORCH(ops.Const)
def _emit_const(em: Emitter, nid: int, node: Node) -> None:
    em.names[nid] = f"({em.print_body(node.attr('value'), [], ())})"
    return None


@TORCH(ops.Offset)
def _emit_offset(em: Emitter, nid: int, node: Node) -> str:
    return "_rt.token_offset(T, x.dtype, x.device)"


@TORCH(ops.Position)
def _emit_position(em: Emitter, nid: int, node: Node) -> str:
    return f"_rt.token_position(T, x.dtype, x.device{em.offset_arg()})"


def _einsum_call(em: Emitter, node: Node, out_axes: tuple[str, ...]) -> str:
    """``"subscripts", operands`` of contraction ``node`` with its output in ``out_axes``."""
    subs = ["".join(em.letters[a] for a in em.graph.node(u).axes) for u in node.inputs]
    out = "".join(em.letters[a] for a in out_axes)
    args = ", ".join(em.names[u] for u in node.inputs)
    return f'"{",".join(subs)}->{out}", {args}'


def _output_order(em: Emitter, nid: int) -> tuple[str, ...]:
    """The axis order node ``nid`` is printed in: the storage order it is returned in where it is
    a value read by nothing else (so no permuted view goes out: a gradient returned as a
    transposed view costs its consumer a strided pass, e.g. autograd's accumulation into the
    parameter's .grad, 25x slower than a contiguous add for a (3072, 768) weight), else its
    canonical axes. ``sum_S A[P, S] B[S, Q]`` is one GEMM in either output order (P Q or Q P),
    so the order costs nothing."""
    node = em.graph.node(nid)
    order = em.wanted_order.get(nid)
    if order is None or em.users(nid) or sorted(order) != sorted(node.axes):
        return node.axes
    em.printed_order[nid] = order
    return order


@TORCH(ops.Contract)
def _emit_contract(em: Emitter, nid: int, node: Node) -> str | None:
    if _accumulates(em, nid, node):
        em.deferred.add(nid)  # printed inside its sum (_emit_pointwise)
        return None
    return _contraction(_einsum_call(em, node, _output_order(em, nid)), len(node.inputs))


def _contraction(call: str, n_inputs: int) -> str:
    """A contraction's code: ``_rt.contract`` for two operands (one GEMM on the faster CPU
    GEMM where it is one), ``torch.einsum`` otherwise."""
    return f"_rt.contract({call})" if n_inputs == 2 else f"torch.einsum({call})"


def _plain_sum(node: Node) -> bool:
    """Whether a pointwise body is a0 + a1 + ... (each argument once, coefficient 1)."""
    body = node.attr("body")
    return body.is_Add and set(body.args) == set(ARG_SYMBOLS[: len(node.inputs)]) and len(
        body.args) == len(node.inputs)


def _accumulates(em: Emitter, nid: int, node: Node) -> bool:
    """A product of two operands with no batch axis (every axis of the output belongs to one
    operand: one GEMM of the flattened axes), read only by a plain sum of values of its own
    axes in this function: the sum takes it inside the GEMM, ``total + A B`` with beta = 1,
    instead of a product into a new tensor and an add (whose operands may not even share a
    memory layout: einsum returns a transposed view where that is cheaper)."""
    if not em.accumulate_products or len(node.inputs) != 2 or nid in em.graph.outputs.values():
        return False
    a, b = (set(em.graph.node(u).axes) for u in node.inputs)
    if a & b & set(node.axes):
        return False
    users = em.users(nid)
    if len(users) != 1 or users[0] not in em.region:
        return False
    user = em.graph.node(users[0])
    return (user.op == "pointwise" and _plain_sum(user) and len(user.inputs) >= 2
            and all(set(em.graph.node(u).axes) == set(node.axes) for u in user.inputs)
            and user.axes == node.axes)


@TORCH(ops.Pointwise)
def _emit_pointwise(em: Emitter, nid: int, node: Node) -> str:
    products = [u for u in node.inputs if u in em.deferred]
    if not products:
        return em.print_body(node.attr("body"), list(node.inputs), node.axes)
    # total + A1 B1 + A2 B2 ...: each deferred product accumulates into the sum of the others
    rest = [u for u in node.inputs if u not in em.deferred]
    if rest:
        code = em.print_body(sympy.Add(*ARG_SYMBOLS[: len(rest)]), rest, node.axes)
        order = node.axes
    else:  # a sum of products alone may come out in its returned order (_output_order)
        order = _output_order(em, nid)
        code = f"_rt.contract({_einsum_call(em, em.graph.node(products.pop(0)), order)})"
    for u in products:
        code = f"_rt.contract_add({code}, {_einsum_call(em, em.graph.node(u), order)})"
    return code


def _reduce_code(em: Emitter, src: str, in_axes: tuple[str, ...], node: Node) -> str:
    """``src`` (a value with ``in_axes``) reduced as ``node`` says: sum or logsumexp, masked."""
    dims = tuple(in_axes.index(a) for a in node.attr("axes"))
    dim = dims[0] if len(dims) == 1 else dims
    mask = node.attr("mask")
    if mask is not None:  # every set, all tokens too: the call's lengths bound it
        m = em.mask(mask, in_axes)
        if node.attr("kind") == "lse":
            return f"_rt.masked_logsumexp({src}, {m}, dim={dim})"
        return f"torch.where({m}, {src}, 0).sum(dim={dim})"
    if node.attr("kind") == "lse":
        return f"torch.logsumexp({src}, dim={dim})"
    return f"{src}.sum(dim={dim})"


@TORCH(ops.Reduce)
def _emit_reduce(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    return _reduce_code(em, em.names[u], em.graph.node(u).axes, node)


@TORCH(ops.FusedReduce)
def _emit_fused_reduce(em: Emitter, nid: int, node: Node) -> str:
    """``post(reduce(pre(a...)), b...)`` as one expression (torch evaluates it in steps)."""
    pre_args, post_args, in_axes = FusedReduce.parts(em.graph, node)
    pre = em.print_body(node.attr("pre"), pre_args, in_axes)
    reduced = _reduce_code(em, pre if _simple(pre) else f"({pre})", in_axes, node)
    return em.print_body(node.attr("post"), post_args, node.axes, first=reduced)


def _simple(code: str) -> bool:
    """A name, or a name with one index (``t3``, ``grad_g[:, :, None]``): needs no parentheses."""
    return re.fullmatch(r"[A-Za-z_]\w*(\[[^\[\]()]*\])?", code) is not None


@TORCH(ops.Mask)
def _emit_mask(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    return f"torch.where({em.mask(node.attr('mask'), node.axes)}, {em.align(u, node.axes)}, 0)"


@TORCH(ops.Broadcast)
def _emit_broadcast(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    sizes = ", ".join(em.size(a) for a in node.axes)
    if em.graph.node(u).op == "const":  # a constant with axes: a tensor like the state's
        return f"x.new_full(({sizes}{',' if len(node.axes) == 1 else ''}), {em.names[u]})"
    return f"{em.align(u, node.axes)}.expand({sizes})"


@TORCH(ops.Relabel)
def _emit_relabel(em: Emitter, nid: int, node: Node) -> None:
    em.names[nid] = em.names[node.inputs[0]]  # the same tensor seen in another token role
    return None


@TORCH(ops.Rotary)
def _emit_rotary(em: Emitter, nid: int, node: Node) -> str:
    axes = node.axes
    token = next(a for a in axes if a in ("i", "j"))
    inverse = node.attr("inverse")
    return (f"_rt.rotary({em.names[node.inputs[0]]}, token_dim={axes.index(token)}, "
            f"feature_dim={axes.index(node.attr('feature'))}, base={node.attr('base')!r}, "
            f"inverse={inverse}{em.offset_arg()})")


def einsum_letters(dims: tuple[str, ...]) -> dict[str, str]:
    """One einsum letter per axis: b, i, j, then each dim's lower-case initial when free."""
    letters = {"b": "b", "i": "i", "j": "j"}
    taken = set(letters.values())
    pool = string.ascii_lowercase + string.ascii_uppercase  # what einsum accepts
    for d in (*dims, UNIT):
        c = d[0].lower()
        if c in taken or c not in pool:
            c = next((ch for ch in pool if ch not in taken), None)
            if c is None:
                raise CompileError(f"too many dims for one einsum: {len(dims)} (at most "
                                   f"{len(pool) - 3})", None)
        letters[d] = c
        taken.add(c)
    return letters


def full_output(em: Emitter, nid: int | None, axes: tuple[str, ...], order: tuple[str, ...]) -> str:
    """Expression of ``nid`` expanded to ``axes`` (canonical) and permuted to ``order``."""
    if nid is None:
        return "None"
    node_axes = em.graph.node(nid).axes
    expr = em.names[nid]
    if em.printed_order.get(nid) == tuple(order):  # printed in the returned order already
        return expr
    if node_axes != axes:
        if not node_axes:
            expr = f"torch.as_tensor({expr}).expand({', '.join(em.size(a) for a in axes)})"
        else:
            expr = f"{em.align(nid, axes)}.expand({', '.join(em.size(a) for a in axes)})"
    if tuple(order) != tuple(axes):
        perm = ", ".join(str(axes.index(a)) for a in order)
        expr = f"{expr}.permute({perm})"
    return expr
