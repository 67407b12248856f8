"""Every op's plain evaluation in torch: the reference interpreter of graphs.

One rule per op class (``@evaluates(ops.Contract)``), beside the op table of
:mod:`energyc.ir.ops` and :mod:`energyc.ir.pairs`; importing this module fails, naming the op,
when an op has none. :func:`evaluate` walks a graph with them. It reads each op's definition, not
the generated code: it shares nothing with the backends or the runtime. Masks are a context set's
predicate (``energyc.context.Context.contains``); a masked log-sum-exp over an empty set is 0; contractions are
``torch.einsum`` with a letter per axis; element-wise bodies are walked over SymPy's tree, energyc's
functions expanded to their definitions except sigmoid and softplus (torch's own: see
:data:`STABLE`); pair ops and the attention family form every (i, j) pair (the (tokens x tokens)
values the kernels avoid). Arguments broadcast by inserting singleton axes, which the canonical
axis order ``(b, i, j, *dims)`` makes sufficient. Every value is differentiable twice by autograd.

Used by ``energyc.reference`` (a layer's energy, which ``energyc check`` differentiates) and by the
tests of the VJP rules and passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F  # noqa: N812

from energyc.context import Context
from energyc.ir import ops
from energyc.ir.functions import EnergyFunction, sigmoid, softplus
from energyc.ir.graph import Graph, Node
from energyc.ir.ops import ARG_SYMBOLS, OPS, Op
from energyc.ir.pairs import DIST, PairLse, PairSum, RunningSum, e, u

_UNARY = {
    sympy.exp: torch.exp, sympy.log: torch.log, sympy.tanh: torch.tanh, sympy.sinh: torch.sinh,
    sympy.cosh: torch.cosh, sympy.sin: torch.sin, sympy.cos: torch.cos, sympy.tan: torch.tan,
    sympy.atan: torch.atan, sympy.erf: torch.erf, sympy.erfc: torch.erfc, sympy.Abs: torch.abs,
    sympy.sign: torch.sign, sympy.asinh: torch.asinh,
}

# sigmoid and softplus by torch's own functions, not their definitions: autograd of
# 1 / (1 + exp(-u)) or log(1 + exp(u)) squares exp(|u|) in the second derivative, which overflows
# for |u| > 355 in float64 (and 44 in float32) and turned a second derivative of ~0 into ~1
# (sigmoid_attention after a large step: the reference's backward 8.8e4 off, the layer's right).
# softplus is linear past its threshold: 40, where its second derivative, e^-40 = 4e-18, is below
# float64's resolution (the default 20 drops 2e-9). They are what a user's autograd layer calls,
# so the benchmark's autograd variant is no slower than theirs.
STABLE = {
    sigmoid: torch.sigmoid,
    softplus: lambda u: F.softplus(u, threshold=40.0),
}


def evaluate_body(expr: sympy.Basic, env: Mapping[str, torch.Tensor], dtype) -> torch.Tensor:
    """Evaluate a SymPy expression on tensors, recursively (EnergyFunctions expanded first, but
    for those with a stable torch form, :data:`STABLE`); symbols by name from ``env``."""
    def ev(e):
        if e.is_Symbol:
            return env[e.name]
        if type(e) in STABLE:
            return STABLE[type(e)](ev(e.args[0]))
        if e.is_Number or e in (sympy.pi, sympy.E):
            return torch.tensor(float(e), dtype=dtype)
        if e.is_Add:
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if e.is_Mul:
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if e.is_Pow:
            base, expo = e.args
            if expo.is_Integer:
                return ev(base) ** int(expo)
            return ev(base) ** ev(expo)
        if e.func in _UNARY:
            return _UNARY[e.func](ev(e.args[0]))
        if isinstance(e, sympy.Piecewise):
            out = torch.tensor(math.nan, dtype=dtype)
            for value, cond in reversed(e.args):
                out = ev(value) if cond == sympy.true else torch.where(ev(cond), ev(value), out)
            return out
        if isinstance(e, sympy.Heaviside):
            v = ev(e.args[0])
            h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
            return torch.where(v > 0, 1.0, torch.where(v < 0, 0.0, h0)).to(dtype)
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = torch.maximum if isinstance(e, sympy.Max) else torch.minimum
            vals = [ev(a) for a in e.args]
            out = vals[0]
            for v in vals[1:]:
                out = fn(*torch.broadcast_tensors(out, v))
            return out
        if isinstance(e, sympy.core.relational.Relational):
            a, b = ev(e.lhs), ev(e.rhs)
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b,
                    "!=": a != b}[e.rel_op]
        if isinstance(e, sympy.And):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out & ev(a)
            return out
        if e.is_number:  # a constant SymPy has no tensor form for (EulerGamma, ...)
            return torch.tensor(float(e), dtype=dtype)
        raise NotImplementedError(f"reference evaluator: {e.func}")

    expanded = expr.replace(lambda e: isinstance(e, EnergyFunction) and type(e) not in STABLE,
                            lambda e: type(e).definition(e.args[0]))
    return ev(expanded)


def context_mask(mask: Context, T: int, device=None, keys: int | None = None) -> torch.Tensor:
    """The (b, i, j) boolean mask of a context set: (1, T, T) from ``Context.contains`` (whose
    kinds ``tests/test_context.py`` checks against their textbook definitions), and where the
    call gives data (``energyc.runtime.rows.calling``), (B, T, T) from its textbook definition
    (FlexAttention's): ``| (j < P_b)`` for a prefix, ``& (doc(i) == doc(j))`` for documents,
    ``& (i < L_b) & (j < L_b)`` for lengths (not from the runtime's per-row bounds). Over a
    memory's ``keys`` tokens (all of them): (1, T, keys), ``& (i < L_b) & (j < M_b)`` with the
    call's lengths and memory_lengths."""
    from energyc.runtime.rows import current  # the call's data, as the layer was given it

    keys = T if keys is None else keys
    idx, kdx = torch.arange(T, device=device), torch.arange(keys, device=device)
    out = mask.contains(idx[:, None], kdx[None, :]).expand(T, keys)[None]
    data = current()
    if data is None:
        return out
    i, j = idx[None, :, None], kdx[None, None, :]
    if "prefix" in mask.data:
        out = out | (j < data.prefix[:, None, None])
    if "same_document" in mask.data:
        out = out & (data.ids[:, :, None] == data.ids[:, None, :])
    if data.lengths is not None:
        n = data.lengths[:, None, None]
        out = out & (i < n) & (j < n) if data.M is None else out & (i < n)
    if data.first is not None:
        f = data.first[:, None, None]
        out = out & (i >= f) & (j >= f)
    if data.memory_lengths is not None:
        out = out & (j < data.memory_lengths[:, None, None])
    return out


def masked_logsumexp(v: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum_{m} exp(v) over ``dim``; 0 where the set is empty. Differentiable twice."""
    neg = torch.where(m, v, torch.full_like(v, -math.inf))
    mx = neg.amax(dim, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    # exp of -inf (not where() after exp): masked entries may overflow
    total = torch.exp(neg - mx).sum(dim, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, mx + torch.log(safe), torch.zeros_like(total)).squeeze(dim)


def align(value: torch.Tensor, axes: tuple, to_axes: tuple) -> torch.Tensor:
    """View ``value`` (axes ``axes``) with singleton axes so that it broadcasts against
    ``to_axes``."""
    assert tuple(axes) == tuple(a for a in to_axes if a in axes), (axes, to_axes)
    return value.reshape([value.shape[axes.index(a)] if a in axes else 1 for a in to_axes])


@dataclass
class Evaluation:
    """What the rules read besides a node and its inputs' values.

    Attributes:
        graph: the graph.
        env: the values of the input, param and hyper leaves by name (canonical axis order).
        sizes: axis -> size (``b``, ``i``, ``j`` and the dims).
        dtype, device: of the values made here (constants, offsets, masks).
    """

    graph: Graph
    env: Mapping[str, torch.Tensor | float]
    sizes: Mapping[str, int]
    dtype: torch.dtype = torch.float64
    device: torch.device | str | None = None

    @property
    def T(self) -> int:  # noqa: N802
        return self.sizes["i"]

    def symbols(self) -> dict[str, int]:
        """Values of the size symbols that bodies and constants may contain (B, T, the dims)."""
        out = {a: n for a, n in self.sizes.items() if a not in ("b", "i", "j")}
        out.update({"B": self.sizes["b"], "T": self.sizes["i"]})
        return out

    def body_env(self) -> dict[str, torch.Tensor]:
        """The size symbols as tensors, for a body's evaluation."""
        return {name: torch.tensor(float(v), dtype=self.dtype)
                for name, v in self.symbols().items()}

    def full(self, axes: tuple[str, ...]) -> list[int]:
        return [self.sizes[a] for a in axes]

    def expand(self, value: torch.Tensor, axes: tuple, to_axes: tuple) -> torch.Tensor:
        """``value`` broadcast to the full shape of ``to_axes`` (constant along axes it lacks)."""
        return align(value, axes, to_axes).expand(self.full(to_axes))

    def mask(self, mask: Context, to_axes: tuple) -> torch.Tensor:
        """The context set's (b, i, j) mask, aligned to ``to_axes`` (a value without the batch
        axis takes the one mask of every row; per-row data cannot bound it)."""
        m = context_mask(mask, self.T, self.device, self.sizes["j"])
        if "b" not in to_axes:
            if m.shape[0] != 1:
                raise ValueError("a value over (i, j) without a batch axis cannot follow per-row "
                                 "context data")
            return align(m[0], ("i", "j"), to_axes)
        return align(m, ("b", "i", "j"), to_axes)

    def offsets(self) -> torch.Tensor:
        """The (i, j) matrix of ``i - j``."""
        idx = torch.arange(self.T, dtype=self.dtype, device=self.device)
        keys = torch.arange(self.sizes.get("j", self.T), dtype=self.dtype, device=self.device)
        return idx[:, None] - keys[None, :]

    def letters(self) -> dict[str, str]:
        """One einsum letter per axis."""
        return {a: chr(ord("a") + k) for k, a in enumerate(("b", "i", "j", *self.graph.dims))}


Rule = Callable[[Evaluation, Node, list], torch.Tensor]
EVALUATORS: dict[type[Op], Rule] = {}


def evaluates(*op_classes: type[Op]) -> Callable[[Rule], Rule]:
    """Register the decorated function as the evaluation of each of ``op_classes``."""
    def register(rule: Rule) -> Rule:
        for op in op_classes:
            EVALUATORS[op] = rule
        return rule

    return register


def evaluate(graph: Graph, node_id: int, env: Mapping[str, torch.Tensor | float],
             sizes: Mapping[str, int], *, dtype: torch.dtype = torch.float64, device=None,
             cache: dict | None = None) -> torch.Tensor:
    """The value of ``node_id``: a tensor of the full shape of its axes (canonical order).

    Args:
        graph: the graph.
        env: the names of input, param and hyper leaves -> their values.
        sizes: axis -> size for ``b``, ``i``, ``j`` and the dims.
        dtype, device: of the values made here (constants, offsets, masks).
        cache: node id -> value, shared between calls on the same graph and env.
    """
    ev = Evaluation(graph, env, sizes, dtype, device)
    values = {} if cache is None else cache
    for n in sorted(graph.ancestors([node_id])):
        if n not in values:
            node = graph.node(n)
            values[n] = EVALUATORS[OPS[node.op]](ev, node, [values[x] for x in node.inputs])
    return values[node_id]


# -- the rules --------------------------------------------------------------------------------


@evaluates(ops.Input, ops.Param, ops.Hyper)
def _leaf(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    value = ev.env[node.attr("name")]
    if node.op == "hyper" or not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, dtype=ev.dtype)
    # a memory's tokens are the context token's (its input is relabelled to j where read)
    axes = tuple("j" if a == "i" and node.attr("memory") else a for a in node.axes)
    assert tuple(value.shape) == tuple(ev.full(axes)), (node.attr("name"), value.shape)
    return value


@evaluates(ops.Const)
def _const(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    value, syms = node.attr("value"), ev.symbols()
    return torch.tensor(float(value.subs({s: syms[s.name] for s in value.free_symbols})),
                        dtype=ev.dtype)


@evaluates(ops.Offset)
def _offset(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    return ev.offsets()


@evaluates(ops.Position)
def _position(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    return torch.arange(ev.T, dtype=ev.dtype, device=ev.device)


@evaluates(ops.Contract)
def _contract(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    letters = ev.letters()
    spec = ",".join("".join(letters[a] for a in ev.graph.node(x).axes) for x in node.inputs)
    return torch.einsum(spec + "->" + "".join(letters[a] for a in node.axes), *ins)


@evaluates(ops.Pointwise)
def _pointwise(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    env: dict = ev.body_env()
    for k, (v, x) in enumerate(zip(ins, node.inputs)):
        env[ARG_SYMBOLS[k].name] = align(v, ev.graph.node(x).axes, node.axes)
    out = evaluate_body(node.attr("body"), env, ev.dtype)
    full = ev.full(node.axes)
    return out.reshape([1] * (len(full) - out.dim()) + list(out.shape)).expand(full)


def _reduced(ev: Evaluation, node: Node, v: torch.Tensor, axes: tuple) -> torch.Tensor:
    """``v`` (with ``axes``) reduced as ``node`` says: sum or log-sum-exp, over its context set."""
    dims = [axes.index(a) for a in node.attr("axes")]
    mask = node.attr("mask")
    if mask is not None:
        m = ev.mask(mask, axes)
        if node.attr("kind") == "sum":
            return torch.where(m, v, torch.zeros_like(v)).sum(dims[0])
        return masked_logsumexp(v, m.expand(v.shape), dims[0])
    if node.attr("kind") == "sum":
        return v.sum(dims)
    return torch.logsumexp(v, dims[0])


@evaluates(ops.Reduce)
def _reduce(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    return _reduced(ev, node, ins[0], ev.graph.node(node.inputs[0]).axes)


@evaluates(ops.FusedReduce)
def _fused_reduce(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    """post(reduce(pre(a...)), b...): each stage by the rules of pointwise and reduce."""
    n_pre = node.attr("n_pre")
    pre_args, post_args, in_axes = ops.FusedReduce.parts(ev.graph, node)
    env = ev.body_env()
    env.update({ARG_SYMBOLS[k].name: align(v, ev.graph.node(x).axes, in_axes)
                for k, (v, x) in enumerate(zip(ins[:n_pre], pre_args))})
    pre = evaluate_body(node.attr("pre"), env, ev.dtype)
    pre = pre.reshape([1] * (len(in_axes) - pre.dim()) + list(pre.shape)).expand(
        ev.full(in_axes))
    env = ev.body_env()
    env[ARG_SYMBOLS[0].name] = _reduced(ev, node, pre, in_axes)
    env.update({ARG_SYMBOLS[k + 1].name: align(v, ev.graph.node(x).axes, node.axes)
                for k, (v, x) in enumerate(zip(ins[n_pre:], post_args))})
    out = evaluate_body(node.attr("post"), env, ev.dtype)
    full = ev.full(node.axes)
    return out.reshape([1] * (len(full) - out.dim()) + list(out.shape)).expand(full)


@evaluates(ops.Mask)
def _mask(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    m = ev.mask(node.attr("mask"), node.axes)
    v = align(ins[0], ev.graph.node(node.inputs[0]).axes, node.axes)
    return torch.where(m, v, 0.0).expand(ev.full(node.axes))


@evaluates(ops.Broadcast)
def _broadcast(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    return ev.expand(ins[0], ev.graph.node(node.inputs[0]).axes, node.axes)


@evaluates(ops.Relabel)
def _relabel(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    return ins[0]  # the same tensor, an axis renamed (the canonical order keeps its place)


@evaluates(ops.Rotary)
def _rotary(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    """Rotary embedding as a complex multiplication: (u_2m + i u_2m+1) * exp(i p w_m), with
    ``w_m = base^(-2m/F)`` at token position p (the conjugate when ``inverse``)."""
    axes = node.axes
    token = next(a for a in axes if a in ("i", "j"))
    td, fd = axes.index(token), axes.index(node.attr("feature"))
    t = ins[0]
    v = t.movedim((td, fd), (-2, -1))
    T, F = v.shape[-2], v.shape[-1]
    z = torch.complex(v[..., 0::2], v[..., 1::2])
    w = node.attr("base") ** (-torch.arange(0, F, 2, dtype=torch.float64, device=t.device) / F)
    phase = torch.arange(T, dtype=torch.float64, device=t.device)[:, None] * w[None, :]
    rot = torch.polar(torch.ones_like(phase), -phase if node.attr("inverse") else phase)
    z = z * rot.to(z.dtype)
    out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return out.movedim((-2, -1), (td, fd))


@evaluates(ops.Attention, ops.AttentionLse, ops.AttentionTransposed, ops.AttentionGrad)
def _attention(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    """The fused attention ops from their documented definitions, with einsum over named axes:
    S = s sum_t q_t . k_t (+ m (i - j)), P = softmax of S over C(i); attention o = P v,
    attention_transposed o_j = sum_i P_ij v_i; attention_grad by autograd of the attention's own
    definition here (its o and lse inputs are recomputed)."""
    graph = ev.graph
    attrs = dict(node.attrs)
    slots = ops.attention_slots(node.op, attrs)
    val = {name: ins[pos] for name, pos in slots.items()}
    ax = {name: graph.node(node.inputs[pos]).axes for name, pos in slots.items()}
    letters = ev.letters()

    def spec(*axes_list):
        *ins_, out = ("".join(letters[a] for a in axes) for axes in axes_list)
        return ",".join(ins_) + "->" + out

    heads = tuple(attrs["heads"])
    sa = graph.canonical({"b", "i", "j", *heads})  # scores
    la = tuple(a for a in sa if a != "j")  # log-sum-exp
    in_c = ev.mask(attrs["mask"], sa)

    def weights(val):
        S = sum(torch.einsum(spec(ax[f"q{t}"], ax[f"k{t}"], sa), val[f"q{t}"], val[f"k{t}"])
                for t in range(len(attrs["features"])))
        S = val["s"] * S
        if "m" in val:
            S = S + align(val["m"], ax["m"], sa) * align(ev.offsets(), ("i", "j"), sa)
        lse = masked_logsumexp(S, in_c.expand(S.shape), sa.index("j"))
        return torch.where(in_c, torch.exp(S - align(lse, la, sa)), 0.0), lse

    def attention(val):
        out = graph.canonical({"b", "i", *heads, ops.value_feature(ax["v"], "j", heads)})
        return torch.einsum(spec(sa, ax["v"], out), weights(val)[0], val["v"]), out

    if node.op == "attention_lse":
        return weights(val)[1]
    if node.op == "attention":
        return attention(val)[0]
    if node.op == "attention_transposed":
        return torch.einsum(spec(sa, ax["v"], node.axes), weights(val)[0], val["v"])
    with torch.enable_grad():
        leaves = {name: val[name].clone().requires_grad_(True) for name in val
                  if name not in ("o", "lse", "g")}
        o, out = attention(leaves)
        (grad,) = torch.autograd.grad((o * align(val["g"], ax["g"], out)).sum(),
                                      [leaves[attrs["wrt"]]])
    return grad


@evaluates(PairLse, PairSum)
def _pair(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    """Pair ops from their definitions, with every (i, j) pair formed."""
    graph = ev.graph
    in_axes = [graph.node(x).axes for x in node.inputs]
    heads, features = node.attr("heads"), node.attr("features")
    n = len(features)
    pair = graph.canonical({"b", "i", "j", *heads})
    env: dict = ev.body_env()
    for t, f in enumerate(features):
        full = graph.canonical({"b", "i", "j", *heads, f})
        qk = ev.expand(ins[t], in_axes[t], full) * ev.expand(ins[n + t], in_axes[n + t], full)
        env[u(t).name] = qk.sum(full.index(f))
    env[DIST.name] = align(ev.offsets(), ("i", "j"), pair)
    n_extras = len(ins) - 2 * n - (1 if node.attr("value") else 0)
    for k in range(n_extras):
        env[e(k).name] = align(ins[2 * n + k], in_axes[2 * n + k], pair)
    body = torch.broadcast_to(evaluate_body(node.attr("body"), env, ev.dtype), ev.full(pair))
    mm = ev.mask(node.attr("mask"), pair).expand(body.shape)
    if node.op == "pair_lse":
        return masked_logsumexp(body, mm, pair.index("j"))
    other = "j" if node.attr("token") == "i" else "i"
    a = torch.where(mm, body, 0.0)
    if node.attr("value"):
        full = graph.canonical(set(pair) | set(node.axes))
        a = align(a, pair, full) * align(ins[-1], in_axes[-1], full)
        return a.sum(full.index(other))
    return a.sum(pair.index(other))


@evaluates(RunningSum)
def _running_sum(ev: Evaluation, node: Node, ins: list) -> torch.Tensor:
    """``sum_{j in C(i)} v_j`` (or keys-major) with every pair formed."""
    in_axes = ev.graph.node(node.inputs[0]).axes
    token = node.attr("token")
    other = "j" if token == "i" else "i"
    pair = ev.graph.canonical(set(in_axes) | {token})
    v = ev.expand(ins[0], in_axes, pair)
    return torch.where(ev.mask(node.attr("mask"), pair), v, 0.0).sum(pair.index(other))


_missing = sorted(name for name, op in OPS.items() if op not in EVALUATORS)
if _missing:
    raise ImportError(f"no reference evaluation for op(s) {', '.join(_missing)}")
