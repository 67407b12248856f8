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
    new = Graph(graph.dims)
    mapping: dict[int, int] = {}
    for n in live:
        node = graph.node(n)
        if node.op != "pointwise" or not shared:
            mapping[n] = new.add_like(node, [mapping[u] for u in node.inputs])
            continue
        body = _concrete(graph, n)
        for sub in shared:
            if body.has(sub):
                body = body.xreplace({sub: _node_symbol(-1 - shared.index(sub))})
        mapping[n] = _build(new, body, mapping, shared, node.where)
    new.outputs = {name: mapping[n] for name, n in graph.outputs.items()}
    return new


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
