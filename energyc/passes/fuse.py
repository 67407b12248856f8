"""Pointwise fusion at graph level.

A pointwise node whose argument is another pointwise node used by nobody else absorbs it:
``f(g(u, v), w) => (f o g)(u, v, w)``. Legal because the inner node's axes are a subset of the outer
node's (a pointwise output broadcasts all its arguments), so evaluating ``g`` inside ``f`` computes
the same values; the inner value is not needed elsewhere, so nothing is recomputed.
"""

from __future__ import annotations

from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS, pointwise


def fuse_pointwise(graph: Graph) -> Graph:
    live = graph.live()
    uses: dict[int, int] = {}
    for n in live:
        for u in graph.node(n).inputs:
            uses[u] = uses.get(u, 0) + 1
    outputs = set(graph.outputs.values())
    new = Graph(graph.dims)
    mapping: dict[int, int] = {}
    # inner bodies absorbed into their single user: old id -> (body, old input ids)
    for n in live:
        node = graph.node(n)
        if node.op != "pointwise":
            mapping[n] = new.add_like(node, [mapping[u] for u in node.inputs])
            continue
        body, args = _expanded(graph, n, uses, outputs)
        mapping[n] = pointwise(new, body, [mapping[u] for u in args], where=node.where)
    new.outputs = {name: mapping[n] for name, n in graph.outputs.items()}
    return new


def _expanded(graph: Graph, n: int, uses: dict[int, int], outputs: set[int]):
    """Body of ``n`` with single-use pointwise arguments inlined, and its leaf arguments."""
    node = graph.node(n)
    body = node.attr("body")
    leaves: list[int] = []
    subs = {}
    for k, u in enumerate(node.inputs):
        un = graph.node(u)
        if un.op == "pointwise" and uses.get(u, 0) == 1 and u not in outputs:
            inner_body, inner_args = _expanded(graph, u, uses, outputs)
            shift = {ARG_SYMBOLS[m]: _Slot(len(leaves) + m) for m in range(len(inner_args))}
            subs[ARG_SYMBOLS[k]] = inner_body.xreplace(shift)
            leaves.extend(inner_args)
        else:
            subs[ARG_SYMBOLS[k]] = _Slot(len(leaves))
            leaves.append(u)
    body = body.xreplace(subs)
    body = body.xreplace({_Slot(m): ARG_SYMBOLS[m] for m in range(len(leaves))})
    return body, leaves


def _Slot(m: int):  # noqa: N802 - a placeholder symbol distinct from ARG_SYMBOLS
    import sympy

    return sympy.Symbol(f"_slot{m}")
