"""Canonicalisation: a table of local rewrites, applied bottom-up while rebuilding the graph.

Each rule is ``(name, op, rewrite)``; ``rewrite(graph, node, inputs)`` returns the id of an
equivalent node or ``None`` when the rule does not apply. Rules see their inputs already rewritten.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy

from energyc.ir.graph import Graph, Node
from energyc.ir.ops import ARG_SYMBOLS, contract, pointwise

Rewrite = Callable[[Graph, Node, list[int]], "int | None"]


def _pointwise_normalise(graph: Graph, node: Node, inputs: list[int]) -> int | None:
    # f(c, u) => f[c](u): constants folded into the body; unused and repeated args dropped
    return pointwise(graph, node.attr("body"), inputs, where=node.where)


def _broadcast_into_pointwise(graph: Graph, node: Node, inputs: list[int]) -> int | None:
    # f(broadcast(u), v) => f(u, v)  when the other args already carry the broadcast axes
    changed = False
    new_inputs = list(inputs)
    for k, u in enumerate(inputs):
        un = graph.node(u)
        if un.op != "broadcast":
            continue
        # against the arguments as already rewritten: two broadcasts must not both go
        others = set().union(*(graph.node(v).axes for m, v in enumerate(new_inputs) if m != k))
        if set(un.axes) <= others | set(graph.node(un.inputs[0]).axes):
            new_inputs[k] = un.inputs[0]
            changed = True
    if not changed:
        return None
    return pointwise(graph, node.attr("body"), new_inputs, where=node.where)


def _contract_normalise(graph: Graph, node: Node, inputs: list[int]) -> int | None:
    # contract(c, u) => c * contract(u);  contract(u) => sum(u)
    return contract(graph, inputs, node.axes, where=node.where)


def _relabel_identity(graph: Graph, node: Node, inputs: list[int]) -> int | None:
    # relabel_{i->j}(u) => u  when u has no axis i (constant along tokens)
    (u,) = inputs
    un = graph.node(u)
    if node.attr("src") not in un.axes:
        return u
    # relabel_{j->i}(relabel_{i->j}(u)) => u
    if un.op == "relabel" and un.attr("src") == node.attr("dst") and un.attr("dst") == node.attr(
        "src"
    ):
        return un.inputs[0]
    return None


def _mask_idempotent(graph: Graph, node: Node, inputs: list[int]) -> int | None:
    # mask_C(mask_C(u)) => mask_C(u)
    (u,) = inputs
    un = graph.node(u)
    if un.op == "mask" and un.attr("mask") == node.attr("mask"):
        return u
    return None


def _pointwise_of_mask(graph: Graph, node: Node, inputs: list[int]) -> int | None:
    # f(mask_C(u), c) => mask_C(f(u, c))  when f is linear in the masked arg (so f(0, c) = 0)
    masked = [k for k, u in enumerate(inputs) if graph.node(u).op == "mask"]
    if len(masked) != 1:
        return None
    k = masked[0]
    body = node.attr("body")
    a = ARG_SYMBOLS[k]
    if body.subs(a, 0) != 0 or sympy.diff(body, a, 2) != 0:
        return None
    inner = graph.node(inputs[k])
    if set(node.axes) - set(inner.axes):
        return None  # the other args add axes: keep the mask where it is
    args = list(inputs)
    args[k] = inner.inputs[0]
    moved = pointwise(graph, body, args, where=node.where)
    return graph.add("mask", (moved,), mask=inner.attr("mask"))


#: (name, op, rewrite) — tried in order for each node of that op.
RULES: list[tuple[str, str, Rewrite]] = [
    ("broadcast_into_pointwise", "pointwise", _broadcast_into_pointwise),
    ("pointwise_of_mask", "pointwise", _pointwise_of_mask),
    ("pointwise_normalise", "pointwise", _pointwise_normalise),
    ("contract_normalise", "contract", _contract_normalise),
    ("relabel_identity", "relabel", _relabel_identity),
    ("mask_idempotent", "mask", _mask_idempotent),
]


def canonicalize(graph: Graph) -> Graph:
    """Rebuild ``graph`` applying :data:`RULES` to every node (inputs first)."""

    def first_rule(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        node = graph.node(n)
        inputs = [mapping[u] for u in node.inputs]
        for _name, op, rule in RULES:
            if op == node.op:
                result = rule(new, node, inputs)
                if result is not None:
                    return result
        return None

    return graph.rewritten(first_rule)
