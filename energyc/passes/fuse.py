"""Pointwise fusion at graph level.

A pointwise node whose argument is another pointwise node used by nobody else absorbs it:
``f(g(u, v), w) => (f o g)(u, v, w)``. Legal because the inner node's axes are a subset of the outer
node's (a pointwise output broadcasts all its arguments), so evaluating ``g`` inside ``f`` computes
the same values; the inner value is not needed elsewhere, so nothing is recomputed.
"""

from __future__ import annotations

import functools

from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS, pointwise


def fuse_pointwise(graph: Graph) -> Graph:
    live = graph.live()
    uses: dict[int, int] = {}
    for n in live:
        for u in graph.node(n).inputs:
            uses[u] = uses.get(u, 0) + 1
    outputs = set(graph.outputs.values())
    # each pointwise node's body with its single-use pointwise arguments inlined: old id ->
    # (body, old input ids); computed once per node (a chain of n nodes expanded every node's
    # whole chain again: cubic in n, 50 s of compile time for an energy of 300 terms)
    expanded: dict[int, tuple] = {}

    def inlined(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        node = graph.node(n)
        if node.op != "pointwise":
            return None
        body, args = _expanded(graph, n, uses, outputs, expanded)
        return pointwise(new, body, [mapping[u] for u in args], where=node.where)

    return graph.rewritten(inlined)


def _expanded(graph: Graph, n: int, uses: dict[int, int], outputs: set[int],
              memo: dict[int, tuple]):
    """Body of ``n`` with single-use pointwise arguments inlined, and its leaf arguments (looked
    up in, and added to, ``memo``)."""
    if n not in memo:
        memo[n] = _expand(graph, n, uses, outputs, memo)
    return memo[n]


def _expand(graph: Graph, n: int, uses: dict[int, int], outputs: set[int],
            memo: dict[int, tuple]):
    node = graph.node(n)
    body = node.attr("body")
    leaves: list[int] = []
    subs = {}
    for k, u in enumerate(node.inputs):
        un = graph.node(u)
        if un.op == "pointwise" and uses.get(u, 0) == 1 and u not in outputs:
            inner_body, inner_args = _expanded(graph, u, uses, outputs, memo)
            shift = {ARG_SYMBOLS[m]: _Slot(len(leaves) + m) for m in range(len(inner_args))}
            subs[ARG_SYMBOLS[k]] = inner_body.xreplace(shift)
            leaves.extend(inner_args)
        else:
            subs[ARG_SYMBOLS[k]] = _Slot(len(leaves))
            leaves.append(u)
    body = body.xreplace(subs)
    body = body.xreplace({_Slot(m): ARG_SYMBOLS[m] for m in range(len(leaves))})
    return body, leaves


@functools.cache
def _Slot(m: int):  # noqa: N802 - a placeholder symbol distinct from ARG_SYMBOLS
    import sympy

    return sympy.Symbol(f"_slot{m}")


def fuse_reductions(graph: Graph) -> Graph:
    """Join element-wise work before and after a reduction into one ``fused_reduce`` node.

    Prologue: ``reduce(p)`` where ``p`` is a pointwise node used by nobody else becomes
    ``fused_reduce(pre=body(p))`` over p's arguments (the body is evaluated inside the reduction,
    never stored). Epilogue: a pointwise node ``q(r, b...)`` whose argument ``r`` is a reduction used
    by nobody else, with every other argument no wider than ``r``, absorbs ``r``:
    ``fused_reduce(pre, post=q)``. Legal because each reduced value is consumed once, so nothing is
    recomputed, and the epilogue is element-wise over the reduction's own output axes.
    """
    live = graph.live()
    uses: dict[int, int] = {}
    for n in live:
        for u in graph.node(n).inputs:
            uses[u] = uses.get(u, 0) + 1
    outputs = set(graph.outputs.values())

    def private(u: int) -> bool:
        return uses.get(u, 0) == 1 and u not in outputs

    fused: dict[int, tuple] = {}  # old reduce id -> (pre body, old pre args, attrs)

    def rule(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        node = graph.node(n)
        if node.op == "reduce":
            (u,) = node.inputs
            un = graph.node(u)
            if un.op == "pointwise" and private(u):
                pre, args = un.attr("body"), list(un.inputs)
            else:
                pre, args = ARG_SYMBOLS[0], [u]
            attrs = dict(kind=node.attr("kind"), axes=node.attr("axes"), mask=node.attr("mask"))
            fused[n] = (pre, args, attrs)
            return _fused(new, mapping, pre, args, ARG_SYMBOLS[0], [], attrs, node.where)
        if node.op == "pointwise":
            reds = [k for k, u in enumerate(node.inputs) if u in fused and private(u)
                    and graph.node(u).axes == node.axes]
            if len(reds) == 1:
                k = reds[0]
                pre, args, attrs = fused[node.inputs[k]]
                rest = [u for m, u in enumerate(node.inputs) if m != k]
                order = [k] + [m for m in range(len(node.inputs)) if m != k]
                post = node.attr("body").xreplace(
                    {ARG_SYMBOLS[m]: _Slot(pos) for pos, m in enumerate(order)})
                post = post.xreplace({_Slot(m): ARG_SYMBOLS[m] for m in range(len(order))})
                return _fused(new, mapping, pre, args, post, rest, attrs, node.where)
        return None

    return graph.rewritten(rule)


def _fused(new: Graph, mapping, pre, args, post, post_args, attrs, where) -> int:
    """A plain ``reduce`` when there is nothing to fuse, else a ``fused_reduce``."""
    pre_args = [mapping[u] for u in args]
    rest = [mapping[u] for u in post_args]
    if pre == ARG_SYMBOLS[0] and post == ARG_SYMBOLS[0] and not rest:
        return new.add("reduce", tuple(pre_args), where=where, **attrs)
    return new.add("fused_reduce", tuple(pre_args + rest), where=where, pre=pre, post=post,
                   n_pre=len(pre_args), **attrs)
