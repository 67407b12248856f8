"""Share element-wise subexpressions across pointwise bodies.

Pointwise fusion inlines single-use values into their user's body, so one expensive
subexpression can end up inside several bodies (the softmax weights ``exp(s - l)`` appear in three
terms of an attention backward). This pass gives each function application (``exp``, ``log``,
``sigmoid``, ...) or fractional power that occurs in two or more pointwise nodes with the same
arguments its own node, computed once:

    f(exp(u - v), a), g(exp(u - v), b)  =>  e = exp(u - v); f(e, a), g(e, b)

Legal because a subexpression of a pointwise body is itself element-wise in its arguments, whose
axes are a subset of the body's, so computing it apart and broadcasting gives the same values.
"""

from __future__ import annotations

import sympy

from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS, pointwise


def _node_symbol(n: int) -> sympy.Symbol:
    return sympy.Symbol(f"_node{n}")


def _concrete(graph: Graph, n: int) -> sympy.Expr:
    """The body of pointwise node ``n`` over symbols naming its input nodes."""
    node = graph.node(n)
    return node.attr("body").xreplace(
        {ARG_SYMBOLS[k]: _node_symbol(u) for k, u in enumerate(node.inputs)}
    )


def _candidates(expr: sympy.Expr) -> list[sympy.Expr]:
    """Function applications and fractional powers in ``expr``, once each, in traversal order."""
    found: list[sympy.Expr] = []
    for sub in sympy.preorder_traversal(expr):
        expensive = isinstance(sub, sympy.Function) or (
            isinstance(sub, sympy.Pow) and not sub.exp.is_Integer
        )
        if expensive and sub.free_symbols and sub not in found:
            found.append(sub)
    return found


def share_subexpressions(graph: Graph) -> Graph:
    live = graph.live()
    counts: dict[sympy.Expr, int] = {}
    for n in live:
        if graph.node(n).op == "pointwise":
            for sub in _candidates(_concrete(graph, n)):
                counts[sub] = counts.get(sub, 0) + 1
    # a total order that does not depend on hashes (they vary with PYTHONHASHSEED): largest first
    shared = sorted((s for s, c in counts.items() if c >= 2),
                    key=lambda s: (-sympy.count_ops(s), sympy.srepr(s)))

    def rule(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        node = graph.node(n)
        if node.op != "pointwise" or not shared:
            return None
        body = _concrete(graph, n)
        for sub in shared:
            if body.has(sub):
                body = body.xreplace({sub: _node_symbol(-1 - shared.index(sub))})
        return _build(new, body, mapping, shared, node.where)

    return graph.rewritten(rule)


def _build(new: Graph, body: sympy.Expr, mapping: dict[int, int], shared: list, where) -> int:
    """Add ``body`` (over node symbols; negative ids stand for shared subexpressions)."""
    symbols = sorted(body.free_symbols, key=lambda s: s.name)
    args = []
    subs = {}
    for sym in symbols:
        if not sym.name.startswith("_node"):
            continue  # a dim size
        n = int(sym.name[len("_node"):])
        if n < 0:
            sub = shared[-1 - n]
            arg = _build(new, sub, mapping, shared, where)
        else:
            arg = mapping[n]
        subs[sym] = ARG_SYMBOLS[len(args)]
        args.append(arg)
    return pointwise(new, body.xreplace(subs), args, where=where)


def _upstream_side(graph: Graph, live: list[int]) -> set[int]:
    """The live nodes that depend on an upstream gradient (an input named ``grad_*``, the seed
    ``differentiate`` adds): the backward's side of a step graph."""
    side: set[int] = set()
    for n in live:
        node = graph.node(n)
        if (node.op == "input" and str(node.attr("name")).startswith("grad_")) or any(
                u in side for u in node.inputs):
            side.add(n)
    return side


def reuse_values(graph: Graph) -> Graph:
    """A pointwise body that computes again, up to a number factor, the body of an earlier
    pointwise node uses that node's value:

        t3 = -(a b);   t7 = -(a b c (1 - a))   =>   t7 = t3 c (1 - a)

    (the backward of a gated unit recomputes the forward's product). Legal: the earlier node is
    element-wise in arguments that the later body also has, so its value broadcasts to the same
    numbers; it precedes in topological order, so no cycle forms. Taken only when the body gets
    cheaper (fewer operations), and never where it would make the backward keep a forward value
    that no backward node used before (memory that recomputation saved)."""
    live = graph.live()
    side = _upstream_side(graph, live)
    used_by_backward = {u for n in side for u in graph.node(n).inputs}
    bodies: dict[int, sympy.Expr] = {}

    def rule(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        node = graph.node(n)
        if node.op != "pointwise":
            return None
        body = _concrete(graph, n)
        best = body, sympy.count_ops(body)
        for m, earlier in bodies.items():
            if m in side and n not in side:
                continue
            if n in side and m not in side and m not in used_by_backward:
                continue
            if not earlier.free_symbols <= body.free_symbols:
                continue
            coeff, rest = earlier.as_coeff_Mul()
            if rest.is_Symbol:
                continue
            tried = best[0].subs(rest, _node_symbol(m) / coeff)
            ops = sympy.count_ops(tried)
            if ops < best[1] and _node_symbol(m) in tried.free_symbols:
                best = tried, ops
        bodies[n] = body
        return None if best[0] is body else _build(new, best[0], mapping, [], node.where)

    return graph.rewritten(rule)
