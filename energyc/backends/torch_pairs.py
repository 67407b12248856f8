"""Torch printing of the pair ops: one call into the block-sparse kernels of
``energyc.runtime.pairs`` per group of pair sums over the same pairs.

The rules of pair_lse and pair_sum gather a group into one :class:`PairCall` and hand it to the
emitter's ``print_pair_call``: here one runtime call (:func:`print_call`), on the Triton backend
the pair kernels of ``triton_pairs``, which registers the same rules in its table.

Operands are laid out with the token and feature axes last, ``(b, *heads, token, feature)``, extras
as ``(b, *heads, i, j)``, a missing axis as a size-1 axis (``None`` index), so that tiles broadcast.
The pair functions (phi, the weights A) print from SymPy as lambdas over the tiles ``u`` (the
contractions), ``d`` (i - j) and ``e`` (the extras).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from energyc.backends.rules import TORCH
from energyc.backends.spelling import stable_forms
from energyc.backends.torch_printer import TorchPrinter
from energyc.ir.graph import Node
from energyc.ir.pairs import (
    DIST,
    PairForm,
    PairLse,
    PairSum,
    RunningSum,
    e,
    form_of,
    pair_symbols,
    u,
)


def _view(em, nid: int, target: tuple[str, ...]) -> str:
    """Node ``nid`` permuted to the order of ``target`` with ``None`` for the axes it lacks."""
    axes = em.graph.node(nid).axes
    code = em.names[nid]
    if not axes:
        return code
    present = [a for a in target if a in axes]
    perm = [axes.index(a) for a in present]
    if perm != list(range(len(axes))):
        code = f"{code}.permute({', '.join(map(str, perm))})"
    index = [":" if a in axes else "None" for a in target]
    while index and index[-1] == ":":
        index.pop()
    return f"{code}[{', '.join(index)}]" if index else code


def _function(em, bodies: list[sympy.Expr], var: str, several: bool) -> str:
    """Define ``var(u, d, e)``: the bodies on a tile (with ``several``, a tuple of them), their
    common subexpressions computed once (SymPy's cse)."""
    symbols = set().union(*(pair_symbols(b) for b in bodies))
    names = {s.name: ("d" if s == DIST else f"{s.name[5]}[{s.name[6:]}]") for s in symbols}
    names.update({d: d for d in em.graph.dims})
    names.update({"B": "B", "T": "T"})
    # the printer's stable forms first: cse would take sinh(u) and cosh(u) of a ratio apart
    bodies = [stable_forms(b) for b in bodies]
    shared, reduced = sympy.cse(bodies, symbols=sympy.numbered_symbols("_c"), order="none")
    tensors = set(symbols)
    lines = []
    for sym, expr in shared:
        if expr.free_symbols & tensors:
            tensors.add(sym)
        names[sym.name] = sym.name
        lines.append(f"    {sym.name} = {TorchPrinter(names, tensors).doprint(expr)}")
    printed = [TorchPrinter(names, tensors).doprint(b) for b in reduced]
    code = f"({', '.join(printed)},)" if several else printed[0]
    em.lines.append(f"def {var}(u, d, e):")
    em.lines.extend(lines)
    em.lines.append(f"    return {code}")
    return var


@dataclass
class PairCall:
    """One pass over the pairs of ``form`` that a backend prints as one call (or kernels).

    ``softmax``: ``bodies[0]`` is phi, and the call returns ``R_i = log sum_j exp(phi_ij)``
    first, then each output with the weights ``A = bodies[n] exp(phi - R)``; otherwise each
    output is a plain sum of the weights ``A = bodies[n]``. ``outputs`` are ``(token, value,
    n)``: the sum over the other token of the weights of ``bodies[n]``, times ``value`` (a node
    indexed by the other token) or alone (None). ``results`` are the variables to bind, in
    order, with the (node, layout) each holds, the layout being the kernel's
    ``(b, *heads, token[, feature])``."""

    var: str
    form: PairForm
    softmax: bool
    bodies: list[sympy.Expr]
    outputs: list[tuple[str, int | None, int]]
    results: list[tuple[int, tuple[str, ...]]]


def value_view(em, call: PairCall, token: str, v: int | None) -> str:
    """The value of an output summed over ``token``'s partner, laid out (b, *heads, token', F)."""
    if v is None:
        return "None"
    heads = call.form.heads
    return _view(em, v, ("b", *heads, "j" if token == "i" else "i", feature_of(em, v, heads)))


def feature_of(em, v: int, heads: tuple[str, ...]) -> str:
    """The feature axis of a value node (its one axis besides b, the token and the heads)."""
    return next(a for a in em.graph.node(v).axes if a not in ("b", "i", "j", *heads))


def print_call(em, call: PairCall) -> None:
    """The call as one call into ``energyc.runtime.pairs`` (the torch printing of a pair call;
    its pair functions a nested def)."""
    form = call.form
    names = [em.pending[n] for n, _ in call.results]
    q, k, ex = _operands(em, form, form.extras)
    tail = _call_tail(em, form, call.bodies)
    first = 1 if call.softmax else 0  # the runtime numbers the factors g after phi from 0
    outputs = ", ".join(f"({t!r}, {value_view(em, call, t, v)}, {n - first})"
                        for t, v, n in call.outputs)
    if call.softmax and not call.outputs:
        phi = _function(em, call.bodies, f"{call.var}_phi", several=False)
        em.lines.append(f"{names[0]} = _rt.pair_lse({q}, {k}, {ex}, {phi}, {tail})")
    elif call.softmax:
        fn = _function(em, call.bodies, f"{call.var}_phi_g", several=True)
        em.lines.append(f"{', '.join(names)}, = _rt.pair_softmax_sums({q}, {k}, {ex}, {fn}, "
                        f"[{outputs}], {tail})")
    else:
        fn = _function(em, call.bodies, f"{call.var}_w", several=True)
        em.lines.append(f"{', '.join(names)}, = _rt.pair_sums({q}, {k}, {ex}, {fn}, "
                        f"[{outputs}], {tail})")
    bind_results(em, call, names)


def bind_results(em, call: PairCall, names: list[str]) -> None:
    """Each result variable permuted from its kernel layout to its node's axes, and named."""
    for (n, layout), name in zip(call.results, names):
        _back(em, name, layout, em.graph.node(n).axes)
        em.names[n] = name


def _operands(em, form: PairForm, extras: list[int]) -> tuple[str, str, str]:
    heads = form.heads
    q = [_view(em, x, ("b", *heads, "i", f)) for x, f in zip(form.q, form.features)]
    k = [_view(em, x, ("b", *heads, "j", f)) for x, f in zip(form.k, form.features)]
    ex = [_view(em, x, ("b", *heads, "i", "j")) for x in extras]
    return f"[{', '.join(q)}]", f"[{', '.join(k)}]", f"[{', '.join(ex)}]"


def shape_arg(em, form: PairForm) -> str:
    """``(B, *heads)``: the batch and head sizes the pair kernels run over."""
    return f"({', '.join(['B', *(em.size(h) for h in form.heads)])},)"


def _back(em, var: str, layout: tuple[str, ...], axes: tuple[str, ...]) -> None:
    """``var`` (a kernel result in ``layout``) permuted to the node's canonical ``axes``."""
    perm = [layout.index(a) for a in axes]
    if perm != list(range(len(axes))):
        em.lines.append(f"{var} = {var}.permute({', '.join(map(str, perm))})")


def mask_arg(form: PairForm) -> str:
    """The context set as the runtime's argument: its spelling, e.g. ``("window", 4)``."""
    return repr(form.mask.spelling)


def _call_tail(em, form: PairForm, bodies) -> str:
    offset = any(DIST in b.free_symbols for b in bodies)
    return (f"{mask_arg(form)}, T=T, shape={shape_arg(em, form)}, uses_offset={offset}, "
            f"dtype=x.dtype, device=x.device{em.offset_arg()}")


@TORCH(PairLse)
def emit_pair_lse(em, nid: int, node: Node) -> None:
    """``R = pair_lse(...)``: an online log-sum-exp over the context's tiles; with the pair sums
    over the same pairs whose weights are softmax weights times an R-free factor, one pass
    (``_softmax_sums``)."""
    var = em.pending[nid]
    form = form_of(em.graph, node)
    if _softmax_sums(em, nid, node, form, var):
        return None
    em.print_pair_call(PairCall(var, form, True, [node.attr("body")], [],
                                [(nid, ("b", *form.heads, "i"))]))
    return None


def _group_key(node: Node) -> tuple:
    return (node.attr("heads"), node.attr("mask"))


def _ready(em, node: Node, also: int | None = None) -> bool:
    return all(x in em.names or x == also for x in node.inputs)


def _gather(em, group: list[int], union: PairForm) -> list[tuple[sympy.Expr, str, int | None]]:
    """Each pair sum of ``group`` as (its body on the symbols of ``union``, which grows to hold
    their terms and extras; its token; its value node or None)."""
    out = []
    for n in group:
        member = em.graph.node(n)
        mf = form_of(em.graph, member)
        renum = {}
        for t, term in enumerate(zip(mf.q, mf.k, mf.features)):
            terms = list(zip(union.q, union.k, union.features))
            if term not in terms:
                union.q.append(term[0])
                union.k.append(term[1])
                union.features.append(term[2])
                terms.append(term)
            renum[u(t)] = u(terms.index(term))
        for m, x in enumerate(mf.extras):
            if x not in union.extras:
                union.extras.append(x)
            renum[e(m)] = e(union.extras.index(x))
        value = member.inputs[-1] if member.attr("value") else None
        out.append((member.attr("body").xreplace(renum), member.attr("token"), value))
    return out


def _layouts(em, group: list[int], heads: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """Each pair sum of ``group`` with its kernel layout ``(b, *heads, token[, feature])``."""
    out = []
    for n in group:
        member = em.graph.node(n)
        token = member.attr("token")
        feature = [a for a in member.axes if a not in ("b", token, *heads)]
        out.append((n, ("b", *heads, token, *feature)))
    return out


def _softmax_sums(em, nid: int, node: Node, form: PairForm, var: str) -> bool:
    """Emit R with the query-role pair sums (same pairs) whose every weight is
    ``A_ij = g_ij exp(phi_ij - R_i)`` with g free of R, in one pass: the online log-sum-exp
    rescales their accumulators as it goes (``_rt.pair_softmax_sums``), so phi's tiles are made
    once, not once for R and again for the sums. Whether a weight has that form is SymPy's:
    ``powsimp(A exp(R - phi))`` must be free of R. False when no pair sum qualifies."""
    key = _group_key(node)
    cands = [n for n in sorted(em.region) if n not in em.names and n != nid
             and em.graph.node(n).op == "pair_sum" and _group_key(em.graph.node(n)) == key
             and em.graph.node(n).attr("token") == "i" and nid in em.graph.node(n).inputs
             and _ready(em, em.graph.node(n), also=nid)]
    if not cands:
        return False
    union = PairForm(list(form.q), list(form.k), list(form.features), list(form.extras),
                     form.heads, form.mask)
    gathered = _gather(em, cands, union)
    phi = node.attr("body")
    R = e(union.extras.index(nid))
    group, factors = [], []
    for n, (body, _, value) in zip(cands, gathered):
        g = sympy.powsimp(body * sympy.exp(R - phi))
        if R not in g.free_symbols:
            group.append(n)
            factors.append((g, value))
    if not group:
        return False
    # R is what this call makes: drop it from the extras, renumber those after it
    keep = [x for x in union.extras if x != nid]
    renum = {e(union.extras.index(x)): e(m) for m, x in enumerate(keep)}
    union.extras = keep
    phi = phi.xreplace(renum)
    bodies: list[sympy.Expr] = [phi]
    outputs = []
    for g, value in factors:
        g = g.xreplace(renum)
        if g not in bodies[1:]:
            bodies.append(g)
        outputs.append(("i", value, bodies.index(g, 1)))
    em.print_pair_call(PairCall(var, union, True, bodies, outputs,
                                [(nid, ("b", *form.heads, "i")),
                                 *_layouts(em, group, form.heads)]))
    return True


@TORCH(PairSum)
def emit_pair_sum(em, nid: int, node: Node) -> None:
    """Every pair sum over the same pairs (context set, heads) whose inputs are ready: one pass
    over the tiles, each tile's contractions computed once for all of them."""
    key = _group_key(node)
    group = [nid] + [n for n in sorted(em.region) if n != nid and n not in em.names
                     and em.graph.node(n).op == "pair_sum"
                     and _group_key(em.graph.node(n)) == key and _ready(em, em.graph.node(n))]
    var = em.pending[nid]
    heads = node.attr("heads")
    union = PairForm([], [], [], [], heads, node.attr("mask"))
    bodies: list[sympy.Expr] = []
    outputs = []
    for body, token, value in _gather(em, group, union):
        if body not in bodies:
            bodies.append(body)
        outputs.append((token, value, bodies.index(body)))
    em.print_pair_call(PairCall(var, union, False, bodies, outputs, _layouts(em, group, heads)))
    return None


@TORCH(RunningSum)
def emit_running_sum(em, nid: int, node: Node) -> str:
    token = node.attr("token")
    (v,) = node.inputs
    dim = node.axes.index(token)
    return (f"_rt.running_sum({em.names[v]}, dim={dim}, mask={node.attr('mask').spelling!r}, "
            f"keys_major={token == 'j'}{em.offset_arg()}{', T=T' if em.position else ''})")

