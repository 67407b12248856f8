"""Reverse-mode differentiation over the op table.

``vjp(graph, out, seed, wrt)`` adds to ``graph`` the nodes computing ``sum(seed * d out / d w)``
for each ``w`` in ``wrt``: a walk in reverse topological order that asks each op's VJP rule
(:mod:`energyc.ir.ops`) for its inputs' contributions and sums them. Applied to the energy it gives
``dE/dx``; applied again to the update graph it gives the layer's backward (second derivatives of E).
"""

from __future__ import annotations

from energyc.ir.graph import Graph
from energyc.ir.ops import OPS, add_all


def vjp(graph: Graph, out: int, seed: int, wrt: list[int],
        prefix: str | None = None) -> dict[int, int | None]:
    """Return ``{w: grad node or None}``; ``None`` where ``out`` does not depend on ``w``.

    With ``prefix``, the gradient of each labelled node is labelled ``prefix + label`` (``dq``
    for dE/dq), unless it is a leaf or has a label already."""
    return vjp_many(graph, [(out, seed)], wrt, prefix)


def vjp_many(graph: Graph, seeded: list[tuple[int, int]], wrt: list[int],
             prefix: str | None = None) -> dict[int, int | None]:
    """:func:`vjp` of several outputs at once: ``sum_k sum(seed_k * d out_k / d w)`` for each
    ``w``, from (out_k, seed_k) pairs (the VJP of a tuple of outputs, e.g. the gradients of an
    energy with respect to each of several states)."""
    region = graph.ancestors([out for out, _ in seeded])
    # nodes on a path from some w to an output
    depends: set[int] = set()
    for n in sorted(region):
        node = graph.node(n)
        if n in wrt or any(u in depends for u in node.inputs):
            depends.add(n)
    contributions: dict[int, list[int]] = {}
    for out, seed in seeded:
        contributions.setdefault(out, []).append(seed)
    grads: dict[int, int] = {}
    for n in sorted(depends, reverse=True):
        terms = contributions.pop(n, None)
        if not terms:
            continue
        g = add_all(graph, terms)
        grads[n] = g
        node = graph.node(n)
        if prefix and node.label and graph.node(g).op not in ("input", "param", "hyper", "const"):
            graph.label(g, prefix + node.label)
        for pos, du in OPS[node.op].vjp(graph, n, node, g):
            u = node.inputs[pos]
            if u in depends:
                contributions.setdefault(u, []).append(du)
    return {w: grads.get(w) for w in wrt}
