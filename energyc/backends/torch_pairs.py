"""Torch printing of the pair ops: one call into the block-sparse kernels of
``energyc.runtime.pairs`` per group of pair sums over the same pairs.

Operands are laid out with the token and feature axes last, ``(b, *heads, token, feature)``, extras
as ``(b, *heads, i, j)``, a missing axis as a size-1 axis (``None`` index), so that tiles broadcast.
The pair functions (phi, the weights A) print from SymPy as lambdas over the tiles ``u`` (the
contractions), ``d`` (i - j) and ``e`` (the extras).
"""

from __future__ import annotations

import sympy

from energyc.backends.torch_printer import TorchPrinter
from energyc.ir.graph import Node
from energyc.ir.pairs import DIST, PairForm, e, form_of, pair_symbols, u


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


def _operands(em, form: PairForm, extras: list[int]) -> tuple[str, str, str]:
    heads = form.heads
    q = [_view(em, x, ("b", *heads, "i", f)) for x, f in zip(form.q, form.features)]
    k = [_view(em, x, ("b", *heads, "j", f)) for x, f in zip(form.k, form.features)]
    ex = [_view(em, x, ("b", *heads, "i", "j")) for x in extras]
    return f"[{', '.join(q)}]", f"[{', '.join(k)}]", f"[{', '.join(ex)}]"


def _shape(em, form: PairForm) -> str:
    return f"({', '.join(['B', *(em.size(h) for h in form.heads)])},)"


def _back(em, var: str, layout: tuple[str, ...], axes: tuple[str, ...]) -> None:
    """``var`` (a kernel result in ``layout``) permuted to the node's canonical ``axes``."""
    perm = [layout.index(a) for a in axes]
    if perm != list(range(len(axes))):
        em.lines.append(f"{var} = {var}.permute({', '.join(map(str, perm))})")


def _call_tail(em, form: PairForm, bodies) -> str:
    offset = any(DIST in b.free_symbols for b in bodies)
    kind, w = form.mask[0], (form.mask[1] if form.mask[0] == "window" else 0)
    return (f"({kind!r}, {w}), T=T, shape={_shape(em, form)}, uses_offset={offset}, "
            f"dtype=x.dtype, device=x.device{em.offset_arg()}")


def emit_pair_lse(em, nid: int, node: Node) -> None:
    """``R = pair_lse(...)``: an online log-sum-exp over the context's tiles; with the pair sums
    over the same pairs whose weights are softmax weights times an R-free factor, one pass
    (``_softmax_sums``)."""
    var = em.pending[nid]
    form = form_of(em.graph, node)
    if _softmax_sums(em, nid, node, form, var):
        return None
    phi = _function(em, [node.attr("body")], f"{var}_phi", several=False)
    q, k, ex = _operands(em, form, form.extras)
    tail = _call_tail(em, form, [node.attr("body")])
    em.lines.append(f"{var} = _rt.pair_lse({q}, {k}, {ex}, {phi}, {tail})")
    _back(em, var, ("b", *form.heads, "i"), node.axes)
    em.names[nid] = var
    return None


def _group_key(node: Node) -> tuple:
    return (node.attr("heads"), node.attr("mask"))


def _ready(em, node: Node, also: int | None = None) -> bool:
    return all(x in em.names or x == also for x in node.inputs)


def _gather(em, group: list[int], union: PairForm) -> list[tuple[sympy.Expr, str, str]]:
    """Each pair sum of ``group`` as (its body on the symbols of ``union``, which grows to hold
    their terms and extras; its token; its value's view or "None")."""
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
        token = member.attr("token")
        value = "None"
        if member.attr("value"):
            v = member.inputs[-1]
            feature = next(a for a in member.axes if a not in ("b", token, *union.heads))
            value = _view(em, v, ("b", *union.heads, "j" if token == "i" else "i", feature))
        out.append((member.attr("body").xreplace(renum), token, value))
    return out


def _emit_sums_back(em, group: list[int], names: list[str], heads: tuple[str, ...]) -> None:
    for n, name in zip(group, names):
        member = em.graph.node(n)
        token = member.attr("token")
        feature = [a for a in member.axes if a not in ("b", token, *heads)]
        _back(em, name, ("b", *heads, token, *feature), member.axes)
        em.names[n] = name


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
    bodies: list[sympy.Expr] = []
    outputs = []
    for g, value in factors:
        g = g.xreplace(renum)
        if g not in bodies:
            bodies.append(g)
        outputs.append(f"('i', {value}, {bodies.index(g)})")
    fn = _function(em, [phi, *bodies], f"{var}_phi_g", several=True)  # phi and g share cse
    q, k, ex = _operands(em, union, union.extras)
    names = [em.pending[n] for n in group]
    em.lines.append(f"{var}, {', '.join(names)}, = _rt.pair_softmax_sums({q}, {k}, {ex}, "
                    f"{fn}, [{', '.join(outputs)}], "
                    f"{_call_tail(em, union, [phi, *bodies])})")
    _back(em, var, ("b", *form.heads, "i"), node.axes)
    em.names[nid] = var
    _emit_sums_back(em, group, names, form.heads)
    return True


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
        outputs.append(f"({token!r}, {value}, {bodies.index(body)})")
    fn = _function(em, bodies, f"{var}_w", several=True)
    q, k, ex = _operands(em, union, union.extras)
    names = [em.pending[n] for n in group]
    em.lines.append(f"{', '.join(names)}, = _rt.pair_sums({q}, {k}, {ex}, {fn}, "
                    f"[{', '.join(outputs)}], {_call_tail(em, union, bodies)})")
    _emit_sums_back(em, group, names, heads)
    return None


def emit_running_sum(em, nid: int, node: Node) -> str:
    token = node.attr("token")
    (v,) = node.inputs
    dim = node.axes.index(token)
    kind, w = node.attr("mask")[0], (node.attr("mask")[1] if node.attr("mask")[0] == "window"
                                     else 0)
    return (f"_rt.running_sum({em.names[v]}, dim={dim}, mask=({kind!r}, {w}), "
            f"keys_major={token == 'j'}{em.offset_arg()}{', T=T' if em.position else ''})")


PAIR_EMITTERS = {"pair_lse": emit_pair_lse, "pair_sum": emit_pair_sum,
                 "running_sum": emit_running_sum}
